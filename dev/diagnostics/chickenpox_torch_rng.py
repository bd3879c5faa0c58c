"""Per-seed comparison of `difformer train --preset chickenpox-{s,a} --rng torch --runs 40 --json F`
with the PyTorch peer's per-seed test MSE (seeds 0-19: dev/cuda/sigmoid_chunked.h200.log; seeds
20-39: dev/diagnostics/chickenpox_40seeds.log; both peer_temporal_seeds.py on the H200 host's CPU).

    /usr/bin/python3 dev/diagnostics/chickenpox_torch_rng.py OURS_S.json OURS_A.json
"""
import json, os, re, statistics, sys

here = os.path.dirname(os.path.abspath(__file__))
log = open(os.path.join(here, '../cuda/sigmoid_chunked.h200.log')).read()
peer = {}
for k in 'sa':
    m = re.search(r'chickenpox-%s seeds 20 mean .*? per seed \[(.*?)\]' % k, log)
    peer[k] = {s: float(v) for s, v in enumerate(m.group(1).split(','))}
for line in open(os.path.join(here, 'chickenpox_40seeds.log')):
    if line.startswith('{'):
        d = json.loads(line)
        peer[d['name'][-1]][d['seed']] = d['mse']
for k, path in zip('sa', sys.argv[1:3]):
    ours = {r['seed']: r['test'] for r in json.load(open(path))['runs']}
    seeds = sorted(ours)
    diff = {s: abs(round(ours[s], 4) - peer[k][s]) for s in seeds}
    same = sum(d <= 1.01e-4 for d in diff.values())
    o, p = [ours[s] for s in seeds], [peer[k][s] for s in seeds]
    print(f'chickenpox-{k}: {len(seeds)} seeds; equal to the peer to 4 decimals (+-1 in the last) on {same}; '
          f'largest difference {max(diff.values()):.4f}')
    print(f'  ours {statistics.mean(o):.4f} +- {statistics.stdev(o):.4f}; peer {statistics.mean(p):.4f} +- '
          f'{statistics.stdev(p):.4f}; seeds 0-4: ours {statistics.mean(o[:5]):.4f}, peer {statistics.mean(p[:5]):.4f}')
    for s in seeds:
        if diff[s] > 1.01e-4:
            print(f'  seed {s}: ours {ours[s]:.4f}, peer {peer[k][s]:.4f}')
