#!/usr/bin/env bash
# Device-host timing of the Cora DIFFormer-s epoch (dev aid for the CPU perf work).
# Builds build-dev/difformer from this tree with .devdeps/build.sh, then times
# `train --preset cora-s` pinned to cores 0,1 (threads 2) and core 0 (threads 1), repeated,
# for every binary given in BINS (default: build-dev/difformer). Results to $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.devdeps/lib
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash dev/cpuperf/build_device.sh > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }; fi
tail -3 "$OUT/build.log"
cp build-dev/difformer "$OUT/difformer" 2>/dev/null
BINS=${BINS:-build-dev/difformer}
REPS=${REPS:-3}
PRESETS=${PRESETS:-cora-s}
for preset in $PRESETS; do
for b in $BINS; do
  for th in 2 1; do
    cores=$([ $th = 2 ] && echo 0,1 || echo 0)
    for r in $(seq $REPS); do
      taskset -c $cores $b train --preset $preset --runs 1 --epochs ${EPOCHS:-60} --threads $th --quiet --json /tmp/x.json > /dev/null 2>&1
      python3 -c "import json;j=json.load(open('/tmp/x.json'));print('$preset $b threads=$th ms_per_epoch=%.2f' % j['ms_per_epoch'])"
    done
  done
done
done
if [ -n "${PROFILE_CMD:-}" ]; then eval "$PROFILE_CMD"; fi
