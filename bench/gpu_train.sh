#!/usr/bin/env bash
# On a GPU machine, with prebuilt binaries: the CUDA tests, `train --device cuda` on the citation
# presets (10 fixed splits each), and the large-graph GPU figures of issue 5 (one full-graph step
# on a Pokec-like 100,000-node graph; full-graph DIFFormer-s training on 2,000,000 nodes).
#   bench/gpu_train.sh BIN_DIR [OUT_DIR] [SOURCE_DIR]
# BIN_DIR holds difformer, difformer_tests and lib/ (shared libraries the machine may lack; each is
# used only when the machine has none). Run from the repository root (data/ and tests/fixtures);
# SOURCE_DIR: the source path difformer_tests was configured with (DIFFORMER_SOURCE_DIR), linked
# to this checkout when it does not exist here. TEST_FILTER: the gtest filter (default *Cuda*).
set -uo pipefail
BIN=$(cd "$1" && pwd)
OUT=${2:-${OUT:-out/gpu_train}}
mkdir -p "$OUT"
LOG=$OUT/log
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
EXTRA=$(mktemp -d)
for lib in $(ldd "$BIN/difformer_tests" "$BIN/difformer" 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
  [ -e "$BIN/lib/$lib" ] && ln -sf "$BIN/lib/$lib" "$EXTRA/$lib" && say "$lib from $BIN/lib"
done
export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$EXTRA
# the test binary finds data/ and tests/fixtures through the source path it was configured with
SRC=${3:-}
[ -n "$SRC" ] && [ ! -e "$SRC" ] && mkdir -p "$(dirname "$SRC")" && ln -s "$PWD" "$SRC" && say "linked $SRC -> $PWD"
say "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"

D=$BIN/difformer
# the synthetic graphs are made on the CPU while the GPU runs the tests and the citation presets
( "$D" synth --nodes 100000 --avg-degree 19 --features 65 --classes 2 --seed 1 --out /tmp/b.npz &&
  "$D" synth --nodes 2000000 --avg-degree 19 --features 65 --classes 2 --seed 1 --out /tmp/m2.npz ) >/tmp/synth.log 2>&1 &
SYNTH=$!
say "CUDA tests"
timeout 120 "$BIN/difformer_tests" --gtest_filter="${TEST_FILTER:-*Cuda*}" >"$OUT/tests.log" 2>&1
say "tests exit $?: $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/tests.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]|CoraEpochsMatchCpu:' "$OUT/tests.log" | tee -a "$LOG"

presets() {  # the citation rows on the GPU, 10 fixed splits each
  PRESETS=$1
  for p in $PRESETS; do
    case $p in cora*) S=data/splits/cora_random10.npz ;; *) S=data/splits/citeseer_random10.npz ;; esac
    say "train --preset $p --device cuda, 10 splits"
    timeout 75 "$D" train --preset $p --device cuda --splits $S --runs 10 --json "$OUT/$p.json" >/tmp/$p.log 2>&1
    say "exit $?: $(tail -1 /tmp/$p.log)"; grep -E '^run ' /tmp/$p.log >>"$LOG"
  done
}
presets "cora-s citeseer-s"
say "issue 5: one full-graph step, Pokec-like 100,000 nodes"
timeout 120 "$D" train-large --data /tmp/b.npz --preset pokec-s --batch-size 0 --epochs 1 --eval-every 0 \
  --device cuda --json "$OUT/pokec100k_step.json" >>"$LOG" 2>&1; say "exit $?: $(tail -2 "$LOG" | tr '\n' ' ')"

say "issue 5: full-graph DIFFormer-s on 2,000,000 nodes, 2 epochs"
wait $SYNTH; say "synth exit $?: $(cat /tmp/synth.log)"
timeout 150 "$D" train-large --data /tmp/m2.npz --preset pokec-s --batch-size 0 --epochs 2 --device cuda \
  --json "$OUT/synth2m_full.json" >>"$LOG" 2>&1; say "exit $?: $(tail -2 "$LOG" | tr '\n' ' ')"

presets "cora-a citeseer-a"
say "done"
