"""DIFFormer-a on Cora, the peer and difformer from the SAME initial weights (dropout 0 in this
protocol, so initialisation is the runs' only randomness): the first R fixed splits of
data/splits/cora_random10.npz, run r from the peer's torch.manual_seed(r) model (its state_dict via
numpy.savez, loaded by `difformer train --init`). Differences left: floating-point summation order,
amplified over 500 epochs of an 8-layer model with unscaled sigmoid attention.

  python3 dev/diagnostics/cora_a_same_init.py [--runs 5] [--device cuda] [--difformer build/difformer]
prints one JSON line per split: split, peer test accuracy, ours (test, best epoch).
"""
import argparse, json, os, subprocess, sys, tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "bench", "peer"))
import reference_targets as rt  # noqa: E402
from reference_difformer import DIFFormer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--difformer", default="build/difformer")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
os.chdir(ROOT)
torch.set_num_threads(a.threads)
splits = "data/splits/cora_random10.npz"
z = np.load("data/cora.npz")
nfeat, ncls = z["x"].shape[1], int(z["y"].max()) + 1
tmp = tempfile.mkdtemp(prefix="dfm_cora_a_init_")
for r in range(a.runs):  # the peer's model of run r, as run_classification builds it (on the CPU)
    torch.manual_seed(r)
    m = DIFFormer(nfeat, 64, ncls, num_layers=8, num_heads=1, kernel="sigmoid", alpha=0.5, dropout=0.0, use_bn=True,
                  use_residual=True, use_weight=False, use_graph=True)
    np.savez(os.path.join(tmp, "init%d.npz" % r), **{k: v.detach().numpy().astype(np.float32)
                                                     for k, v in m.state_dict().items()})
cfg = {"name": "cora-a", "data": "data/cora.npz", "task": "citation", "kernel": "sigmoid", "lr": 1e-3, "wd": 0.1,
       "dropout": 0.0, "layers": 8, "hidden": 64, "epochs": 500, "runs": a.runs, "splits": splits}
peer = rt.run_classification(cfg, torch.device(a.device))["per_run"]
for r in range(a.runs):
    js = os.path.join(tmp, "ours%d.json" % r)
    subprocess.run([a.difformer, "train", "--preset", "cora-a", "--splits", splits, "--first-run", str(r), "--runs", "1",
                    "--device", a.device, "--threads", str(a.threads), "--quiet", "--init",
                    os.path.join(tmp, "init%d.npz" % r), "--json", js], check=True, capture_output=True)
    ours = json.load(open(js))["runs"][0]
    print(json.dumps({"split": r, "device": a.device, "peer": peer[r], "ours": round(ours["test"], 2),
                      "ours_best_epoch": ours["best_epoch"]}), flush=True)
