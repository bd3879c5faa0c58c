#!/usr/bin/env bash
# Scale measurements of issue 5 (large graphs) on the CPU. Run ONE AT A TIME on a shared machine:
# every step is a separate process whose peak RSS (getrusage) and phase peaks (VmHWM after a
# /proc/self/clear_refs reset) land in the JSON files under $OUT.
#
#   1. Pokec-sized synthetic graph: 1,632,803 nodes, ~30.6M directed edges (avg degree 18.75),
#      65 features, 2 classes; preset pokec-s (DIFFormer-s, Wv, hidden 128, 3 layers, batch 100,000,
#      undirected + self-loops, random 50/25/25 split): one epoch and one full-graph evaluation.
#   2. ogbn-proteins-sized synthetic graph: 132,534 nodes, ~39.5M directed edges, 8 features,
#      112 binary tasks; preset proteins-s (hidden 64, 3 layers, batch 10,000, ROC-AUC): one epoch
#      and one full-graph evaluation (ratio split: a synthetic file has no OGB split).
#   3. One training step on a 100,000-node batch with Pokec-like degree (18.75 edges per node
#      inside the batch, i.e. denser than a real Pokec chunk), DIFFormer-s hidden 128, 3 layers:
#      the memory-lean path, then the model's own forward/backward for comparison.
#
# Usage: scripts/scale_runs.sh [all|pokec|proteins|step]   (BIN, OUT, THREADS from the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build-large/difformer}
OUT=${OUT:-/tmp/difformer-scale}
THREADS=${THREADS:-0}
WHAT=${1:-all}
mkdir -p "$OUT"

run() {  # prints the command, runs it under /usr/bin/time for an outside view of the peak RSS
  echo "+ $*" >&2
  /usr/bin/time -f "  [time] %e s wall, max RSS %M KB" "$@"
}

if [[ $WHAT == all || $WHAT == pokec ]]; then
  [[ -f $OUT/pokec_synth.npz ]] ||
    run "$BIN" synth --nodes 1632803 --avg-degree 18.75 --features 65 --classes 2 --homophily 0.7 --signal 0.6 \
      --seed 1 --threads "$THREADS" --out "$OUT/pokec_synth.npz" --json "$OUT/synth_pokec.json"
  run "$BIN" train-large --data "$OUT/pokec_synth.npz" --preset pokec-s --epochs 1 --runs 1 --eval-every 1 \
    --threads "$THREADS" --json "$OUT/pokec_epoch.json"
fi

if [[ $WHAT == all || $WHAT == proteins ]]; then
  [[ -f $OUT/proteins_synth.npz ]] ||
    run "$BIN" synth --nodes 132534 --avg-degree 300.2 --features 8 --classes 10 --tasks 112 --homophily 0.7 \
      --seed 2 --threads "$THREADS" --out "$OUT/proteins_synth.npz" --json "$OUT/synth_proteins.json"
  run "$BIN" train-large --data "$OUT/proteins_synth.npz" --preset proteins-s --split ratio:0.5,0.25 --epochs 1 \
    --runs 1 --eval-every 1 --threads "$THREADS" --json "$OUT/proteins_epoch.json"
fi

if [[ $WHAT == all || $WHAT == step ]]; then
  [[ -f $OUT/batch100k.npz ]] ||
    run "$BIN" synth --nodes 100000 --avg-degree 18.75 --features 65 --classes 2 --seed 3 --threads "$THREADS" \
      --out "$OUT/batch100k.npz" --json "$OUT/synth_batch100k.json"
  # --batch-size 0: the whole file is the batch: exactly one optimiser step, no evaluation
  run "$BIN" train-large --data "$OUT/batch100k.npz" --preset pokec-s --no-self-loops --batch-size 0 --epochs 1 \
    --eval-every 0 --runs 1 --path lean --threads "$THREADS" --json "$OUT/step100k.json"
  run "$BIN" train-large --data "$OUT/batch100k.npz" --preset pokec-s --no-self-loops --batch-size 0 --epochs 1 \
    --eval-every 0 --runs 1 --path model --threads "$THREADS" --json "$OUT/step100k_model.json"
fi

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ["pokec_epoch", "proteins_epoch", "step100k", "step100k_model"]:
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        continue
    j = json.load(open(p))
    mb = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"{name}: nodes {j['nodes']} edges {j['edges']} batch {j['batch_size']} path {j['path']}: "
          f"{j['seconds_per_epoch']:.1f} s/epoch, eval {j['eval_seconds']:.1f} s, {j['metric']} {j['test_mean']}, "
          f"peak RSS {mb(j['peak_rss_bytes'])} (load {mb(j['load_peak_rss_bytes'])}, after load "
          f"{mb(j['rss_after_load_bytes'])}, training {mb(j['train_peak_rss_bytes'])}, "
          f"evaluation {mb(j['eval_peak_rss_bytes'])}; estimate {mb(j['estimate']['peak_bytes'])})")
EOF
