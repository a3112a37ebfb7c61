#!/usr/bin/env bash
# The training worker on a GPU machine (the device tool), on a full-size random-weight Voxtral.
#   bash bench/gpu_worker.sh [NPROC]     results: $OUT (or ./gpu-out) /results.jsonl + logs
set -uo pipefail
NPROC=${1:-1}
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)' | tee "$OUT/versions.txt"
[ -f /tmp/voxtral-random/config.json ] || python3 bench/random_voxtral.py /tmp/voxtral-random 2>&1 | grep -v Warn | tail -2
python3 bench/synth.py /tmp/medqa-synth.jsonl 6000 380 1024
python3 bench/synth.py /tmp/medqa-synth-val.jsonl 64 380 1024 1
run() {  # name, extra flags...
  local name=$1; shift
  local launch=(python3 -m engine.train)
  [ "$NPROC" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m engine.train)
  rm -rf "/tmp/runs/$name"  # a second call on a warm machine: the worker refuses a folder that holds a run
  "${launch[@]}" --model_id /tmp/voxtral-random --train_jsonl /tmp/medqa-synth.jsonl --val_jsonl /tmp/medqa-synth-val.jsonl \
    --output_dir "/tmp/runs/$name" --max_steps 25 --warmup_steps 5 --save_steps 25 --eval_steps 25 --preview_steps 25 \
    --preview_count 2 --max_new_tokens 16 --max_len 1024 "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/exits.txt"
  python3 bench/summarize_run.py "/tmp/runs/$name" | tee -a "$OUT/results.jsonl"
  grep -E "audio tower|model loaded|data:" "$OUT/$name.log" | head -5
  tail -3 "$OUT/$name.log"
}
run "bf16-lora-n$NPROC" --quant none --per_device_bsz 8 --grad_ckpt
run "nf4-qlora-n$NPROC" --quant nf4 --per_device_bsz 6 --grad_ckpt
