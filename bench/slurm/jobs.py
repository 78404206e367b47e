"""Job states from Slurm's accounting, and the job records kept in grid.json."""


from __future__ import annotations

import contextlib
import getpass
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.slurm.options import JOBS_KEY, _now
from bench.store import read_json, read_summary
from ddnet.errors import UserError

# ------------------------------------------------------------------ job states

# Slurm job states (sacct / squeue long names) -> what the harness needs to know
_STATES = {
    "queued": ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "CONFIGURING",
               "POWER_UP_NODE"),
    "running": ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"),
    "finished": ("COMPLETED",),
    "failed": ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"),
    "cancelled": ("CANCELLED", "PREEMPTED", "REVOKED"),
}
_STATE_OF = {raw: mine for mine, raws in _STATES.items() for raw in raws}
STATES = (*_STATES, "unknown")
"""What `job_states` reports: queued, running, finished, failed, cancelled, unknown."""

# Slurm's word -> why the job ended so and what to do (the coarse state alone reads as the cell's own failure)
_WHY = {
    "TIMEOUT": "the job hit --slurm-time; raise it, the cell resumes from its last epoch",
    "OUT_OF_MEMORY": "the job hit its memory limit; raise --slurm-mem-gb (or lower --batch-size)",
    "NODE_FAIL": "its node was lost, not the cell's doing; resubmitted (--retry-failed if the cell recorded a "
                 "failure), it resumes from its last epoch",
    "BOOT_FAIL": "its node failed to boot, not the cell's doing; resubmitted, it resumes from its last epoch",
    "DEADLINE": "the job passed its --deadline (from --slurm-extra)",
}
_PLAIN = ("", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")  # the coarse state says it all


class JobState(str):
    """One of `STATES` ('failed'), which it equals, hashes and is stored as: the logic reads only that. `slurm`
    keeps Slurm's own word ('TIMEOUT', 'PREEMPTED') for what is printed (`state_text`, `state_label`)."""

    slurm: str

    def __new__(cls, coarse: str, slurm: str = "") -> JobState:
        self = super().__new__(cls, coarse)
        self.slurm = slurm
        return self


def slurm_state(raw: str) -> JobState:
    """A Slurm state ('PENDING', 'CANCELLED by 1234', 'OUT_OF_MEMORY') as one of `STATES`, Slurm's word kept."""
    word = raw.strip().split(" ")[0].rstrip("+").upper() if raw.strip() else ""
    return JobState(_STATE_OF.get(word, "unknown"), word)


def state_text(state: str) -> str:
    """A job state as printed: 'failed', 'failed (Slurm TIMEOUT: the job hit --slurm-time; raise it, ...)',
    'preempted (resumable)' (a PREEMPTED job is 'cancelled' to the logic, but nobody cancelled it), 'queued (Slurm
    REQUEUE_HOLD)'. A plain string (no Slurm word) is printed as it is."""
    word = _news(state)
    if word == "PREEMPTED":
        return "preempted (resumable)"
    if not word:
        return str(state)
    return f"{state} (Slurm {word}: {_WHY[word]})" if word in _WHY else f"{state} (Slurm {word})"


def state_label(state: str) -> str:
    """`state_text` in a word or two, for a table's job column: 'failed', 'failed: TIMEOUT', 'preempted'."""
    word = _news(state)
    return "preempted" if word == "PREEMPTED" else f"{state}: {word}" if word else str(state)


def _news(state: str) -> str:
    """Slurm's own word where it says more than the coarse state ('TIMEOUT', 'PREEMPTED'), else ''."""
    word = getattr(state, "slurm", "")
    return "" if word in _PLAIN or str(state) == "unknown" else word


def _expand(job_id: str) -> list[str]:
    """'4242_[3-5,7%2]' -> ['4242_3', '4242_4', '4242_5', '4242_7']; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if m is None:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (hi.isdigit() or not hi):
            out += [f"{m.group(1)}_{k}" for k in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str], timeout_s: float) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _parse(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        jid, _, raw = line.strip().partition("|")
        if not jid or "." in jid:  # job steps (4242_3.batch) are not the job
            continue
        for one in _expand(jid):
            found[one] = raw
    return found


def job_states(job_ids: Sequence[str], timeout_s: float = 30.0) -> dict[str, str]:
    """{job id: queued | running | finished | failed | cancelled | unknown} for the given Slurm job ids, each a
    `JobState` that keeps Slurm's own word ('TIMEOUT') for `state_text`.

    Live jobs come from squeue (authoritative and immediate), ended ones from sacct (when accounting
    is enabled). A job neither lists is 'unknown'. Without Slurm (no squeue or sacct on PATH, or both
    failing: the controller down, a timeout) this returns {} and raises nothing.
    """
    wanted = list(dict.fromkeys(str(j) for j in job_ids))
    squeue, sacct = shutil.which("squeue"), shutil.which("sacct")
    if not wanted or (squeue is None and sacct is None):
        return {}
    raw: dict[str, str] = {}
    answered = False  # a job neither lists is 'unknown' only when one of them answered
    if squeue is not None:

        # this user's live jobs, arrays expanded (-j with an id Slurm forgot is an error for squeue)
        cmd = [squeue, "--noheader", "--array", "--format=%i|%T"]
        with contextlib.suppress(Exception):  # no user name: list everyone's, the filter below still holds
            cmd += ["--user", getpass.getuser()]
        text = _run(cmd, timeout_s)
        answered = text is not None
        raw.update({k: v for k, v in _parse(text or "").items() if k in wanted})
    rest = [j for j in wanted if j not in raw]
    if rest and sacct is not None:
        mains = sorted({j.split("_")[0] for j in rest})
        text = _run([sacct, "--noheader", "--parsable2", "--allocations", "--format=JobID,State",
                     "--jobs=" + ",".join(mains)], timeout_s)
        answered = answered or text is not None
        raw.update({k: v for k, v in _parse(text or "").items() if k in rest})
    if not answered and not raw:  # the controller down, a timeout: not asked, rather than every job gone
        return {}
    return {j: slurm_state(raw[j]) if j in raw else "unknown" for j in wanted}


# ------------------------------------------------------------------ bookkeeping in grid.json


def record_jobs(grid_json: Mapping[str, Any], folder_to_job: Mapping[str, str],
                submitted_at: str | None = None) -> dict[str, Any]:
    """A copy of `grid_json` with one job record appended per cell under "jobs" (latest last).

    Each record is {"executor": "slurm", "job_id": ..., "submitted_at": ISO time}; earlier submissions
    of a cell are kept (a requeue keeps its id, a resubmission adds a record).
    """
    stamp = submitted_at or _now()
    old = grid_json.get(JOBS_KEY)
    jobs = {k: list(v) for k, v in old.items() if isinstance(v, list)} if isinstance(old, Mapping) else {}
    for folder, job_id in folder_to_job.items():
        record = {"executor": "slurm", "job_id": str(job_id), "submitted_at": stamp}
        jobs.setdefault(str(folder), []).append(record)
    return {**grid_json, JOBS_KEY: jobs}


def latest_job_records(grid_json: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{cell folder: its latest job record} from a grid.json dict (malformed entries are ignored)."""
    jobs = grid_json.get(JOBS_KEY) if isinstance(grid_json, Mapping) else None
    out: dict[str, dict[str, Any]] = {}
    if isinstance(jobs, Mapping):
        for folder, records in jobs.items():
            if not isinstance(records, list):
                continue
            good = [r for r in records if isinstance(r, Mapping) and r.get("job_id")]
            if good:
                out[str(folder)] = dict(good[-1])
    return out


def latest_jobs(grid_json: Mapping[str, Any]) -> dict[str, str]:
    """{cell folder: latest job id} from a grid.json dict."""
    return {f: str(r["job_id"]) for f, r in latest_job_records(grid_json).items()}


def _age_s(stamp: Any, now: float) -> float | None:
    try:
        return now - datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def submission_decisions(
    statuses: Mapping[str, str | None],
    grid_json: Mapping[str, Any],
    states: Mapping[str, str],
    retry_failed: bool = False,
    unknown_grace_s: float = 300.0,
    now: float | None = None,
) -> dict[str, tuple[bool, str]]:
    """{cell folder: (submit?, why)} for each cell in `statuses` (folder -> summary.json status or None).

    Never submits a finished or skipped cell, nor one whose latest job is queued or running. Submits a
    cell never submitted, or whose job died (failed, cancelled, preempted and not requeued by Slurm, ended without
    an 'ok' summary, or
    unknown to Slurm for longer than `unknown_grace_s`: accounting can lag a fresh submission). A cell
    whose summary says 'failed' is submitted again only with `retry_failed` (as the local runner).
    """
    now = time.time() if now is None else now
    records = latest_job_records(grid_json)
    out: dict[str, tuple[bool, str]] = {}
    for folder, status in statuses.items():
        rec = records.get(folder)
        job = str(rec["job_id"]) if rec else None
        state = states.get(job, "unknown") if job else None
        if status == "ok":
            out[folder] = (False, "finished")
        elif status == "skipped":
            out[folder] = (False, "skipped")
        elif state in ("queued", "running"):
            out[folder] = (False, f"job {job} {state_text(state)}")
        elif status == "failed":
            out[folder] = (retry_failed, f"failed (job {job} {state_text(state)})" if state else "failed")
        elif job is None:
            out[folder] = (True, "not submitted yet")
        elif state == "unknown":
            age = _age_s(rec.get("submitted_at"), now) if rec else None
            if age is not None and age < unknown_grace_s:
                out[folder] = (False, f"job {job} submitted {age:.0f} s ago, not listed by Slurm yet")
            else:
                out[folder] = (True, f"job {job} unknown to Slurm and the cell is unfinished")
        else:  # failed, cancelled or preempted, or finished without finishing the cell
            out[folder] = (True, f"job {job} {state_text(state)} and the cell is unfinished")
    return out


def pending_cells(decisions: Mapping[str, tuple[bool, str]]) -> list[str]:
    """The cell folders to submit now, in the order of `submission_decisions`' answer."""
    return [folder for folder, (go, _) in decisions.items() if go]


def refuse_live_jobs(out: Path, states: Callable[[list[str]], dict[str, str]] = job_states) -> None:
    """For the local runner: refuse a grid folder whose unfinished cells have Slurm jobs queued or running.

    Those jobs would run the same cells at the same time on their nodes; the cell lock (an flock) does not hold
    across nodes on every shared filesystem. Without Slurm here, or without recorded jobs, nothing is refused."""
    try:
        record = read_json(Path(out) / "grid.json")
    except (OSError, ValueError):  # none yet, or damaged: the runner says so itself
        return
    jobs = {f: j for f, j in latest_jobs(record).items() if (read_summary(Path(out) / f) or {}).get("status") != "ok"}
    if not jobs:
        return
    answer = states(list(jobs.values()))
    live = [f"{j} ({answer[j]})" for j in jobs.values() if answer.get(j) in ("queued", "running")]
    if live:
        raise UserError(f"{out} has {len(live)} cell(s) whose Slurm job(s) {', '.join(live[:4])}"
                        f"{' ...' if len(live) > 4 else ''} would run them at the same time as this run; wait for them "
                        f"(`bench status {out}`), `scancel` them, or continue with --executor slurm.")
