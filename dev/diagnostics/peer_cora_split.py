"""The PyTorch peer's citation protocol (bench/peer/reference_targets.py, run_classification) for
ONE row of a fixed split file, so that the rows can run as separate processes (the peer's loop
runs rows 0..R-1 one after another). Run r there uses split row r and torch.manual_seed(r); this
script gives the loop a one-row split file and shifts the seed by --row, so it computes exactly
that run.

  python3 dev/diagnostics/peer_cora_split.py --row R [--kernel simple] [--wd 0.01] [--dropout 0.2]
      [--layers 8] [--hidden 64] [--data data/cora.npz] [--splits data/splits/cora_random10.npz]
prints one JSON line: {"row", "test"}.
"""
import argparse, json, os, sys, tempfile

import numpy as np
import torch

here = os.path.dirname(os.path.abspath(__file__))
for peer in (os.path.join(here, "..", "..", "bench", "peer"), os.path.join(here, "..", "..", "..", "shared", "peer")):
    sys.path.insert(0, peer)
import reference_targets as rt  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--row", type=int, required=True)
ap.add_argument("--kernel", default="simple")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--wd", type=float, default=0.01)
ap.add_argument("--dropout", type=float, default=0.2)
ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--hidden", type=int, default=64)
ap.add_argument("--epochs", type=int, default=500)
ap.add_argument("--data", default="data/cora.npz")
ap.add_argument("--splits", default="data/splits/cora_random10.npz")
a = ap.parse_args()
torch.set_num_threads(1)
sp = np.load(a.splits)
one = os.path.join(tempfile.mkdtemp(), "row.npz")
np.savez(one, **{k: sp[k][a.row:a.row + 1] for k in ("train_idx", "val_idx", "test_idx")})
_manual_seed = torch.manual_seed
torch.manual_seed = lambda s: _manual_seed(s + a.row)  # run 0 of the peer's loop -> seed a.row
cfg = {"name": "cora", "data": a.data, "task": "citation", "kernel": a.kernel, "lr": a.lr, "wd": a.wd,
       "dropout": a.dropout, "layers": a.layers, "hidden": a.hidden, "epochs": a.epochs, "runs": 1,
       "splits": one}
r = rt.run_classification(cfg, torch.device("cpu"))
print(json.dumps({"row": a.row, "test": r["per_run"][0]}), flush=True)
