"""The synthetic data a grid's plan still has to make, and how long that takes (`data_to_make`).

Part of the plan's estimates (`bench.estimate`): the splits that the cells still to run need and the
synthetic cache (`ddnet.data.cache`) lacks are generated once per grid, by the first cell that needs them.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

from bench.planning import PlannedCell
from bench.status import format_duration
from bench.store import read_json
from ddnet.data import split_seed
from ddnet.data.cache import cache_enabled, cache_root, list_entries, split_key
from ddnet.data.synthetic import SECONDS_PER_512_SLICE, pool_workers


def data_to_make(planned: list[PlannedCell], states: dict[str, str]) -> tuple[float, str]:
    """(seconds, note): generating the synthetic splits that the cells to run (`states[folder] == 'to run'`)
    need and the cache lacks; once per grid, by the first cell that needs them.

    Scaled by slices x pixels from the closest split generated on this host (its cache entry's
    `generate_s`), else from the generator's nominal cost (`SECONDS_PER_512_SLICE`, spread over
    the worker processes it would start).
    """
    splits: dict[str, tuple[int, int, str]] = {}
    for p in planned:
        d = p.config.data
        if states.get(p.folder) != "to run" or d.source != "synthetic":
            continue
        for split, n in (("train", d.n_train), ("val", d.n_val)):
            key = split_key(n, d.image_size, split_seed(d.data_seed, split), d.synth_mode, d.dose, d.phantom)
            splits[key] = (n, d.image_size, d.synth_mode)
    if not splits:
        return 0.0, ""
    if not cache_enabled():
        return 0.0, "data: the synthetic cache is off, so every cell makes its own slices (in its start-up time)"
    root = cache_root()
    missing = {k: v for k, v in splits.items() if not (root / k / "meta.json").exists()}
    if not missing:
        return 0.0, f"data: all {len(splits)} synthetic split(s) are cached in {root}"
    made = _generated_here()
    total, how = 0.0, set()
    for n, size, mode in missing.values():
        same = [(gn, gs, t) for gn, gs, gm, t in made if gm == mode]
        if same:
            gn, gs, t = min(same, key=lambda e: abs(math.log((n * size * size) / (e[0] * e[1] * e[1]))))
            total += t * (n * size * size) / (gn * gs * gs)
            how.add("scaled from a split generated on this host")
        else:
            total += n * SECONDS_PER_512_SLICE.get(mode, 0.12) * (size / 512) ** 2 / pool_workers(n, size, mode)
            how.add(f"nominal {SECONDS_PER_512_SLICE.get(mode, 0.12)} s per 512 px slice per core")
    what = " + ".join(f"{n} x {size} px" for n, size, _ in missing.values())
    return total, (f"data: {len(missing)} synthetic split(s) to generate once ({what} slices), "
                   f"~{format_duration(total)} ({'; '.join(sorted(how))})")


def _generated_here() -> list[tuple[int, int, str, float]]:
    """(slices, side, mode, generate_s) of the cache entries generated on this host."""
    host, found = socket.gethostname(), []
    for e in list_entries():
        try:
            meta = read_json(Path(e["path"]) / "meta.json")
        except (OSError, ValueError):
            continue
        st = meta.get("settings") if isinstance(meta, dict) else None
        if isinstance(st, dict) and meta.get("host") == host and isinstance(meta.get("generate_s"), int | float) and st.get("n"):
            found.append((int(st["n"]), int(st["size"]), str(st.get("mode")), float(meta["generate_s"])))
    return found
