"""bench: the harness around ddnet: CLI, grids, runner, collectors, store, report."""
