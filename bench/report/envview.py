"""One environment's cells as the artifacts see them: baseline lookup, speedups, and shared row columns.

Every artifact's `build` takes an `EnvView`: the cells of one machine (ratios
never mix env fingerprints), the report options and the paper's numbers.

Speedups are ratios of robust training-time estimates: per phase (dense,
sparse), the number of epochs times the median non-warm-up epoch time. For a
cell without a sparse phase that is the ratio of median epoch times. The 95%
interval is Welch's t-interval on log times (`bench.stats`), over repeats when
both arms have at least 3 finished ones. Otherwise it is over the non-warm-up
epochs of ONE run per arm (the run with the median estimate), marked `WITHIN_RUN`
in its verdict and method: it shows how steady the epochs inside one process
were, not the run-to-run spread a comparison needs, so it is never a verdict
over runs. Epochs of several runs are never pooled as if independent, and an
arm with exactly 2 repeats (too few for an interval over runs, and no run in
the middle) gets no interval. Below 3 samples per arm there is no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bench.paper import table1_row, table2_row
from bench.report.cells import LAST_EPOCHS, SETTLED_PP, CellRuns
from bench.report.format import WITHIN_RUN, is_num
from bench.report.options import Options
from bench.report.runs import RunRecord
from bench.report.setting import ARCH_BASELINE, ARCH_KEYS, PAPER_MP, Setting
from bench.stats import (
    FASTER,
    MIN_SAMPLES_PER_ARM,
    NO_CHANGE,
    NO_INTERVAL,
    NO_VERDICT,
    SLOWER,
    Speedup,
    classify_ratio,
    cover,
    estimate_speedup,
    median,
    ratio_ci,
)

CellPredicate = Callable[[Setting, int], bool]
"""Does a cell with this setting (and --profile-steps) belong in an artifact?"""

BASELINE = Speedup(1.0, None, None, "baseline", "baseline")
"""What a baseline row shows against itself (not a bootstrap of a run against itself)."""


TWO_REPEATS = ("no interval: an arm has exactly 2 repeats, too few for an interval over runs, and epochs of "
               "different runs are not independent samples; --repeats 3 gives one")
"""The method of a speedup with an arm of exactly 2 finished repeats (it has a point but no interval)."""


OURS_OVER_PAPER_NOTE = (
    "ours/paper (total time) divides our speedup in total training time (total_time_s: epochs, graph capture, "
    "pruning, DoLL staging) by the paper's: the paper measures performance as total time to train (Section 5; "
    "Table 1 quotes times; 'reduce the total training time by 1.94x'), so every table compares it in that "
    "measure. That speedup has an interval only with 3 or more repeats per arm."
)
"""The note under every table with an ours/paper column (Tables 1, 2, Fig. 8)."""


def ratio(a: Any, b: Any) -> float | None:
    """a / b for two numbers (b non-zero), else None."""
    return float(a) / float(b) if is_num(a) and is_num(b) and b != 0 else None


def _strata(run: RunRecord) -> tuple[list[list[float]], list[float]]:
    """One run's non-warm-up epoch times per phase, with the phase's epoch count as its weight."""
    times, counts = run.phase_times(), run.phase_counts()
    keys = sorted(times)
    return [times[k] for k in keys], [float(counts[k]) for k in keys]


def within_run(res: Speedup) -> Speedup:
    """`res` with `WITHIN_RUN` on its verdict: an interval from one run's epochs is no verdict over runs."""
    if res.verdict not in (FASTER, SLOWER, NO_CHANGE):
        return res
    return Speedup(res.point_x, res.lo_x, res.hi_x, f"{res.verdict}{WITHIN_RUN}", res.method)


def drop_note(rows: list[dict[str, Any]]) -> list[str]:
    """The note for a table whose MS-SSIM drops carry a noise band (`drop_noise_pp`), or could not (`drop_changing`)."""
    bases = sorted({str(r["drop_noise_basis"]) for r in rows if r.get("drop_noise_basis")})
    changing = sorted({run for r in rows if is_num(r.get("drop_pp")) and r.get("drop_changing")
                       for run in str(r["drop_changing"]).split("; ")})
    bandless = any(is_num(r.get("drop_pp")) and r.get("drop_pp") != 0 and not is_num(r.get("drop_noise_pp"))
                   and not r.get("drop_changing") for r in rows)
    if not bases and not bandless and not changing:
        return []
    note = (f"'± N' after a change in MS-SSIM: 2 x sqrt(s_cell² + s_baseline²), s the std of the final MS-SSIM over "
            f"repeats (both arms with 3 or more) or over each run's last {LAST_EPOCHS} epochs of its final phase, "
            f"never across a pruning (here: {'; '.join(bases) or 'none measured'}). The final value is one noisy "
            "sample; a change inside the band reads 'within noise' and is no measured change.")
    if bandless:
        note += (" A change without a band has no measured chance swing: a run's final phase is a single epoch "
                 "(a net pruned before its last epoch, a one-epoch run), so nothing tells its noise from a change.")
    if changing:
        note += (f" 'still changing': a run's last {LAST_EPOCHS} validation MS-SSIM values (oldest first: "
                 f"{'; '.join(changing)}) move one way without slowing down, or end in a jump, or (a final phase "
                 "of two epochs) take one step that no earlier spread can call a swing, by more than "
                 f"{SETTLED_PP:g} pp: the run had not settled, their spread is a trend and no chance swing, so "
                 "the change has no band and no 'within noise' verdict; its final value is where a still-moving "
                 "run stopped, and more epochs would move it.")
    return [note]


def interval_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Notes for a table whose speedups have within-run intervals (`*_verdict`) or 2 repeats (`*_ci_method`)."""
    methods = [str(v) for r in rows for k, v in r.items() if k.endswith("_ci_method") and v]
    verdicts = [str(v) for r in rows for k, v in r.items() if k.endswith("_verdict") and v]
    notes = []
    if any(v.endswith(WITHIN_RUN) for v in verdicts):
        notes.append(f"'{WITHIN_RUN.strip()}': an arm had fewer than 3 finished repeats, so the interval is over "
                     "the epochs of one run per arm (for an arm with 3 or more, the run with the median estimate). "
                     "It shows epoch-to-epoch jitter inside one process, not the run-to-run spread a comparison "
                     "needs, and is no proof of a change; `bench run --repeats 3` gives intervals over runs.")
    if any(m == TWO_REPEATS for m in methods):
        notes.append("'(no CI)' where an arm has exactly 2 repeats: too few for an interval over runs, and their "
                     "epochs are not independent samples; `bench run --repeats 3` gives one.")
    return notes


# ---------------------------------------------------------------------- paper lookups


def opt_category(s: Setting) -> str | None:
    """The paper's name for the optimizations a setting has on (Fig. 8), or None when it has no match."""
    if s.extra_parts() or s.precision not in ("fp32", *PAPER_MP) or s.graphs not in ("off", "cuda-graph"):
        return None  # tf32, compile, channels-last, fused Adam, ...: the paper has no number for them
    combo = (s.precision in PAPER_MP, s.loader == "device", s.graphs == "cuda-graph")
    return {
        (True, False, False): "mixed_precision",
        (False, True, False): "doll",
        (False, False, True): "gco",
        (True, True, True): "all_three",
    }.get(combo)


def paper_model(s: Setting) -> bool:
    """Whether the paper quotes numbers for this model: the dense DDNet, or 50 % of its weights pruned (no 2:4
    pattern) before training (Table 1) or after half the epochs (Table 2's and Fig. 8's sparse models, 25 dense
    + 25 sparse of 50; `epochs // 2` here, as the grids schedule it). Other amounts and splits (Fig. 4(c)'s,
    a net pruned before its last epoch) have no paper number to set beside them."""
    return s.dense or (s.amount == 0.5 and s.pattern != "2:4" and s.dense_epochs in (0, s.epochs // 2))


def paper_model_with(s: Setting, category: str) -> bool:
    """Whether `s` is one of the paper's models (`paper_model`) with nothing on but the paper's optimization
    `category` (`opt_category`: 'doll', 'mixed_precision', ...), or nothing at all: what the paper measured
    that optimization on."""
    return paper_model(s) and (s.arch_off or opt_category(s) == category)


def other_model_note(cells: list[CellRuns]) -> list[str]:
    """The note for a table some of whose sparse models the paper quotes no number for (`paper_model`)."""
    names = sorted({c.name for c in cells if not paper_model(c.setting)})
    if not names:
        return []
    return [f"Paper columns only for the paper's sparse models: 50 % pruned before training or after half the "
            f"epochs (its 25 dense + 25 sparse of 50). {', '.join(names)} "
            f"{'prunes' if len(names) == 1 else 'prune'} another amount, in a 2:4 pattern or at another epoch: the "
            "paper has no number for that, so none stands beside it."]


def run_size_note(cells: list[CellRuns], batch: int, epochs: int, what: str) -> list[str]:
    """A note when `cells` ran at another batch size or epoch count than the paper's `what` they stand beside."""
    ours = sorted({(c.setting.batch_size, c.setting.epochs) for c in cells})
    if ours == [(batch, epochs)]:
        return []
    runs = "; ".join(f"batch {b}, {e} epochs" for b, e in ours)
    return [f"Ours ran at {runs}; the paper's {what} at batch {batch}, {epochs} epochs: its times and accuracies "
            "are of that run, so compare ratios and shapes with it, not values."]


def paper_vs_model(paper: dict[str, Any], s: Setting) -> float | None:
    """Fig. 8: the paper's speedup of these optimizations over the same model without them."""
    cat = opt_category(s)
    if cat is None or not paper_model(s) or not (s.dense or s.hybrid):  # Fig. 8's sparse models are hybrid
        return None
    return paper["fig8"]["speedup_x"][cat]["dense" if s.dense else "sparse"]


def paper_vs_dense(paper: dict[str, Any], s: Setting) -> float | None:
    """The paper's speedup of this setting over the dense fp32 baseline, where it quotes one."""
    if not paper_model(s):
        return None
    cat = opt_category(s)
    if s.dense:
        return 1.0 if s.arch_off else paper_vs_model(paper, s)
    if s.arch_off and s.hybrid:
        row = table2_row(paper, s.sparsity)
        return row["speedup_x"] if row else None
    if s.arch_off and s.dense_epochs == 0 and s.sparsity == "random":
        dense, sparse = table1_row(paper, "none"), table1_row(paper, "random")
        return dense["time_min"] / sparse["time_min"]
    if cat == "all_three" and s.hybrid:
        return paper["fig8"]["speedup_x"]["all_three_hybrid_vs_dense_baseline"]["sparse"]
    return None


# ---------------------------------------------------------------------- one environment


BELOW_INPUT = "below the low-dose input's own MS-SSIM"
"""Marks a time-to-quality target set by a baseline that did not beat its input (`EnvView.target_for`)."""


class EnvView:
    """The cells of one environment, with baseline lookup and cached speedups."""

    def __init__(self, fingerprint: str, env_label: str, cells: list[CellRuns], opts: Options,
                 paper: dict[str, Any]) -> None:
        self.fingerprint = fingerprint
        self.env_label = env_label
        self.cells = cells
        self.opts = opts
        self.paper = paper
        self._cache: dict[tuple[int, int, str], Speedup] = {}

    # ------------------------------------------------------------ lookups
    def select(self, pred: CellPredicate) -> list[CellRuns]:
        """The cells an artifact's predicate accepts (by setting and profile steps), in loading order."""
        return [c for c in self.cells if pred(c.setting, c.profile_steps)]

    def find(self, like: CellRuns, **changes: Any) -> CellRuns | None:
        """The cell of the same context and machine whose setting is `like`'s with `changes`.

        Finished cells first, then a cell of `like`'s own grid before one of another grid: a grid without
        baseline cells of its own (ablations/fig8b.py: 'baselines in fig8a') is compared with another grid's,
        run on the same machine (this view) with the same data, net, epochs and batch (the context).
        """
        want = like.setting.replace(**changes)
        key = (want.arch_key, want.model_key)
        hits = [
            c for c in self.cells
            if c.context == like.context and (c.setting.arch_key, c.setting.model_key) == key
        ]
        hits.sort(key=lambda c: (not c.has_numbers, c.grid != like.grid, c.grid, c.name))
        return hits[0] if hits else None

    @staticmethod
    def ref(cell: CellRuns | None, like: CellRuns) -> str | None:
        """How a row names the cell it is compared with: its name, 'grid/name' when it is of another grid."""
        if cell is None:
            return None
        return cell.name if cell.grid == like.grid else f"{cell.grid or '-'}/{cell.name}"

    @staticmethod
    def borrowed_note(pairs: list[tuple[CellRuns, CellRuns | None]]) -> list[str]:
        """A note for each grid whose rows were compared with another grid's cells: (cell, its comparison)."""
        lent: dict[str, set[str]] = {}
        for c, other in pairs:
            if other is not None and other.grid != c.grid:
                lent.setdefault(c.grid or "-", set()).add(other.grid or "-")
        return [f"Grid {g} lacks some of the cells its rows are compared with: "
                f"those come from grid {' and '.join(sorted(src))}, run on the same machine with the same data, "
                "net, epochs and batch size; the CSV names them 'grid/cell'."
                for g, src in sorted(lent.items())]

    def baseline(self, cell: CellRuns) -> CellRuns | None:
        """The dense fp32/host/eager cell of the same context and machine (of the same grid when it has one)."""
        return self.find(cell, **ARCH_BASELINE, sparsity="none", dense_epochs=0)

    def model_baseline(self, cell: CellRuns) -> CellRuns | None:
        """The same model (sparsity and schedule) with every architecture-aware optimization off."""
        return self.find(cell, **ARCH_BASELINE)

    # ------------------------------------------------------------ measures
    def speedup(self, base: CellRuns | None, arm: CellRuns) -> Speedup:
        """Training-time speedup of `arm` over `base` (robust estimate) with its interval (module docstring)."""
        if base is None:
            return Speedup(None, None, None, NO_INTERVAL, "no baseline cell")
        key = (id(base), id(arm), "est")
        if key in self._cache:
            return self._cache[key]
        b, a = base.train_time_est_s(), arm.train_time_est_s()
        point = ratio(b, a)
        warm = sorted({p for c in (base, arm) for r in c.ok_runs for p in r.warmup_only_phases()})
        if not base.ok_runs or not arm.ok_runs:
            res = Speedup(None, None, None, NO_INTERVAL, "no finished run in one arm")
        elif point is None and warm:
            res = Speedup(None, None, None, NO_INTERVAL,
                          f"phase {'/'.join(warm)} has only warm-up epochs: run more epochs")
        elif point is None:
            res = Speedup(None, None, None, NO_INTERVAL, "no finished run in one arm")
        elif len(base.ok_runs) >= MIN_SAMPLES_PER_ARM and len(arm.ok_runs) >= MIN_SAMPLES_PER_ARM:
            bs = base.values(lambda r: r.train_time_est_s())
            as_ = arm.values(lambda r: r.train_time_est_s())
            res = estimate_speedup([bs], [1.0], [as_], [1.0], f"repeats ({len(bs)} vs {len(as_)})",
                                   point_x=point)
        elif 2 in (len(base.ok_runs), len(arm.ok_runs)):
            res = Speedup(point, None, None, NO_VERDICT, TWO_REPEATS)
        else:
            # One run per arm: its epochs are samples of that process only (see the module docstring).
            bst, bw = _strata(base.middle_run())
            ast, aw = _strata(arm.middle_run())
            nb, na = sum(map(len, bst)), sum(map(len, ast))
            res = within_run(estimate_speedup(bst, bw, ast, aw, f"epochs ({nb} vs {na}), within one run per arm",
                                              point_x=point))
        self._cache[key] = res
        return res

    def speedup_total(self, base: CellRuns | None, arm: CellRuns) -> Speedup:
        """Speedup in total_time_s (one-off costs included); an interval only with enough repeats per arm."""
        if base is None:
            return Speedup(None, None, None, NO_INTERVAL, "no baseline cell")
        b, a = base.values(lambda r: r.total_time_s()), arm.values(lambda r: r.total_time_s())
        if not b or not a:
            return Speedup(None, None, None, NO_INTERVAL, "no finished run in one arm")
        point = ratio(median(b), median(a))
        if len(b) >= MIN_SAMPLES_PER_ARM and len(a) >= MIN_SAMPLES_PER_ARM:
            lo, hi = cover(point, *ratio_ci(a, b)[1:])
            return Speedup(point, lo, hi, classify_ratio(lo, hi), f"repeats ({len(b)} vs {len(a)})")
        return Speedup(point, None, None, NO_VERDICT if len(b) > 1 and len(a) > 1 else NO_INTERVAL,
                       f"repeats ({len(b)} vs {len(a)})")

    def target_for(self, cell: CellRuns) -> tuple[float | None, str]:
        """Time-to-quality target for the cell's context (its baseline's), and how it was set (why not, if None).

        No target at or below 0 %: every run would 'reach' it at its first epoch (a baseline ending at 0 % set
        -0.50 %, and its cells read 5x speedups at epoch 1). A baseline that did not beat the low-dose input's
        own MS-SSIM still sets one (short runs rarely do: the time to its quality is still a speed measure),
        marked `BELOW_INPUT` in the rule so that the table says so.
        """
        if self.opts.target_pct is not None:
            return self.opts.target_pct, f"--target {self.opts.target_pct:g}%"
        base = self.baseline(cell)
        if self.opts.target_input:
            floor = (base or cell).metric("input_ms_ssim")[0]
            if floor is None:
                return None, "no recorded input MS-SSIM (runs older than the input_* fields)"
            return floor, f"the low-dose input's MS-SSIM, {floor:.2f}% (--target input)"
        q = base.quality()[0] if base is not None else None
        if q is None:
            return None, "no finished dense fp32 baseline to set a target"
        t = q - self.opts.tolerance_pp
        if t <= 0:
            return None, (f"the dense fp32 baseline ({self.ref(base, cell)}) ended at {q:.2f}%: minus "
                          f"{self.opts.tolerance_pp:g} pp leaves no target above 0%; --target PCT sets one")
        how = f"dense fp32 baseline {q:.2f}% - {self.opts.tolerance_pp:g} pp"
        floor = base.metric("input_ms_ssim")[0]
        if is_num(floor) and q <= floor:
            how += f"; {BELOW_INPUT} ({floor:.2f}%)"
        return t, how

    # ------------------------------------------------------------ row helpers
    def head(self, cell: CellRuns) -> dict[str, Any]:
        """Columns every row starts with."""
        return {
            "env": self.env_label,
            "fingerprint": self.fingerprint,
            "grid": cell.grid or "-",
            "cell": cell.name,
            "label": cell.label,
            "status": cell.status_text(),
            "repeats_ok": len(cell.ok_runs),
            **{k: getattr(cell.setting, k) for k in ARCH_KEYS},
            "sparsity": cell.setting.sparsity,
            "amount": cell.setting.amount if not cell.setting.dense else 0.0,
            "pattern": cell.setting.pattern if not cell.setting.dense else "",
            "dense_epochs": cell.setting.dense_epochs if not cell.setting.dense else cell.setting.epochs,
            "epochs": cell.setting.epochs,
            "batch_size": cell.setting.batch_size,
        }

    def drop_noise(self, cell: CellRuns, base: CellRuns | None) -> tuple[float | None, str | None]:
        """How far a drop of `cell` from `base` can go by chance (pp), and what that was measured over.

        2 x sqrt(s_cell^2 + s_base^2), with s each arm's `CellRuns.quality_sd`: over repeats when both have
        at least 3, else over the last epochs of each run. The final-epoch values are single noisy samples
        (a few epochs at a high learning rate swing by 10 pp and more); a drop inside this is no drop. None
        when an arm's chance swing cannot be measured: a final phase of one epoch, or one still changing
        (`drop_changing` names those).
        """
        if base is None or base is cell:
            return None, None
        over_repeats = self._over_repeats(cell, base)
        sds = [c.quality_sd(over_repeats) for c in (cell, base)]
        if any(sd is None for sd in sds):
            return None, None
        basis = f"{len(cell.ok_runs)} vs {len(base.ok_runs)} repeats" if over_repeats else f"last {LAST_EPOCHS} epochs"
        return 2.0 * math.sqrt(sum(float(sd) ** 2 for sd in sds)), basis

    @staticmethod
    def _over_repeats(cell: CellRuns, base: CellRuns) -> bool:
        """Whether a drop's band is over repeats (both arms with at least 3), not over each run's last epochs."""
        return min(len(cell.ok_runs), len(base.ok_runs)) >= MIN_SAMPLES_PER_ARM

    def drop_changing(self, cell: CellRuns, base: CellRuns | None) -> list[str]:
        """The runs of either arm whose last epochs were still changing (`CellRuns.changing_runs`), when the
        band would be measured over those epochs; [] otherwise."""
        if base is None or base is cell or self._over_repeats(cell, base):
            return []
        return [*cell.changing_runs(), *base.changing_runs()]

    def quality_cols(self, cell: CellRuns, base: CellRuns | None) -> dict[str, Any]:
        """MS-SSIM (median over repeats) and its drop from the dense baseline, in pp and relative %, with its noise."""
        q, s = cell.quality()
        bq = base.quality()[0] if base is not None else None
        drop = bq - q if is_num(bq) and is_num(q) else None
        noise, basis = self.drop_noise(cell, base) if drop is not None else (None, None)
        changing = self.drop_changing(cell, base) if drop is not None else []
        pq, ps = cell.metric("val_ms_ssim_paper_code")
        iq, iq_paper = cell.metric("input_ms_ssim")[0], cell.metric("input_ms_ssim_paper_code")[0]
        return {
            "ms_ssim_pct": q,
            "ms_ssim_std_pct": s,
            "ms_ssim_paper_code_pct": pq,
            "ms_ssim_paper_code_std_pct": ps,
            "input_ms_ssim_pct": iq,
            "input_ms_ssim_paper_code_pct": iq_paper,
            "beats_input": (q > iq) if is_num(q) and is_num(iq) else None,
            "baseline_ms_ssim_pct": bq,
            "drop_pp": drop,
            "drop_rel_pct": 100.0 * drop / bq if drop is not None and bq else None,
            "drop_noise_pp": noise,
            "drop_noise_basis": basis,
            "drop_within_noise": abs(drop) <= noise if drop is not None and noise is not None else None,
            "drop_changing": "; ".join(changing) or None,
            "drop_still_changing": bool(changing) if drop is not None else None,
        }

    def time_cols(self, cell: CellRuns, base: CellRuns | None) -> dict[str, Any]:
        """Epoch time, training-time estimate, total time, and both speedups over `base`."""
        row: dict[str, Any] = {
            "epoch_time_s_p50": cell.epoch_time_p50(),
            "epoch_time_dense_s_p50": cell.phase_p50("dense"),
            "epoch_time_sparse_s_p50": cell.phase_p50("sparse"),
            "train_time_est_s": cell.train_time_est_s(),
            "total_time_s": cell.total_time_s(),
            "baseline_cell": self.ref(base, cell),
        }
        if base is cell:
            row.update(BASELINE.to_dict("speedup"))
            row.update(BASELINE.to_dict("speedup_total"))
        else:
            row.update(self.speedup(base, cell).to_dict("speedup"))
            row.update(self.speedup_total(base, cell).to_dict("speedup_total"))
        return row
