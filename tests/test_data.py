"""The data layer: synthetic generator, readers, normalisation, `bench data synth`."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
import tifffile
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

import ddnet.data.readers as readers
from bench.cli import app, main
from ddnet.config import ConfigError, DataConfig
from ddnet.data import DataError, SliceDataset, SliceSet, load_split, normalise, split_seed
from ddnet.data.phantoms import chest_phantom, random_ellipses, shepp_logan
from ddnet.data.synthetic import generate, generation_pool, simulate_low_dose
from ddnet.errors import UserError
from ddnet.loaders import check_val_shape


def psnr_window(lq: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """PSNR (dB) per slice in the default window normalisation (-1024..1024 HU -> [0, 1])."""
    a = np.clip((lq + 1024) / 2048, 0, 1)
    b = np.clip((hq + 1024) / 2048, 0, 1)
    return 10 * np.log10(1.0 / ((a - b) ** 2).reshape(len(a), -1).mean(1))


def frac(img: np.ndarray, lo: float, hi: float) -> float:
    return float(((img > lo) & (img < hi)).mean())


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("mode", ["fast", "physics"])
def test_generate_is_deterministic_per_seed_and_differs_across_seeds(mode):
    a_lq, a_hq = generate(3, 32, seed=7, mode=mode)
    b_lq, b_hq = generate(3, 32, seed=7, mode=mode)
    c_lq, c_hq = generate(3, 32, seed=8, mode=mode)
    assert a_lq.dtype == np.float32 and a_lq.shape == (3, 32, 32)
    assert np.array_equal(a_lq, b_lq) and np.array_equal(a_hq, b_hq)
    assert np.abs(a_hq - c_hq).mean() > 20.0  # other anatomy (HU)
    assert np.abs(a_lq - c_lq).mean() > 20.0
    # Slices within one call differ too.
    assert np.abs(a_hq[0] - a_hq[1]).mean() > 20.0


def test_generate_slices_do_not_depend_on_chunking():
    lq, hq = generate(5, 32, seed=3)
    lq2, hq2 = generate(3, 32, seed=3, first=2)
    assert np.array_equal(lq[2:], lq2) and np.array_equal(hq[2:], hq2)


def test_fast_mode_noise_band_and_dose_scaling():
    lq, hq = generate(6, 64, seed=1, mode="fast", dose=0.25)
    p = psnr_window(lq, hq)
    # Measured ~41.7 dB (about 20 HU noise in a 2048 HU window); a noise-free or a wildly noisy
    # generator falls outside.
    assert 39.0 < p.min() and p.max() < 44.5, p
    assert np.std(lq - hq) > 10.0  # HU
    lq_full, hq_full = generate(6, 64, seed=1, mode="fast", dose=1.0)
    assert np.array_equal(hq, hq_full)  # HQ does not depend on the dose
    # Noise std scales like 1/sqrt(dose): quarter dose is twice as noisy as full dose.
    ratio = np.std(lq - hq) / np.std(lq_full - hq_full)
    assert ratio == pytest.approx(2.0, rel=0.05)


def test_physics_mode_noise_band_and_lower_dose_is_worse():
    p = {d: psnr_window(*generate(3, 64, seed=2, mode="physics", dose=d)).mean() for d in (0.1, 0.25, 0.5)}
    assert 41.0 < p[0.25] < 47.5, p  # measured ~44.5 dB at 64 px
    assert p[0.1] < p[0.25] - 2.0 and p[0.25] < p[0.5] - 1.5, p
    lq, hq = generate(2, 64, seed=2, mode="physics", dose=0.25)
    # Same geometry for LQ and HQ: they differ by zero-mean noise only.
    assert abs(float((lq - hq).mean())) < 3.0
    assert 8.0 < float((lq - hq).std()) < 40.0


def test_chest_phantom_has_anatomy_in_expected_hu_ranges():
    img = chest_phantom(128, np.random.default_rng([5, 0]))
    assert img.shape == (128, 128) and img.dtype == np.float32
    assert frac(img, -1001, -990) > 0.4  # air around the body
    assert frac(img, -900, -780) > 0.05  # lungs near -850
    assert frac(img, -130, -70) > 0.01  # subcutaneous fat
    assert frac(img, -10, 90) > 0.08  # soft tissue, heart, vessels
    assert img.max() > 700 and frac(img, 650, 1200) > 0.001  # bone
    # One lung on each side of the midline.
    lung_cols = np.nonzero((img > -900) & (img < -780))[1]
    assert (lung_cols < 54).sum() > 100 and (lung_cols > 74).sum() > 100
    # Spine at the bottom centre, below the body's middle.
    rows, cols = np.nonzero(img > 700)
    assert np.abs(cols - 64).min() < 3 and rows[np.abs(cols - 64) < 3].mean() > 64
    # The generated HQ target keeps the anatomy (lungs, soft tissue, bone).
    _, hq = generate(4, 128, seed=5, mode="fast")
    assert frac(hq, -900, -780) > 0.05 and frac(hq, -10, 90) > 0.08 and hq.max() > 700


def test_other_phantoms():
    sl = shepp_logan(64)
    assert sl.max() == pytest.approx(1000.0, abs=30) and sl.min() == pytest.approx(-1000.0)
    assert frac(sl, 10, 30) > 0.3  # brain at 20 HU
    ell = random_ellipses(64, np.random.default_rng(1))
    assert ell[0, 0] == -1000.0 and ell[-1, -1] == -1000.0  # stays inside the field of view
    assert not np.array_equal(ell, random_ellipses(64, np.random.default_rng(2)))
    lq, hq = simulate_low_dose(sl, "fast", 0.25, np.random.default_rng(0))
    assert lq.shape == sl.shape and 35 < psnr_window(lq[None], hq[None])[0] < 46


def test_fast_generation_is_fast():
    t0 = time.process_time()
    lq, _ = generate(64, 128, seed=0, mode="fast")
    # The brief's goal is well under a second; the bound leaves room for a loaded CI machine.
    assert time.process_time() - t0 < 3.0
    assert lq.shape == (64, 128, 128)


def test_generator_rejects_bad_arguments():
    with pytest.raises(DataError, match="dose"):
        generate(1, 32, 0, dose=0.0)
    with pytest.raises(DataError, match="mode"):
        generate(1, 32, 0, mode="nope")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="phantom"):
        generate(1, 32, 0, phantom="nope")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- load_split (synthetic)
def test_load_split_synthetic_is_reproducible_and_splits_differ():
    cfg = DataConfig(image_size=32, n_train=5, n_val=3)
    a, b = load_split(cfg, "train"), load_split(cfg, "train")
    val, test = load_split(cfg, "val"), load_split(cfg, "test")
    assert isinstance(a, SliceSet) and len(a) == 5 and len(val) == 3 and len(test) == 3
    assert a.lq.shape == (5, 1, 32, 32) and a.lq.dtype == torch.float32
    assert torch.equal(a.lq, b.lq) and torch.equal(a.hq, b.hq)
    assert not torch.equal(val.hq, test.hq[:3]) and not torch.equal(a.hq[:3], val.hq)
    assert a.names[2] == "synth_000002" and a.source == "synthetic:fast:chest" and a.normalisation == "window"
    assert torch.all(a.hu_scale == 2048.0)
    assert 0.0 <= a.lq.min() and a.lq.max() <= 1.0
    assert a.nbytes == 2 * 5 * 32 * 32 * 4
    other_seed = load_split(DataConfig(image_size=32, n_train=5, n_val=3, data_seed=99), "train")
    assert not torch.equal(other_seed.hq, a.hq)
    assert split_seed(1, "train") != split_seed(1, "val")


def test_minmax_normalisation_and_dataset_items():
    s = load_split(DataConfig(image_size=32, n_train=3, n_val=1, normalisation="minmax"), "train")
    for t in (s.lq, s.hq):
        assert torch.allclose(t.amin(dim=(1, 2, 3)), torch.zeros(3), atol=1e-6)
        assert torch.allclose(t.amax(dim=(1, 2, 3)), torch.ones(3), atol=1e-6)
    lq_hu, hq_hu = generate(3, 32, split_seed(1234, "train"))
    assert torch.allclose(s.hu_scale, torch.from_numpy(hq_hu.max((1, 2)) - hq_hu.min((1, 2))))
    # RMSE in HU = normalised RMSE * hu_scale, against HU computed directly.
    norm, scale = normalise(hq_hu[0] + 5.0, DataConfig(normalisation="minmax"))
    assert scale == pytest.approx(float(s.hu_scale[0]), rel=1e-5)
    lq, hq, i = SliceDataset(s)[2]
    assert lq.shape == (1, 32, 32) and hq.shape == (1, 32, 32) and i == 2 and torch.equal(hq, s.hq[2])
    assert len(SliceDataset(s)) == 3


def test_window_normalisation_clips_and_scales():
    img = np.array([[-2000.0, -1024.0], [0.0, 3000.0]], dtype=np.float32)
    out, scale = normalise(img, DataConfig(hu_window=(-1024.0, 1024.0)))
    assert scale == 2048.0 and out.dtype == np.float32
    assert np.allclose(out, [[0.0, 0.0], [0.5, 1.0]])
    with pytest.raises(ConfigError, match="hu_window"):  # refused when the config is made, before any data
        DataConfig(image_size=32, hu_window=(10.0, 10.0))


# ----------------------------------------------------------------------------- readers
def make_split(root: Path, split: str = "train", n: int = 2, size: int = 32, suffix: str = ".npy",
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write n random HU pairs as .npy under root/split/{HQ,LQ}/; return (lq, hq)."""
    rng = np.random.default_rng(seed)
    hq = rng.uniform(-1000, 1000, (n, size, size)).astype(np.float32)
    lq = (hq + rng.normal(0, 20, hq.shape)).astype(np.float32)
    for kind, arr in (("HQ", hq), ("LQ", lq)):
        (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / kind / f"s{i}{suffix}", arr[i])
    return lq, hq


def write_dicom(path: Path, hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.round((hu - intercept) / slope).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_roundtrip_every_format(tmp_path):
    rng = np.random.default_rng(0)
    hu = np.round(rng.uniform(-1024, 2000, (32, 32))).astype(np.float32)
    # TIFF with an ImageJ linear calibration (stored as unsigned 16-bit, HU = -1024 + value).
    tifffile.imwrite(tmp_path / "cal.tif", (hu + 1024).astype(np.uint16), imagej=True,
                     metadata={"cf": 0, "c0": -1024.0, "c1": 1.0, "vunit": "HU"})
    assert np.array_equal(readers.read_image(tmp_path / "cal.tif"), hu)
    tifffile.imwrite(tmp_path / "half.tiff", (hu + 1024).astype(np.uint16) * 2, imagej=True,
                     metadata={"c0": -1024.0, "c1": 0.5})
    assert np.array_equal(readers.read_image(tmp_path / "half.tiff"), hu)
    tifffile.imwrite(tmp_path / "float.tif", hu + 0.25)  # uncalibrated: values are HU
    assert np.array_equal(readers.read_image(tmp_path / "float.tif"), hu + 0.25)
    np.save(tmp_path / "a.npy", hu.astype(np.int16))
    assert np.array_equal(readers.read_image(tmp_path / "a.npy"), hu)
    write_dicom(tmp_path / "a.dcm", hu)
    assert np.array_equal(readers.read_image(tmp_path / "a.dcm"), hu)
    write_dicom(tmp_path / "b.IMA", hu, slope=0.5, intercept=-1024.0)
    assert np.array_equal(readers.read_image(tmp_path / "b.IMA"), hu)
    Image.fromarray((hu + 1024).astype(np.uint16)).save(tmp_path / "a16.png")  # 16-bit: HU + 1024
    assert np.array_equal(readers.read_image(tmp_path / "a16.png"), hu)
    gray = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "a8.png")  # 8-bit: windowed intensities
    assert np.allclose(readers.read_image(tmp_path / "a8.png", (-1000.0, 1000.0)), -1000 + gray / 255 * 2000, atol=1e-3)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png"):
        readers.read_image(tmp_path / "rgb.png")


def test_load_split_folder_mixed_formats_and_window_of_8bit_png(tmp_path):
    rng = np.random.default_rng(1)
    hq = np.round(rng.uniform(-1000, 1000, (3, 32, 32))).astype(np.float32)
    lq = hq + 10.0
    for kind, arr in (("HQ", hq), ("LQ", lq)):
        d = tmp_path / "val" / kind
        d.mkdir(parents=True)
        tifffile.imwrite(d / "slice1.tif", arr[0])
        np.save(d / "slice2.npy", arr[1])
        write_dicom(d / "slice10.dcm", arr[2])
    (tmp_path / "val" / "HQ" / "notes.txt").write_text("ignored")
    s = load_split(DataConfig(source=str(tmp_path)), "val")
    assert s.names == ["slice1", "slice2", "slice10"]  # natural order
    assert s.source == str(tmp_path)
    assert torch.allclose(s.hq[:, 0] * 2048 - 1024, torch.from_numpy(hq), atol=1e-3)
    assert torch.allclose(s.lq[:, 0] * 2048 - 1024, torch.from_numpy(lq), atol=1e-3)
    # 8-bit PNGs map back onto the window, so window normalisation returns value / 255.
    gray = rng.integers(0, 256, (2, 32, 32)).astype(np.uint8)
    for kind in ("HQ", "LQ"):
        d = tmp_path / "test" / kind
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(gray[i]).save(d / f"p{i}.png")
    t = load_split(DataConfig(source=str(tmp_path), hu_window=(-500.0, 700.0)), "test")
    assert torch.allclose(t.hq[:, 0], torch.from_numpy(gray / 255.0).float(), atol=1e-5)


def test_positional_pairing_warns(tmp_path):
    make_split(tmp_path, n=2)
    for i in range(2):
        (tmp_path / "train" / "LQ" / f"s{i}.npy").rename(tmp_path / "train" / "LQ" / f"low_{i}.npy")
    with pytest.warns(UserWarning, match="sorted position"):
        s = load_split(DataConfig(source=str(tmp_path)), "train")
    assert len(s) == 2 and s.names == ["s0", "s1"]


def error_message(root: Path, split: str = "train") -> str:
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source=str(root)), split)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_reader_errors_name_the_folder(tmp_path):
    assert str(tmp_path / "nope") in error_message(tmp_path / "nope")
    make_split(tmp_path, "train")
    assert str(tmp_path / "val") in error_message(tmp_path, "val")
    (tmp_path / "test" / "LQ").mkdir(parents=True)
    assert str(tmp_path / "test" / "HQ") in error_message(tmp_path, "test")
    (tmp_path / "test" / "LQ").rmdir()
    (tmp_path / "test" / "HQ").mkdir()
    assert str(tmp_path / "test" / "LQ") in error_message(tmp_path, "test")
    (tmp_path / "test" / "LQ").mkdir()
    assert "no images" in (m := error_message(tmp_path, "test")) and str(tmp_path / "test" / "HQ") in m
    with pytest.raises(DataError, match="split"):
        load_split(DataConfig(source=str(tmp_path)), "dev")  # type: ignore[arg-type]


def test_a_dangling_link_to_a_slice_is_named_not_blamed_on_its_partner(tmp_path):
    make_split(tmp_path, n=3)
    link = tmp_path / "train" / "HQ" / "s1.npy"
    (tmp_path / "scratch").mkdir()
    link.rename(tmp_path / "scratch" / "s1.npy")
    link.symlink_to(tmp_path / "unmounted" / "s1.npy")  # a link farm onto scratch space that is not mounted
    msg = error_message(tmp_path)
    assert msg.startswith(f"{link} is a link to {tmp_path / 'unmounted' / 's1.npy'}, which does not exist"), msg
    link.unlink()
    link.symlink_to(tmp_path / "scratch" / "s1.npy")  # a link that resolves is read like a file
    assert len(load_split(DataConfig(source=str(tmp_path)), "train")) == 3


def test_lq_that_is_hq_through_a_link_is_refused_not_scored_as_a_perfect_input(tmp_path):
    make_split(tmp_path, n=3)
    lq = tmp_path / "train" / "LQ"
    (lq / "s1.npy").unlink()
    (lq / "s1.npy").symlink_to(tmp_path / "train" / "HQ" / "s1.npy")
    assert "LQ/s1.npy and " in (msg := error_message(tmp_path)) and "are the same file" in msg, msg
    for f in lq.iterdir():
        f.unlink()
    lq.rmdir()
    lq.symlink_to(tmp_path / "train" / "HQ")
    msg = error_message(tmp_path)
    assert msg.startswith(f"{lq} and {tmp_path / 'train' / 'HQ'} are the same folder"), msg


def test_no_images_says_what_the_folder_holds_instead(tmp_path):
    make_split(tmp_path)
    hq = tmp_path / "train" / "HQ"
    (hq / "patient1").mkdir()
    for f in list(hq.glob("*.npy")):
        f.rename(hq / "patient1" / f.name)
    (hq / ".DS_Store").write_bytes(b"")
    msg = error_message(tmp_path)
    assert f"no images in {hq} " in msg and "it holds 1 subfolder (patient1/), which is not searched" in msg, msg
    (hq / "IM0001").write_bytes(b"")  # scanners often write DICOM files without a suffix
    assert "and 1 file of other kinds (e.g. IM0001; a DICOM file needs the suffix .dcm or .IMA)" in (
        msg := error_message(tmp_path)), msg


def test_slices_in_subfolders_beside_direct_ones_warn(tmp_path):
    # HQ/ holds two slices itself and more in patient2/: only the two are read, and the warning says so
    lq, hq = make_split(tmp_path, n=2)
    hq_dir = tmp_path / "train" / "HQ"
    (hq_dir / "patient2").mkdir()
    np.save(hq_dir / "patient2" / "s9.npy", hq[0])
    (hq_dir / "notes").mkdir()  # a subfolder without slices says nothing
    (hq_dir / "notes" / "readme.txt").write_text("x")
    with pytest.warns(UserWarning) as caught:
        got_lq, got_hq, names = readers.read_split(tmp_path, "train")
    msgs = [str(w.message) for w in caught]
    assert msgs == [f"{hq_dir} also has 1 subfolder holding slices (patient2/), which is not read; only the 2 "
                    f"slices directly in HQ/ are. Move the slices up into {hq_dir} to train on them."], msgs
    assert names == ["s0", "s1"] and np.array_equal(got_hq, hq)
    (hq_dir / "patient2" / "s9.npy").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        readers.read_split(tmp_path, "train")  # no slices below: no warning


def test_reader_errors_name_the_file(tmp_path):
    # Unpaired: counts differ, the HQ file without a partner is named.
    make_split(tmp_path / "unpaired", n=3)
    (tmp_path / "unpaired" / "train" / "LQ" / "s1.npy").unlink()
    msg = error_message(tmp_path / "unpaired")
    assert str(tmp_path / "unpaired" / "train" / "HQ") in msg and "HQ only: s1.npy;" in msg and "partner" in msg
    # Corrupt files of each format.
    for suffix in (".npy", ".tif", ".dcm", ".IMA", ".png"):
        root = tmp_path / f"corrupt{suffix}"
        make_split(root, n=2)
        for kind in ("HQ", "LQ"):
            (root / "train" / kind / "s1.npy").unlink()
            (root / "train" / kind / f"s1{suffix}").write_bytes(b"this is not an image" * 10)
        msg = error_message(root)
        assert str(root / "train" / "HQ" / f"s1{suffix}") in msg and "not a readable" in msg, msg
    # Pair shape mismatch names both files.
    make_split(tmp_path / "pair", n=2)
    np.save(tmp_path / "pair" / "train" / "LQ" / "s1.npy", np.zeros((48, 48), np.float32))
    msg = error_message(tmp_path / "pair")
    assert str(tmp_path / "pair" / "train" / "HQ" / "s1.npy") in msg
    assert str(tmp_path / "pair" / "train" / "LQ" / "s1.npy") in msg
    # A shape differing across the split names the file and the first one.
    np.save(tmp_path / "pair" / "train" / "HQ" / "s1.npy", np.zeros((48, 48), np.float32))
    msg = error_message(tmp_path / "pair")
    assert "s1.npy" in msg and "s0.npy" in msg and "one shape" in msg
    # NaN values.
    make_split(tmp_path / "nan", n=2)
    np.save(tmp_path / "nan" / "train" / "LQ" / "s1.npy", np.full((32, 32), np.nan, np.float32))
    assert str(tmp_path / "nan" / "train" / "LQ" / "s1.npy") in (m := error_message(tmp_path / "nan")) and "NaN" in m
    # A float64 value that is finite but overflows float32 (checked after the cast).
    make_split(tmp_path / "huge", n=2)
    big = np.zeros((32, 32), np.float64)
    big[3, 4] = 1e300
    np.save(tmp_path / "huge" / "train" / "HQ" / "s1.npy", big)
    m = error_message(tmp_path / "huge")
    assert str(tmp_path / "huge" / "train" / "HQ" / "s1.npy") in m and "float32's range" in m, m
    # A stack instead of a slice.
    make_split(tmp_path / "stack", n=2)
    np.save(tmp_path / "stack" / "train" / "HQ" / "s0.npy", np.zeros((2, 32, 32), np.float32))
    assert "s0.npy" in (m := error_message(tmp_path / "stack")) and "one slice per file" in m


def test_reader_errors_on_sides(tmp_path, monkeypatch):
    make_split(tmp_path, "train", size=40)
    msg = error_message(tmp_path)
    assert "divisible by 16" in msg and str(tmp_path / "train" / "HQ") in msg and "32x32" in msg
    make_split(tmp_path, "val", size=32)

    def too_small(side):
        raise ValueError(f"image side {side} px is too small for MS-SSIM")

    monkeypatch.setattr(readers, "choose_msssim", too_small)
    msg = error_message(tmp_path, "val")
    assert "too small" in msg and str(tmp_path / "val" / "HQ") in msg


def test_synthetic_image_size_checked():
    # refused when the config is made: no DataConfig with these values can reach load_split
    with pytest.raises(ConfigError, match="16"):
        DataConfig(image_size=40)
    with pytest.raises(ConfigError, match="n-val"):
        DataConfig(image_size=32, n_val=0)


# ----------------------------------------------------------------------------- bench data synth
def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bench_data_synth_writes_a_readable_dataset(tmp_path):
    out = tmp_path / "ds"
    args = ["data", "synth", "--n", "8", "--size", "32", "--out", str(out), "--mode", "fast",
            "--format", "npy", "--val-frac", "0.25", "--test-frac", "0.125", "--seed", "11"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "5/2/1 train/val/test" in result.output and "PSNR" in result.output
    cfg = DataConfig(source=str(out))
    counts = {split: len(load_split(cfg, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 5, "val": 2, "test": 1}
    # The files hold exactly what the in-memory generator makes for the same seed and settings.
    disk = load_split(cfg, "train")
    mem = load_split(DataConfig(image_size=32, n_train=5, data_seed=11), "train")
    assert torch.equal(disk.lq, mem.lq) and torch.equal(disk.hq, mem.hq) and disk.names == mem.names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left

    # A second run into the same folder is refused and leaves every file untouched.
    before = _digest(out)
    again = CliRunner().invoke(app, [*args[:8], "--mode", "physics"])
    assert again.exit_code != 0
    assert isinstance(again.exception, UserError) and "not empty" in str(again.exception)
    assert _digest(out) == before


def test_bench_data_synth_physics_tif_and_cli_errors(tmp_path, capsys):
    out = tmp_path / "phys"
    result = CliRunner().invoke(app, ["data", "synth", "--n", "3", "--size", "32", "--out", str(out),
                                      "--val-frac", "0.34", "--test-frac", "0.34"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "train" / "HQ").glob("*.tif"))) == 1
    s = load_split(DataConfig(source=str(out)), "val")
    mem = load_split(DataConfig(image_size=32, n_val=1, synth_mode="physics"), "val")
    assert torch.equal(s.lq, mem.lq) and torch.equal(s.hq, mem.hq)
    # Through the console entry point: one line, exit status 2, nothing written.
    for bad, needle in ((["--size", "40"], "16"), (["--mode", "slow"], "--mode"), (["--n", "1"], "--n 1")):
        with pytest.raises(SystemExit) as e:
            main(["data", "synth", "--out", str(tmp_path / "bad"), *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names match: no positional-pairing warning
        load_split(DataConfig(source=str(out)), "train")


def test_val_slices_may_differ_from_train_slices_only_where_the_msssim_setting_is_the_same() -> None:
    def sliceset(side: int) -> SliceSet:
        x = torch.zeros(2, 1, side, side)
        return SliceSet(lq=x, hq=x, hu_scale=torch.ones(2), names=["a", "b"], normalisation="window", source="d")

    check_val_shape(sliceset(256), sliceset(512), "d")  # crops for training, whole slices to validate
    with pytest.raises(UserError, match=r"val slices in d are 32x32 px but the train slices 64x64 px"):
        check_val_shape(sliceset(64), sliceset(32), "d")
    with pytest.raises(UserError, match="standard MS-SSIM: 5 scales, 11x11 window vs reduced"):
        check_val_shape(sliceset(128), sliceset(176), "d")


def test_generation_in_worker_processes_gives_the_same_slices() -> None:
    serial = generate(12, 64, seed=7)
    with generation_pool(2) as pool:
        parallel = generate(12, 64, seed=7, pool=pool)
        offset = generate(5, 64, seed=7, first=3, pool=pool)
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(offset[0], serial[0][3:8]) and np.array_equal(offset[1], serial[1][3:8])


def test_generation_workers_ignore_ctrl_c_and_end_at_once_with_the_parent() -> None:
    """A terminal's Ctrl-C reaches every worker too: none may die of it (each printed its own traceback and
    broke the pool), and the parent's KeyboardInterrupt ends them instead of waiting for work in flight."""
    with pytest.raises(KeyboardInterrupt), generation_pool(2) as pool:
        pool.submit(os.getpid).result(timeout=120)  # the workers have booted
        workers = list(pool._processes.values())
        for proc in workers:
            os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert pool.submit(os.getpid).result(timeout=60) in {proc.pid for proc in workers}
        assert all(proc.is_alive() for proc in workers)
        pool.submit(time.sleep, 120)  # a piece in flight when the user presses Ctrl-C
        t0 = time.perf_counter()
        raise KeyboardInterrupt
    assert time.perf_counter() - t0 < 30  # not the 120 s of the piece in flight
    # by pid, not proc.is_alive(): the pool's own thread may reap a worker first, and is_alive() then reads
    # the failed waitpid as 'still running' (seen under load)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(proc.pid) for proc in workers):
        time.sleep(0.1)
    assert not any(_running(proc.pid) for proc in workers)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not ended, not an unreaped zombie)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False



def test_sigterm_during_bench_data_synth_leaves_nothing_and_still_ends_by_sigterm(tmp_path) -> None:
    """SIGTERM's default action ended `bench data synth` where it stood: its hidden partial folder stayed beside
    --out for good, without a word. Now it is removed, as on Ctrl-C, and the process still dies by SIGTERM."""
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "data", "synth", "--n", "2000", "--size", "128",
                             "--mode", "physics", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob(".d.partial-*/*/HQ/*")):
            time.sleep(0.05)
        assert proc.poll() is None and list(tmp_path.glob(".d.partial-*")), "no partial dataset to stop"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert (f"stopped by SIGTERM: nothing was written to {out} (the partial dataset was removed); run the same "
            "command again to make it.") in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []

def test_ctrl_c_during_bench_data_synth_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bench.cmd_data.generate", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--n", "12", "--size", "32", "--mode", "fast", "--out", str(tmp_path / "d")])
    assert e.value.code == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "synthesising" not in ln]
    assert lines == [f"interrupted: nothing was written to {tmp_path / 'd'} (the partial dataset was removed); "
                     "run the same command again to make it."], lines
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- audit: pairing, messages, offsets
def _names(folder: Path, stems: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        np.save(folder / f"{stem}.npy", np.zeros((32, 32), np.float32))


def test_names_matching_in_part_are_refused_not_paired_shifted(tmp_path):
    # HQ s000..s007 against LQ s001..s008: 7 of 8 names match; by position every pair would be shifted.
    _names(tmp_path / "train" / "HQ", [f"s{i:03d}" for i in range(8)])
    _names(tmp_path / "train" / "LQ", [f"s{i:03d}" for i in range(1, 9)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no positional pairing with a warning either
        msg = error_message(tmp_path)
    print(msg)
    assert "7 of 8 HQ files" in msg and "HQ only: s000.npy;" in msg and "LQ only: s008.npy)" in msg
    assert str(tmp_path / "train" / "HQ") in msg and str(tmp_path / "train" / "LQ") in msg
    assert "only when no name matches" in msg
    # Many unmatched files: a few are named, the rest counted.
    _names(tmp_path / "b" / "train" / "HQ", ["a", "h1", "h2", "h3", "h4", "h5"])
    _names(tmp_path / "b" / "train" / "LQ", ["a", "l1", "l2", "l3", "l4", "l5"])
    msg = error_message(tmp_path / "b")
    print(msg)
    assert "HQ only: h1.npy, h2.npy, h3.npy and 2 more;" in msg and "LQ only: l1.npy, l2.npy, l3.npy and 2 more)" in msg
    # No name in common and equal counts: the documented fallback, by sorted position, with a warning.
    _names(tmp_path / "c" / "train" / "HQ", ["hq_2", "hq_10"])
    _names(tmp_path / "c" / "train" / "LQ", ["lq_2", "lq_10"])
    with pytest.warns(UserWarning, match="no file name .* matches .*hq_2.npy vs lq_2.npy.*sorted position"):
        pairs = readers.pair_files(tmp_path / "c" / "train" / "HQ", tmp_path / "c" / "train" / "LQ")
    assert [(h.name, lq.name) for h, lq in pairs] == [("hq_2.npy", "lq_2.npy"), ("hq_10.npy", "lq_10.npy")]


def test_unreadable_files_say_so_without_library_advice_or_log_lines(tmp_path, caplog):
    root = tmp_path / "d"
    (root / "x").mkdir(parents=True)
    np.save(root / "x" / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (root / "x" / "junk.npy").write_bytes(b"not an array at all" * 4)
    (root / "x" / "junk.dcm").write_bytes(b"not a dicom at all")
    (root / "x" / "junk.tif").write_bytes(b"II*\x00garbage")
    (root / "x" / "junk.png").write_bytes(b"not a png")
    fmt = {".npy": "NumPy .npy", ".dcm": "DICOM", ".tif": "TIFF", ".png": "PNG"}
    for name in ("obj.npy", "junk.npy", "junk.dcm", "junk.tif", "junk.png"):
        path = root / "x" / name
        with pytest.raises(DataError) as e:
            readers.read_image(path)
        msg = str(e.value)
        print(msg)
        assert msg.startswith(f"cannot read {path}: not a readable {fmt[path.suffix]} image (") and "\n" not in msg
        assert msg.endswith("; re-export the file or remove it.") and msg.count(str(path)) == 1
        for advice in ("force=True", "allow_pickle", "pickle.load", "holds 0 images"):
            assert advice not in msg, msg
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]  # tifffile's log line stays inside


def test_dicom_without_preamble_and_file_meta_is_read(tmp_path):
    hu = np.round(np.random.default_rng(3).uniform(-1000, 1500, (32, 32))).astype(np.float32)
    write_dicom(tmp_path / "full.dcm", hu)
    raw = pydicom.dcmread(tmp_path / "full.dcm")
    del raw.file_meta  # what older scanners write: the bare data set, implicit VR little endian
    raw.preamble = None
    raw.save_as(tmp_path / "raw.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert b"DICM" not in (tmp_path / "raw.dcm").read_bytes()[:256]
    assert np.array_equal(readers.read_image(tmp_path / "raw.dcm"), hu)


def _uint16_tifs(root: Path, hu: np.ndarray, calibrated: bool = False) -> None:
    for split in ("train", "val"):
        for kind in ("HQ", "LQ"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                meta = {"cf": 0, "c0": -1024.0, "c1": 1.0} if calibrated else {}
                tifffile.imwrite(root / split / kind / f"s{i}.tif", (hu + 1024).astype(np.uint16), imagej=True,
                                 metadata=meta)


def test_uncalibrated_integer_tiffs_without_negatives_warn_once_per_split(tmp_path):
    hu = np.full((32, 32), -1000.0, np.float32)
    hu[8:24, 8:24] = 40.0  # a body in air, stored as HU + 1024 without a calibration
    _uint16_tifs(tmp_path / "plain", hu)
    with pytest.warns(UserWarning) as caught:
        s = load_split(DataConfig(source=str(tmp_path / "plain")), "train")
    hints = [str(w.message) for w in caught if "1024 HU too high" in str(w.message)]
    print(hints)
    assert len(hints) == 1 and "6 of 6 files of the train split" in hints[0] and "c0=-1024" in hints[0]
    assert "--normalisation minmax" in hints[0] and str(tmp_path / "plain" / "train" / "HQ" / "s0.tif") in hints[0]
    assert float(s.hq.min()) == (24 + 1024) / 2048  # air read as +24 HU, as documented: the warning is the only change
    with pytest.warns(UserWarning, match="s0.tif is an uncalibrated integer TIFF"):
        readers.read_image(tmp_path / "plain" / "train" / "HQ" / "s0.tif")
    # No false alarms: minmax (offset-free), a calibration, float HU, signed integers with air in them.
    _uint16_tifs(tmp_path / "cal", hu, calibrated=True)
    for kind in ("HQ", "LQ"):
        (tmp_path / "f" / "train" / kind).mkdir(parents=True)
        (tmp_path / "i" / "train" / kind).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "f" / "train" / kind / "s0.tif", hu + 1024)
        tifffile.imwrite(tmp_path / "i" / "train" / kind / "s0.tif", hu.astype(np.int16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(DataConfig(source=str(tmp_path / "plain"), normalisation="minmax"), "train")
        for name in ("cal", "f", "i"):
            load_split(DataConfig(source=str(tmp_path / name)), "train")


def test_bench_data_synth_refuses_an_empty_val_split_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "4", "--size", "32", "--mode", "fast",
              "--val-frac", "0", "--test-frac", "0"])
    err = capsys.readouterr().err
    print(err)
    assert e.value.code == 2 and err.startswith("error: --val-frac 0") and err.count("\n") == 1
    assert "set --val-frac above 0" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    # --test-frac 0 alone is fine: train and val are written, and read back.
    res = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--n", "4", "--size", "32",
                                   "--mode", "fast", "--val-frac", "0.25", "--test-frac", "0"])
    assert res.exit_code == 0, res.output
    assert [len(load_split(DataConfig(source=str(tmp_path / "d")), sp)) for sp in ("train", "val")] == [3, 1]


@pytest.mark.parametrize(("size", "suggested"), [("40", "32"), ("0", "16"), ("-16", "16")])
def test_synth_refuses_a_bad_size_in_its_own_option(tmp_path: Path, capsys, size: str, suggested: str) -> None:
    # the refusal once spoke of files ('slices in --size 40 are 40x40 ... crop or pad') or of
    # `bench train`'s --image-size, an option `bench data synth` does not have
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "4", "--size", size])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err == (f"error: --size {size} must be divisible by 16 (four 2x poolings) and at least 16, "
                   f"e.g. --size {suggested}.\n")
    assert not (tmp_path / "d").exists()


def test_a_colour_png_is_named_with_its_mode_and_the_fix(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    for mode, said in (("RGB", "is an RGB PNG"), ("P", "is a P PNG"), ("LA", "is an LA PNG")):
        path = tmp_path / f"s_{mode}.png"
        image.new(mode, (16, 16)).save(path)
        with pytest.raises(DataError) as e:
            readers.read_image(path)
        assert str(e.value) == f"{path} {said}; save CT slices as 8- or 16-bit grayscale."
