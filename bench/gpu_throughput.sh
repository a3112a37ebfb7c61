#!/usr/bin/env bash
# bench/throughput.py on a GPU machine (the device tool), on a full-size random-weight Voxtral.
#   bash bench/gpu_throughput.sh [NPROC] [CONFIGS]
#   RUNS=DIR: the run folders (default /tmp/bench-runs; give each of two concurrent calls its own, with its own
#   OUT and CUDA_VISIBLE_DEVICES, to measure two configurations lists on two GPUs at once)
#   EXTRA="--seed 7": worker flags added to every configuration (the run's data order and adapter initialisation)
#   PROFILE=1: each worker configuration also writes <config>-nNPROC.profile.txt (3 steps under torch.profiler)
#   (issue 15's rows: bf16-ckpt-16gib, bf16-long-8192, bf16-long-32768-ckpt, small24b-bf16, small24b-nf4)
# results: $OUT (or ./gpu-out)/throughput.jsonl; each run's log and events.jsonl: $OUT/wNPROC$TAG.tar.gz
set -uo pipefail
NPROC=${1:-1}
ONLY=${2:-seed,bf16-packed,bf16-packed-compiled,nf4-packed-compiled,bf16-packed-compiled-quiet}
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)' | tee "$OUT/versions.txt"
# the 3B model for every configuration but the 24B shape's; that one (about 48 GB) only when asked for
if [ -n "$(echo ",$ONLY," | tr ',' '\n' | grep -v '^small24b' | grep .)" ]; then
  [ -f /tmp/voxtral-random/config.json ] || python3 bench/random_voxtral.py /tmp/voxtral-random 2>&1 | grep -v Warn | tail -2
fi
case ",$ONLY," in *,small24b*)
  [ -f /tmp/voxtral-small-random/config.json ] || python3 bench/random_voxtral.py /tmp/voxtral-small-random --shape small24b 2>&1 | grep -v Warn | tail -2 ;;
esac
[ -f /tmp/medqa-synth.jsonl ] || python3 bench/synth.py /tmp/medqa-synth.jsonl 6000 380 1024
[ -f /tmp/medqa-synth-val.jsonl ] || python3 bench/synth.py /tmp/medqa-synth-val.jsonl 64 380 1024 1
W="$OUT/w$NPROC"  # logs and events of this call's runs, packed into one file at the end (the device tool returns 8)
python3 bench/throughput.py --model /tmp/voxtral-random --data /tmp/medqa-synth.jsonl --val /tmp/medqa-synth-val.jsonl \
  --out "$W" --runs "${RUNS:-/tmp/bench-runs}" --nproc "$NPROC" --only "$ONLY" --timeout "${TIMEOUT:-300}" --steps "${STEPS:-15}" ${PROFILE:+--profile} ${EXTRA:+"--extra=$EXTRA"} 2>&1 | grep -v -i warn
cat "$W/throughput.jsonl" >> "$OUT/throughput.jsonl"
for f in "$W"/*.profile.txt; do [ -f "$f" ] && { echo "== $f"; head -14 "$f"; }; done
for f in "$W"/*.log; do echo "== $f"; grep -E "attention|all-reduce|model loaded|CUDA graphs|cudagraph|Error|error" "$f" | sort -u | head -8; done
tar -czf "$OUT/w$NPROC${TAG:-}.tar.gz" -C "$W" . && rm -rf "$W"
