"""A content-addressed on-disk cache of synthetic splits, shared by processes and runs.

Every cell of a grid is a fresh process, and a 512 px synthetic split costs
minutes of CPU (about 0.12 s per slice per core in 'fast' mode, 3 s in
'physics'). `load_or_generate` makes each distinct split once and every later
request, from any process, reads it back.

Layout under `cache_root()`::

    <key>/lq.npy, hq.npy    raw HU float32 (N, H, W), exactly what `generate` returned
    <key>/meta.json         settings, key, generator version, created, bytes, shapes, CRC-32s
    <key>.lock              flock'ed while the entry is being made
    .tmp-<key>-<pid>-<hex>/ an entry being written (or torn by a killed writer)
    .trash-<key>-<hex>/     an entry being removed

The key (`split_key`) hashes everything that changes the raw slices, so an
entry is never rewritten in place: it appears whole, by renaming a finished
temporary folder, or not at all. Normalisation is not in the key; it is
applied after loading. Readers check meta.json (key, shapes) and each array's
CRC-32 before trusting an entry; anything else is regenerated with a warning.

``DDNET_BENCH_CACHE=off`` turns the cache off (every call generates).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddnet.data.synthetic import Mode, PhantomKind, generate, generation_pool, pool_workers

__all__ = ["CACHE_ENV", "GENERATOR_VERSION", "cache_enabled", "cache_root", "clear", "list_entries",
           "load_or_generate", "split_key"]

GENERATOR_VERSION = "1"
"""Version of what `ddnet.data.synthetic.generate` returns for given arguments; part of every key.

Bump it with any change to the phantoms, the low-dose models or their
constants (``ddnet/data/{synthetic,phantoms,ct_physics}.py``) that changes
the slices: old entries then stop matching and are regenerated, and
`clear` removes them. `tests/test_data_cache.py` pins a fingerprint of the
generator's output so that forgetting to bump fails a test.
"""
CACHE_ENV = "DDNET_BENCH_CACHE"
"""Environment variable: the cache's base folder, or 'off' to disable the cache."""

_ARRAYS = ("lq", "hq")
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES, errno.EROFS, errno.EPERM}
"""flock/open errors of filesystems without locks (Lustre without -o flock) or read-only caches."""


class _Unusable(Exception):
    """An entry that is absent, torn or does not match its key; the message says why."""


# ----------------------------------------------------------------------------- location and key
def cache_enabled() -> bool:
    """False when ``$DDNET_BENCH_CACHE`` is 'off'."""
    return os.environ.get(CACHE_ENV, "").strip().lower() != "off"


def cache_root() -> Path:
    """Folder of the synthetic-split entries: ``<base>/synth``.

    The base is ``$DDNET_BENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/ddnet-bench``,
    else ``~/.cache/ddnet-bench``. With ``DDNET_BENCH_CACHE=off`` it is the
    default location (so `list_entries` and `clear` still reach it), but
    `load_or_generate` does not use it.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env and env.lower() != "off":
        return Path(env).expanduser() / "synth"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ddnet-bench" / "synth"


def _settings(n: int, size: int, seed: int, mode: str, dose: float, phantom: str) -> dict[str, Any]:
    # Normalised types: dose 1 and 1.0 (or a numpy scalar) make the same split and the same key.
    return {"n": int(n), "size": int(size), "seed": int(seed), "mode": str(mode), "dose": float(dose),
            "phantom": str(phantom)}


def _libraries(mode: str) -> dict[str, str]:
    """Library versions whose numerics reach the slices (FFTs; torch runs the physics projector).

    In the key, so that a hit equals what `generate` returns in this environment, bit for bit.
    """
    libs = {"numpy": np.__version__}
    if mode == "physics":
        libs["torch"] = torch.__version__
    return libs


def split_key(n: int, size: int, seed: int, mode: Mode, dose: float, phantom: PhantomKind) -> str:
    """sha256 (64 hex digits) of every setting that changes the raw HU slices of a synthetic split.

    Covers `generate`'s arguments, `GENERATOR_VERSION` and the versions of the
    libraries doing the arithmetic; not normalisation, which is applied after loading.
    """
    blob = json.dumps({"settings": _settings(n, size, seed, mode, dose, phantom),
                       "generator_version": GENERATOR_VERSION, "libraries": _libraries(mode)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _lock_path(root: Path, key: str) -> Path:
    return root / f"{key}.lock"


# ----------------------------------------------------------------------------- locking
def _acquire(path: Path, blocking: bool) -> int | None:
    """A descriptor holding an exclusive flock on `path` (created if missing); None if busy, not blocking."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: flock needs no write access
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # `clear` may have unlinked the file between our open and our flock: that lock guards
        # nothing anyone else can see, so start again on the file that is there now.
        try:
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def _key_lock(path: Path, announce: bool) -> Iterator[None]:
    """Hold the key's lock for the block: waits while another process makes the same entry."""
    try:
        fd = _acquire(path, blocking=False)
        if fd is None:
            if announce:
                print(f"waiting for another process making cached split {path.stem[:12]}", file=sys.stderr)
            fd = _acquire(path, blocking=True)
    except OSError as e:
        if e.errno not in _NO_LOCKING:
            raise
        # Still correct without the lock (entries appear by atomic rename); two processes may
        # just both generate.
        warnings.warn(f"cannot lock {path} ({e.strerror}); concurrent runs may generate the same split "
                      "twice.", RuntimeWarning, stacklevel=3)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock (also released by the kernel if this process dies)


# ----------------------------------------------------------------------------- reading and writing
def _read_entry(entry: Path, key: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The entry's arrays and meta, or `_Unusable` naming what is wrong."""
    if not entry.is_dir():
        raise _Unusable("absent")
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("key") != key:
            raise _Unusable(f"meta.json names key {str(meta.get('key'))[:12]}, not {key[:12]}")
        want = [n, size, size]
        arrays = []
        for name in _ARRAYS:
            if meta["shapes"][name] != want:
                raise _Unusable(f"meta.json gives {name} shape {meta['shapes'][name]}, expected {want}")
            # Plain load, not mmap + copy: on 315 MB from the page cache 0.03-0.05 s vs 0.03-0.9 s
            # (0.08 vs 0.10 s from disk), and the array is writable for in-place normalisation.
            # (A fresh process pays ~1 s per 315 MB of first-touch page faults either way.)
            a = np.load(entry / f"{name}.npy", allow_pickle=False)
            if a.dtype != np.float32 or list(a.shape) != want:
                raise _Unusable(f"{name}.npy holds {a.dtype} {list(a.shape)}, expected float32 {want}")
            if zlib.crc32(a) != meta["crc32"][name]:  # ~7 GB/s: a small price for not training on rot
                raise _Unusable(f"{name}.npy does not match its CRC-32")
            arrays.append(a)
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:  # missing, truncated, not JSON
        raise _Unusable(f"{type(e).__name__}: {e}") from e
    return arrays[0], arrays[1], meta


def _write_array(path: Path, a: np.ndarray) -> int:
    """Write `a` as .npy, durably; returns the CRC-32 of its data."""
    with open(path, "wb") as f:
        np.lib.format.write_array(f, a, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())  # before the rename: a crash must not publish an entry whose data never landed
    return zlib.crc32(a)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="seconds")


def _write_entry(root: Path, key: str, lq: np.ndarray, hq: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write the entry into a temporary folder beside it and rename that into place."""
    tmp = root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would shut other users out of a shared cache
    arrays = dict(zip(_ARRAYS, (lq, hq), strict=True))
    try:
        crc = {name: _write_array(tmp / f"{name}.npy", a) for name, a in arrays.items()}
        meta = {**meta, "crc32": crc, "shapes": {name: list(a.shape) for name, a in arrays.items()},
                "dtype": "float32", "bytes": sum((tmp / f"{name}.npy").stat().st_size for name in _ARRAYS)}
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        entry = root / key
        try:
            os.rename(tmp, entry)  # atomic: readers see the whole entry or none
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer (without a lock) got there first
        _fsync_dir(root)
        return entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(path: Path, key: str) -> int:
    """Remove a folder: renamed aside first, so that no reader sees it half deleted. Returns bytes freed."""
    size = _bytes(path)
    trash = path.parent / f".trash-{key}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return 0
    shutil.rmtree(trash, ignore_errors=True)
    return size


def _bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _remove_leftovers(root: Path, key: str) -> int:
    """Temporary and trash folders of `key`; call while holding its lock (their writers are gone)."""
    freed = 0
    for p in [*root.glob(f".tmp-{key}-*"), *root.glob(f".trash-{key}-*")]:
        freed += _bytes(p)
        shutil.rmtree(p, ignore_errors=True)
    return freed


# ----------------------------------------------------------------------------- the entry point
def _generate(n: int, size: int, seed: int, mode: Mode, dose: float, phantom: PhantomKind,
              progress: bool) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    with generation_pool(pool_workers(n, size, mode)) as pool:  # every core: 512 px slices are slow
        lq, hq = generate(n, size, seed, mode, dose, phantom, progress=progress, pool=pool)
    return lq, hq, time.perf_counter() - t0


def load_or_generate(
    n: int, size: int, seed: int, mode: Mode, dose: float, phantom: PhantomKind, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(lq, hq, info): the split `generate(n, size, seed, mode, dose, phantom)` would return, cached.

    lq and hq are raw HU float32 (n, size, size), writable, bit-identical to
    `generate`'s. info is a flat dict: ``cache`` ('hit', 'miss' or 'off'),
    ``path`` (the entry; None when off or when it could not be written),
    ``key``, ``load_s`` (reading and checking the entry), ``generate_s``,
    ``write_s`` and ``wait_s`` (waiting for another process that was making
    the same entry).

    A miss generates with every core and publishes the entry atomically; a
    second process asking for the same key meanwhile waits on the key's lock
    and then reads the entry. A corrupt entry is regenerated with a warning;
    a failed write (disk full) warns and returns the generated slices.
    """
    key = split_key(n, size, seed, mode, dose, phantom)
    info: dict[str, Any] = {"cache": "off", "path": None, "key": key, "load_s": 0.0, "generate_s": 0.0,
                            "write_s": 0.0, "wait_s": 0.0}
    if not cache_enabled():
        lq, hq, info["generate_s"] = _generate(n, size, seed, mode, dose, phantom, progress)
        return lq, hq, info
    root = cache_root()
    entry = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"cannot create the synthetic cache {root} ({e.strerror}); generating without it. "
                      f"Point ${CACHE_ENV} at a writable folder, or set it to 'off'.", RuntimeWarning,
                      stacklevel=2)
        lq, hq, info["generate_s"] = _generate(n, size, seed, mode, dose, phantom, progress)
        return lq, hq, info

    def hit() -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        lq, hq, _ = _read_entry(entry, key, n, size)
        info.update(cache="hit", path=str(entry), load_s=time.perf_counter() - t0)
        try:
            os.utime(entry / "meta.json")  # 'last used' for list_entries
        except OSError:
            pass  # a read-only cache still serves hits
        return lq, hq

    # Lock-free first look: an entry, once there, is complete and never changes.
    try:
        lq, hq = hit()
        return lq, hq, info
    except _Unusable:
        pass
    t_wait = time.perf_counter()
    with _key_lock(_lock_path(root, key), announce=progress):
        info["wait_s"] = time.perf_counter() - t_wait
        try:  # made by the process we waited for?
            lq, hq = hit()
            return lq, hq, info
        except _Unusable as e:
            if entry.exists():
                warnings.warn(f"synthetic cache entry {entry} is unusable ({e}); regenerating it.",
                              RuntimeWarning, stacklevel=2)
                _discard(entry, key)
        _remove_leftovers(root, key)  # torn temporary folders of killed writers
        lq, hq, info["generate_s"] = _generate(n, size, seed, mode, dose, phantom, progress)
        info["cache"] = "miss"
        meta = {"key": key, "generator_version": GENERATOR_VERSION,
                "settings": _settings(n, size, seed, mode, dose, phantom), "libraries": _libraries(mode),
                "created": _now_iso(), "generate_s": info["generate_s"], "host": socket.gethostname()}
        t0 = time.perf_counter()
        try:
            info["path"] = str(_write_entry(root, key, lq, hq, meta))
        except OSError as e:  # disk full, quota: the slices are still good, just not kept
            warnings.warn(f"could not write the synthetic cache entry {entry} ({e.strerror or e}); "
                          "continuing without it.", RuntimeWarning, stacklevel=2)
        info["write_s"] = time.perf_counter() - t0
    return lq, hq, info


# ----------------------------------------------------------------------------- housekeeping
def list_entries() -> list[dict[str, Any]]:
    """The cache's entries, oldest first: key, settings, bytes, created, last_used, path.

    `settings` and `created` are None for an entry whose meta.json is unreadable
    (it will be regenerated when asked for; `clear` removes it). `last_used`
    is the time of the last hit or of the creation.
    """
    root = cache_root()
    if not root.is_dir():
        return []
    rows = []
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            meta = json.loads((p / "meta.json").read_text())
            settings, created = meta.get("settings"), meta.get("created")
            last_used = _now_iso((p / "meta.json").stat().st_mtime)
        except (OSError, ValueError, AttributeError):  # missing, not JSON, not a JSON object
            settings, created, last_used = None, None, None
        rows.append({"key": p.name, "settings": settings, "bytes": _bytes(p), "created": created,
                     "last_used": last_used, "path": str(p)})
    return sorted(rows, key=lambda r: (r["created"] or "", r["key"]))


def clear(keys: Iterable[str] | None = None) -> int:
    """Remove entries; returns the bytes freed.

    `keys`: full keys or prefixes (each removes every entry whose key starts
    with it); None removes every entry. Temporary folders left by killed
    writers of those keys (of any key when None) are removed too; one whose
    writer still holds the key's lock is left alone.
    """
    keys = None if keys is None else list(keys)
    if keys is not None and any(not k for k in keys):
        raise ValueError("an empty key would match every entry; pass keys=None to clear everything.")
    root = cache_root()
    if not root.is_dir():
        return 0

    def chosen(key: str) -> bool:
        return keys is None or any(key.startswith(k) for k in keys)

    freed = 0
    for p in root.iterdir():
        if not p.name.startswith(".") and p.is_dir() and chosen(p.name):
            freed += _discard(p, p.name)
    # Leftovers and idle lock files, key by key, only where no writer holds the lock.
    names = {p.name[len(".tmp-"):][:64] for p in root.glob(".tmp-*")}
    names |= {p.name[len(".trash-"):][:64] for p in root.glob(".trash-*")}
    names |= {p.stem for p in root.glob("*.lock")}
    for key in sorted(k for k in names if chosen(k)):
        lock = _lock_path(root, key)
        try:
            fd = _acquire(lock, blocking=False)
        except OSError:
            continue
        if fd is None:
            continue  # being written right now
        try:
            freed += _remove_leftovers(root, key)
            if not (root / key).exists():
                lock.unlink(missing_ok=True)  # waiters notice the unlink (`_acquire`) and retry
        finally:
            os.close(fd)
    return freed
