"""The run-folder store: atomic JSON, flushed JSONL, torn last lines, permissions."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bench.store import (
    append_jsonl,
    read_json,
    read_jsonl,
    read_jsonl_checked,
    read_summary,
    rewrite_jsonl,
    write_json,
)


def test_json_round_trip_and_non_finite(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": 1.5, "bad": float("nan"), "t": (1, 2)})
    assert read_json(tmp_path / "a.json") == {"x": 1.5, "bad": "nan", "t": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_files_follow_the_umask_not_mkstemp(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        rewrite_jsonl(tmp_path / "b.jsonl", [{"epoch": 1}])
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_leaves_the_file_as_it_was_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    write_json(tmp_path / "a.json", {"v": 1})
    rewrite_jsonl(tmp_path / "b.jsonl", [{"epoch": 1}])

    def full(fd: int) -> None:  # a delayed-allocation filesystem reports the full disk at fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_json(tmp_path / "a.json", {"v": 2})
    with pytest.raises(OSError, match="No space"):
        rewrite_jsonl(tmp_path / "b.jsonl", [{"epoch": 1}, {"epoch": 2}])
    monkeypatch.undo()
    assert read_json(tmp_path / "a.json") == {"v": 1} and read_jsonl(tmp_path / "b.jsonl") == [{"epoch": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl"]


def test_jsonl_ignores_a_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    append_jsonl(p, {"epoch": 1})
    append_jsonl(p, {"epoch": 2})
    with open(p, "a") as f:
        f.write('{"epoch": 3, "train_lo')  # killed mid-write
    assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}]
    rewrite_jsonl(p, read_jsonl(p)[:1])
    assert read_jsonl(p) == [{"epoch": 1}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_every_valid_row_is_read_and_bad_lines_are_named(tmp_path):

    path = tmp_path / "e.jsonl"
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n[1, 2]\n\n{"epoch": 5, "torn')
    rows, bad = read_jsonl_checked(path)
    assert rows == [{"epoch": 1}, {"epoch": 3}] and bad == [2, 4, 6]  # rows after a bad line are kept
    assert read_jsonl(path) == rows and read_jsonl_checked(tmp_path / "missing") == ([], [])
    # a file being appended to: its torn last line is not reported, an inner bad line still is
    assert read_jsonl_checked(path, live=True) == (rows, [2, 4])
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n\n')
    assert read_jsonl_checked(path, live=True) == ([{"epoch": 1}, {"epoch": 2}], [])


def test_a_summary_is_none_when_absent_and_damaged_when_unreadable(tmp_path: Path) -> None:
    assert read_summary(tmp_path) is None
    write_json(tmp_path / "summary.json", {"status": "ok", "epochs": 3})
    assert read_summary(tmp_path) == {"status": "ok", "epochs": 3}
    for text, why in [('{"status": "o', "JSONDecodeError"), ("[1, 2]", "not a JSON object"),
                      (b"\xff\xfe{}", "UnicodeDecodeError")]:
        (tmp_path / "summary.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        s = read_summary(tmp_path)
        assert s["status"] == "damaged" and why in s["error"] and str(tmp_path) in s["error"], s
