"""Measurement collectors: time, data movement, memory and the environment, one module each.

    timing.py       TimeCollector: epoch wall time with a device sync, raw per-step times
    memory.py       MemoryCollector (a context manager): NVML, allocator and RSS peaks
    copies.py       profile_copies: HtoD, DtoH, DtoD, memset in a dedicated profiled window
    env.py          environment(), precision_flags(), git_state(): what a run ran on (env.json)

Each collector returns flat dicts with the unit in every key (`time_s`,
`copies_HtoD_bytes`, `mem_rss_peak_gib`) so the trainer can merge them into one
epoch row. The rules they implement (DESIGN.md, "Measurement rules"):

- time with a device sync or CUDA events, keep the raw per-step values, mark
  warm-up epochs;
- profile copies (HtoD, DtoH, DtoD, memset) in a dedicated profiled window,
  never inside the timed epochs (`profile_copies`);
- memory from NVML (device and this process) and the torch allocator peaks on
  a GPU, the process's peak RSS everywhere, each figure named for what it is;
- the environment (GPU, driver, CUDA, cuDNN, torch, git commit, every precision
  flag) with a fingerprint so a report never mixes machines in one ratio.

Nothing here changes a torch flag: the collectors only read. The trainer
(`ddnet.trainer`) imports them from here: `from bench.collectors import TimeCollector`.
"""

from bench.collectors.copies import CPU_COPY_KINDS, GPU_COPY_KINDS, profile_copies
from bench.collectors.env import environment, git_state, precision_flags
from bench.collectors.memory import GIB, MemoryCollector
from bench.collectors.timing import TimeCollector

__all__ = [
    "CPU_COPY_KINDS",
    "GIB",
    "GPU_COPY_KINDS",
    "MemoryCollector",
    "TimeCollector",
    "environment",
    "git_state",
    "precision_flags",
    "profile_copies",
]
