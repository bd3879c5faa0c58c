"""Continue training in the PyTorch reference from weights `difformer train --save` wrote (citeseer-s,
split row 2), to tell an initialisation-dependent failure from an arithmetic one.

  difformer train --preset citeseer-s --splits ROW2.npz --runs 1 --seed 2 --epochs 1 --save s2.npz
  /usr/bin/python3 dev/diagnostics/citeseer_continue_in_torch.py s2.npz 0 160   # or "torch" for torch's own init
"""
import sys, json, numpy as np, torch
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'bench', 'peer'))
from reference_difformer import DIFFormer
from reference_targets import citation_graph
import torch.nn.functional as F
torch.set_num_threads(1)
z = np.load('data/citeseer.npz')
x = z['x'].astype(np.float32); s = x.sum(1, keepdims=True); s[s == 0] = 1; x = x / s
y = z['y'].astype(np.int64); n = x.shape[0]
ei = torch.from_numpy(citation_graph(z['edge_index'], n))
X = torch.from_numpy(x); Y = torch.from_numpy(y)
sp = np.load('data/splits/citeseer_random10.npz'); tr = torch.from_numpy(sp['train_idx'][2]); va = sp['val_idx'][2]
torch.manual_seed(int(sys.argv[2]))
m = DIFFormer(x.shape[1], 64, 6, num_layers=4, num_heads=1, kernel='simple', alpha=0.5, dropout=0.2, use_bn=True,
              use_residual=True, use_weight=False, use_graph=True)
if sys.argv[1] != 'torch':
    ck = np.load(sys.argv[1])
    m.load_state_dict({k: torch.from_numpy(ck[k]) for k in m.state_dict().keys()})
opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1.0)
best = 0
for ep in range(int(sys.argv[3])):
    m.train(); opt.zero_grad(); loss = F.cross_entropy(m(X, ei)[tr], Y[tr]); loss.backward(); opt.step()
    m.eval()
    with torch.no_grad(): p = m(X, ei).argmax(1).numpy()
    v = (p[va] == y[va]).mean(); best = max(best, v)
    if ep % 20 == 0 or ep == int(sys.argv[3]) - 1: print(sys.argv[1][-6:], ep, round(float(loss), 4), v, 'best', best, flush=True)
