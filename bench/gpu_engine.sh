#!/usr/bin/env bash
# The engine on a GPU machine (the device tool): `voxtui run --detach` on a full-size random-weight
# Voxtral, NVML telemetry, then `voxtui infer` on CUDA.   bash bench/gpu_engine.sh   (results in $OUT)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
V="python3 -m engine"
[ -f /tmp/voxtral-random/config.json ] || python3 bench/random_voxtral.py /tmp/voxtral-random 2>&1 | tail -1
python3 bench/synth.py /tmp/medqa-synth.jsonl 3000 380 1024
python3 bench/synth.py /tmp/medqa-synth-val.jsonl 16 380 1024 1
$V preflight --model_id /tmp/voxtral-random --train_jsonl /tmp/medqa-synth.jsonl --quant none --per_device_bsz 8 \
  --json "$OUT/preflight.json" | tail -4
$V run --model_id /tmp/voxtral-random --train_jsonl /tmp/medqa-synth.jsonl --val_jsonl /tmp/medqa-synth-val.jsonl \
  --quant none --per_device_bsz 8 --max_steps 20 --save_steps 10 --eval_steps 10 --preview_steps 10 --preview_count 2 \
  --max_new_tokens 16 --output_dir runs/gpu-engine --detach
for i in $(seq 1 240); do
  grep -q '"state":"finished"\|"state":"failed"' runs/gpu-engine/events.jsonl 2>/dev/null && break; sleep 1
done
$V engine status runs/gpu-engine
python3 - <<'PY'
import json
ev = [json.loads(l) for l in open("runs/gpu-engine/events.jsonl")]
tel = [e for e in ev if e["type"] == "telemetry" and e["gpus"]]
print("telemetry events with GPUs:", len(tel))
if tel:
    print(json.dumps(tel[-1]["gpus"][0]))
steps = [e for e in ev if e["type"] == "step"]
print("steps", len(steps), "last", {k: steps[-1][k] for k in ("loss", "tokens_per_s", "mfu", "mem_peak", "step_time")})
print("states", [e["state"] for e in ev if e["type"] == "status"])
PY
cp runs/gpu-engine/events.jsonl "$OUT/events.jsonl"
$V infer --run runs/gpu-engine --all-checkpoints --data /tmp/medqa-synth-val.jsonl --max_new_tokens 16 --device cuda \
  --json "$OUT/infer-table.json" 2>&1 | grep -v Warn | tail -4
