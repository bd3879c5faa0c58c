"""The PyTorch peer's temporal protocol (bench/peer/reference_targets.py, run_temporal) for ONE
seed, so that many seeds can run as separate processes (the peer's own loop runs seeds 0..R-1 one
after another in one process). The temporal protocol has no randomness but the initialisation and
dropout, seeded by torch.manual_seed(run) with run = 0: this script shifts that seed by --seed.

  python3 dev/diagnostics/peer_temporal_seeds.py --seed S --name NAME --kernel simple|sigmoid \
      --lr LR [--wd WD] [--dropout P] [--data data/chickenpox.npz] [--no-graph]
prints one JSON line: {"name", "seed", "mse", "paper_mse"}.
"""
import argparse, json, os, sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "peer"))
import reference_targets as rt  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--name", required=True)
ap.add_argument("--kernel", required=True)
ap.add_argument("--lr", type=float, required=True)
ap.add_argument("--wd", type=float, default=0.0)
ap.add_argument("--dropout", type=float, default=0.2)
ap.add_argument("--data", default="data/chickenpox.npz")
ap.add_argument("--no-graph", action="store_true")
a = ap.parse_args()
torch.set_num_threads(1)
_manual_seed = torch.manual_seed
torch.manual_seed = lambda s: _manual_seed(s + a.seed)  # run 0 of the peer's loop -> seed a.seed
cfg = {"name": a.name, "data": a.data, "task": "temporal", "kernel": a.kernel, "lr": a.lr, "wd": a.wd,
       "dropout": a.dropout, "layers": 2, "hidden": 4, "epochs": 200, "runs": 1, "use_graph": not a.no_graph}
r = rt.run_temporal(cfg, torch.device("cpu"))
print(json.dumps({"name": a.name, "seed": a.seed, "mse": r["mse_mean"], "paper_mse": r["paper_mse_mean"]}), flush=True)
