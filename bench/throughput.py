"""Training throughput: the seed's method against voxtui's worker, on the same data, in one run.

    python bench/throughput.py --model /tmp/voxtral-random --data /tmp/medqa-synth.jsonl \
        --val /tmp/medqa-synth-val.jsonl --out gpu-out [--only seed,bf16-packed-compiled,...] [--nproc 2]

1. a bf16 matmul peak, measured (the MFU denominator);
2. ``seed``: the seed's method — VoxtralForConditionalGeneration + peft LoRA r16/α32 on the LLM
   projections + bitsandbytes NF4 (double quant, bf16 compute) + ``prepare_model_for_kbit_training``
   + gradient checkpointing, batch 6 padded to its longest row, random order, HF's own loss;
3. voxtui's worker (``python -m engine.train``, or torchrun with ``--nproc``) in the configurations
   of ``CONFIGS``, summarised from its events.jsonl.

For each: non-pad tokens/s (wall clock over the steady steps), step time, peak memory, MFU
(4 × matmul parameters per token over the measured peak), and for the worker the time from launch to
its first step. One JSON line per configuration goes to ``<out>/throughput.jsonl``; a Markdown table
is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMMON = ["--max_len", "1024", "--warmup_steps", "5", "--save_steps", "0", "--eval_steps", "0",
          "--preview_steps", "0", "--log_steps", "1"]
# bf16 LoRA: packed rows of 16 × 1024 tokens, no gradient checkpointing (an H200 has the memory), every
# product a bf16 one (--fp8_products none: the configurations named bf16 keep the meaning they had before
# FP8 input gradients; "-fp8bwd" ones are what --fp8_products auto gives on an H200)
FP8_NONE = ["--fp8_products", "none"]
BF16_PACKED = ["--quant", "none", "--packing", "--per_device_bsz", "16", "--no-grad_ckpt"]
BF16 = BF16_PACKED + FP8_NONE
# --quant fp8: configurations named fp8 have every product an FP8 one (what --quant fp8 was before FP8 input
# gradients alone); "fp8bwd" ones the input's gradients only (--fp8_products auto on an H200)
FP8_ALL = ["--fp8_products", "all"]
FP8_BWD = ["--fp8_products", "backward"]
# "fp8mlp": FP8 weights, the MLP's forward products and every input gradient FP8 ones (--fp8_products mlp)
FP8_MLP = ["--fp8_products", "mlp"]
# QLoRA at the seed's batch: 6 × 1024 tokens per micro-batch
NF4 = ["--quant", "nf4", "--packing", "--per_device_bsz", "6", "--grad_ckpt"]


def checkpointed(quant: str, layers: int | None = None, bsz: int = 8, products: list[str] | None = None) -> list[str]:
    """``bsz`` × 1024-token packed micro-batches (8 unless said), compiled, checkpointed: every layer, or the
    first ``layers``. ``quant``: none (bf16 products), fp8 (every product FP8), fp8bwd (FP8 weights, the
    input's gradients FP8 products), fp8mlp (FP8 weights, the MLP's forward products FP8 ones too) or nf4; ``products``: other --fp8_products flags than the quant's."""
    if products is None:
        products = {"none": FP8_NONE, "fp8": FP8_ALL, "fp8bwd": FP8_BWD, "fp8mlp": FP8_MLP}.get(quant, [])
    return (["--quant", "fp8" if quant in ("fp8bwd", "fp8mlp") else quant, "--packing", "--per_device_bsz", str(bsz),
             "--grad_ckpt", "--compile"] + products + (["--grad_ckpt_layers", str(layers)] if layers is not None else []))


CONFIGS: dict[str, list[str]] = {
    "bf16-packed": BF16 + ["--no-compile"],
    "bf16-packed-compiled": BF16 + ["--compile"],
    # the same with the fused head's softmax and gradient as eager operations (ENV below; compiled is the default)
    "bf16-packed-compiled-eagerce": BF16 + ["--compile"],
    # the same with q/k/v and gate/up as one product each (ENV below: VOXTUI_FUSION=all; separate is bf16's default)
    "bf16-packed-compiled-fused": BF16 + ["--compile"],
    # the same with Inductor's coordinate-descent tuning / max-autotune (ENV below: VOXTUI_INDUCTOR)
    "bf16-packed-compiled-cdt": BF16 + ["--compile"],
    "bf16-packed-compiled-autotune": BF16 + ["--compile"],
    # a larger token budget per micro-batch (24 × 1024): the step's fixed costs over 1.5× the tokens
    "bf16-packed-compiled-b24": ["--quant", "none", "--packing", "--per_device_bsz", "24", "--no-grad_ckpt",
                                 "--compile", "--fp8_products", "none"],
    "fp8-packed-compiled-b24": ["--quant", "fp8", "--packing", "--per_device_bsz", "24", "--no-grad_ckpt",
                                "--compile"] + FP8_ALL,
    "bf16-packed-compiled-dropout": BF16 + ["--compile", "--lora_dropout", "0.05"],
    "bf16-packed-compiled-nodrop": BF16 + ["--compile", "--lora_dropout", "0"],
    # the same with telemetry off (the default run above has it on, every 1 s) — the overhead check
    "bf16-packed-compiled-quiet": BF16 + ["--compile", "--telemetry_interval", "0"],
    # the same with previews every 5 steps and no time budget: what each preview costs
    "bf16-packed-compiled-previews": BF16 + ["--compile", "--preview_steps", "5", "--preview_count", "4",
                                             "--preview_budget", "0"],
    "bf16-grouped": ["--quant", "none", "--no-packing", "--per_device_bsz", "16", "--no-grad_ckpt", "--no-compile",
                     "--fp8_products", "none"],
    # several GPUs: the adapter gradients summed by torch's DistributedDataParallel instead of one flat
    # all-reduce per step (the default); "-split" lets dynamo split each compiled layer at DDP's buckets
    "bf16-packed-compiled-ddp": BF16 + ["--compile", "--grad_sync", "ddp"],
    "bf16-packed-compiled-ddp-split": BF16 + ["--compile", "--grad_sync", "ddp"],
    # --quant fp8 at bf16's batch (the bar: ≥ 1.4× bf16-packed-compiled, its loss within 1% of bf16's
    # over 200 steps: STEPS=200 for both, then bench/compare_losses.py on their events)
    "fp8-packed-compiled": ["--quant", "fp8", "--packing", "--per_device_bsz", "16", "--no-grad_ckpt", "--compile"]
    + FP8_ALL,
    "fp8-packed-compiled-cdt": ["--quant", "fp8", "--packing", "--per_device_bsz", "16", "--no-grad_ckpt",
                                "--compile"] + FP8_ALL,
    "nf4-packed": NF4 + ["--no-compile"],
    "nf4-packed-compiled": NF4 + ["--compile"],
    # the same with bitsandbytes' own forward in the 4-bit layers (ENV below; voxtui's traceable one is the default)
    "nf4-packed-compiled-bnb": NF4 + ["--compile"],
    # the same with q/k/v and gate/up as one product each (VOXTUI_FUSION=nf4; separate is the default)
    "nf4-packed-compiled-fused": NF4 + ["--compile"],
    "nf4-packed-compiled-cdt": NF4 + ["--compile"],  # Inductor's coordinate-descent tuning (VOXTUI_INDUCTOR)
    # the layers not checkpointed (EXTRA="--grad_ckpt_layers N") keep their weights dequantised for the backward
    # (VOXTUI_NF4_KEEP_WEIGHTS=1) instead of dequantising them again there (the default; engine/worker/nf4.py)
    "nf4-packed-compiled-keepw": NF4 + ["--compile"],
    # issue 15's rows. bf16 within 16 GiB (a 24 GB card): gradient checkpointing, 8 × 1024 tokens a micro-batch
    "bf16-ckpt-16gib": checkpointed("none"),
    # the same with the last 5 / 7 of the 30 layers keeping their activations (--grad_ckpt_layers)
    "bf16-ckpt25-16gib": checkpointed("none", 25),
    "bf16-ckpt27-16gib": checkpointed("none", 27),
    # every layer checkpointed with larger micro-batches (16 / 20 × 1024 tokens): the products longer, the
    # step's fixed costs over more tokens, the kept inputs larger
    "bf16-ckpt-16gib-b16": checkpointed("none", bsz=16),
    "bf16-ckpt-16gib-b20": checkpointed("none", bsz=20),
    "fp8-ckpt-16gib-b16": checkpointed("fp8", bsz=16),
    # FP8 products within 16 GiB: the frozen weights' 3.2 GB saved let 6 layers keep their activations (24 of 30
    # checkpointed: preflight's pick for 16 GiB on a GPU that takes FP8)
    "fp8-ckpt24-16gib": checkpointed("fp8", 24),
    # with more layers keeping their activations where 16 GiB has room (run N: FP8 with 24 checkpointed peaked at
    # 11.5 GiB)
    "fp8-ckpt20-16gib": checkpointed("fp8", 20),
    "fp8-ckpt17-16gib": checkpointed("fp8", 17),
    # where the checkpoint is taken (VOXTUI_CHECKPOINT, ENV below; modeling.checkpoint_layers): around each
    # compiled layer's call instead of inside it (the default)
    "bf16-ckpt-16gib-ckptout": checkpointed("none"),
    "nf4-packed-compiled-ckptout": NF4 + ["--compile"],
    "fp8-ckpt20-16gib-ckptout": checkpointed("fp8", 20),
    "bf16-ckpt23-16gib": checkpointed("none", 23),
    # the input's gradients as FP8 products, the forward's bf16 ones (--fp8_products backward, auto's choice on
    # an H200): bf16 weights with an e4m3 copy for the backward; FP8 weights dequantised for the forward
    "bf16-packed-compiled-fp8bwd": BF16_PACKED + FP8_BWD + ["--compile"],
    "bf16-packed-compiled-b24-fp8bwd": ["--quant", "none", "--packing", "--per_device_bsz", "24", "--no-grad_ckpt",
                                        "--compile"] + FP8_BWD,
    # the same with the step boundary as it was (VOXTUI_STEP_OVERLAP=0, ENV below: the update launched after
    # the host has the step's numbers, the batch sent at the step's start; the default queues both before the
    # host waits for the GPU), or with Inductor's coordinate-descent tuning
    "bf16-packed-compiled-fp8bwd-nooverlap": BF16_PACKED + FP8_BWD + ["--compile"],
    "bf16-packed-compiled-fp8bwd-cdt": BF16_PACKED + FP8_BWD + ["--compile"],
    "bf16-packed-compiled-b24-fp8bwd-nooverlap": ["--quant", "none", "--packing", "--per_device_bsz", "24",
                                                  "--no-grad_ckpt", "--compile"] + FP8_BWD,
    "fp8bwd-packed-compiled": ["--quant", "fp8", "--packing", "--per_device_bsz", "16", "--no-grad_ckpt",
                               "--compile"] + FP8_BWD,
    "bf16-ckpt-16gib-b20-fp8bwd": checkpointed("none", bsz=20, products=FP8_BWD),
    # within 16 GiB with FP8 weights and FP8 input gradients: every layer checkpointed at 20 / 24 × 1024 tokens,
    # 28 of 30 at 16 × 1024, 20 of 30 at 8 × 1024
    "fp8bwd-ckpt-16gib-b20": checkpointed("fp8bwd", bsz=20),
    "fp8bwd-ckpt-16gib-b24": checkpointed("fp8bwd", bsz=24),
    "fp8bwd-ckpt28-16gib-b16": checkpointed("fp8bwd", 28, bsz=16),
    "fp8bwd-ckpt20-16gib": checkpointed("fp8bwd", 20),
    "fp8bwd-ckpt19-16gib": checkpointed("fp8bwd", 19),
    # FP8 weights, the MLP's forward products FP8 ones too (--fp8_products mlp): at bf16's batch, at 24 × 1024,
    # and within 16 GiB
    "fp8mlp-packed-compiled": ["--quant", "fp8", "--packing", "--per_device_bsz", "16", "--no-grad_ckpt",
                               "--compile"] + FP8_MLP,
    "fp8mlp-packed-compiled-b24": ["--quant", "fp8", "--packing", "--per_device_bsz", "24", "--no-grad_ckpt",
                                   "--compile"] + FP8_MLP,
    "fp8mlp-ckpt19-16gib": checkpointed("fp8mlp", 19),
    # each compiled layer's forward and backward replayed as CUDA graphs (VOXTUI_CUDA_GRAPHS=1, ENV below): one
    # launch a layer instead of one a kernel (measured on an H200: the same speed, docs/benchmarks.md runs AA–AB)
    "bf16-packed-compiled-graphs": BF16 + ["--compile"],
    "bf16-packed-compiled-fp8bwd-graphs": BF16_PACKED + FP8_BWD + ["--compile"],
    "bf16-packed-compiled-b24-fp8bwd-graphs": ["--quant", "none", "--packing", "--per_device_bsz", "24",
                                               "--no-grad_ckpt", "--compile"] + FP8_BWD,
    "fp8-packed-compiled-graphs": ["--quant", "fp8", "--packing", "--per_device_bsz", "16", "--no-grad_ckpt",
                                   "--compile"] + FP8_ALL,
    "fp8bwd-ckpt19-16gib-graphs": checkpointed("fp8bwd", 19),
    "nf4-packed-compiled-graphs": NF4 + ["--compile"],
    # long rows (their own data: LONG_DATA): 2 × 8192 tokens a micro-batch; 32768 with checkpointing
    "bf16-long-8192": ["--quant", "none", "--packing", "--per_device_bsz", "2", "--no-grad_ckpt", "--compile",
                       "--max_len", "8192", "--fp8_products", "none"],
    "bf16-long-32768-ckpt": ["--quant", "none", "--packing", "--per_device_bsz", "1", "--grad_ckpt", "--compile",
                             "--max_len", "32768", "--fp8_products", "none"],
    # the same with every example through varlen FlashAttention (VOXTUI_DENSE_ATTENTION=0: as before run AL)
    "bf16-long-8192-fa2": ["--quant", "none", "--packing", "--per_device_bsz", "2", "--no-grad_ckpt", "--compile",
                           "--max_len", "8192", "--fp8_products", "none"],
    "bf16-long-32768-ckpt-fa2": ["--quant", "none", "--packing", "--per_device_bsz", "1", "--grad_ckpt", "--compile",
                                 "--max_len", "32768", "--fp8_products", "none"],
    # Voxtral-Small-24B's shape (--model24: bench/random_voxtral.py --shape small24b)
    "small24b-bf16": checkpointed("none"),
    "small24b-nf4": NF4 + ["--compile"],
    # the same bf16 with the last 24 of 40 layers keeping their activations (the 139 GiB of an H200 allow it)
    "small24b-bf16-ckpt16": checkpointed("none", 16),
}
# configurations with their own training rows: (file tag, rows, median tokens, cap) for bench/synth.py, the cap
# under --max_len (synth's token counts are estimates)
LONG_DATA: dict[str, tuple[str, int, int, int]] = {
    "bf16-long-8192": ("long-8192", 600, 3000, 7000),
    "bf16-long-32768-ckpt": ("long-32768", 200, 12000, 28000),
    "bf16-long-8192-fa2": ("long-8192", 600, 3000, 7000),
    "bf16-long-32768-ckpt-fa2": ("long-32768", 200, 12000, 28000),
}
ENV: dict[str, dict[str, str]] = {"bf16-packed-compiled-ddp-split": {"VOXTUI_DDP_SPLIT_GRAPHS": "1"},
                                  "nf4-packed-compiled-bnb": {"VOXTUI_NF4_BNB_FORWARD": "1"},
                                  "bf16-packed-compiled-eagerce": {"VOXTUI_EAGER_CE": "1"},
                                  "bf16-packed-compiled-fused": {"VOXTUI_FUSION": "all"},
                                  "nf4-packed-compiled-fused": {"VOXTUI_FUSION": "nf4"},
                                  "bf16-packed-compiled-cdt": {"VOXTUI_INDUCTOR": "coordinate"},
                                  "bf16-packed-compiled-autotune": {"VOXTUI_INDUCTOR": "autotune"},
                                  "nf4-packed-compiled-cdt": {"VOXTUI_INDUCTOR": "coordinate"},
                                  "nf4-packed-compiled-keepw": {"VOXTUI_NF4_KEEP_WEIGHTS": "1"},
                                  "fp8-packed-compiled-cdt": {"VOXTUI_INDUCTOR": "coordinate"},
                                  "bf16-packed-compiled-fp8bwd-cdt": {"VOXTUI_INDUCTOR": "coordinate"},
                                  "bf16-packed-compiled-fp8bwd-nooverlap": {"VOXTUI_STEP_OVERLAP": "0"},
                                  "bf16-packed-compiled-b24-fp8bwd-nooverlap": {"VOXTUI_STEP_OVERLAP": "0"},
                                  "bf16-ckpt-16gib-ckptout": {"VOXTUI_CHECKPOINT": "around"},
                                  "nf4-packed-compiled-ckptout": {"VOXTUI_CHECKPOINT": "around"},
                                  "fp8-ckpt20-16gib-ckptout": {"VOXTUI_CHECKPOINT": "around"},
                                  "bf16-long-8192-fa2": {"VOXTUI_DENSE_ATTENTION": "0"},
                                  "bf16-long-32768-ckpt-fa2": {"VOXTUI_DENSE_ATTENTION": "0"},
                                  **{name: {"VOXTUI_CUDA_GRAPHS": "1", "TORCH_LOGS": "perf_hints"}
                                     for name in ("bf16-packed-compiled-graphs", "bf16-packed-compiled-fp8bwd-graphs",
                                                  "bf16-packed-compiled-b24-fp8bwd-graphs",
                                                  "fp8-packed-compiled-graphs", "fp8bwd-ckpt19-16gib-graphs",
                                                  "nf4-packed-compiled-graphs")}}
DEFAULT_ORDER = ["seed", "bf16-packed", "bf16-packed-compiled", "nf4-packed-compiled", "bf16-packed-compiled-quiet"]


# ------------------------------------------------------------------------------------------ measures


def matmul_peak(device) -> float:
    """Best bf16 matmul throughput (FLOP/s) over a few large square sizes."""
    import torch

    if device.type != "cuda":
        return 0.0
    best = 0.0
    for n in (4096, 8192, 12288):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def matmul_params(model_dir: str) -> int:
    """Linear parameters of the language model plus its head, from config.json (3.61 B for Voxtral-Mini-3B)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir).text_config
    h, i, heads, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i
    return c.num_hidden_layers * per_layer + h * c.vocab_size


# ------------------------------------------------------------------------------------------ the seed


def seed_method(model_dir: str, data: str, steps: int, warm: int, bsz: int = 6) -> dict:
    """The seed's training step, measured in this process."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, VoxtralForConditionalGeneration

    from engine.formatting import load_format
    from engine.worker.batching import tokenize
    from engine.worker.modeling import lora_target_regex

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    fmt = load_format(model_dir)
    tok = tokenize(data, fmt, 1024, "truncate", None)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = VoxtralForConditionalGeneration.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                            device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj"]))
    model = get_peft_model(model, lora)
    model.train()  # a model left in eval mode silently skips checkpointing and dropout
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    order = np.random.default_rng(0).permutation(len(tok))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, real = [], []
    for s in range(warm + steps):
        idx = order[s * bsz:(s + 1) * bsz]
        rows = [tok.example(int(i)) for i in idx]
        width = max(len(e) for e, _ in rows)
        ids = torch.full((bsz, width), fmt.pad, dtype=torch.long)
        att = torch.zeros((bsz, width), dtype=torch.long)
        labels = torch.full((bsz, width), -100, dtype=torch.long)
        for r, (e, p) in enumerate(rows):
            ids[r, :len(e)] = torch.from_numpy(e.astype(np.int64))
            att[r, :len(e)] = 1
            labels[r, p:len(e)] = torch.from_numpy(e[p:].astype(np.int64))
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids.to(device), attention_mask=att.to(device), labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if s >= warm:
            times.append(time.perf_counter() - t)
            real.append(int(att.sum()))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": sum(real) / sum(times), "step_time_s": statistics.median(times),
            "peak_gib": round(peak, 2) if peak is not None else None, "steps": steps, "batch": bsz,
            "final_loss": float(loss)}


# ------------------------------------------------------------------------------------------ the worker


def run_worker(name: str, flags: list[str], args, env: dict) -> dict:
    run_dir = Path(args.runs) / f"{name}-n{args.nproc}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    launch = [sys.executable, "-m", "engine.train"]
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                  "-m", "engine.train"]
    measured = args.steps + args.warm
    extra = 3 if args.profile else 0  # profiled steps come after the measured ones (the profiler slows them)
    if extra:
        env = {**env, "VOXTUI_PROFILE_STEPS": f"{measured + 1}:{measured + extra}"}
    cmd = launch + ["--model_id", model_of(name, args), "--train_jsonl", data_of(name, args), "--output_dir", str(run_dir),
                    "--max_steps", str(measured + extra)] + (["--val_jsonl", args.val] if args.val else []) \
        + COMMON + flags + shlex.split(args.extra)
    log = Path(args.out) / f"{name}-n{args.nproc}.log"
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env={**env, **ENV.get(name, {})}, stdout=f, stderr=subprocess.STDOUT,
                            timeout=args.timeout).returncode
    out = summarize(run_dir, args.warm, t0, measured)
    if (run_dir / "profile.txt").exists():
        (Path(args.out) / f"{name}-n{args.nproc}.profile.txt").write_bytes((run_dir / "profile.txt").read_bytes())
    if (run_dir / "events.jsonl").exists():  # kept beside the results: every step's times
        (Path(args.out) / f"{name}-n{args.nproc}.events.jsonl").write_bytes((run_dir / "events.jsonl").read_bytes())
    out.update(rc=rc, command=" ".join(cmd[cmd.index("engine.train") - 1:]))
    return out


def model_of(name: str, args) -> str:
    """The model a configuration trains: the 24B shape's own (``--model24``), else ``--model``."""
    return args.model24 if name.startswith("small24b") else args.model


def data_of(name: str, args) -> str:
    """A configuration's training rows: its own long rows (made once by bench/synth.py), else ``--data``."""
    if name not in LONG_DATA:
        return args.data
    tag, n, median, cap = LONG_DATA[name]
    path = Path(args.data).with_name(f"medqa-synth-{tag}.jsonl")
    if not path.exists():
        from bench.synth import write_rows

        tmp = path.with_suffix(".tmp")
        write_rows(tmp, n, median, cap)
        tmp.replace(path)
    return str(path)


def summarize(run_dir: Path, warm: int, launched: float, last: int | None = None) -> dict:
    """The run's steady steps (after ``warm``, up to step ``last``) from its events."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in events if e["type"] == "step" and (last is None or e["step"] <= last)]
    previews = [e for e in events if e["type"] == "preview"]
    telemetry = [e for e in events if e["type"] == "telemetry"]
    out: dict = {"steps": len(steps), "telemetry_events": len(telemetry), "preview_events": len(previews)}
    if len(steps) <= warm + 1:
        return out
    steady = steps[warm:]
    preview_steps = {p["step"] for p in previews}
    # wall clock between step events, leaving out the intervals that contain a preview
    spans = [(b["time"] - a["time"], b["tokens"]) for a, b in zip(steady, steady[1:]) if a["step"] not in preview_steps]
    wall = sum(s for s, _ in spans)
    out.update(
        tokens_per_s=sum(t for _, t in spans) / wall if wall else None,
        tokens_per_s_reported=statistics.median(e["tokens_per_s"] for e in steady),
        step_time_s=statistics.median(s for s, _ in spans) if spans else None,
        step_time_mean_s=wall / len(spans) if spans else None,
        step_time_max_s=max(s for s, _ in spans) if spans else None,
        worker_step_time_s=statistics.median(e["step_time"] for e in steady),
        tokens_per_step=statistics.median(e["tokens"] for e in steady),
        pad_frac=statistics.median(e["pad_frac"] for e in steady),
        peak_gib=max(e.get("mem_peak") or 0 for e in steps) or None,
        final_loss=steps[-1]["loss"],
        launch_to_first_step_s=steps[0]["time"] - steps[0]["step_time"] - launched,  # process, data, model
        launch_to_first_step_done_s=steps[0]["time"] - launched,  # … and the first step (with any compile)
    )
    factors = [e["mfu_attn"] / e["mfu"] for e in steady if e.get("mfu") and e.get("mfu_attn")]
    if factors:  # how much counting attention's FLOPs raises the MFU (the worker's step events carry both)
        out["attn_factor"] = statistics.median(factors)
    if previews:
        costs = [b["time"] - a["time"] - b["step_time"] for a, b in zip(steps, steps[1:]) if a["step"] in preview_steps]
        out["preview_costs_s"] = [round(c, 2) for c in costs]
    return out


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--model24", default="/tmp/voxtral-small-random",
                   help="the 24B shape's random model, for the small24b-* configurations")
    p.add_argument("--data", required=True)
    p.add_argument("--val", default="")
    p.add_argument("--out", default="gpu-out")
    p.add_argument("--runs", default="/tmp/bench-runs")
    p.add_argument("--only", default=",".join(DEFAULT_ORDER), help="comma-separated: seed and/or " + ", ".join(CONFIGS))
    p.add_argument("--steps", type=int, default=20, help="measured steps (after --warm)")
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--profile", action="store_true",
                   help="3 more steps under torch.profiler after the measured ones: <out>/<config>-n<N>.profile.txt")
    p.add_argument("--extra", default="", metavar="FLAGS",
                   help="worker flags added to every configuration but the seed's, e.g. '--seed 7' (a loss curve "
                        "at another data order and adapter initialisation)")
    p.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.seed_only:  # child process: the seed's method alone (its memory never mixes with the worker's)
        print(json.dumps(seed_method(args.model, args.data, args.steps, args.warm)))
        return
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak = matmul_peak(device)
    names = [x for x in args.only.split(",") if x]
    params = matmul_params(args.model) if any(not n.startswith("small24b") for n in names) else 0
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "gpus": args.nproc, "torch": torch.__version__, "matmul_peak_tflops": round(peak / 1e12, 1),
              "matmul_params": params}
    print(json.dumps(header), flush=True)
    results = Path(args.out) / "throughput.jsonl"
    with open(results, "a") as f:
        f.write(json.dumps(header) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = []
    params24 = matmul_params(args.model24) if any(n.startswith("small24b") for n in names) else 0
    for name in names:
        t = time.time()
        if name == "seed":
            r = subprocess.run([sys.executable, __file__, "--seed-only", "--model", args.model, "--data", args.data,
                                "--steps", str(args.steps), "--warm", str(args.warm), "--out", args.out],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            (Path(args.out) / "seed.log").write_text(r.stdout + r.stderr)
            res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"rc": r.returncode}
        else:
            res = run_worker(name, CONFIGS[name], args, env)
        tps = res.get("tokens_per_s")
        if tps and peak:
            res["mfu"] = tps * 4 * (params24 if name.startswith("small24b") else params) / (peak * args.nproc)
            if res.get("attn_factor"):  # counting attention's FLOPs too (docs/training.md gives the formula)
                res["mfu_attn"] = res["mfu"] * res["attn_factor"]
        res = {"config": name, "gpus": args.nproc, "wall_s": round(time.time() - t, 1),
               **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}}
        rows.append(res)
        print(json.dumps(res), flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(res) + "\n")
    base = next((r.get("tokens_per_s") for r in rows if r["config"] == "seed"), None)
    print("\n| configuration | GPUs | tokens/s | vs seed | step s | peak GiB | MFU | MFU with attention | launch→step 1 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        tps = r.get("tokens_per_s")
        rel = f"{tps / base:.2f}×" if tps and base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        mfu_attn = f"{100 * r['mfu_attn']:.1f}%" if r.get("mfu_attn") else ""
        print(f"| {r['config']} | {r['gpus']} | {tps:,.0f} | {rel} | {r.get('step_time_s')} | {r.get('peak_gib')} | {mfu} | "
              f"{mfu_attn} | "
              f"{r.get('launch_to_first_step_done_s', '')} |" if tps else f"| {r['config']} | {r['gpus']} | failed (rc {r.get('rc')}) |")


if __name__ == "__main__":
    main()
