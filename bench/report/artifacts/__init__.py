"""The report's artifacts, one module per paper table or figure; importing this package registers them all.

Each module ends with `register(Artifact(...))`, so the import order below is
the report order: the sections of report.md and the 'Not run' list.
"""

from bench.report.artifact import ARTIFACTS

# The import order is the report order, not the alphabet: keep the sorter away.
# isort: off
from bench.report.artifacts import (  # noqa: F401  (imported to register)
    table1,
    table2,
    fig8,  # fig8a, fig8b
    fig9a,
    fig9b,
    fig4c,
    fig4ab,
    memory,
    time_to_quality,  # ttq
    speed,
    sparsity,
    wall,
)

# isort: on

__all__ = ["ARTIFACTS"]
