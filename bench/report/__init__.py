"""`bench report`: the paper's tables and figures re-measured from run folders, beside its numbers.

Reads run folders only (config.json, env.json, epochs.jsonl, summary.json,
cell.json, copies.json); never trains and never imports the trainer. Writes,
into a fresh report folder, report.md, tables/<key>.md and .csv, and
figures/<key>.png (see `bench.report.build`). Runs from different machines are
never mixed in one ratio; tables whose cells were not run are listed with the
grids that would fill them.

Layout (data flows down):

    command.py      the `bench report` command (typer); loads the rest only when it runs
    options.py      Options (the command's knobs) and DEFAULT_RESULTS
    setting.py      Setting: what a run varied (precision, loader, graphs, sparsity, schedule)
    runs.py         RunRecord: one run folder read from disk, the phase/warm-up rule, per-run measures
    cells.py        CellRuns: the repeats of one cell on one machine (a table row), group_cells
    environments.py Environment: the runs of one machine fingerprint, described for the header
    envview.py      EnvView: one machine's cells seen by an artifact: baselines, speedups, shared columns;
                    the paper lookups (opt_category, paper_vs_model, paper_vs_dense)
    artifact.py     Table, Artifact, Needs, and the ARTIFACTS registry (a plain dict, report order)
    artifacts/      one module per paper table or figure (table1, table2, fig8 (a, b), fig9a, fig9b,
                    fig4c, fig4ab, memory, time_to_quality, speed, sparsity, wall); importing the package
                    registers them
    format.py       numbers, table cells and Markdown tables as text
    plotting.py     seaborn helpers shared by the artifacts' plots (bars_with_ci, quality_bars, draw)
    markdown.py     report.md and tables/<key>.md
    build.py        make_report: load, build every artifact per environment, write the files

How to add a report figure
--------------------------
1. Add one file, `bench/report/artifacts/<key>.py` (copy `artifacts/fig9a.py`). It holds:
   `needs(setting, profile_steps) -> bool`, which cells belong in it (from their settings, never from
   grid names); `build(env: EnvView) -> Table | None`, the table of one machine's cells (None when none
   belongs); optionally `plot(table, path) -> Path | None`, drawn with the helpers of `plotting.py`;
   and at the end `register(Artifact(key=..., title=..., build=build, plot=plot,
   needs=Needs("what it needs, in words", needs), fills=("grid", ...)))`.
2. Import it in `bench/report/artifacts/__init__.py`, at the place in the report where it should appear.
3. Test it in `tests/test_report_artifacts.py` against the fabricated run folders of `tests/report_fakes.py`.

Its CSV, Markdown, PNG, its section in report.md and its 'Not run' line follow from the registry.
"""

from bench.report.command import report_cmd
from bench.report.options import DEFAULT_RESULTS, Options

__all__ = ["DEFAULT_RESULTS", "Options", "report_cmd"]
