"""The peer and difformer from the SAME initial weights on the temporal protocol, dropout 0, so that
the only differences left are floating-point summation orders: a check that the two implement the
same model, loss, optimiser and early stopping end to end (the fixtures check one forward/backward).

For seed S: torch.manual_seed(S), the peer's model as bench/peer/reference_targets.py run_temporal
builds it, its state_dict written with numpy.savez (official names); the peer's protocol from that
model; then `difformer train --preset NAME --dropout 0 --runs 1 --init FILE` (train --init).

  /usr/bin/python3 dev/diagnostics/chickenpox_same_init.py --seed S [--name chickenpox-s]
      [--kernel simple] [--lr 0.01] [--difformer build/difformer]
prints one JSON line: seed, peer {mse, best_epoch, epochs}, ours {mse, best_epoch, epochs}.
"""
import argparse, json, os, subprocess, sys, tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "bench", "peer"))
import reference_targets as rt  # noqa: E402
from reference_difformer import DIFFormer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--name", default="chickenpox-s")
ap.add_argument("--kernel", default="simple")
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--data", default="data/chickenpox.npz")
ap.add_argument("--difformer", default="build/difformer")
a = ap.parse_args()
torch.set_num_threads(1)
os.chdir(ROOT)

lags = np.load(a.data)["x"].shape[2]
torch.manual_seed(a.seed)
init = DIFFormer(lags, 4, 1, num_layers=2, num_heads=1, kernel=a.kernel, alpha=0.5, dropout=0.0, use_bn=True,
                 use_residual=True, use_weight=False, use_graph=True)
tmp = tempfile.mkdtemp(prefix="dfm_same_init_")
init_file = os.path.join(tmp, "init.npz")
np.savez(init_file, **{k: v.detach().numpy().astype(np.float32) for k, v in init.state_dict().items()})

# The peer's protocol: its run 0 seeds torch with 0 before building the model; shifted to a.seed it
# builds exactly `init` (same constructor, same seed). Its epochs: best epoch and epochs run are
# recorded through a wrapped Adam.step count and the returned mse.
_manual_seed = torch.manual_seed
torch.manual_seed = lambda s: _manual_seed(s + a.seed)
steps = {"n": 0}
_step = torch.optim.Adam.step
def counting_step(self, *args, **kw):
    steps["n"] += 1
    return _step(self, *args, **kw)
torch.optim.Adam.step = counting_step
cfg = {"name": a.name, "data": a.data, "task": "temporal", "kernel": a.kernel, "lr": a.lr, "wd": 0.0,
       "dropout": 0.0, "layers": 2, "hidden": 4, "epochs": 200, "runs": 1, "use_graph": True}
peer = rt.run_temporal(cfg, torch.device("cpu"))
torch.manual_seed = _manual_seed

js = os.path.join(tmp, "ours.json")
subprocess.run([a.difformer, "train", "--preset", a.name, "--dropout", "0", "--runs", "1", "--threads", "1",
                "--quiet", "--init", init_file, "--json", js], check=True, capture_output=True)
ours = json.load(open(js))["runs"][0]
print(json.dumps({"seed": a.seed, "name": a.name,
                  "peer": {"mse": peer["mse_mean"], "epochs": steps["n"]},
                  "ours": {"mse": round(ours["test"], 4), "best_epoch": ours["best_epoch"],
                           "epochs": ours["epochs_run"]}}), flush=True)
