"""A stand-in for `bench train` and tiny grids, for the planning, process and `bench run` tests.

The fake trainer follows the run-folder contract without torch, so the runner's
bookkeeping (folders, resume, failures, signals) is tested in seconds; the
`fake` fixture (tests/conftest.py) writes it out and returns its command.
"""

from __future__ import annotations

import os

from rich.console import Console

from bench.grids import Cell, Grid, standard_factors
from ddnet.config import DataConfig, ModelConfig, TrainConfig

# A stand-in for `bench train` with the same folder contract: epochs.jsonl rows, a JSON "ckpt.pt"
# written after each row, summary.json; --resume drops rows past the checkpoint. It logs each
# launch to $FAKE_CALLS, crashes without a summary when its folder name contains $FAKE_CRASH,
# records a failed run (as a NaN loss would) at epoch 1 when it contains $FAKE_FAIL, hangs (a stuck
# GPU, say) in epoch 2 when it contains $FAKE_HANG, stops as `bench train` does on a full disk (exit 4,
# nothing recorded as failed) in epoch 2 when it contains $FAKE_FULL, stops as a GPU gone (exit 5) in epoch 2
# when it contains $FAKE_NO_GPU, stops as a DDP run whose replica was lost (exit 6, the summary still 'running'
# with the reason under "interrupted") in epoch 2 when it contains $FAKE_LOST, dies by signal $FAKE_TERM_SIGNAL
# (default SIGTERM: sent from outside the runner) in epoch 2 when it contains $FAKE_TERM, and sleeps $FAKE_EPOCH_S per epoch.
# Before its first epoch it hangs without a sign of life when its name contains $FAKE_STUCK_START, and spends
# $FAKE_START_S seconds touching .alive every 0.2 s (a slow start that lives: data, a compile) when $FAKE_SLOW_START.
FAKE_TRAIN = r'''
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
cfg = json.loads(Path(args[args.index("--config") + 1]).read_text())
out = Path(args[args.index("--out") + 1])
resume = "--resume" in args
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"folder": out.name, "resume": resume,
                        "planned_device": os.environ.get("DDNET_BENCH_PLANNED_DEVICE")}) + "\n")
summ, rows_path, ck = out / "summary.json", out / "epochs.jsonl", out / "ckpt.pt"
def put(path, text):  # atomic, as the real trainer writes: a kill never leaves a torn file
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
if summ.exists() and json.loads(summ.read_text())["status"] == "ok":
    print("error: already finished"); sys.exit(2)
rows = [json.loads(l) for l in rows_path.read_text().splitlines()] if rows_path.exists() else []
if rows and not resume:
    print("error: holds epochs; add --resume"); sys.exit(2)
start = json.loads(ck.read_text())["epoch"] if (resume and ck.exists()) else 0
rows = [r for r in rows if r["epoch"] <= start]
put(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
(out / "config.json").write_text(json.dumps(cfg))
put(summ, json.dumps({"status": "running", "error": None}))
if os.environ.get("FAKE_STUCK_START") and os.environ["FAKE_STUCK_START"] in out.name:
    time.sleep(3600)
if os.environ.get("FAKE_SLOW_START") and os.environ["FAKE_SLOW_START"] in out.name:
    until = time.monotonic() + float(os.environ.get("FAKE_START_S", "0"))
    while time.monotonic() < until:
        (out / ".alive").touch()
        time.sleep(0.2)
for e in range(start + 1, cfg["epochs"] + 1):
    time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0")))
    if os.environ.get("FAKE_CRASH") and os.environ["FAKE_CRASH"] in out.name and e == 2:
        print("segfault-like crash"); sys.stdout.flush(); os._exit(9)
    if os.environ.get("FAKE_HANG") and os.environ["FAKE_HANG"] in out.name and e == 2:
        time.sleep(3600)
    if os.environ.get("FAKE_NO_GPU") and os.environ["FAKE_NO_GPU"] in out.name and e == 2:
        print("error: this cell's grid was planned on a CUDA device but none is visible now"); sys.exit(5)
    if os.environ.get("FAKE_LOST") and os.environ["FAKE_LOST"] in out.name and e == 2:
        put(summ, json.dumps({"status": "running", "error": None,
                              "interrupted": "lost the other replicas (RuntimeError: Connection reset by peer)"}))
        print("error: lost the other replicas (RuntimeError: Connection reset by peer)"); sys.exit(6)
    if os.environ.get("FAKE_TERM") and os.environ["FAKE_TERM"] in out.name and e == 2:
        import signal; os.kill(os.getpid(), int(os.environ.get("FAKE_TERM_SIGNAL", "15"))); time.sleep(30)
    if os.environ.get("FAKE_FULL") and os.environ["FAKE_FULL"] in out.name and e == 2:
        print(f"error: cannot write {ck} (the disk is full: No space left on device)"); sys.exit(4)
    if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in out.name and e == 1:
        put(summ, json.dumps({"status": "failed", "error": f"train loss became nan at epoch {e}",
                                    "epochs_completed": e - 1}))
        print("error: training failed"); sys.exit(3)
    with open(rows_path, "a") as f:
        f.write(json.dumps({"epoch": e, "phase": "dense", "train_loss": 1.0 / e, "val_ms_ssim": 50.0 + e,
                            "time_s": 0.01}) + "\n")
    put(ck, json.dumps({"epoch": e}))
put(summ, json.dumps({"status": "ok", "error": None, "epochs_completed": cfg["epochs"],
                            "total_time_s": 0.01 * cfg["epochs"], "final_val_ms_ssim": 50.0 + cfg["epochs"]}))
print("done")
'''


def tiny_base() -> TrainConfig:
    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                       data=DataConfig(image_size=32, n_train=8, n_val=2), epochs=2, batch_size=4,
                       num_workers=0, device="cpu")


def make_grid(n: int = 3, cuda_cell: bool = False) -> Grid:
    """n tiny cells c0..c{n-1} (a failing one: set FAKE_FAIL to 'c1-'), and a CUDA-only one if asked."""
    def cells(base: TrainConfig) -> list[Cell]:
        out = []
        for i in range(n):
            cfg = base.replace(lr=1e-4 * (i + 1))
            out.append(Cell(f"c{i}", f"cell {i}", {**standard_factors(cfg), "lr": cfg.lr}, cfg))
        if cuda_cell:
            cfg = base.replace(graphs="cuda-graph")
            out.append(Cell("graph", "needs cuda", standard_factors(cfg), cfg))
        return out

    return Grid(name="fake", description="fake grid", source="test", cells_fn=cells, defaults_fn=tiny_base)


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=160)
