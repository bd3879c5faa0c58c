#!/usr/bin/env bash
# One call on a many-core machine (the GPU host of the device tool): the CPU comparison with the
# PyTorch peer pinned to 2 cores, and, on the other cores at the same time, the Cora accuracy
# protocol of the core issue (paper settings, one run per fixed split: DIFFormer-s on the 10
# splits, DIFFormer-a on the first 5). Results go to $OUT (default ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=$(command -v python3)
PEER=$( [ -d bench/peer ] && echo bench/peer || echo ../shared/peer )
nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200
# The GPU host has no Debian packages: use the carried .devdeps/ when there (see CMakeLists.txt).
deps=()
if [ -d .devdeps ]; then
  deps=(-DDIFFORMER_DEPS_DIR="$PWD/.devdeps" -DZLIB_INCLUDE_DIR="$PWD/.devdeps/include" -DZLIB_LIBRARY="$PWD/.devdeps/lib/libz.so")
  export LD_LIBRARY_PATH="$PWD/.devdeps/lib:${LD_LIBRARY_PATH:-}"
fi
# DIFFORMER_BIN: a difformer binary built elsewhere (with its libraries on LD_LIBRARY_PATH), else build here
if [ -n "${DIFFORMER_BIN:-}" ]; then
  mkdir -p build-dev && cp "$DIFFORMER_BIN" build-dev/difformer
else
  cmake -S . -B build-dev -DCMAKE_BUILD_TYPE=Release -DDIFFORMER_TESTS=OFF "${deps[@]}" > "$OUT/cmake.log" 2>&1
  cmake --build build-dev -j"$(nproc)" --target difformer >> "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
fi
# one split file per row so that runs can go in parallel (run r: split row r, seed r)
"$PY" - <<'PYEOF'
import numpy as np
z = np.load("data/splits/cora_random10.npz")
for r in range(z["train_idx"].shape[0]):
    np.savez(f"/tmp/cora_split{r}.npz", **{k: z[k][r:r+1] for k in ("train_idx", "val_idx", "test_idx")})
PYEOF
if [ "${SKIP_ACCURACY:-0}" = 1 ]; then
  taskset -c 0,1 "$PY" bench/cpu_vs_peer.py --difformer "$PWD/build-dev/difformer" --threads 2 --peer "$PEER" --python "$PY" --out "$OUT/cpu_vs_peer.csv" \
    2> "$OUT/cpu_vs_peer.err" || tail -20 "$OUT/cpu_vs_peer.err"
  exit 0
fi
common="--data data/cora.npz --layers 8 --hidden 64 --lr 1e-3 --epochs 500 --runs 1 --quiet"
# DIFFormer-a: 5 runs x 2 threads on cores 2..11
for r in 0 1 2 3 4; do
  c0=$((2 + 2 * r)); c1=$((3 + 2 * r))
  taskset -c $c0,$c1 ./build-dev/difformer train $common --kernel sigmoid --weight-decay 0.1 --dropout 0 \
    --splits /tmp/cora_split$r.npz --seed $r --threads 2 --json "$OUT/cora_a_$r.json" > "$OUT/cora_a_$r.log" 2>&1 &
done
# DIFFormer-s: 10 runs on cores 12..15, 1 thread each
for chain in 0 1 2 3; do
  ( for r in $(seq $chain 4 9); do
      taskset -c $((12 + chain)) ./build-dev/difformer train $common --kernel simple --weight-decay 0.01 --dropout 0.2 \
        --splits /tmp/cora_split$r.npz --seed $r --threads 1 --json "$OUT/cora_s_$r.json" > "$OUT/cora_s_$r.log" 2>&1
    done ) &
done
# speed and memory against the peer, both pinned to cores 0-1 (SKIP_SPEED=1: accuracy only)
if [ "${SKIP_SPEED:-0}" != 1 ]; then
  taskset -c 0,1 "$PY" bench/cpu_vs_peer.py --difformer "$PWD/build-dev/difformer" --threads 2 --peer "$PEER" --python "$PY" --out "$OUT/cpu_vs_peer.csv" \
    > "$OUT/cpu_vs_peer.log" 2> "$OUT/cpu_vs_peer.err"
  cat "$OUT/cpu_vs_peer.log"; tail -5 "$OUT/cpu_vs_peer.err"
fi
wait
"$PY" - "$OUT" <<'PYEOF'
import json, sys, glob, statistics as st
out = sys.argv[1]
for k in ("s", "a"):
    runs = sorted(glob.glob(f"{out}/cora_{k}_*.json"))
    t = [json.load(open(f))["test_mean"] for f in runs]
    if t:
        print(f"cora-{k}: {len(t)} runs, test {[round(x, 1) for x in t]}, mean {st.mean(t):.2f} "
              f"+- {st.stdev(t) if len(t) > 1 else 0:.2f}, median {st.median(t):.2f}")
PYEOF
