"""Experiment grids: one module per grid (paper tables/figures, `full`, `smoke`).

Each module defines `NAME`, `DESCRIPTION`, `cells(base: TrainConfig) -> list[Cell]`
and optionally `defaults() -> TrainConfig` (its own base instead of the paper's
setup). `bench grids` lists them; `bench run --grid NAME` runs one. See
`bench.grids` for the interface and helpers (`Cell`, `slug`, `hybrid_model`).
"""
