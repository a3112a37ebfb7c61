"""A finished two-GPU run folder built from real protocol events (no engine, no training), for the run
screen's Charts, Evaluations, Config and Logs tabs: 240 steps with loss, lr, grad norm, tokens/s, MFU
and torch memory; an evaluation every 40 steps (the best at 200); telemetry of two GPUs on two ranks;
the parameter table; config.toml; worker.log and engine.log; checkpoints with inference jobs (metrics.json
with bootstrap intervals) at 80, 160 and 240. Every time and value is fixed, so pictures of it are the
same on every machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec

from engine.protocol import (
    Alert,
    Checkpoint,
    Eval,
    GpuStat,
    Inference,
    ParamRow,
    ParamTable,
    RunInfo,
    Status,
    Step,
    Telemetry,
)

T0 = 1_790_000_000.0
STEPS = 240
NAME = "tabs_run"
CONFIG = {"model_id": "mistralai/Voxtral-Mini-3B-2507", "train_jsonl": "data/train.jsonl",
          "val_jsonl": "data/val.jsonl", "per_device_bsz": 4, "grad_accum": 2, "epochs": 3.0, "max_steps": STEPS,
          "lr": 2e-4, "warmup_steps": 20, "min_lr_ratio": 0.1, "quant": "nf4", "lora_r": 16, "lora_alpha": 32,
          "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "max_len": 2048, "packing": True,
          "save_steps": 80, "eval_steps": 40, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128,
          "nproc": 2, "peak_tflops": 989.0}
EVAL_LOSS = {40: 2.31, 80: 1.92, 120: 1.71, 160: 1.62, 200: 1.58, 240: 1.60}
JOBS = {80: (0.312, [0.281, 0.344], 8.4, [6.9, 10.1], 0.61, 0.83),
        160: (0.401, [0.367, 0.436], 12.7, [10.8, 14.9], 0.66, 0.87),
        240: (0.418, [0.383, 0.452], 13.9, [11.9, 16.0], 0.67, 0.88)}


def events() -> list:
    out: list = [Status(state="starting", message="2 ranks on gpu-box")]
    out.append(ParamTable(rows=[
        ParamRow("audio_tower (frozen, removed after loading)", 0, 637_000_000, 0),
        ParamRow("embed_tokens", 0, 402_653_184, 0),
        ParamRow("language_model.layers (base)", 0, 0, 2_818_572_288),
        ParamRow("language_model.layers (lora)", 14_680_064, 0, 0),
        ParamRow("norm", 0, 3072, 0), ParamRow("multi_modal_projector", 0, 25_165_824, 0),
        ParamRow("lm_head", 0, 402_653_184, 0)], trainable=14_680_064, total=4_300_723_616))
    out.append(RunInfo(model_id=CONFIG["model_id"], world_size=2, device="cuda", train_rows=5120, val_rows=256,
                       total_steps=STEPS, steps_per_epoch=80, config=CONFIG))
    out.append(Status(state="running"))
    best = (0, 1e9)
    for s in range(1, STEPS + 1):
        t = T0 + 10 + 1.5 * s
        warm = min(1.0, s / 20)
        lr = 2e-4 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / STEPS)))
        loss = 1.4 + 1.6 * math.exp(-s / 45) + 0.05 * math.sin(s * 0.7)
        out.append(Step(step=s, loss=loss, lr=lr, grad_norm=0.8 + 0.6 * math.exp(-s / 30) + 0.1 * math.cos(s),
                        tokens_per_s=10_400 + 300 * math.sin(s / 9), epoch=s / 80, tokens=15_600,
                        tokens_per_s_rank=[5_250.0, 5_150.0], step_time=1.5, step_time_rank=[1.49, 1.5],
                        mfu=0.41 + 0.01 * math.sin(s / 7), mfu_attn=0.47 + 0.01 * math.sin(s / 7),
                        mem_allocated=18.2 + 0.002 * s, mem_reserved=22.5,
                        mem_peak=24.1 + 0.003 * s, time=t))
        if s % 6 == 0:
            for rank in (0, 1):
                out.append(Telemetry(host="gpu-box", rank=rank, time=t + 0.1, gpus=[GpuStat(
                    index=rank, name="NVIDIA H200", util=92 - 5 * rank + 4 * math.sin(s / 11), mem_used=31.5 + rank,
                    mem_total=139.8, power=540 - 30 * rank + 20 * math.sin(s / 13), temp=61 + rank,
                    sm_clock=1980)], cpu_percent=104.0, rss=9.5, mem_used_frac=0.31))
        if s in EVAL_LOSS:
            if EVAL_LOSS[s] < best[1]:
                best = (s, EVAL_LOSS[s])
            out.append(Eval(step=s, loss=EVAL_LOSS[s], ppl=math.exp(EVAL_LOSS[s]), tokens=40_000, best_loss=best[1],
                            best_step=best[0], improved=best[0] == s, time=t + 0.5))
        if s == 130:
            out.append(Alert(level="warning", kind="throughput_drop", message="tokens/s 31% below its median",
                             step=s, time=t + 0.6))
        if s % 80 == 0:
            out.append(Checkpoint(step=s, path=f"runs/{NAME}/checkpoints/checkpoint-{s}", val_loss=EVAL_LOSS[s],
                                  best=best[0] == s, final=s == STEPS, time=t + 0.7))
    for s, (rouge, _, bleu, _, d1, d2) in JOBS.items():
        out.append(Inference(name=f"checkpoint-{s}-val", checkpoint=f"checkpoint-{s}", state="finished", done=256,
                             total=256, metrics={"rougeL": rouge, "bleu": bleu, "distinct_1": d1, "distinct_2": d2},
                             time=T0 + 10 + 1.5 * STEPS + s))
    out.append(Status(state="finished", outcome="completed", message="", step=STEPS, time=T0 + 10 + 1.5 * STEPS + 300))
    for i, ev in enumerate(out, 1):
        ev.seq, ev.run = i, NAME
        ev.time = ev.time or T0 + i * 1e-3
    return out


WORKER_LOG = [
    "W0101 12:00:00.000000 1234 torch/distributed/run.py:793] Setting OMP_NUM_THREADS environment variable",
    "[rank0] loading mistralai/Voxtral-Mini-3B-2507 (nf4)",
    "[rank1] loading mistralai/Voxtral-Mini-3B-2507 (nf4)",
    "[rank0] trainable 14,680,064 of 4,300,723,616 parameters (0.34%)",
    "[rank0] step 40 val loss 2.3100 [/INST] \x1b[31mred\x1b[0m",
    "[rank0] step 80 saved checkpoints/checkpoint-80",
    "[rank1] NCCL WARN Call to ibv_reg_mr failed",
    "[rank0] step 160 saved checkpoints/checkpoint-160",
    "[rank0] step 240 saved checkpoints/checkpoint-240 (final)",
    "[rank0] done: 240 steps in 6m00s",
]


def build(root: Path) -> Path:
    """The run folder ``root/tabs_run``."""
    run = Path(root) / NAME
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(b"".join(msgspec.json.encode(ev) + b"\n" for ev in events()))
    toml = []
    for k, v in CONFIG.items():
        toml.append(f"{k} = {json.dumps(v)}")
    (run / "config.toml").write_text("\n".join(toml) + "\n")
    (run / "worker.log").write_text("\n".join(WORKER_LOG) + "\n")
    (run / "engine.log").write_text("engine: listening\nengine: workers started (pid 4242)\nengine: run finished\n")
    for s, (rouge, rci, bleu, bci, d1, d2) in JOBS.items():
        ck = run / "checkpoints" / f"checkpoint-{s}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"step": s, "best_step": 200 if s == 240 else s,
                                                           "best_loss": 1.58 if s == 240 else EVAL_LOSS[s],
                                                           "reason": "final" if s == STEPS else "periodic"}))
        (ck / "adapter_model.safetensors").write_bytes(b"")
        job = run / "infer" / f"checkpoint-{s}-val"
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps({
            "rows": 256, "rougeL": rouge, "bleu": bleu, "distinct_1": d1, "distinct_2": d2, "exact_match": 0.02,
            "length_ratio": 0.97, "ci95": {"rougeL": rci, "bleu": bci, "exact_match": [0.0, 0.04]},
            "checkpoint": f"checkpoint-{s}", "params": {"checkpoint": f"checkpoint-{s}", "data": "data/val.jsonl"},
            "time": T0 + 10 + 1.5 * STEPS + s}))
    return run
