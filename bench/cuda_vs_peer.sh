#!/usr/bin/env bash
# On a GPU machine: build the CUDA backend (or use prebuilt binaries), run the CUDA tests, then
# `difformer bench --device cuda` and the PyTorch peer (shared/peer/peer_bench.py) on the same
# grid, in one call; print the ratios (speed and peak memory) and keep everything as CSV/logs.
#
#   bench/cuda_vs_peer.sh [--prebuilt DIR] [--build DIR] [--skip-tests] [--skip-peer]
#                         [--simple-sizes 1e4,1e5,1e6,1e7] [--sigmoid-sizes 1e4,3e4,6e4]
#                         [--precision fp32|tf32|bf16] [--precisions fp32,tf32,bf16] [--steps N]
#                         [--exclude REGEX] [--deps DIR]
#
# An empty size list (--simple-sizes '') skips that kernel, ours and the peer's. --precisions runs
# our bench once per precision (rows keyed by precision; the peer runs once, in fp32, TF32 off).
# The precision reaches `difformer bench` as --precision where the binary has the flag, and as
# DIFFORMER_PRECISION in the environment either way.
# Outputs (in $OUT, default ./out/cuda_vs_peer): tests.log, ours.jsonl (one bench JSON per line),
# peer.csv, cuda_vs_peer.csv (the joined table), run.log. The grid is the issue's: F=128, hidden
# 64, 2 layers, 1 head, Wv on, dropout 0, average degree 10, fp32, one full-batch training step
# (zero_grad, forward, cross-entropy over all N, backward, Adam lr 0.01 wd 1e-3).
# --prebuilt DIR: DIR holds difformer and difformer_tests (built elsewhere with
# -DDIFFORMER_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90) and lib/ with any shared libraries they
# need that the machine lacks. Without it the script configures and builds into --build (the H200
# image has nvcc and CMake but no libzip/Eigen/CLI11/GTest: pass --deps DIR, see
# DIFFORMER_DEPS_DIR in CMakeLists.txt). Tested on the H200 with --prebuilt.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/out/cuda_vs_peer}
BUILD=$ROOT/build-cuda-bench
PREBUILT=""
RUN_TESTS=1
RUN_PEER=1
SIMPLE_SIZES=1e4,1e5,1e6,1e7
SIGMOID_SIZES=1e4,3e4,6e4
PRECISION=fp32
STEPS=10
EXCLUDE=""  # --exclude REGEX: sources to leave out of the build (DIFFORMER_EXCLUDE)
DEPS=""     # --deps DIR: carried headers/libraries (DIFFORMER_DEPS_DIR) where the machine has none
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuilt) PREBUILT=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --skip-peer) RUN_PEER=0; shift ;;
    --simple-sizes) SIMPLE_SIZES=$2; shift 2 ;;
    --sigmoid-sizes) SIGMOID_SIZES=$2; shift 2 ;;
    --precision|--precisions) PRECISION=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --exclude) EXCLUDE=$2; shift 2 ;;
    --deps) DEPS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
LOG=$OUT/run.log
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}

# ---- binaries ----------------------------------------------------------------------------------
if [ -n "$PREBUILT" ]; then
  BIN=$(cd "$PREBUILT" && pwd)
  say "using prebuilt binaries in $BIN"
  # Shared libraries the machine lacks come from $BIN/lib, one by one (never shadowing its own).
  if [ -d "$BIN/lib" ]; then
    EXTRA=$(mktemp -d)
    for lib in $(ldd "$BIN/difformer_tests" "$BIN/difformer" 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
      if [ -e "$BIN/lib/$lib" ]; then ln -sf "$BIN/lib/$lib" "$EXTRA/$lib"; say "  $lib from $BIN/lib"; fi
    done
    export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$EXTRA
    for lib in $(LD_LIBRARY_PATH=$LD_LIBRARY_PATH ldd "$BIN/difformer_tests" 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
      if [ -e "$BIN/lib/$lib" ]; then ln -sf "$BIN/lib/$lib" "$EXTRA/$lib"; say "  $lib from $BIN/lib (second level)"; fi
    done
  fi
else
  say "building into $BUILD"
  GEN=""
  command -v ninja >/dev/null && GEN="-G Ninja"
  if ! cmake -S "$ROOT" -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DDIFFORMER_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DDIFFORMER_NATIVE=OFF -DDIFFORMER_EXCLUDE="$EXCLUDE" \
      ${DEPS:+-DDIFFORMER_DEPS_DIR=$(cd "$DEPS" && pwd)} >>"$LOG" 2>&1; then
    say "configure failed (see run.log)"; exit 1
  fi
  if ! cmake --build "$BUILD" -j"$(nproc)" --target difformer difformer_tests >>"$LOG" 2>&1; then
    say "build failed (see run.log)"; tail -30 "$LOG"; exit 1
  fi
  BIN=$BUILD
fi
# A prebuilt test binary finds tests/fixtures through the source path it was configured with
# (/work/main where it was built): point that path at this checkout when it does not exist.
if [ -n "$PREBUILT" ] && [ ! -e /work/main ]; then
  mkdir -p /work && ln -s "$ROOT" /work/main && say "linked /work/main -> $ROOT for the fixtures"
fi
if ! "$BIN/difformer" --help >/dev/null 2>>"$LOG"; then
  say "the difformer binary does not start here:"; ldd "$BIN/difformer" | grep -i "not found" | tee -a "$LOG"; exit 1
fi

# ---- tests ---------------------------------------------------------------------------------------
if [ "$RUN_TESTS" = 1 ]; then
  say "CUDA tests"
  timeout 300 "$BIN/difformer_tests" --gtest_filter='*Cuda*' >"$OUT/tests.log" 2>&1
  say "tests exit $?: $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/tests.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' "$OUT/tests.log" | head -40 | tee -a "$LOG"
fi

# ---- our bench -----------------------------------------------------------------------------------
: >"$OUT/ours.jsonl"
TMPJ=$(mktemp -d)
PREC_FLAG=0
"$BIN/difformer" bench --help 2>/dev/null | grep -q -- '--precision' && PREC_FLAG=1
run_ours() {  # kernel, N, precision
  local k=$1 n=$2 prec=$3 steps=$STEPS
  local nn; nn=$(python3 -c "print(int(float('$n')))")
  [ "$nn" -ge 5000000 ] && steps=$(( STEPS < 5 ? STEPS : 5 ))
  local extra=()
  [ "$PREC_FLAG" = 1 ] && extra=(--precision "$prec")
  if DIFFORMER_PRECISION=$prec timeout 300 "$BIN/difformer" bench --device cuda --kernel "$k" --nodes "$nn" --features 128 \
      --classes 10 --hidden 64 --layers 2 --heads 1 --dropout 0 --steps "$steps" --warmup 2 "${extra[@]}" \
      --json "$TMPJ/$k-$nn-$prec.json" >>"$LOG" 2>&1; then
    python3 -c "import json,sys; j=json.load(open(sys.argv[1])); j.setdefault('precision', sys.argv[2]); print(json.dumps(j))" \
      "$TMPJ/$k-$nn-$prec.json" "$prec" >>"$OUT/ours.jsonl"
    say "ours $k N=$nn $prec: $(tail -1 "$LOG")"
  else
    say "ours $k N=$nn $prec FAILED: $(tail -3 "$LOG" | tr '\n' ' ')"
  fi
}
IFS=, read -ra PS <<<"$PRECISION"
IFS=, read -ra SS <<<"$SIMPLE_SIZES"
IFS=, read -ra GS <<<"$SIGMOID_SIZES"
for p in "${PS[@]}"; do
  for n in "${SS[@]}"; do run_ours simple "$n" "$p"; done
  for n in "${GS[@]}"; do run_ours sigmoid "$n" "$p"; done
done

# ---- the PyTorch peer -------------------------------------------------------------------------------
PEER=""
for d in "$ROOT/bench/peer" "$ROOT/shared/peer" "$ROOT/../shared/peer" "$ROOT/build-dev/peer"; do
  [ -f "$d/peer_bench.py" ] && PEER=$d && break
done
if [ "$RUN_PEER" = 1 ] && [ -n "$PEER" ]; then
  say "peer from $PEER"
  if [ -n "$SIMPLE_SIZES" ]; then
    PYTHONUNBUFFERED=1 python3 "$PEER/peer_bench.py" --device cuda --kernels simple --graph on --sizes "$SIMPLE_SIZES" \
      --out "$TMPJ/peer_simple.csv" >>"$LOG" 2>&1 || say "peer (simple) failed"
  fi
  if [ -n "$SIGMOID_SIZES" ]; then
    PYTHONUNBUFFERED=1 python3 "$PEER/peer_bench.py" --device cuda --kernels sigmoid --graph on --sizes "$SIGMOID_SIZES" \
      --out "$TMPJ/peer_sigmoid.csv" >>"$LOG" 2>&1 || say "peer (sigmoid) failed"
  fi
  : >"$OUT/peer.csv"
  for f in "$TMPJ"/peer_simple.csv "$TMPJ"/peer_sigmoid.csv; do
    [ -f "$f" ] || continue
    if [ -s "$OUT/peer.csv" ]; then tail -n +2 "$f" >>"$OUT/peer.csv"; else cat "$f" >>"$OUT/peer.csv"; fi
  done
elif [ "$RUN_PEER" = 1 ]; then
  say "peer_bench.py not found (looked in shared/peer, ../shared/peer, build-dev/peer)"
fi

# ---- the table --------------------------------------------------------------------------------------
python3 - "$OUT" <<'EOF' | tee -a "$LOG"
import csv, json, os, sys
out = sys.argv[1]
ours = {}
for line in open(os.path.join(out, "ours.jsonl")):
    j = json.loads(line)
    ours[(j["model"]["kernel"], int(j["nodes"]), j.get("precision", "fp32"))] = j
peer = {}
p = os.path.join(out, "peer.csv")
if os.path.exists(p) and os.path.getsize(p) > 0:
    for r in csv.DictReader(open(p)):
        peer[(r["kernel"], int(r["N"]))] = r
rows = []
print(f"{'kernel':8} {'N':>9} {'prec':>5} | {'ours ms':>9} {'ours MB':>9} | {'peer ms':>9} {'peer MB':>9} | {'speedup':>7} {'mem ratio':>9}")
keys = set(ours) | {k + ("fp32",) for k in peer if not any(o[:2] == k for o in ours)}
for key in sorted(keys, key=lambda k: (k[0] != "simple", k[1], k[2])):
    o, q = ours.get(key), peer.get(key[:2])
    oms = o["ms_per_step_mean_loop"] if o else None
    omb = o["peak_device_bytes"] / 2**20 if o else None
    def num(v):
        try: return float(v)
        except (TypeError, ValueError): return None
    pms = num(q["ms_per_step"]) if q else None
    pmb = num(q["peak_mem_MB"]) if q else None
    sp = pms / oms if (pms and oms) else None
    mr = omb / pmb if (pmb and omb) else None
    f = lambda v, w=9, d=2: f"{v:{w}.{d}f}" if v is not None else f"{'-':>{w}}"
    print(f"{key[0]:8} {key[1]:>9} {key[2]:>5} | {f(oms)} {f(omb,9,1)} | {f(pms)} {f(pmb,9,1)} | {f(sp,7,2)} {f(mr,9,3)}"
          + ("" if q is None or pms is not None else f"   (peer: {q['ms_per_step']})"))
    rows.append(dict(kernel=key[0], N=key[1], ours_ms_mean=oms, ours_ms_median=o["ms_per_step_median"] if o else None,
                     ours_peak_MB=omb, peer_ms=q["ms_per_step"] if q else None, peer_peak_MB=q["peak_mem_MB"] if q else None,
                     speedup=sp, mem_ratio=mr, cuda_graph=o["cuda_graph"] if o else None,
                     precision=key[2]))
with open(os.path.join(out, "cuda_vs_peer.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()) if rows else ["kernel"])
    w.writeheader()
    for r in rows: w.writerow(r)
print("speedup = peer ms / ours ms (ours: mean of a loop of steps, timed like the peer); mem ratio = ours / peer peak")
EOF
rm -rf "$TMPJ"
say "done; results in $OUT"
