#!/usr/bin/env python3
"""difformer vs the PyTorch peer on the CPU, in one run on the same machine.

For each configuration it runs our tool and the peer one after the other with the same number of
threads and prints the ratios (peer time / our time, peer memory / our memory), keeping a CSV.

  cora-s, cora-a  one epoch on Cora (training step + evaluation forward, paper settings: 8 layers,
                  hidden 64, dropout 0.2, lr 1e-3, wd 0.01, public split); ours: `difformer train
                  --json` ms_per_epoch; peer: peer_epoch.py
  synth-*         one training step on synthetic data made like the peer's (F=128, hidden 64,
                  2 layers, 1 head, degree 10, Wv on, dropout 0); ours: `difformer bench`; peer:
                  peer_bench.py

With --repeats R each configuration runs R times, ours and the peer alternating, and the row holds
the median of each side's R figures (and the ratio of the medians): on a VM whose speed drifts
between phases of tens of seconds, one short run of ours lands in one phase while the peer's longer
run averages over several, and single pairs scatter widely (Cora-s: 8.6x to 13.6x).

Usage: bench/cpu_vs_peer.py [--threads 2] [--only cora-s,synth-simple-1e5] [--repeats 1] [--out results.csv]
Needs: a Release build in build/ (or --difformer PATH), /usr/bin/python3 with torch + numpy for the
peer, and the peer in ../shared/peer (or --peer DIR). Only ratios from one run mean anything on a
shared 2-core machine; absolute times vary by +-35% between runs.
"""
import argparse, csv, json, os, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    "cora-s": dict(kind="epoch", kernel="simple"),
    "cora-a": dict(kind="epoch", kernel="sigmoid"),
    "synth-simple-1e5": dict(kind="step", kernel="simple", n=100000),
    "synth-sigmoid-1e4": dict(kind="step", kernel="sigmoid", n=10000),
}


def run(cmd, env=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def ours_epoch(a, kernel, tmp):
    out = os.path.join(tmp, f"ours_{kernel}.json")
    run([a.difformer, "train", "--data", os.path.join(ROOT, "data/cora.npz"), "--kernel", kernel, "--layers", "8",
         "--hidden", "64", "--dropout", "0.2", "--lr", "1e-3", "--weight-decay", "0.01", "--epochs", str(a.epochs + 2),
         "--runs", "1", "--split", "public", "--threads", str(a.threads), "--quiet", "--json", out])
    j = json.load(open(out))
    return j["ms_per_epoch"], j["peak_rss_bytes"] / 2**20


def peer_epoch(a, kernel, env):
    line = run([a.python, os.path.join(a.peer, "peer_epoch.py"), os.path.join(ROOT, "data/cora.npz"), kernel, "8",
                "64", str(a.epochs), str(a.threads)], env).strip().splitlines()[-1]
    j = json.loads(line)
    return j["ms_per_epoch_median"], j["peak_rss_bytes"] / 2**20


def ours_step(a, kernel, n, tmp):
    out = os.path.join(tmp, f"ours_{kernel}_{n}.json")
    run([a.difformer, "bench", "--nodes", str(n), "--features", "128", "--classes", "10", "--hidden", "64",
         "--layers", "2", "--heads", "1", "--kernel", kernel, "--steps", str(a.steps), "--threads", str(a.threads),
         "--json", out])
    j = json.load(open(out))
    return j["ms_per_step_median"], j["peak_rss_bytes"] / 2**20


def peer_step(a, kernel, n, tmp, env):
    out = os.path.join(tmp, f"peer_{kernel}_{n}.csv")
    run([a.python, os.path.join(a.peer, "peer_bench.py"), "--device", "cpu", "--threads", str(a.threads), "--sizes",
         str(n), "--kernels", kernel, "--graph", "on", "--min-reps", str(a.steps), "--limit-s", "600", "--out", out], env)
    rows = list(csv.DictReader(open(out)))
    r = rows[-1]
    return float(r["ms_per_step"]), float(r["peak_mem_MB"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of ours and the peer per config")
    ap.add_argument("--difformer", default=os.path.join(ROOT, "build/difformer"))
    ap.add_argument("--peer", default=os.environ.get("PEER_DIR", os.path.join(ROOT, "..", "shared", "peer")))
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "cpu_vs_peer.csv"))
    a = ap.parse_args()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only.split(","):
            c = CONFIGS[name]
            ours_runs, peer_runs = [], []
            for _ in range(a.repeats):
                if c["kind"] == "epoch":
                    ours_runs.append(ours_epoch(a, c["kernel"], tmp))
                    peer_runs.append(peer_epoch(a, c["kernel"], env))
                    unit = "ms/epoch"
                else:
                    ours_runs.append(ours_step(a, c["kernel"], c["n"], tmp))
                    peer_runs.append(peer_step(a, c["kernel"], c["n"], tmp, env))
                    unit = "ms/step"
                print(f"{name}: ours {ours_runs[-1][0]:.2f}, peer {peer_runs[-1][0]:.2f} {unit}, "
                      f"pair ratio {peer_runs[-1][0] / ours_runs[-1][0]:.2f}", file=sys.stderr, flush=True)
            ours = (statistics.median(r[0] for r in ours_runs), max(r[1] for r in ours_runs))
            peer = (statistics.median(r[0] for r in peer_runs), max(r[1] for r in peer_runs))
            rows.append(dict(config=name, unit=unit, ours_ms=round(ours[0], 2), peer_ms=round(peer[0], 2),
                             speedup=round(peer[0] / ours[0], 2), ours_peak_mb=round(ours[1], 1),
                             peer_peak_mb=round(peer[1], 1), memory_ratio=round(peer[1] / ours[1], 2),
                             threads=a.threads, repeats=a.repeats,
                             pair_ratios=" ".join(f"{p[0] / o[0]:.2f}" for o, p in zip(ours_runs, peer_runs))))
            print(json.dumps(rows[-1]), flush=True)
    tmp_out = a.out + ".tmp"
    with open(tmp_out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp_out, a.out)
    print(f"\n{'config':20s} {'unit':9s} {'ours':>10s} {'peer':>10s} {'speedup':>8s} {'ours MB':>9s} {'peer MB':>9s} {'mem x':>6s}")
    for r in rows:
        print(f"{r['config']:20s} {r['unit']:9s} {r['ours_ms']:10.2f} {r['peer_ms']:10.2f} {r['speedup']:8.2f} "
              f"{r['ours_peak_mb']:9.1f} {r['peer_peak_mb']:9.1f} {r['memory_ratio']:6.2f}")


if __name__ == "__main__":
    main()
