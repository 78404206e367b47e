"""The paper's published numbers, shipped in results/paper/paper.json (bench/paper.py)."""

from __future__ import annotations

from bench.paper import load_paper


def test_paper_numbers_are_shipped_exactly():
    p = load_paper()
    t1 = {r["sparsity_kind"]: r for r in p["table1"]["rows"]}
    assert (t1["none"]["ms_ssim_pct"], t1["none"]["ms_ssim_std_pct"], t1["none"]["time_min"]) == (97.22, 1.49, 235)
    assert (t1["random"]["ms_ssim_pct"], t1["random"]["ms_ssim_std_pct"], t1["random"]["time_min"]) == (42.39, 2.10, 175)
    assert t1["random"]["sparsity_pct"] == 50 and t1["none"]["sparsity_pct"] == 0
    assert p["table1"]["hyperparameters"] == {"batch_size": 1, "lr": 0.0001, "gamma": 0.95, "epochs": 50}
    t2 = {r["sparsity_kind"]: r for r in p["table2"]["rows"]}
    assert set(t2) == {"structured", "random", "topk"}
    assert (t2["structured"]["speedup_x"], t2["structured"]["ms_ssim_pct"], t2["structured"]["ms_ssim_std_pct"],
            t2["structured"]["accuracy_drop_pct"]) == (1.14, 97.75, 1.62, 0.0)
    assert (t2["random"]["speedup_x"], t2["random"]["ms_ssim_pct"], t2["random"]["ms_ssim_std_pct"],
            t2["random"]["accuracy_drop_pct"]) == (1.14, 97.30, 2.17, 0.0)
    assert (t2["topk"]["speedup_x"], t2["topk"]["ms_ssim_pct"], t2["topk"]["ms_ssim_std_pct"],
            t2["topk"]["accuracy_drop_pct"]) == (1.14, 96.98, 2.02, 0.02)
    assert p["table2"]["schedule"] == {"dense_epochs": 25, "sparse_epochs": 25} and p["table2"]["amount"] == 0.5
    ref = p["reference"]
    assert (ref["batch_size"], ref["time_to_target_min"], ref["target_ms_ssim_pct"]) == (32, 79, 97.22)
    sx = p["fig8"]["speedup_x"]
    assert sx["mixed_precision"] == {"dense": 1.49, "sparse": 1.34}
    assert sx["doll"] == {"dense": 1.21, "sparse": 1.21}
    assert sx["gco"]["dense"] == 1.16
    assert sx["all_three"] == {"dense": 1.7, "sparse": 1.6}
    assert sx["all_three_hybrid_vs_dense_baseline"] == {"dense": 1.94, "sparse": 1.94}
    assert p["fig8"]["memory_gb"] == {"fp32": 62, "mixed_precision": 27}
    f9 = p["fig9a"]
    assert f9["share_pct"]["host"] == {"HtoD": 60, "DtoD": 24, "Memset": 9}
    assert f9["share_pct"]["device"] == {"HtoD": 7, "DtoD": 64, "Memset": 22}
    assert f9["htod_gb"] == {"host": 7, "device": 1}
    assert f9["htod_gb_bound"] == {"host": "about", "device": "below"}
    f4 = p["fig4"]
    assert f4["hybrid_split"] == {"dense_epochs": 25, "sparse_epochs": 25}
    assert f4["loss_change_saturation_epoch"] == 28 and f4["total_epochs"] == 50
    for key in ("table1", "table2", "reference", "fig8", "fig9a", "fig9b", "fig4"):
        assert "Table" in p[key]["source"] or "Fig." in p[key]["source"] or "Section" in p[key]["source"]
        assert "page" in p[key]["source"]
    assert "Chaturvedi" in " ".join(p["paper"]["authors"])
