#!/usr/bin/env bash
# On a GPU machine (the device tool): the GPU tests (tests/gpu), then bench/infer_speed.py on a full-size
# random-weight Voxtral.   bash bench/gpu_infer.sh [infer_speed.py flags]
# results: $OUT (or ./gpu-out)/gpu-tests.log, infer_speed.jsonl, infer.log
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | grep -v "Warning: \|warnings.warn\|Loading weights\|Writing model" | tee "$OUT/gpu-tests.log" | tail -40
[ -f /tmp/voxtral-random/config.json ] || python3 bench/random_voxtral.py /tmp/voxtral-random 2>&1 | grep -v Warn | tail -2
python3 bench/infer_speed.py --model /tmp/voxtral-random --out "$OUT" "$@" 2>&1 | grep -v -i "warn\|Loading weights" | tee "$OUT/infer.log" | tail -30
