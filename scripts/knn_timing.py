#!/usr/bin/env python3
"""Times the exact kNN graph of `difformer train --knn K` on random data (default: N=50,000 x 128,
k=5, 2 threads; the issue's bound is 30 s). Standard library only: writes the .npz itself.

    scripts/knn_timing.py [--bin build/difformer] [--n 50000] [--f 128] [--k 5] [--threads 2]
                          [--metric euclidean]

Prints one JSON line: {"n", "f", "k", "threads", "metric", "knn_seconds", "fallback_rows", "wall_seconds"}.
The graph build is timed inside the tool (JSON knn_graph.seconds); training is reduced to one
epoch of a zero-layer model so that the wall time is mostly loading + kNN.
"""
import argparse
import array
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zipfile


def npy_bytes(descr, shape, payload):
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        descr, "".join("%d, " % s for s in shape) if len(shape) != 1 else "%d," % shape[0])
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


def write_npz(path, n, f, seed):
    rng = random.Random(seed)
    x = array.array("f", (rng.gauss(0.0, 1.0) for _ in range(n * f)))
    y = array.array("q", (i % 10 for i in range(n)))
    if sys.byteorder != "little":
        x.byteswap()
        y.byteswap()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", npy_bytes("<f4", (n, f), x.tobytes()))
        z.writestr("y.npy", npy_bytes("<i8", (n,), y.tobytes()))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=None, help="difformer binary (default: first of build*/difformer)")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--f", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--metric", default="euclidean")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    binary = a.bin
    if binary is None:
        cands = [os.path.join(root, d, "difformer") for d in sorted(os.listdir(root)) if d.startswith("build")]
        cands = [c for c in cands if os.access(c, os.X_OK)]
        if not cands:
            sys.exit("no build*/difformer found; build first or pass --bin")
        binary = max(cands, key=os.path.getmtime)
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "random.npz"), os.path.join(tmp, "out.json")
        write_npz(data, a.n, a.f, a.seed)
        cmd = [binary, "train", "--data", data, "--task", "instance", "--knn", str(a.k), "--knn-metric", a.metric,
               "--threads", str(a.threads), "--epochs", "1", "--runs", "1", "--layers", "0", "--hidden", "4",
               "--per-class", "10", "--quiet", "--json", out]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        j = json.load(open(out))
    print(json.dumps({"n": a.n, "f": a.f, "k": a.k, "threads": a.threads, "metric": a.metric,
                      "knn_seconds": round(j["knn_graph"]["seconds"], 3),
                      "fallback_rows": j["knn_graph"]["fallback_rows"], "wall_seconds": round(wall, 2),
                      "command": " ".join(cmd[:2] + ["--data", "<random N x F>"] + cmd[4:-2])}))


if __name__ == "__main__":
    main()
