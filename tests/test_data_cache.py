"""The synthetic-split cache: hits equal `generate`; keys; two processes; killed writers; corruption."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ddnet.data.cache as cache
from bench.cli import app
from ddnet.data.cache import cache_root, clear, list_entries, load_or_generate, split_key
from ddnet.data.synthetic import generate

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(n=8, size=128, seed=5, mode="fast", dose=0.25, phantom="chest")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synth"


def direct(n, size, seed, mode, dose, phantom):
    return generate(n, size, seed, mode, dose, phantom)


def spawn(script: str, *args: str, cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "DDNET_BENCH_CACHE": str(cache_dir), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- location and key
def test_cache_root_follows_env_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" / "synth"
    monkeypatch.delenv("DDNET_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "ddnet-bench" / "synth"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "ddnet-bench" / "synth"


def test_every_setting_and_the_generator_version_change_the_key(monkeypatch):
    base = split_key(**SMALL)
    assert base == split_key(**SMALL) and len(base) == 64
    assert split_key(**{**SMALL, "dose": 1}) == split_key(**{**SMALL, "dose": 1.0})
    changed = {"n": 9, "size": 64, "seed": 6, "mode": "physics", "dose": 0.5, "phantom": "ellipses"}
    keys = {name: split_key(**{**SMALL, name: value}) for name, value in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(changed)
    monkeypatch.setattr(cache, "GENERATOR_VERSION", cache.GENERATOR_VERSION + "-next")
    assert split_key(**SMALL) != base


# Pinned summary of `generate(2, 32, seed=0, mode)` for GENERATOR_VERSION "1": mean LQ, mean HQ, std LQ
# and three pixels, in HU. Rounding differences across machines are far below the tolerance; any real
# change of anatomy, noise or constants is far above it.
FINGERPRINT = {
    "fast": [-691.047, -691.064, 415.225, 27.026, -679.162, -615.241],
    "physics": [-690.583, -690.704, 404.757, 39.016, -625.024, -557.983],
}


@pytest.mark.parametrize("mode", ["fast", "physics"])
def test_generator_output_matches_the_pinned_generator_version(mode):
    assert cache.GENERATOR_VERSION == "1", "GENERATOR_VERSION changed: record the new FINGERPRINT here"
    lq, hq = generate(2, 32, seed=0, mode=mode)
    got = [lq.mean(), hq.mean(), lq.std(), hq[0, 16, 16], lq[1, 10, 20], hq[1, 20, 8]]
    assert np.allclose(got, FINGERPRINT[mode], atol=0.05), (
        f"generate() output changed ({np.round(got, 3).tolist()}): bump GENERATOR_VERSION in "
        "ddnet/data/cache.py so that cached splits are regenerated, and record the new FINGERPRINT."
    )


# ----------------------------------------------------------------------------- miss, hit, off
def test_miss_then_hit_bit_identical_to_generate_and_hit_is_faster(root):
    want_lq, want_hq = direct(**SMALL)
    lq, hq, miss = load_or_generate(**SMALL)
    assert miss["cache"] == "miss" and miss["generate_s"] > 0 and miss["load_s"] == 0.0
    entry = Path(miss["path"])
    assert entry == root / split_key(**SMALL)
    assert np.array_equal(lq, want_lq) and np.array_equal(hq, want_hq)

    lq2, hq2, hit = load_or_generate(**SMALL)
    assert hit["cache"] == "hit" and hit["path"] == miss["path"] and hit["generate_s"] == 0.0
    assert lq2.dtype == np.float32 and lq2.shape == (8, 128, 128) and lq2.flags.writeable
    assert np.array_equal(lq2, want_lq) and np.array_equal(hq2, want_hq)
    assert hit["load_s"] < miss["generate_s"]

    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] == entry.name and meta["generator_version"] == cache.GENERATOR_VERSION
    assert meta["settings"] == {**SMALL, "dose": 0.25}
    assert meta["shapes"] == {"lq": [8, 128, 128], "hq": [8, 128, 128]} and meta["created"]
    assert meta["bytes"] == (entry / "lq.npy").stat().st_size + (entry / "hq.npy").stat().st_size
    assert sorted(p.name for p in root.iterdir()) == sorted([entry.name, f"{entry.name}.lock"])


def test_a_miss_generates_with_the_pool_sized_for_the_request(root, monkeypatch):
    asked = []

    @contextmanager
    def fake_pool(workers):  # threads stand in for the spawned processes: same pieces, same result
        asked.append(workers)
        with ThreadPoolExecutor(workers) as pool:
            yield pool

    monkeypatch.setattr(cache, "pool_workers", lambda n, size, mode: 3)
    monkeypatch.setattr(cache, "generation_pool", fake_pool)
    lq, hq, info = load_or_generate(**SMALL)
    assert asked == [3] and info["cache"] == "miss"
    want_lq, want_hq = direct(**SMALL)
    assert np.array_equal(lq, want_lq) and np.array_equal(hq, want_hq)


def test_off_generates_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DDNET_BENCH_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lq, hq, info = load_or_generate(**SMALL)
    assert info["cache"] == "off" and info["path"] is None and info["generate_s"] > 0
    want_lq, want_hq = direct(**SMALL)
    assert np.array_equal(lq, want_lq) and np.array_equal(hq, want_hq)
    assert not (tmp_path / "xdg").exists()
    assert load_or_generate(**SMALL)[2]["cache"] == "off"


# ----------------------------------------------------------------------------- two processes at once
RACER = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import ddnet.data.cache as cache
ready, go, out, counter = map(Path, sys.argv[1:5])
real = cache.generate
def slow(*args, **kwargs):
    with open(counter, "a") as f:
        f.write("generated\n")
    time.sleep(2.0)  # hold the key's lock long enough that the other process must wait for it
    return real(*args, **kwargs)
cache.generate = slow
ready.touch()
while not go.exists():
    time.sleep(0.005)
lq, hq, info = cache.load_or_generate(6, 32, 11, "fast", 0.25, "chest")
np.savez(out, lq=lq, hq=hq)
out.with_suffix(".json").write_text(json.dumps(info))
"""


def test_two_processes_asking_at_once_generate_once_and_get_the_same_slices(tmp_path):
    counter = tmp_path / "generated.txt"
    go = tmp_path / "go"
    procs = [spawn(RACER, str(tmp_path / f"ready{i}"), str(go), str(tmp_path / f"out{i}.npz"), str(counter),
                   cache_dir=tmp_path / "cache") for i in range(2)]
    try:
        for i, p in enumerate(procs):
            wait_for(tmp_path / f"ready{i}", p)
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            p.kill()
    infos = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert sorted(i["cache"] for i in infos) == ["hit", "miss"]
    assert counter.read_text().splitlines() == ["generated"]
    waiter = next(i for i in infos if i["cache"] == "hit")
    assert waiter["wait_s"] > 0.5  # it blocked on the lock while the other generated, then read the entry
    want_lq, want_hq = generate(6, 32, 11, "fast", 0.25, "chest")
    for i in range(2):
        got = np.load(tmp_path / f"out{i}.npz")
        assert np.array_equal(got["lq"], want_lq) and np.array_equal(got["hq"], want_hq)


# ----------------------------------------------------------------------------- interrupted writers
STALLER = r"""
import sys, time
from pathlib import Path
import ddnet.data.cache as cache
signal_file = Path(sys.argv[1])
real = cache._write_array
def stall(path, a):
    crc = real(path, a)
    if path.name == "lq.npy":
        signal_file.touch()
        time.sleep(600)  # SIGKILLed here: lq.npy written, hq.npy and meta.json not
    return crc
cache._write_array = stall
cache.load_or_generate(4, 32, 9, "fast", 0.25, "chest")
"""


def test_a_writer_killed_mid_way_leaves_no_entry_and_the_next_call_regenerates(root, tmp_path):
    args = dict(n=4, size=32, seed=9, mode="fast", dose=0.25, phantom="chest")
    key = split_key(**args)
    proc = spawn(STALLER, str(tmp_path / "stalled"), cache_dir=root.parent)
    try:
        wait_for(tmp_path / "stalled", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    torn = list(root.glob(f".tmp-{key}-*"))
    assert not (root / key).exists() and len(torn) == 1 and (torn[0] / "lq.npy").exists()
    assert [e["key"] for e in list_entries()] == []

    lq, hq, info = load_or_generate(**args)  # the dead writer's lock was released by the kernel
    assert info["cache"] == "miss"
    want_lq, want_hq = direct(**args)
    assert np.array_equal(lq, want_lq) and np.array_equal(hq, want_hq)
    assert not torn[0].exists()  # cleaned up under the key's lock
    assert load_or_generate(**args)[2]["cache"] == "hit"


def test_a_failed_write_warns_returns_the_slices_and_leaves_nothing(root, monkeypatch):
    real = cache._write_array

    def disk_full(path, a):
        crc = real(path, a)
        if path.name == "lq.npy":
            raise OSError(28, "No space left on device")
        return crc

    monkeypatch.setattr(cache, "_write_array", disk_full)
    with pytest.warns(RuntimeWarning, match="could not write"):
        lq, hq, info = load_or_generate(**SMALL)
    assert info["cache"] == "miss" and info["path"] is None
    assert np.array_equal(lq, direct(**SMALL)[0])
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(cache, "_write_array", real)
    assert load_or_generate(**SMALL)[2]["cache"] == "miss"
    assert load_or_generate(**SMALL)[2]["cache"] == "hit"


def flip_bytes(entry: Path) -> None:
    with open(entry / "lq.npy", "r+b") as f:
        f.seek((entry / "lq.npy").stat().st_size // 2)
        f.write(b"\xff" * 16)


def truncate(entry: Path) -> None:
    os.truncate(entry / "lq.npy", (entry / "lq.npy").stat().st_size // 2)


def wrong_shape_in_meta(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["shapes"]["lq"] = [1, 2, 3]
    (entry / "meta.json").write_text(json.dumps(meta))


def garbage_meta(entry: Path) -> None:
    (entry / "meta.json").write_text("{not json")


@pytest.mark.parametrize("damage", [flip_bytes, truncate, wrong_shape_in_meta, garbage_meta])
def test_a_corrupt_entry_is_detected_and_regenerated(root, damage):
    _, _, first = load_or_generate(**SMALL)
    damage(Path(first["path"]))
    with pytest.warns(RuntimeWarning, match="regenerating"):
        lq, hq, info = load_or_generate(**SMALL)
    assert info["cache"] == "miss"
    want_lq, want_hq = direct(**SMALL)
    assert np.array_equal(lq, want_lq) and np.array_equal(hq, want_hq)
    assert load_or_generate(**SMALL)[2]["cache"] == "hit"
    assert [p for p in root.iterdir() if p.name.startswith(".")] == []  # the bad entry's trash is gone


# ----------------------------------------------------------------------------- housekeeping
def test_list_entries_and_clear(root):
    a = dict(SMALL)
    b = {**SMALL, "seed": 6, "size": 64}
    _, _, ia = load_or_generate(**a)
    _, _, ib = load_or_generate(**b)
    entries = {e["key"]: e for e in list_entries()}
    assert set(entries) == {ia["key"], ib["key"]}
    assert entries[ib["key"]]["settings"] == {**b, "dose": 0.25}
    size_a = sum(p.stat().st_size for p in Path(ia["path"]).iterdir())
    assert entries[ia["key"]]["bytes"] == size_a and entries[ia["key"]]["created"]

    # last_used moves with a hit
    os.utime(Path(ia["path"]) / "meta.json", (1_000_000_000, 1_000_000_000))
    assert next(e for e in list_entries() if e["key"] == ia["key"])["last_used"].startswith("2001-09-09")
    load_or_generate(**a)
    last_used = next(e for e in list_entries() if e["key"] == ia["key"])["last_used"]
    assert last_used >= entries[ia["key"]]["created"]

    # a torn temporary folder of `b` (its writer is gone) and an in-progress one of a key being written
    torn = root / f".tmp-{ib['key']}-123-abcd"
    torn.mkdir()
    (torn / "lq.npy").write_bytes(b"x" * 1000)
    busy_key = "f" * 64
    busy = root / f".tmp-{busy_key}-456-beef"
    busy.mkdir()
    held = os.open(cache._lock_path(root, busy_key), os.O_RDONLY | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # another "process" is writing busy_key right now
    try:
        assert clear([ia["key"][:10]]) == size_a
        assert [e["key"] for e in list_entries()] == [ib["key"]]
        assert load_or_generate(**a)[2]["cache"] == "miss"
        size_all = sum(e["bytes"] for e in list_entries())
        assert clear() == size_all + 1000
        assert list_entries() == [] and not torn.exists()
        assert busy.exists()  # its writer still holds the lock
    finally:
        os.close(held)
    assert clear() == 0 and not busy.exists()
    assert list(root.iterdir()) == []
    with pytest.raises(ValueError, match="empty key"):
        clear([""])


def test_clear_and_list_on_a_missing_cache(root):
    assert list_entries() == [] and clear() == 0 and not root.exists()


def test_bench_data_cache_list_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path))
    load_or_generate(3, 32, 5, "fast", 0.25, "chest")
    res = CliRunner().invoke(app, ["data", "cache", "list"])
    assert res.exit_code == 0 and "1 entries" in res.output and "fast" in res.output
    res = CliRunner().invoke(app, ["data", "cache", "clear"])
    assert res.exit_code == 0 and "freed" in res.output and list_entries() == []


def test_bench_data_cache_clear_refuses_an_unknown_key_and_removes_nothing(tmp_path, monkeypatch, capsys):
    from bench.cli import main  # noqa: PLC0415 - the console entry point: one error line, exit 2

    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path))
    load_or_generate(3, 32, 5, "fast", 0.25, "chest")
    before = list_entries()
    key = before[0]["key"]
    with pytest.raises(SystemExit) as e:
        main(["data", "cache", "clear", key[:8], "deadbeef"])  # one known, one unknown: neither is removed
    err = capsys.readouterr().err
    print(err)
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "'deadbeef'" in err and "nothing was removed" in err and key[:12] in err and "cache list" in err
    assert list_entries() == before
    # A prefix that `bench data cache list` shows still removes its entry.
    res = CliRunner().invoke(app, ["data", "cache", "clear", key[:12]])
    assert res.exit_code == 0 and "freed" in res.output and list_entries() == []
    with pytest.raises(SystemExit) as e:
        main(["data", "cache", "clear", key[:12]])
    assert e.value.code == 2 and "it has no entries" in capsys.readouterr().err


def test_bench_data_cache_with_off_says_it_acts_on_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DDNET_BENCH_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    res = CliRunner().invoke(app, ["data", "cache", "clear"])
    print(res.output)
    assert res.exit_code == 0 and str(tmp_path / "xdg" / "ddnet-bench" / "synth") in res.output
    assert "the default folder: DDNET_BENCH_CACHE=off only stops runs from using it" in res.output


PROBE_TEST = '''
import os
from pathlib import Path


def test_probe():
    folder = Path(os.environ["DDNET_BENCH_CACHE"])
    assert folder.is_dir()
    (folder / "entry").write_text("slices")
    Path(os.environ["PROBE_SAYS"]).write_text(str(folder))
'''


@pytest.mark.parametrize("given", [False, True])
def test_a_test_session_removes_the_cache_folder_it_made_and_keeps_one_given(tmp_path, given):
    # the repository's conftest.py gives each pytest session its own data cache; it used to stay in /tmp after
    # the session, 5 MB each run
    (tmp_path / "test_probe.py").write_text(PROBE_TEST)
    env = {k: v for k, v in os.environ.items() if k != "DDNET_BENCH_CACHE"}
    env["PROBE_SAYS"] = str(tmp_path / "said")
    if given:
        (tmp_path / "mine").mkdir()
        env["DDNET_BENCH_CACHE"] = str(tmp_path / "mine")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    used = Path((tmp_path / "said").read_text())
    if given:
        assert used == tmp_path / "mine" and (used / "entry").read_text() == "slices"  # the caller's: kept
    else:
        assert used.name.startswith("ddnet-bench-cache-") and not used.exists()
