"""The report's Markdown: report.md (every environment, every table, what was not run) and tables/<key>.md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.paper import PAPER_JSON
from bench.report.artifact import Table
from bench.report.artifacts import ARTIFACTS
from bench.report.environments import Environment
from bench.report.format import bullets, md_table
from bench.report.options import Options
from bench.report.runs import UNKNOWN_ENV, RunRecord


def how_to_read(opts: Options) -> list[str]:
    """The 'How to read the tables' bullets: what each measure and column means."""
    return [
        "Speedup = training-time estimate of the baseline / the same of the cell. The estimate is, per phase "
        "(dense, sparse), the number of epochs times the median of that phase's non-warm-up epoch times "
        "(`time_s`); for a model without a sparse phase this is the ratio of median epoch times.",
        "[lo, hi] is a 95% interval for the ratio of medians: Welch's t-interval on log times (it keeps its "
        "coverage with few samples, where a percentile bootstrap does not), over finished repeats when both arms "
        "have at least three. Otherwise it is over the non-warm-up epochs of one run per arm (widened to hold the "
        "ratio of medians when a skewed sample puts it outside) and is marked '(within one run)': it shows that "
        "run's epochs were steady, not how much another run would differ (`--repeats 3` gives intervals over "
        "runs); an arm of exactly two repeats gets none. An interval containing 1.0 is printed as 'no "
        "measurable change', not as a win; '(no CI)' means an arm had too few samples for a verdict.",
        "MS-SSIM has two scales here. The paper's MS-SSIM figures (the 97.22 % target, Tables 1 and 2) were "
        "most likely measured with its public code's MS-SSIM, which differs from the standard one (valid "
        "convolution, batch-wide means, L read from the image, (v+1)/2 normalisation and a misplaced bracket; "
        "`ddnet.paper_msssim`) and reads higher; 'paper's scale' is that computation, compared with the paper's "
        "numbers, and 'standard' (pytorch_msssim) stands beside it. '(input X)' is the low-dose input's own score "
        "against the target: a denoiser that does not beat it has learned nothing useful. A standard score of 0.00 "
        "is a real one: pytorch_msssim clamps each scale's contrast term at 0, so an output anti-correlated with "
        "the target at one scale (an undertrained net's) scores 0, where the paper's scale maps the term to "
        "(v+1)/2 and stays above 0.",
        "'speedup, total time' uses total_time_s (epochs + graph capture + pruning + DoLL staging), the measure "
        "the paper quotes; it has an interval only with three or more repeats per arm.",
        "Baselines: the dense fp32/host-loader/eager cell of the same data, net, epochs, batch size and "
        "optimizer settings on the same machine (env fingerprint), from the cell's own grid when it has a "
        "finished one, else from another grid (named grid/cell in the CSV; e.g. Fig. 8(b) takes Fig. 8(a)'s). "
        "Runs of one cell name with other such settings are separate cells, never repeats. Fig. 8's 'vs same "
        "model' compares with the same sparsity and schedule with every architecture-aware optimization off.",
        "MS-SSIM is the final epoch's validation mean ± std over slices (percent), median over repeats; "
        "'drop' is baseline minus cell in percentage points and relative to the baseline, ± its noise band "
        "(2 x sqrt of the two arms' variances: over repeats when both have three or more, else over each run's "
        "last 3 epochs of its final phase, never across a pruning); a drop inside it reads 'within noise'. "
        "'still changing': a run's last epochs trend or jump, so their spread is no noise and there is no band.",
        "'ours/paper' divides our total-time speedup by the paper's, in every table: the paper quotes total "
        "training time.",
        f"Time to quality: the first epoch from which every later validation MS-SSIM stays at or above the "
        f"target (default: the dense fp32 baseline's final value minus {opts.tolerance_pp:g} pp), time summed up "
        "to it; a run that touches the target and falls back has not reached it ('not held'). Over repeats, a "
        "repeat that did not hold it counts as never: a time only when most repeats held it. A target at or below "
        "0 % is not set; one set by a baseline that did not beat the low-dose input's MS-SSIM is named in the "
        "notes.",
        "Paper columns quote Chaturvedi, Cao, Feng on an Ampere GPU (likely A100; the paper names only an "
        "\"Nvidia Ampere GPU\"), 512x512 chest CT, 50 epochs; small synthetic runs "
        "on other hardware are not expected to match them, the columns are there to compare shapes and ratios.",
    ]


def render(results_dir: Path, runs: list[RunRecord], envs: list[Environment], env_rows: list[dict[str, Any]],
           status: list[dict[str, Any]], not_run: dict[str, list[str]], paper: dict[str, Any], opts: Options,
           failed: dict[str, list[str]] | None = None) -> str:
    """report.md: header, environments, run status, how to read, each environment's tables, the tables that
    could not be rendered, not run, sources."""
    counts: dict[str, int] = {}
    for row in status:  # every run, and the cells grid.json lists that were never started
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    n_cells = sum(len(e.cells) for e in envs)
    lines = [
        "# DDNet benchmark report\n",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())} by `bench report` from `{results_dir}`: "
        f"{len(runs)} run folder(s), {n_cells} cell(s), {len(envs)} environment(s). "
        f"Paper numbers: `{PAPER_JSON.relative_to(PAPER_JSON.parents[2]).as_posix()}` (each with its source).\n",
        "## Environments\n",
        md_table(env_rows),
    ]
    if len(envs) > 1:
        lines.append("Runs from different environments are never compared in one ratio; each has its own section.\n")
    if any(e.fingerprint == UNKNOWN_ENV for e in envs):
        lines.append(f"`{UNKNOWN_ENV}`: runs without env.json that could not be attributed to a machine.\n")
    lines.append("## Run status\n")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".\n")
    bad = [r for r in status if r["status"] != "ok"]
    if bad:
        lines.append("Runs that did not finish (partial runs are shown as such: 'running' while their process "
                     "runs, 'stopped' when it has ended, resumable; failed, skipped and not started cells have no "
                     "numbers in the tables below):\n")
        lines.append(md_table(bad, ["env", "grid", "cell", "repeat", "status", "epochs_done", "epochs", "message",
                                    "path"]))
    damaged = [r for r in status if r["status"] == "ok" and r.get("damage")]
    if damaged:
        lines.append("Finished runs whose epochs.jsonl is damaged (their numbers come from the valid rows; "
                     "check them before trusting the tables):\n")
        lines.append(md_table(damaged, ["env", "grid", "cell", "repeat", "epochs_done", "epochs", "damage", "path"]))
    lines.append("All runs: `tables/status.csv`; every epoch of every run: `tables/epochs_raw.csv`.\n")
    lines.append("## How to read the tables\n")
    lines.append(bullets(how_to_read(opts)))
    for e in envs:
        d = e.describe()
        lines.append(f"## Results on {e.label}: {d['GPU'] if d['GPU'] != 'none' else d['CPU']} "
                     f"(torch {d['torch']}, fingerprint `{e.fingerprint}`)\n")
        if not e.tables:
            lines.append("_No table could be filled from these runs._\n")
        if e.problems:
            lines.append("**Rendering problems** (please report them):\n")
            lines.append(bullets(e.problems))
        for t in e.tables:
            lines.append(f"### {t.title}\n")
            lines.append(md_table(t.md_rows, t.md_columns))
            files_note = f"Numbers: `tables/{t.key}.csv`" + "".join(f", `tables/{x}.csv`" for x in t.extra_csv) + "."
            lines.append(bullets([*t.notes, files_note]))
            for p in t.plots:
                lines.append(f"\n![{t.title}]({p.relative_to(p.parents[1]).as_posix()})\n")
    if failed:
        lines.append("## Could not be rendered\n")
        lines.append("Their runs are there, but building the table failed (the error is under 'Rendering "
                     "problems' in the environment's section); running more cells will not fill them.\n")
        lines.append(bullets([f"{ARTIFACTS[key].title}: on {', '.join(labels)}." for key, labels in failed.items()]))
    if not_run:
        lines.append("## Not run\n")
        items = []
        for key, grids in not_run.items():
            art = ARTIFACTS[key]
            need = art.needs.text if art.needs is not None else "cells"
            how = (" or ".join(f"`bench run --grid {g}`" for g in grids)) if grids else "a grid with such cells"
            items.append(f"{art.title}: not run (needs {need}); fill it with {how}.")
        lines.append(bullets(items))
    lines.append("## Paper sources\n")
    lines.append(bullets([f"**{k}**: {paper[k]['source']}"
                           for k in ("table1", "table2", "reference", "fig8", "fig9a", "fig9b", "fig4")]))
    return "\n".join(lines)


def table_file(per_env: list[tuple[str, Table]], out: Path, several_envs: bool) -> str:
    """tables/<key>.md: one artifact's table in every environment (label, table), with notes and plots."""
    text = []
    for label, t in per_env:
        text.append(f"### {t.title}" + (f" — {label}" if several_envs else "") + "\n")
        text.append(md_table(t.md_rows, t.md_columns))
        text.append(bullets(t.notes))
        for p in t.plots:
            text.append(f"\n![{t.title}]({p.relative_to(out).as_posix()})\n")
    # The per-table Markdown sits in tables/, so its image links climb one level.
    return "\n".join(text).replace("](figures/", "](../figures/")
