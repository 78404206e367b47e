"""Readers for real slice pairs on disk, laid out as ``{root}/{split}/{HQ,LQ}/``.

Each file holds one 2D slice; values are turned into Hounsfield units:

- ``.tif`` / ``.tiff`` (the paper's format, e.g. 32-bit float): values are HU,
  unless the ImageJ description carries a linear calibration (``cf=0``,
  ``c0=``, ``c1=``), in which case HU = c0 + c1 * value (ImageJ stores signed
  16-bit data this way, e.g. ``c0=-32768``). Uncalibrated integer TIFFs that
  store HU + 1024 read 1024 too high: calibrate them, or use 'minmax'
  normalisation, which ignores offsets.
- ``.npy``: values are HU (any numeric dtype).
- ``.dcm`` / ``.IMA`` (DICOM, via pydicom): HU = pixel * RescaleSlope + RescaleIntercept.
- ``.png`` (Pillow): 16-bit grayscale is stored CT values, HU = value - 1024;
  8-bit grayscale is taken as already-windowed display intensities and mapped
  back linearly onto the configured HU window (0 -> low end, 255 -> high
  end), so 'window' normalisation returns value / 255. Colour PNGs are refused.
  Float ('F') images are HU.

Pairing: an HQ and an LQ file with the same name (stem, the suffix may differ)
form a pair. Only when no HQ name matches any LQ name and the counts agree are
files paired by sorted position, with a warning; names that match in part
(s000..s007 against s001..s008) are an error, never a shifted pairing. An
uncalibrated integer slice without a negative value (no air, so probably HU +
1024: an integer TIFF without calibration or .npy, a DICOM file without
RescaleIntercept) gets a warning. Every slice of a split must have one shape,
with sides divisible by 16 (DDNet's four 2x poolings) and large enough for
MS-SSIM. Every problem raises `DataError` with one line naming the file or
folder and the fix.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ddnet.data.errors import DataError
from ddnet.loss import choose_msssim

SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".npy", ".dcm", ".ima", ".png")
"""Recognised slice files (case-insensitive); other files in HQ/ and LQ/ are ignored."""
LAYOUT_HINT = "{train,val,test}/{HQ,LQ}/ (`bench data synth --out DIR` writes that layout)"


def _natural_key(name: str) -> list[object]:
    """Sort 'slice2' before 'slice10'."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    """Slice files of a folder in natural name order (hidden files and unknown suffixes skipped).

    A link to a slice whose target is gone is an error naming it: skipped, it would leave its partner
    unpaired and the message would blame the wrong side.
    """
    files = []
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in SUFFIXES:
            continue
        if p.is_symlink() and not p.exists():
            raise DataError(f"{p} is a link to {os.readlink(p)}, which does not exist; mount or restore its "
                            "target, or remove the link.")
        if p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: _natural_key(p.name))


def _no_images(folder: Path) -> DataError:
    """The error for a folder without slice files, saying what it holds instead (subfolders are not searched)."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: _natural_key(p.name))
    subdirs = [p.name + "/" for p in entries if p.is_dir()]
    others = [p.name for p in entries if not p.is_dir()]
    held = []
    if subdirs:
        held.append(f"{len(subdirs)} subfolder{'s' if len(subdirs) > 1 else ''} ({', '.join(subdirs[:2])}"
                    f"{', ...' if len(subdirs) > 2 else ''}), which {'are' if len(subdirs) > 1 else 'is'} not searched")
    if others:
        held.append(f"{len(others)} file{'s' if len(others) > 1 else ''} of other kinds (e.g. {others[0]}; a DICOM "
                    "file needs the suffix .dcm or .IMA)")
    found = f"; it holds {' and '.join(held)}" if held else ""
    return DataError(f"no images in {folder} (looked for {', '.join(SUFFIXES)}){found}; put the slices in that "
                     "folder itself, one per file.")


def _nested_slices(folder: Path, n_read: int) -> None:
    """Warn when subfolders of `folder` hold slice files too: only the slices directly in it are read."""
    nested = [p.name + "/" for p in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name))
              if p.is_dir() and not p.name.startswith(".")
              and any(q.suffix.lower() in SUFFIXES and not q.name.startswith(".") for q in p.iterdir())]
    if nested:
        names = ", ".join(nested[:2]) + (", ..." if len(nested) > 2 else "")
        warnings.warn(f"{folder} also has {len(nested)} subfolder{'s' if len(nested) > 1 else ''} holding slices "
                      f"({names}), which {'are' if len(nested) > 1 else 'is'} not read; only the {n_read} slices "
                      f"directly in {folder.name}/ are. Move the slices up into {folder} to train on them.",
                      stacklevel=3)


# ----------------------------------------------------------------------------- single files
def _as_2d(arr: np.ndarray, path: Path) -> np.ndarray:
    """Drop singleton axes; anything but one 2D slice is an error."""
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim != 2:
        raise DataError(
            f"{path} holds an array of shape {arr.shape}, not one 2D slice; save one slice per file."
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{path} holds {arr.dtype} values, not real numbers; save the slice as numbers in HU.")
    return arr


FORMAT_NAMES = {".tif": "TIFF", ".tiff": "TIFF", ".npy": "NumPy .npy", ".dcm": "DICOM", ".ima": "DICOM",
                ".png": "PNG"}


class _Unreadable(Exception):
    """A file its decoder cannot make sense of; the message is a short reason in our words."""


def _reason(e: BaseException, path: Path) -> str:
    """First line of a decoder's message, without the path (already named) and without sentences that
    advise library arguments (`force=True`, `allow_pickle=`) the user cannot pass."""
    text = str(e).replace(f"'{path}'", "").replace(str(path), "").strip()
    line = text.splitlines()[0] if text else type(e).__name__
    kept = [s for s in re.split(r"(?<=[.!?])\s+", line) if not re.search(r"[A-Za-z_]\w*=", s)]
    return " ".join(kept).rstrip(".") or type(e).__name__


@contextmanager
def _tifffile_log() -> Iterator[list[str]]:
    """Collect what tifffile logs while reading a file instead of letting it reach the console."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(re.sub(r"^<tifffile\.\w+ @\d+>\s*", "", record.getMessage()))

    log, handler = logging.getLogger("tifffile"), Collect()
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _read_tiff(path: Path) -> tuple[np.ndarray, bool]:
    """(HU, suspect): suspect when the file is integer, uncalibrated and has no negative value."""
    import tifffile  # noqa: PLC0415 - optional format reader, loaded only for .tif data

    with _tifffile_log() as logged, tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise _Unreadable(logged[0] if logged else "no image in it")
        if len(tif.series) != 1:
            raise DataError(f"{path} holds {len(tif.series)} images; save one slice per file.")
        raw = _as_2d(tif.series[0].asarray(), path)
        meta = tif.imagej_metadata or {}
    arr = raw.astype(np.float64)
    if "c0" in meta or "c1" in meta:
        cf = int(meta.get("cf", 0))
        if cf != 0:
            raise DataError(
                f"{path} has ImageJ calibration function cf={cf}; only the straight line (cf=0, HU = c0 + c1*value) "
                "is supported, re-save the slice in HU."
            )
        return float(meta.get("c0", 0.0)) + float(meta.get("c1", 1.0)) * arr, False
    return arr, _no_air(raw)


def _read_npy(path: Path) -> tuple[np.ndarray, bool]:
    """(HU, suspect): suspect when the array is integer with no negative value (`_no_air`)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):  # not an .npy header numpy knows, or an array of Python objects
            raise _Unreadable("it holds pickled Python objects or no .npy header, not a numeric array") from e
        raise
    arr = _as_2d(arr, path)
    return arr.astype(np.float64), _no_air(arr)


def _no_air(raw: np.ndarray) -> bool:
    """Integers that never go below 0: a CT slice in HU has air (about -1000 HU) around or inside the body, so
    these are almost surely stored CT values (HU + 1024), which read 1024 HU too high."""
    return bool(np.issubdtype(raw.dtype, np.integer) and raw.size and raw.min() >= 0)


def _dicom_dataset(path: Path) -> Any:  # a pydicom Dataset (pydicom is imported lazily)
    """The DICOM dataset of a file, also of one without the 128-byte preamble and file meta (older scanners)."""
    import pydicom  # noqa: PLC0415 - optional format reader, loaded only for DICOM data (slow import)
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian  # noqa: PLC0415

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    # No preamble: parse the elements as they come; garbage yields no pixel data (or raises).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as e:
            raise _Unreadable("no DICOM header and no DICOM elements in it") from e
    if "PixelData" not in ds or "Rows" not in ds:
        raise _Unreadable("no DICOM header and no pixel data in it")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if not little:
            raise _Unreadable("big-endian DICOM without a file meta header")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _read_dicom(path: Path) -> tuple[np.ndarray, bool]:
    """(HU, suspect): suspect when the file has no RescaleIntercept and its pixels no negative value."""
    ds = _dicom_dataset(path)
    if "PixelData" not in ds:
        raise DataError(f"{path} is a DICOM file without pixel data; remove it from the folder.")
    raw = _as_2d(ds.pixel_array, path)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return raw.astype(np.float64) * slope + intercept, "RescaleIntercept" not in ds and _no_air(raw)


def _read_png(path: Path, hu_window: tuple[float, float]) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415 - optional format reader, loaded only for .png data

    with Image.open(path) as im:
        mode = im.mode
        arr = np.asarray(im)
    if mode == "L":  # already-windowed display intensities
        lo, hi = hu_window
        return lo + _as_2d(arr, path).astype(np.float64) / 255.0 * (hi - lo)
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # stored CT values: HU + 1024
        return _as_2d(arr, path).astype(np.float64) - 1024.0
    if mode == "F":
        return _as_2d(arr, path).astype(np.float64)
    article = "an" if mode[:1] in "AEFHILMNORSX" else "a"  # said as letters: an RGB, an LA; a P, a CMYK
    raise DataError(f"{path} is {article} {mode} PNG; save CT slices as 8- or 16-bit grayscale.")


_OFFSET_FIX = {"TIFF": "add an ImageJ calibration (c0=-1024)", "DICOM": "set RescaleIntercept (-1024)",
               ".npy": "save HU (the values less 1024)"}
"""How to calibrate each format whose integer files may hold HU + 1024 without saying so."""


def _offset_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "TIFF" if suffix in (".tif", ".tiff") else "DICOM" if suffix in (".dcm", ".ima") else ".npy"


def _offset_hint(subject: str, files: list[Path]) -> str:
    """The warning for `files`, uncalibrated integer slices without a negative value; `subject` names them."""
    many = len(files) > 1
    kinds = sorted({_offset_format(f) for f in files})
    is_, a, it, s_ = ("are", "", "they", "") if many else ("is", "an ", "it", "s")
    names = [f"{'.npy array' if k == '.npy' else k}{'s' if many else ''}" for k in kinds]
    what = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    fix = "; ".join(_OFFSET_FIX[k] for k in kinds) + ("; or" if len(kinds) > 1 else " or")
    return (f"{subject} {is_} {a}uncalibrated integer {what} without a negative value (no air at -1000 HU): if "
            f"{it} store{s_} HU + 1024, {it} read{s_} 1024 HU too high; {fix} use --normalisation minmax.")


NARROW_HU = 2.0
"""A slice whose values all lie within +-NARROW_HU is no CT slice in HU (air is about -1000 HU)."""


def _narrow(hu: np.ndarray) -> bool:
    """Values all within +-NARROW_HU and not constant: normalised ([0, 1], [-1, 1]) or attenuation values, not HU."""
    lo, hi = float(hu.min()), float(hu.max())
    return hi > lo and max(-lo, hi) <= NARROW_HU


def _narrow_hint(subject: str, many: bool) -> str:
    """The warning for slices whose values are `_narrow`; `subject` names them."""
    is_, s_, it = ("are", "s", "they") if many else ("is a", "", "it")
    return (f"{subject} {is_} slice{s_} whose values all lie within -{NARROW_HU:g}..{NARROW_HU:g}, not HU (air is "
            f"about -1000 HU): if {it} hold{'' if many else 's'} values normalised to [0, 1] or attenuation "
            "coefficients, the HU window maps every pixel onto about the same grey; save HU, or use "
            "--normalisation minmax.")


def _read(path: Path, hu_window: tuple[float, float]) -> tuple[np.ndarray, bool]:
    """(slice in HU as float32, suspect of the HU + 1024 offset); see `read_image`."""
    suffix = path.suffix.lower()
    suspect = False
    try:
        if suffix in (".tif", ".tiff"):
            arr, suspect = _read_tiff(path)
        elif suffix == ".npy":
            arr, suspect = _read_npy(path)
        elif suffix in (".dcm", ".ima"):
            arr, suspect = _read_dicom(path)
        elif suffix == ".png":
            arr = _read_png(path, hu_window)
        else:
            raise DataError(f"{path} has an unknown suffix; use one of {', '.join(SUFFIXES)}.")
    except DataError:
        raise
    except Exception as e:  # any decoder failure: corrupt, truncated or mislabelled file
        raise DataError(
            f"cannot read {path}: not a readable {FORMAT_NAMES[suffix]} image ({_reason(e, path)}); "
            "re-export the file or remove it."
        ) from e
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    # checked after the cast: a float64 value of 1e300 is finite but becomes inf in float32
    if not np.isfinite(out).all():
        what = "NaN or infinite values" if not np.isfinite(arr).all() else "values beyond float32's range"
        raise DataError(f"{path} contains {what}; fix or remove the slice.")
    return out, suspect


def read_image(path: Path | str, hu_window: tuple[float, float] = (-1024.0, 1024.0)) -> np.ndarray:
    """One slice in HU, (H, W) float32. `hu_window` only matters for 8-bit PNGs (see the module docstring).

    Warns (UserWarning) when the file is an uncalibrated integer slice with no negative value (`_no_air`),
    or when its values all lie within +-NARROW_HU (`_narrow`).
    """
    out, suspect = _read(Path(path), hu_window)
    if suspect:
        warnings.warn(_offset_hint(str(path), [Path(path)]), stacklevel=2)
    elif _narrow(out):
        warnings.warn(_narrow_hint(str(path), many=False), stacklevel=2)
    return out


# ----------------------------------------------------------------------------- folders
def _subdir(parent: Path, name: str) -> Path | None:
    """Child folder named `name`, case-insensitively (HQ, hq, Hq all work)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    for p in parent.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def find_split(root: Path | str, split: str) -> tuple[Path, Path]:
    """The (HQ, LQ) folders of a split, or DataError naming what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {what}; pass --data synthetic or a folder holding {LAYOUT_HINT}.")
    split_dir = _subdir(root, split)
    if split_dir is None:
        raise DataError(f"{root / split} is missing; the data folder must hold {LAYOUT_HINT}.")
    found = {}
    for kind, what in (("HQ", "normal-dose (target)"), ("LQ", "low-dose (input)")):
        sub = _subdir(split_dir, kind)
        if sub is None:
            raise DataError(f"{split_dir / kind} is missing; put the {what} slices of the {split} split there.")
        found[kind] = sub
    if found["HQ"].resolve() == found["LQ"].resolve():  # a link, or HQ and hq on a case-insensitive disk
        raise DataError(f"{found['LQ']} and {found['HQ']} are the same folder, so every input would equal its "
                        "target; put the low-dose slices in LQ/ and the normal-dose ones in HQ/.")
    return found["HQ"], found["LQ"]


def pair_files(hq_dir: Path, lq_dir: Path) -> list[tuple[Path, Path]]:
    """(HQ, LQ) file pairs: by identical name, else by sorted position when the counts agree (with a warning)."""
    hq, lq = list_images(hq_dir), list_images(lq_dir)
    for folder, files in ((hq_dir, hq), (lq_dir, lq)):
        if not files:
            raise _no_images(folder)
        _nested_slices(folder, len(files))
        seen: dict[str, Path] = {}
        for p in files:
            if p.stem in seen:
                raise DataError(f"{p} and {seen[p.stem]} share the name {p.stem!r}; keep one of them.")
            seen[p.stem] = p
    hq_by = {p.stem: p for p in hq}
    lq_by = {p.stem: p for p in lq}
    if hq_by.keys() == lq_by.keys():
        same = next((p for p in hq if p.resolve() == lq_by[p.stem].resolve()), None)
        if same is not None:
            raise DataError(f"{lq_by[same.stem]} and {same} are the same file, so the input would equal its target; "
                            "put the low-dose slice in LQ/ and the normal-dose one in HQ/.")
        return [(hq_by[p.stem], lq_by[p.stem]) for p in hq]
    hq_only = [p for p in hq if p.stem not in lq_by]
    lq_only = [p for p in lq if p.stem not in hq_by]
    n_common = len(hq) - len(hq_only)
    if n_common == 0 and len(hq) == len(lq):  # no name in common at all: a renamed side, pair in order
        warnings.warn(
            f"no file name in {hq_dir} matches one in {lq_dir} (e.g. {hq[0].name} vs {lq[0].name}); pairing "
            f"{len(hq)} slices by sorted position. Give each LQ file its HQ file's name to pair by name.",
            stacklevel=2,
        )
        return list(zip(hq, lq, strict=True))
    if n_common == 0:
        other = lq_dir if hq_only else hq_dir
        raise DataError(
            f"{(hq_only or lq_only)[0]} has no partner of the same name in {other} ({len(hq)} HQ vs {len(lq)} LQ "
            "files); give every HQ slice an LQ slice of the same name."
        )

    def few(files: list[Path]) -> str:
        return ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

    # Some names match and some do not: pairing by position would shift every pair after the first gap.
    raise DataError(
        f"{n_common} of {len(hq)} HQ files in {hq_dir} have an LQ file of the same name in {lq_dir}, the rest have "
        f"no partner (HQ only: {few(hq_only) or 'none'}; LQ only: {few(lq_only) or 'none'}); give every HQ slice "
        "an LQ slice of the same name (files are paired by sorted position only when no name matches)."
    )


def check_shape(h: int, w: int, where: Path | str) -> None:
    """Sides divisible by 16 and large enough for MS-SSIM, else DataError naming `where`."""
    if h % 16 or w % 16:
        fix_h, fix_w = max(16, h // 16 * 16), max(16, w // 16 * 16)
        raise DataError(
            f"slices in {where} are {h}x{w}; DDNet needs sides divisible by 16 (crop or pad to e.g. {fix_h}x{fix_w})."
        )
    try:
        choose_msssim(min(h, w))
    except ValueError as e:
        raise DataError(f"slices in {where} are {h}x{w}: {e}") from e


def read_split(
    root: Path | str, split: str, hu_window: tuple[float, float] = (-1024.0, 1024.0), warn_offset: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All pairs of one split: (lq_hu, hq_hu, names), the arrays (N, H, W) float32 in HU, names the HQ stems.

    Warns once (UserWarning) when uncalibrated integer files without a negative value are among them, and
    once when slices whose values all lie within +-NARROW_HU are, unless `warn_offset` is False ('minmax'
    normalisation sees neither the offset nor the scale).
    """
    hq_dir, lq_dir = find_split(root, split)
    pairs = pair_files(hq_dir, lq_dir)
    lq_all: np.ndarray | None = None
    hq_all: np.ndarray | None = None
    first = pairs[0][0]
    suspects: list[Path] = []
    narrow: list[Path] = []
    for i, (hq_path, lq_path) in enumerate(pairs):
        (hq_img, hq_odd), (lq_img, lq_odd) = _read(hq_path, hu_window), _read(lq_path, hu_window)
        suspects += [p for p, odd in ((hq_path, hq_odd), (lq_path, lq_odd)) if odd]
        narrow += [p for p, img, odd in ((hq_path, hq_img, hq_odd), (lq_path, lq_img, lq_odd))
                   if not odd and _narrow(img)]
        if hq_img.shape != lq_img.shape:
            raise DataError(
                f"{hq_path} is {hq_img.shape[0]}x{hq_img.shape[1]} but {lq_path} is "
                f"{lq_img.shape[0]}x{lq_img.shape[1]}; each LQ slice must have its HQ slice's shape."
            )
        if hq_all is None or lq_all is None:
            check_shape(*hq_img.shape, hq_dir)
            hq_all = np.empty((len(pairs), *hq_img.shape), dtype=np.float32)
            lq_all = np.empty_like(hq_all)
        elif hq_img.shape != hq_all.shape[1:]:
            raise DataError(
                f"{hq_path} is {hq_img.shape[0]}x{hq_img.shape[1]} but {first} is "
                f"{hq_all.shape[1]}x{hq_all.shape[2]}; all slices of a split must share one shape (crop or resample)."
            )
        hq_all[i], lq_all[i] = hq_img, lq_img
    assert lq_all is not None and hq_all is not None  # pairs is never empty
    if suspects and warn_offset:
        warnings.warn(_offset_hint(f"{len(suspects)} of {2 * len(pairs)} files of the {split} split (e.g. "
                                   f"{suspects[0]})", suspects), stacklevel=2)
    if narrow and warn_offset:
        warnings.warn(_narrow_hint(f"{len(narrow)} of {2 * len(pairs)} files of the {split} split (e.g. {narrow[0]})",
                                   many=True), stacklevel=2)
    return lq_all, hq_all, [hq.stem for hq, _ in pairs]
