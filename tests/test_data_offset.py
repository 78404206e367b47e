"""The HU + 1024 warning for every format that can hold stored values without saying so: uncalibrated integer
TIFFs, integer .npy arrays, DICOM files without a RescaleIntercept. Air (about -1000 HU) is in every CT slice in
HU, so integers that never go below 0 are almost surely HU + 1024 and would read 1024 HU too high."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile

from ddnet.config import DataConfig
from ddnet.data import load_split, readers
from tests.test_data import write_dicom

HU = np.full((32, 32), -1000.0, np.float32)
HU[8:24, 8:24] = 40.0  # a body in air


def _no_intercept(path: Path, stored: np.ndarray) -> None:
    """A DICOM whose pixels are `stored` (uint16) and which has no RescaleIntercept (nor slope)."""
    write_dicom(path, HU)
    ds = pydicom.dcmread(path)
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _split(root: Path, write) -> Path:
    for kind in ("HQ", "LQ"):
        (root / "train" / kind).mkdir(parents=True)
        for i in range(2):
            write(root / "train" / kind / f"s{i}")
    return root


@pytest.mark.parametrize(("fmt", "write", "fix"), [
    ("npy", lambda p: np.save(p.with_suffix(".npy"), (HU + 1024).astype(np.uint16)), "save HU (the values less 1024)"),
    ("dcm", lambda p: _no_intercept(p.with_suffix(".dcm"), HU + 1024), "set RescaleIntercept (-1024)"),
])
def test_stored_values_without_calibration_warn_once_per_split(tmp_path, fmt, write, fix) -> None:
    root = _split(tmp_path / fmt, write)
    with pytest.warns(UserWarning) as caught:
        split = load_split(DataConfig(source=str(root)), "train")
    hints = [str(w.message) for w in caught if "1024 HU too high" in str(w.message)]
    assert len(hints) == 1 and hints[0].startswith("4 of 4 files of the train split (e.g. ")
    assert fix in hints[0] and "--normalisation minmax" in hints[0] and "TIFF" not in hints[0]
    assert float(split.hq.min()) == (24 + 1024) / 2048  # air read as +24 HU: the warning is the only change
    with pytest.warns(UserWarning, match=f"s0.{fmt} is an uncalibrated integer"):
        readers.read_image(root / "train" / "HQ" / f"s0.{fmt}")


def test_no_false_alarm_for_hu_integers_floats_or_calibrated_dicom(tmp_path) -> None:
    writers = {
        "npy-int16": lambda p: np.save(p.with_suffix(".npy"), HU.astype(np.int16)),  # air below 0: HU
        "npy-float": lambda p: np.save(p.with_suffix(".npy"), HU + 1024),  # floats are HU as documented
        "dcm-intercept": lambda p: write_dicom(p.with_suffix(".dcm"), HU),  # RescaleIntercept -1024
        "tif-int16": lambda p: tifffile.imwrite(p.with_suffix(".tif"), HU.astype(np.int16)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, write in writers.items():
            split = load_split(DataConfig(source=str(_split(tmp_path / name, write))), "train")
            assert tuple(split.hq.shape) == (2, 1, 32, 32), name


def test_a_mixed_split_names_every_format_and_its_fix(tmp_path) -> None:
    paths = [tmp_path / "a.tif", tmp_path / "b.dcm", tmp_path / "c.npy"]
    hint = readers._offset_hint("3 of 6 files", paths)
    assert hint.startswith("3 of 6 files are uncalibrated integer .npy arrays, DICOMs and TIFFs without a negative")
    assert hint.endswith("save HU (the values less 1024); set RescaleIntercept (-1024); add an ImageJ calibration "
                         "(c0=-1024); or use --normalisation minmax.")


@pytest.mark.parametrize("write", [
    lambda p: tifffile.imwrite(p.with_suffix(".tif"), ((HU + 1024) / 2048).astype(np.float32)),  # [0, 1]
    lambda p: np.save(p.with_suffix(".npy"), (HU + 1000) / 1000 * 0.02),  # attenuation, 1/mm
], ids=["tif-unit-range", "npy-attenuation"])
def test_slices_that_are_not_hu_but_normalised_warn_once_per_split(tmp_path, write) -> None:
    root = _split(tmp_path / "d", write)
    with pytest.warns(UserWarning) as caught:
        split = load_split(DataConfig(source=str(root)), "train")
    hints = [str(w.message) for w in caught if "not HU" in str(w.message)]
    assert len(hints) == 1 and hints[0].startswith("4 of 4 files of the train split (e.g. "), hints
    assert "values all lie within -2..2" in hints[0] and "--normalisation minmax" in hints[0]
    assert float(split.hq.max() - split.hq.min()) < 0.002  # one grey: why it warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # minmax stretches each slice: nothing to warn of
        load_split(DataConfig(source=str(root), normalisation="minmax"), "train")
    with pytest.warns(UserWarning, match=r"s\d\.(tif|npy) is a slice whose values all lie within"):
        readers.read_image(next((root / "train" / "HQ").iterdir()))


def test_a_blank_slice_is_no_narrow_range_alarm(tmp_path) -> None:
    root = _split(tmp_path / "d", lambda p: np.save(p.with_suffix(".npy"), np.zeros((32, 32), np.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(DataConfig(source=str(root)), "train")
