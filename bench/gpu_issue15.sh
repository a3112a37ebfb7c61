#!/usr/bin/env bash
# Every row of issue 15 on this machine, each lever against what it replaces in the same run:
#   bash bench/gpu_issue15.sh            # one GPU: all parts below, in order (about 45 minutes on an H200)
#   PART=tests|rows|long|fp8|tuning|16gib|ckpt|nf4|24b bash bench/gpu_issue15.sh    # one part (the device tool's calls last 10 minutes)
#   NPROC=2 PART=rows bash bench/gpu_issue15.sh                # the same rows on two GPUs (NCCL)
# results: $OUT/throughput.jsonl (+ each part's logs in $OUT/w*.tar.gz), $OUT/gpu-tests.log, $OUT/*-loss.json
set -uo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
PART=${PART:-tests,rows,long,fp8,tuning,16gib,ckpt,nf4,24b}
source bench/gpu_env.sh
has() { case ",$PART," in *,"$1",*) return 0 ;; esac; return 1; }

if has tests; then  # the GPU equivalence tests first: a lever that fails them is not done
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
fi
if has rows; then  # bf16 and NF4 at the issue's batches, each beside what its levers replaced; 16 GiB
  TAG=-rows STEPS=${STEPS:-15} bash bench/gpu_throughput.sh "$NPROC" \
    bf16-packed-compiled,bf16-packed-compiled-fp8bwd,bf16-packed-compiled-eagerce,bf16-packed-compiled-fused,nf4-packed-compiled,nf4-packed-compiled-fused,nf4-packed-compiled-bnb,bf16-ckpt-16gib,bf16-ckpt25-16gib
fi
if has long; then  # long rows: 2 × 8192 without checkpointing, 1 × 32768 with
  TAG=-long STEPS=${STEPS:-10} bash bench/gpu_throughput.sh "$NPROC" \
    bf16-long-8192,bf16-long-8192-fa2,bf16-long-32768-ckpt,bf16-long-32768-ckpt-fa2
fi
if has fp8; then  # FP8 input gradients (the default on Hopper), the MLP's forward in FP8 and every product FP8
  # against bf16 products over 200 steps: speed, memory, and the loss curves compared; SEEDS="42 7 11": one list
  # per seed (the data order and the adapters' initialisation), about 12 minutes each on an H200
  for s in ${SEEDS:-42}; do
    TAG=-fp8-s$s STEPS=200 TIMEOUT=${TIMEOUT:-600} EXTRA="--seed $s" bash bench/gpu_throughput.sh "$NPROC" \
      bf16-packed-compiled,bf16-packed-compiled-fp8bwd,fp8mlp-packed-compiled,fp8-packed-compiled
    rm -rf /tmp/fp8cmp && mkdir -p /tmp/fp8cmp && tar -xzf "$OUT/w$NPROC-fp8-s$s.tar.gz" -C /tmp/fp8cmp
    for c in bf16-packed-compiled-fp8bwd fp8mlp-packed-compiled fp8-packed-compiled; do
      python3 bench/compare_losses.py /tmp/fp8cmp/bf16-packed-compiled-n$NPROC.events.jsonl \
        /tmp/fp8cmp/$c-n$NPROC.events.jsonl --json "$OUT/$c-s$s-loss.json"
    done
  done
fi
if has tuning; then  # 24 × 1024 micro-batches beside the defaults, each beside the step boundary as it was
  # (-nooverlap), profiled (Inductor's tuning: runs N, O, X)
  TAG=-tuning PROFILE=1 STEPS=${STEPS:-30} bash bench/gpu_throughput.sh "$NPROC" \
    bf16-packed-compiled-fp8bwd,bf16-packed-compiled-fp8bwd-nooverlap,bf16-packed-compiled-b24-fp8bwd,bf16-packed-compiled-b24-fp8bwd-nooverlap,fp8-packed-compiled,fp8-packed-compiled-b24,nf4-packed-compiled
fi
if has 16gib; then  # within 16 GiB (a 24 GB card): bf16 products on bf16 weights, every layer checkpointed, at 8
  # and 20 x 1024 tokens a micro-batch (the fastest in run R); FP8 weights with FP8 input gradients, 19 / 20 of
  # 30 checkpointed at 8 x 1024 (the fastest in runs U, V); every product FP8 at 16 x 1024 (R)
  TAG=-16gib STEPS=${STEPS:-10} bash bench/gpu_throughput.sh "$NPROC" \
    bf16-ckpt-16gib,bf16-ckpt-16gib-b20,fp8bwd-ckpt19-16gib,fp8bwd-ckpt20-16gib,fp8-ckpt-16gib-b16
fi
if has ckpt; then  # where the checkpoint sits (VOXTUI_CHECKPOINT): inside each layer (the default) beside around it, profiled
  TAG=-ckpt PROFILE=1 STEPS=${STEPS:-10} bash bench/gpu_throughput.sh "$NPROC" \
    bf16-ckpt-16gib,bf16-ckpt-16gib-ckptout,nf4-packed-compiled,nf4-packed-compiled-ckptout,fp8-ckpt20-16gib,fp8-ckpt20-16gib-ckptout
fi
if has nf4; then  # NF4 layers left uncheckpointed (none, then 10 of 30 checkpointed) dequantise their weights again in
  # the backward (the default) beside keeping them from the forward (-keepw): memory and speed (runs AR-AS)
  for L in 0 10; do
    TAG=-nf4-l$L STEPS=${STEPS:-12} EXTRA="--grad_ckpt_layers $L" bash bench/gpu_throughput.sh "$NPROC" \
      nf4-packed-compiled,nf4-packed-compiled-keepw
  done
fi
if has 24b; then  # Voxtral-Small-24B's shape, last: it builds a ~48 GB random checkpoint once (the 3B one is
  # removed first when /tmp has less than 55 GB free: an H200 machine's disk holds one or the other)
  if [ ! -f /tmp/voxtral-small-random/config.json ] && [ "$(df --output=avail -BG /tmp | tail -1 | tr -dc 0-9)" -lt 55 ]; then
    rm -rf /tmp/voxtral-random
  fi
  TAG=-24b TIMEOUT=${TIMEOUT:-900} STEPS=${STEPS:-10} bash bench/gpu_throughput.sh "$NPROC" small24b-bf16-ckpt16,small24b-nf4
fi
