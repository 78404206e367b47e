"""`bench report` as a user meets it: options and odd run folders, each checked against what the report prints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.report.options import Options
from tests.report_fakes import QUAL, _cfg, _cli, _times, by_cell, table, write_run


def test_target_input_note_names_the_input_not_the_baseline(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, extra_row={"input_ms_ssim": 84.0})
    t = table(root, "ttq", Options(target_input=True))
    assert t.csv_rows[0]["target_ms_ssim_pct"] == 84.0
    target_note = next(n for n in t.notes if n.startswith("Target:"))
    assert "--target input" in target_note and "low-dose input" in target_note
    assert "baseline's final MS-SSIM minus" not in target_note  # it once named the rule --target input replaces


def test_a_two_epoch_final_phase_that_moved_is_still_changing_not_noise(tmp_path):
    """The smoke grid (2 dense + 2 sparse epochs): structured read '+5.11 pp (+9.55%) ± 68.49, within noise',
    the band made of its sparse epochs 0.00 -> 48.42, a recovery after the pruning, not a chance swing."""
    root = tmp_path / "runs"
    write_run(root, "smoke", "fp32-host-off-dense", _cfg(epochs=4), _times(10.0, 1, n=4), [20.37, 53.67, 55.04, 53.53])
    write_run(root, "smoke", "fp32-host-off-structured-hybrid2", _cfg(kind="structured", dense_epochs=2, epochs=4),
              _times(10.0, 2, n=4), [20.37, 53.67, 0.0, 48.42])
    write_run(root, "smoke", "fp32-host-off-random-hybrid2", _cfg(kind="random", dense_epochs=2, epochs=4),
              _times(10.0, 3, n=4), [20.37, 53.67, 53.2, 53.0])
    t = table(root, "table2")
    st, st_md = by_cell(t, "fp32-host-off-structured-hybrid2")
    assert st["drop_pp"] == pytest.approx(53.53 - 48.42)
    assert st["drop_noise_pp"] is None and st["drop_within_noise"] is None and st["drop_still_changing"] is True
    assert st_md["drop vs dense (ours)"] == "+5.11 pp (+9.55%), still changing"
    # two sparse epochs within 1 pp keep their band: 2 x sqrt(sd(53.2, 53.0)^2 + sd(53.67, 55.04, 53.53)^2)
    rnd, _ = by_cell(t, "fp32-host-off-random-hybrid2")
    sd = lambda v: float(np.std(v, ddof=1))  # noqa: E731
    band = 2 * math.sqrt(sd([53.2, 53.0]) ** 2 + sd([53.67, 55.04, 53.53]) ** 2)
    assert rnd["drop_noise_pp"] == pytest.approx(band) and rnd["drop_still_changing"] is False
    (note,) = [n for n in t.notes if n.startswith("'± N'")]
    assert "fp32-host-off-structured-hybrid2: 0.00, 48.42" in note and "two epochs" in note


def test_fig9a_puts_no_paper_share_beside_a_cpus_copy_ops(tmp_path):
    """`bench run --grid fig9` on a CPU: the paper's GPU memset shares (9 %, 22 %) stood beside aten::fill_."""
    root = tmp_path / "runs"
    cpu = {"copies_device": "cpu", "copies_steps": 5, "copies_Memset_bytes": 2_370_000,
           "copies_Memset_share_bytes": 0.291, "copies_Memset_share_time": 0.057, "copies_Memset_time_ms": 0.21,
           "copies_HtoH_bytes": 5_760_000, "copies_HtoH_share_bytes": 0.709, "copies_HtoH_share_time": 0.943,
           "copies_HtoH_time_ms": 3.42}
    write_run(root, "fig9", "host-profile", _cfg(profile_steps=5), _times(10.0, 1), QUAL, copies=cpu)
    write_run(root, "fig9", "device-profile", _cfg(loader="device", profile_steps=5), _times(9.0, 2), QUAL,
              copies=cpu)
    t = table(root, "fig9a")
    assert {r["kind"] for r in t.csv_rows} == {"Memset", "HtoH"}
    assert all(r["paper_share_pct"] is None and r["paper_htod_gb"] is None for r in t.csv_rows)
    assert all(m["share % (paper)"] == "—" for m in t.md_rows)
    assert any("no paper share beside them" in n for n in t.notes)


def test_a_repeat_written_by_an_older_version_is_pooled_not_a_second_cell(tmp_path):
    """A repeat whose config.json predates some fields (warmup_epochs, nproc, data.synth_mode, ...) split its cell
    in two: 'random-hybrid3 [data.synth_mode None, nproc None, warmup_epochs None]' beside the other repeat."""
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    for r in range(2):
        d = write_run(root, "g", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3),
                      _times(8.0, 2 + r), QUAL, repeat=r)
        if r == 1:  # the older version's config: the fields added since are missing (they ran at the defaults)
            cfg = json.loads((d / "config.json").read_text())
            for k in ("warmup_epochs", "nproc", "compile_mode", "optimizer_impl"):
                cfg.pop(k)
            cfg["data"].pop("synth_mode")
            cfg["sparsity"].pop("pattern")
            (d / "config.json").write_text(json.dumps(cfg))
    rnd, md = by_cell(table(root, "table2"), "fp32-host-off-random-hybrid3")
    assert rnd["repeats_ok"] == 2 and md["status"] == "ok (2 repeats)"
    assert rnd["baseline_cell"] == "fp32-host-off-dense"


def test_one_of_two_repeats_holding_the_target_reads_half_not_fewer_than_half(tmp_path):
    """Two `bench train` seeds, one held the target: the table read '1/2 repeats held it: fewer than half'."""
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, repeat=0)
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 2), [50, 70, 80, 85, 88, 70.0], repeat=1)
    t = table(root, "ttq", Options(target_pct=85.0))
    row, md = by_cell(t, "fp32-host-off-dense")
    assert row["repeats_reached"] == 1 and row["ttq_s"] is None  # a time needs more than half of the repeats
    assert md["reached and held"].startswith("1/2 repeats held it")
    assert md["reached and held"].endswith(": half, no time") and "fewer than half" not in md["reached and held"]


@pytest.mark.parametrize("bad", ["nan", "inf", "-1"])
def test_a_tolerance_that_is_no_number_of_points_is_one_error_line(tmp_path, capsys, bad):
    """`bench report --tolerance nan` wrote a report whose every target was NaN: 'never reached' everywhere."""
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    code, out, err = _cli(["report", str(root), "--tolerance", bad], capsys)
    assert code == 2 and not (root / "report").exists()
    assert err.startswith("error: --tolerance") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
