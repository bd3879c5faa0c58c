#!/usr/bin/env bash
# One call on the GPU host (the `device` tool's H200 machine, 16 cores) that measures everything
# the issues ask to be measured there, with prebuilt binaries (no device time spent compiling):
#
#   1. every CUDA test (ops vs the CPU reference, fixtures, GPU model and training vs the CPU);
#   2. scripts/reproduce: every preset row whose data is here; node and instance rows train on the
#      GPU (--device cuda), temporal rows on cores 2..15; writes docs/RESULTS.md + docs/results/;
#   3. at the same time, on cores 0-1 only: the CPU comparison with the PyTorch peer
#      (bench/cpu_vs_peer.py: Cora epochs and synthetic steps, both sides pinned to the same 2
#      cores) and then the kNN graph timing (N=50,000 x 128, k=5, 2 threads).
#
#   bench/device_session.sh --prebuilt DIR [--skip-tests] [--skip-reproduce] [--skip-cpu]
#                           [--jobs 4] [--only ROWS]
# DIR holds difformer and difformer_tests built with -DDIFFORMER_CUDA=ON
# -DCMAKE_CUDA_ARCHITECTURES=90 (and lib/ with shared libraries the host lacks; .devdeps/lib is
# used too when present). Results go to $OUT (default ./out/device_session).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/out/device_session}
PREBUILT="" RUN_TESTS=1 RUN_REPRO=1 RUN_CPU=1 JOBS=4 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuilt) PREBUILT=$2; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --skip-reproduce) RUN_REPRO=0; shift ;;
    --skip-cpu) RUN_CPU=0; shift ;;
    --jobs) JOBS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "device_session: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$PREBUILT" ] || { echo "device_session: --prebuilt DIR is required" >&2; exit 2; }
BIN=$(cd "$PREBUILT" && pwd)
mkdir -p "$OUT"
LOG=$OUT/session.log
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
[ -d "$BIN/lib" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$BIN/lib
[ -d "$ROOT/.devdeps/lib" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$ROOT/.devdeps/lib
# the prebuilt test binary finds tests/fixtures and data/ through the path it was configured in
if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$ROOT" /work/main; fi
say "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU); $(nproc) cores"
"$BIN/difformer" --help >/dev/null || { ldd "$BIN/difformer" | grep "not found"; exit 1; }
PY=$(command -v python3)
PEER=$([ -d bench/peer ] && echo bench/peer || echo ../shared/peer)

if [ "$RUN_TESTS" = 1 ]; then
  say "CUDA tests"
  timeout 240 "$BIN/difformer_tests" --gtest_filter='*Cuda*:*CUDA*:*Gpu*:*GPU*' >"$OUT/tests.log" 2>&1
  say "tests exit $?: $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/tests.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' "$OUT/tests.log" | head -20 | tee -a "$LOG"
fi

cpu_pid=""
if [ "$RUN_CPU" = 1 ]; then
  (
    taskset -c 0,1 "$PY" bench/cpu_vs_peer.py --difformer "$BIN/difformer" --threads 2 --peer "$PEER" --python "$PY" \
      --out "$OUT/cpu_vs_peer.csv" >"$OUT/cpu_vs_peer.log" 2>"$OUT/cpu_vs_peer.err"
    taskset -c 0,1 "$PY" scripts/knn_timing.py --bin "$BIN/difformer" --threads 2 >"$OUT/knn_timing.jsonl" 2>>"$OUT/cpu_vs_peer.err"
    taskset -c 0,1 "$PY" scripts/knn_timing.py --bin "$BIN/difformer" --threads 2 --metric cosine >>"$OUT/knn_timing.jsonl" 2>>"$OUT/cpu_vs_peer.err"
  ) &
  cpu_pid=$!
fi

if [ "$RUN_REPRO" = 1 ]; then
  say "reproduce (node/instance rows on the GPU, $JOBS rows at a time, cores 2-$(( $(nproc) - 1 )))"
  taskset -c 2-$(( $(nproc) - 1 )) "$PY" scripts/reproduce --bin "$BIN/difformer" --device cuda --jobs "$JOBS" \
    --threads $(( ($(nproc) - 2) / JOBS )) ${ONLY:+--only "$ONLY"} >"$OUT/reproduce.log" 2>&1
  say "reproduce exit $?"
  grep -E "done in|FAILED|not run" "$OUT/reproduce.log" | tee -a "$LOG"
  cp -r docs/RESULTS.md docs/results "$OUT/" 2>/dev/null
fi

if [ -n "$cpu_pid" ]; then
  wait "$cpu_pid"
  say "CPU vs peer (2 pinned cores):"; cat "$OUT/cpu_vs_peer.log" | tee -a "$LOG"; tail -3 "$OUT/cpu_vs_peer.err"
  say "kNN timing:"; cat "$OUT/knn_timing.jsonl" | tee -a "$LOG"
fi
say "done"
# the device tool brings back at most 8 files: everything but this log goes into one archive
(cd "$OUT" && tar czf all.tgz --exclude all.tgz --exclude session.log . && find . -mindepth 1 ! -name all.tgz ! -name session.log -delete)
