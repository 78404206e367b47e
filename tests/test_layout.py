"""The architecture, checked: `ddnet` never imports the harness, and no module grows past about 450 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 480
"""'About 450': a module that grows past this is split along its seams (see README, Layout)."""


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, those inside functions and classes included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def test_ddnet_never_imports_bench() -> None:
    offenders = [f"{p.relative_to(REPO)}:{line} imports {mod}"
                 for p in sorted((REPO / "ddnet").rglob("*.py"))
                 for line, mod in _imported_modules(p) if mod == "bench" or mod.startswith("bench.")]
    assert offenders == [], offenders


def test_the_import_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from bench.store import read_json\n    import bench.cli\n")
    assert [m for _, m in _imported_modules(probe)] == ["bench.store", "bench.cli"]


@pytest.mark.parametrize("package", ["ddnet", "bench"])
def test_no_module_is_over_about_450_lines(package: str) -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / package).rglob("*.py")}
    too_big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert too_big == {}, too_big


def test_the_oldest_torch_session_tests_pyprojects_lower_bound() -> None:
    """`nox -s oldest` runs the suite on the torch release pyproject.toml names as its lower bound."""
    bound = re.search(r'"torch>=([\d.]+),', (REPO / "pyproject.toml").read_text())
    oldest = re.search(r'TORCH_OLDEST = "torch==([\d.]+)"', (REPO / "noxfile.py").read_text())
    assert bound and oldest
    assert oldest.group(1).split(".")[:2] == bound.group(1).split(".")[:2], (oldest.group(1), bound.group(1))
