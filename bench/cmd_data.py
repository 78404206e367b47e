"""`bench data synth`: write a synthetic low-dose CT dataset in the real-data layout.

The folder it writes is what `--data DIR` reads::

    DIR/train/HQ/synth_000000.tif   DIR/train/LQ/synth_000000.tif   ...
    DIR/val/{HQ,LQ}/...             DIR/test/{HQ,LQ}/...
    DIR/synth.json                  how it was made (generator settings, counts, PSNR)

Slices are float32 TIFFs (or .npy) in HU. Each split is seeded like the
in-memory generator (`ddnet.data.split_seed(seed, split)`), so the train split
of `bench data synth --seed S` holds the same slices as `--data synthetic`
with `data_seed=S` and the same size, mode, dose and phantom. The dataset is
written into a hidden temporary folder beside DIR and renamed at the end, so
an interrupted run leaves no half-written dataset; DIR must be new or empty.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bench import signals
from ddnet.data import split_seed
from ddnet.data.cache import CACHE_ENV, cache_enabled, cache_root, clear, list_entries
from ddnet.data.readers import check_shape
from ddnet.data.synthetic import MODES, PHANTOMS, generate, generation_pool, pool_workers
from ddnet.errors import UserError, make_folder

data_app = typer.Typer(
    help="Datasets: `synth` writes a synthetic dataset that --data DIR reads; `cache` lists or clears made data.",
    no_args_is_help=True,
)

FORMATS = ("tif", "npy")
CHUNK = 8  # slices per worker and call: bounds memory at 512 px and keeps the bar moving
PSNR_WINDOW_HU = (-1024.0, 1024.0)


def split_counts(n: int, val_frac: float, test_frac: float) -> dict[str, int]:
    """Slices per split: val and test get round(n * frac) (at least 1 when frac > 0), train the rest.

    val must not be empty (training reads it); test may be (`--test-frac 0` writes no test/ folder).
    """
    for flag, frac in (("--val-frac", val_frac), ("--test-frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise UserError(f"{flag} {frac} must be in [0, 1).")
    if val_frac == 0:  # `bench train --data DIR` validates on DIR/val/ after every epoch
        raise UserError("--val-frac 0 leaves the dataset without a val split, which `bench train --data DIR` "
                        "reads; set --val-frac above 0 (e.g. 0.1).")
    counts = {
        split: (max(1, round(n * frac)) if frac > 0 else 0)
        for split, frac in (("val", val_frac), ("test", test_frac))
    }
    n_train = n - counts["val"] - counts["test"]
    if n_train < 1:
        raise UserError(
            f"--n {n} leaves no training slice after {counts['val']} val and {counts['test']} test slices; "
            "raise --n or lower --val-frac/--test-frac."
        )
    return {"train": n_train, **counts}


def _psnr_db(lq: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each LQ slice against its HQ slice, both windowed to PSNR_WINDOW_HU -> [0, 1]."""
    lo, hi = PSNR_WINDOW_HU
    a = np.clip((lq - lo) / (hi - lo), 0, 1)
    b = np.clip((hq - lo) / (hi - lo), 0, 1)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def _write(path: Path, hu: np.ndarray, fmt: str) -> None:
    if fmt == "tif":
        tifffile.imwrite(path.with_suffix(".tif"), hu.astype(np.float32), metadata=None)
    else:
        np.save(path.with_suffix(".npy"), hu.astype(np.float32))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a new folder.")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new folder (earlier data is never overwritten).")


@data_app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", help="New (or empty) folder to write {train,val,test}/{HQ,LQ}/ into."),
    n: int = typer.Option(64, "--n", help="Total slice pairs, split into train/val/test."),
    size: int = typer.Option(512, "--size", help="Side of the square slices in px (divisible by 16)."),
    mode: str = typer.Option("physics", "--mode", help="physics (projection, Poisson noise, FBP) | fast (image-domain noise)."),
    dose: float = typer.Option(0.25, "--dose", help="Dose fraction of the low-dose scan (0.25 = quarter dose)."),
    phantom: str = typer.Option("chest", "--phantom", help="chest | shepp-logan | ellipses."),
    seed: int = typer.Option(1234, "--seed", help="Generator seed (same seed, same slices)."),
    fmt: str = typer.Option("tif", "--format", help="tif (float32 HU) | npy (float32 HU)."),
    val_frac: float = typer.Option(0.1, "--val-frac", help="Fraction of slices for validation."),
    test_frac: float = typer.Option(0.1, "--test-frac", help="Fraction of slices for testing."),
) -> None:
    """Write a seeded synthetic low-dose/normal-dose CT dataset in the layout --data DIR reads."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}.")
    if phantom not in PHANTOMS:
        raise UserError(f"--phantom {phantom!r} is not one of {', '.join(PHANTOMS)}.")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if not 0.0 < dose <= 1.0:
        raise UserError(f"--dose {dose} must be in (0, 1] (0.25 = quarter dose).")
    if seed < 0:
        raise UserError(f"--seed {seed} must be non-negative.")
    if size < 16 or size % 16:  # the options' own words: check_shape's speak of files (crop, pad, --image-size)
        raise UserError(f"--size {size} must be divisible by 16 (four 2x poolings) and at least 16, e.g. --size "
                        f"{max(16, size // 16 * 16)}.")
    check_shape(size, size, f"--size {size}")
    counts = split_counts(n, val_frac, test_frac)
    _check_out(out)
    make_folder(out.parent, "pass an --out folder in a writable place.")

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    psnr: list[float] = []
    try:
        columns = (TextColumn("synthesising {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        workers = pool_workers(n, size, mode)
        chunk = CHUNK * workers
        with (signals.sigterm_unwinds(), Progress(*columns, console=Console(stderr=True)) as bar,
              generation_pool(workers) as pool):
            task = bar.add_task(f"{mode} {phantom} {size}x{size}", total=n)
            for split, count in counts.items():
                if count == 0:
                    continue
                for kind in ("HQ", "LQ"):
                    (tmp / split / kind).mkdir(parents=True)
                s_seed = split_seed(seed, split)
                for first in range(0, count, chunk):
                    k = min(chunk, count - first)
                    lq, hq = generate(k, size, s_seed, mode, dose, phantom, first=first,  # type: ignore[arg-type]
                                      pool=pool)
                    for j in range(k):
                        name = f"synth_{first + j:06d}"
                        _write(tmp / split / "HQ" / name, hq[j], fmt)
                        _write(tmp / split / "LQ" / name, lq[j], fmt)
                    psnr.extend(_psnr_db(lq, hq).tolist())
                    bar.advance(task, k)
        mean_psnr = float(np.mean(psnr))
        info = {
            "generator": "ddnet.data.synthetic", "mode": mode, "phantom": phantom, "dose": dose, "seed": seed,
            "size_px": size, "format": fmt, "units": "HU", "counts": counts,
            "psnr_lq_vs_hq_db_mean": mean_psnr, "psnr_lq_vs_hq_db_std": float(np.std(psnr)),
            "psnr_window_hu": list(PSNR_WINDOW_HU),
        }
        (tmp / "synth.json").write_text(json.dumps(info, indent=2) + "\n")
        _check_out(out)  # someone may have written there meanwhile: still never overwrite
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except KeyboardInterrupt as e:  # typer would turn it into exit status 130 silently
        shutil.rmtree(tmp, ignore_errors=True)
        how = signals.stopped_how(e)
        typer.echo(f"{how}: nothing was written to {out} (the partial dataset was removed); run the same "
                   "command again to make it.", err=True)
        signals.end_like(e)
        raise typer.Exit(130) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    typer.echo(
        f"wrote {counts['train']}/{counts['val']}/{counts['test']} train/val/test slice pairs of {size}x{size} "
        f"({mode}, {phantom}, dose {dose:g}, {fmt}) to {out}; LQ vs HQ PSNR {mean_psnr:.2f} dB mean "
        f"(window {PSNR_WINDOW_HU[0]:g}..{PSNR_WINDOW_HU[1]:g} HU)"
    )


cache_app = typer.Typer(no_args_is_help=True,
                        help="The synthetic-data cache: splits made once, read by every later run "
                             "($DDNET_BENCH_CACHE sets the folder; 'off' stops runs from using it, and then "
                             "`list` and `clear` act on the default folder).")
data_app.add_typer(cache_app, name="cache")


def _off_note() -> str:
    """What `list` and `clear` say when runs do not use the folder they act on."""
    return "" if cache_enabled() else f" (the default folder: {CACHE_ENV}=off only stops runs from using it)"


@cache_app.command("list")
def cache_list_cmd() -> None:
    """Every cached synthetic split: key, settings, size, when made and last used."""
    entries = list_entries()
    table = Table(title=f"synthetic-data cache: {cache_root()}{_off_note()}")
    for col in ("key", "slices", "size px", "mode", "dose", "phantom", "seed", "MB", "created", "last used"):
        table.add_column(col)
    for e in entries:
        st = e.get("settings") or {}
        table.add_row(str(e["key"])[:12], str(st.get("n", "?")), str(st.get("size", "?")), str(st.get("mode", "?")),
                      str(st.get("dose", "?")), str(st.get("phantom", "?")), str(st.get("seed", "?")),
                      f"{e['bytes'] / 1e6:.1f}", str(e.get("created", ""))[:19], str(e.get("last_used", ""))[:19])
    console = Console()
    console.print(table)
    console.print(f"{len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB")


@cache_app.command("clear")
def cache_clear_cmd(
    keys: list[str] = typer.Argument(None, help="Keys or key prefixes to remove, as `bench data cache list` shows "
                                                "them (default: everything)."),
) -> None:
    """Remove cached splits (all, or the given keys); later runs make them again."""
    if keys and not all(k.strip() for k in keys):  # '' starts every key: it would remove everything
        raise UserError("an empty KEY names no entry (it would match every one); nothing was removed. Pass a key "
                        "as `bench data cache list` shows it, or run `bench data cache clear` without a KEY to "
                        "remove every entry.")
    if keys:  # every key must name an entry before any is removed: a typo removes nothing, and says so
        known = [str(e["key"]) for e in list_entries()]
        unknown = [k for k in keys if not any(key.startswith(k) for key in known)]
        if unknown:
            shown = ", ".join(k[:12] for k in known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
            have = f"its keys: {shown}; `bench data cache list` shows each entry" if known else "it has no entries"
            raise UserError(f"no entry of the synthetic-data cache {cache_root()}{_off_note()} has the key "
                            f"{unknown[0]!r}; nothing was removed ({have}).")
    freed = clear(keys or None)
    typer.echo(f"freed {freed / 1e6:.1f} MB from {cache_root()}{_off_note()}")
