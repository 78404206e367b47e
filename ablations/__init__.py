"""Experiment grids: one module per grid, each defining `cells(**overrides) -> list[Cell]`."""
