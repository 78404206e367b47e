"""`bench eval`: the quality of any DDNet checkpoint on a dataset split.

Runs the network under eval() and no_grad() over the validation (or test) split,
with the normalisation the checkpoint was trained with, and scores both the
low-dose input and the network output against the high-dose target per slice:
MS-SSIM (percent), PSNR (dB, data range 1.0) and RMSE (HU). The metrics are the
trainer's own (`ddnet.loss`, same MS-SSIM setting for the image side), so a
checkpoint evaluated on its validation set reproduces the val_ms_ssim that
training recorded for that epoch. The network and the metrics run in true
fp32 (TF32 off), and `eval.json` records the flags.

Writes into --out (default `eval-<split>/` beside the checkpoint; never over an
earlier evaluation): `slices.csv` (one row per slice), `eval.json` (means, stds,
checkpoint and data description) and `strip.png` (input, output, target,
|output - target| for a few slices).
"""

from __future__ import annotations

import csv
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from bench import signals
from bench.store import read_json, read_summary, write_json
from ddnet.config import DataConfig, resolve_device, warn_synthetic_only
from ddnet.convert import load_model_weights
from ddnet.data import load_split
from ddnet.errors import UserError, make_folder
from ddnet.loss import choose_msssim, slice_metrics
from ddnet.precision import set_fp32_precision

SPLITS = ("val", "test")
NORMALISATIONS = ("auto", "window", "minmax")
METRICS = (("ms_ssim_pct", "MS-SSIM (%)"), ("ms_ssim_paper_code_pct", "MS-SSIM, paper's code (%)"),
           ("psnr_db", "PSNR (dB)"), ("rmse_hu", "RMSE (HU)"))
"""Per-slice metrics (the paper code's MS-SSIM only for sides >= 32 px, where it is defined)."""
STRIP_SLICES = 4


# ---------------------------------------------------------------------------- configuration
def _train_data_config(info: dict[str, Any]) -> DataConfig | None:
    """The data config the checkpoint was trained with: its 'config' entry or config.json beside it."""
    cfg = info.get("train_config")
    if cfg is None:
        beside = Path(info["path"]).parent / "config.json"
        if beside.is_file():
            try:
                cfg = read_json(beside)
            except ValueError:
                cfg = None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict):
        return None
    names = {f.name for f in dataclasses.fields(DataConfig)}
    d = {k: v for k, v in data.items() if k in names}
    if "hu_window" in d:
        d["hu_window"] = tuple(d["hu_window"])
    try:
        return DataConfig(**d)
    except TypeError:
        return None


def resolve_data_config(
    info: dict[str, Any],
    data: str | None,
    normalisation: str = "auto",
    image_size: int | None = None,
    n_val: int | None = None,
    synth_mode: str | None = None,
) -> tuple[DataConfig, str]:
    """DataConfig to evaluate on, and where its normalisation came from.

    Starts from the checkpoint's training data config when it has one (so the
    synthetic validation set is regenerated identically), else the defaults;
    explicit options override. Normalisation 'auto' takes the checkpoint's own.
    """
    base = _train_data_config(info) or DataConfig()
    changes: dict[str, Any] = {}
    if data is not None:
        changes["source"] = data
    for name, value in (("image_size", image_size), ("n_val", n_val), ("synth_mode", synth_mode)):
        if value is not None:
            changes[name] = value
    if normalisation not in NORMALISATIONS:
        raise UserError(f"--normalisation {normalisation!r} is not one of {', '.join(NORMALISATIONS)}.")
    expected = info.get("normalisation")
    if normalisation != "auto":
        changes["normalisation"] = normalisation
        source = "--normalisation"
    elif expected and expected.get("normalisation"):
        changes["normalisation"] = expected["normalisation"]
        source = "original layout (per-image min-max)" if info["layout"] == "original" else "checkpoint"
    else:
        source = f"default ({base.normalisation}; the checkpoint does not say)"
        # a guess the scores rest on: a net trained under the other normalisation scores far too low
        warnings.warn(f"{Path(info['path']).name} does not say which normalisation it was trained with; using "
                      f"{base.normalisation}: pass --normalisation minmax or window to choose.", UserWarning,
                      stacklevel=2)
    if expected and expected.get("hu_window"):
        changes["hu_window"] = tuple(float(v) for v in expected["hu_window"])
    cfg = dataclasses.replace(base, **changes)
    warn_synthetic_only([flag for flag, v in (("--image-size", image_size), ("--n-val", n_val),
                                              ("--synth-mode", synth_mode)) if v is not None], cfg.source)
    if cfg.source == "synthetic" and cfg.image_size % 16:
        raise UserError(f"--image-size {cfg.image_size} must be divisible by 16 (DDNet pools four times).")
    return cfg, source


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_slices(
    model: torch.nn.Module,
    lq: torch.Tensor,
    hq: torch.Tensor,
    hu_scale: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """Per-slice metrics of input and output vs target, as the trainer's validation computes them.

    Returns ({'input_ms_ssim_pct': (N,), ..., 'output_rmse_hu': (N,)} as float64 on the CPU,
    the outputs (N, 1, H, W) on the CPU, the MS-SSIM setting as a dict).
    """
    setting = choose_msssim(int(min(lq.shape[-2:])))
    model.eval()
    cols: dict[str, list[torch.Tensor]] = {}
    outs = []
    for i in range(0, lq.shape[0], batch_size):
        x = lq[i : i + batch_size].to(device)
        y = hq[i : i + batch_size].to(device)
        scale = hu_scale[i : i + batch_size].to(device)
        out = model(x).float()
        for which, pred in (("input", x.float()), ("output", out)):
            for k, v in slice_metrics(pred, y, scale, setting).items():
                cols.setdefault(f"{which}_{k}", []).append(v)
        outs.append(out.cpu())
    per_slice = {k: torch.cat(v).double().cpu() for k, v in cols.items()}
    return per_slice, torch.cat(outs), setting.to_dict()


def summarise(per_slice: dict[str, torch.Tensor]) -> dict[str, float]:
    """Flat means and (population) stds over slices, plus the output's gain over the input."""
    out: dict[str, float] = {}
    for k, v in per_slice.items():
        out[f"{k}_mean"] = float(v.mean())
        out[f"{k}_std"] = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
    for m, _ in METRICS:
        if f"output_{m}_mean" in out:
            out[f"gain_{m}_mean"] = out[f"output_{m}_mean"] - out[f"input_{m}_mean"]
    for which in ("input", "output"):  # scores the standard MS-SSIM clamped to 0 (`zero_ms_ssim_note`)
        if f"{which}_ms_ssim_pct" in per_slice:
            out[f"{which}_ms_ssim_zero_slices"] = int((per_slice[f"{which}_ms_ssim_pct"] == 0).sum())
    return out


def zero_ms_ssim_note(result: dict[str, Any]) -> str | None:
    """A line for output slices whose standard MS-SSIM is exactly 0, else None.

    note: pytorch_msssim (and `ddnet.loss`) clamp each scale's contrast-structure term at 0 (relu) before the
    weighted product, so an output anti-correlated with the target at any one scale scores 0, however close
    it is elsewhere; the paper's code maps every term v to (v + 1) / 2 instead and stays above 0. An
    undertrained network (a few epochs from scratch) does this; it is not a failed measurement.
    """
    zero, n = result.get("output_ms_ssim_zero_slices", 0), result.get("n_slices", 0)
    if not zero:
        return None
    paper = ("; the paper's code, which maps such terms to (v + 1) / 2, gives "
             f"{result['output_ms_ssim_paper_code_pct_mean']:.2f} %"
             if "output_ms_ssim_paper_code_pct_mean" in result else "")
    return (f"note: {zero} of {n} output slice(s) score 0 % MS-SSIM: at some scale the output is anti-correlated "
            f"with the target (a contrast-structure term <= 0, which the standard MS-SSIM clamps to 0){paper}. "
            "An undertrained network does this; train longer.")


def _pick_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {name!r} is not one of auto, cpu, cuda.")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    return torch.device(resolve_device(name))


def _out_dir(checkpoint: Path, out: Path | None, split: str) -> Path:
    out = out if out is not None else checkpoint.parent / f"eval-{split}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass another --out or delete it "
                        "(an earlier evaluation is never overwritten).")
    # made now, empty, so an unwritable place fails before any work (an empty folder is reusable)
    make_folder(out, "pass a writable --out folder.")
    return out


def run_eval(
    checkpoint: Path,
    data: str | None = None,
    split: str = "val",
    out: Path | None = None,
    image_size: int | None = None,
    n_val: int | None = None,
    synth_mode: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    normalisation: str = "auto",
) -> tuple[dict[str, Any], Path]:
    """Evaluate `checkpoint` on a split and write slices.csv, eval.json and strip.png.

    Returns the eval.json content and the folder written. Bad input raises UserError
    before anything is written.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}.")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and (checkpoint / "config.json").is_file() and not (checkpoint / "weights.pt").is_file():
        checkpoint = checkpoint / "weights.pt"  # a run folder without weights: say what the run has not written
    run = checkpoint.parent
    if not checkpoint.exists() and checkpoint.name in ("ckpt.pt", "weights.pt") and (run / "config.json").is_file():
        resume = f"resume it with `bench train --out {run} --resume`"
        failed = read_summary(run) or {}
        if failed.get("status") == "failed" and (run / "ckpt.pt").is_file():  # no weights.pt: it never finished
            raise UserError(f"{run} failed ({str(failed.get('error') or 'see its summary.json')[:160]}), so it has no "
                            f"weights.pt; evaluate {run / 'ckpt.pt'} (its last checkpoint), or fix the cause and "
                            f"{resume}.")
        if (run / "ckpt.pt").is_file():  # weights.pt is written when the run finishes
            raise UserError(f"{run} has no weights.pt yet: the run has not finished; evaluate {run / 'ckpt.pt'} (its "
                            f"last checkpoint), or {resume} first.")
        raise UserError(f"{run} is a run with no checkpoint yet: it has not finished its first epoch (stopped before, "
                        f"or still in it); {resume}, then evaluate.")
    dev = _pick_device(device)
    # the network runs in true fp32 (cuDNN would use TF32 for convolutions by default), whatever
    # flags an earlier caller in this process left: evaluation is the reference arithmetic
    flags = set_fp32_precision("ieee")
    model, info = load_model_weights(checkpoint, device=dev)
    data_cfg, norm_source = resolve_data_config(info, data, normalisation, image_size, n_val, synth_mode)
    slices = load_split(data_cfg, split)
    h, w = (int(s) for s in slices.lq.shape[-2:])
    if h % 16 or w % 16:
        raise UserError(f"the {split} slices are {h}x{w} px; DDNet needs sides divisible by 16 "
                        "(crop or pad the data).")
    folder = _out_dir(checkpoint, out, split)

    t0 = time.perf_counter()
    per_slice, outputs, setting = score_slices(model, slices.lq, slices.hq, slices.hu_scale, batch_size, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    bad = sorted(k for k, v in per_slice.items() if not bool(torch.isfinite(v).all()))
    if bad:  # a NaN score is an error, not a result
        if not any(folder.iterdir()):
            folder.rmdir()
        raise UserError(f"{checkpoint} scores non-finite {', '.join(bad)} on the {split} split (the network's output "
                        "or the data is not finite); check the checkpoint and the data, nothing was written.")

    info_out = {k: v for k, v in info.items() if k != "train_config"}
    result: dict[str, Any] = {
        **summarise(per_slice),
        "n_slices": int(slices.lq.shape[0]),
        "checkpoint": info_out,
        "normalisation": {"normalisation": data_cfg.normalisation,
                          "hu_window": list(data_cfg.hu_window) if data_cfg.normalisation == "window" else None,
                          "source": norm_source},
        "data": {"source": data_cfg.source, "split": split, "height_px": h, "width_px": w,
                 "config": dataclasses.asdict(data_cfg)},
        "msssim_setting": setting,
        "device": dev.type,
        "precision_flags": flags,
        "batch_size": batch_size,
        "time_s": elapsed,
    }
    written = [folder / "slices.csv", folder / "eval.json", folder / "strip.png"]
    try:
        _write_csv(written[0], list(slices.names), per_slice)
        write_json(written[1], result)
        write_strip(written[2], slices.lq, outputs, slices.hq, list(slices.names), per_slice)
    except BaseException:  # a full disk, say: leave the folder empty, as made, so the same command can run again
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return result, folder


# ---------------------------------------------------------------------------- outputs
def _write_csv(path: Path, names: list[str], per_slice: dict[str, torch.Tensor]) -> None:
    cols = list(per_slice)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *cols])
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{float(per_slice[c][i]):.6f}" for c in cols)])


def write_strip(
    path: Path,
    lq: torch.Tensor,
    out: torch.Tensor,
    hq: torch.Tensor,
    names: list[str],
    per_slice: dict[str, torch.Tensor],
    n: int = STRIP_SLICES,
) -> None:
    """PNG: one row per shown slice (evenly spaced), columns input, output, target, |output - target|."""
    import matplotlib  # noqa: PLC0415 - plotting backend: chosen before pyplot loads, only when a strip is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - see above

    total = lq.shape[0]
    rows = sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(min(n, total))})
    diffs = [(out[i, 0] - hq[i, 0]).abs() for i in rows]
    # one colour scale for every |difference| panel, robust to a few hot pixels
    dmax = max(float(torch.quantile(torch.cat([d.flatten() for d in diffs]), 0.995)), 1e-6)
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for r, (i, diff) in enumerate(zip(rows, diffs, strict=True)):
        panels = [
            (lq[i, 0], f"input  {per_slice['input_ms_ssim_pct'][i]:.2f}%", "gray", 0.0, 1.0),
            (out[i, 0], f"output  {per_slice['output_ms_ssim_pct'][i]:.2f}%", "gray", 0.0, 1.0),
            (hq[i, 0], "target", "gray", 0.0, 1.0),
            (diff, f"|output - target| (max {dmax:.3f})", "magma", 0.0, dmax),
        ]
        for c, (img, title, cmap, lo, hi) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img.float().numpy(), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(str(names[i])[:24], fontsize=8)
    fig.suptitle("input, output, target, |output - target| (MS-SSIM vs target in the titles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(result: dict[str, Any], folder: Path) -> None:
    """Means +/- std of input and output vs target, as a small rich table."""
    ck = result["checkpoint"]
    title = (f"{Path(ck['path']).name} ({ck['layout']} layout, {ck['format']}"
             f"{', epoch ' + str(ck['epoch']) if ck['epoch'] is not None else ''}) on "
             f"{result['data']['source']} {result['data']['split']}, {result['n_slices']} slices, "
             f"{result['normalisation']['normalisation']} normalisation")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("input (LQ vs HQ)", justify="right")
    table.add_column("output (net vs HQ)", justify="right")
    table.add_column("gain", justify="right")
    for key, label in (m for m in METRICS if f"output_{m[0]}_mean" in result):
        cell = [f"{result[f'{w}_{key}_mean']:.3f} +/- {result[f'{w}_{key}_std']:.3f}" for w in ("input", "output")]
        table.add_row(label, *cell, f"{result[f'gain_{key}_mean']:+.3f}")
    console = Console()
    console.print(table)
    if note := zero_ms_ssim_note(result):
        console.print(note)
    console.print(f"wrote {folder / 'slices.csv'}, eval.json, strip.png")


# ---------------------------------------------------------------------------- command
def eval_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="ckpt.pt / weights.pt from `bench train`, or a "
                                    "state dict (ours or the original DDNet code's layout)."),
    data: str | None = typer.Option(None, "--data", help="'synthetic' or a folder with {train,val,test}/{HQ,LQ}/ "
                                    "(default: the checkpoint's training data, else synthetic)"),
    split: str = typer.Option("val", "--split", help="val | test"),
    out: Path | None = typer.Option(None, "--out", help="Folder to write (default: eval-<split>/ beside the "
                                    "checkpoint); must not hold an earlier evaluation."),
    image_size: int | None = typer.Option(None, help="Synthetic slice side (default: the checkpoint's, else 128)"),
    n_val: int | None = typer.Option(None, help="Synthetic validation slices (default: the checkpoint's, else 16)"),
    synth_mode: str | None = typer.Option(None, help="Synthetic low-dose model: fast | physics"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(8, help="Slices per forward pass."),
    normalisation: str = typer.Option("auto", help="auto (what the checkpoint was trained with) | window | minmax"),
) -> None:
    """Evaluate a checkpoint: input and output vs target per slice, mean +/- std, and a PNG strip."""
    try:
        with signals.sigterm_unwinds():
            result, folder = run_eval(checkpoint, data, split, out, image_size, n_val, synth_mode, device,
                                      batch_size, normalisation)
    except KeyboardInterrupt as e:  # typer would turn it into exit status 130 silently
        how = signals.stopped_how(e)
        typer.echo(f"{how}: no evaluation was written (what was begun is removed); run the same command again "
                   f"to evaluate {checkpoint}.", err=True)
        signals.end_like(e)
        raise typer.Exit(130) from None
    print_table(result, folder)
