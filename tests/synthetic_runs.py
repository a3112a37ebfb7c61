"""Run folders as the engine leaves them, built from the protocol's own event structs (engine/protocol.py,
encoded by its encoder and numbered by its ``stamp``) and a config.toml written by engine.config: a
finished or crashed run to read, without training one. The config starts from the recorded run's (a real
worker's, tests/data/recorded_run) with the given fields changed."""

from __future__ import annotations

import json
import math
from pathlib import Path

RECORDED = Path(__file__).parent / "data" / "recorded_run"
T0 = 1_795_000_000.0  # a fixed start, so pictures and tables are the same on every run


def config(**changes) -> dict:
    from engine.config import read_toml

    return {**read_toml(RECORDED / "config.toml"), **changes}


def run_events(steps: int = 12, *, lr: float = 0.005, loss0: float = 4.0, decay: float = 0.15, tokens: int = 400,
               tokens_per_s: float = 900.0, eval_every: int = 4, save_every: int = 4, preview_every: int = 6,
               gpus: int = 2, ranks: int = 1, telemetry: bool = True, state: str = "finished", model: str = "/tmp/tiny1",
               cfg: dict | None = None, inference: dict[int, dict] | None = None) -> list:
    """The events of a run of ``steps`` steps: status, param table, run_info, then per step a step event, a
    telemetry sample per rank (``gpus`` GPUs each; 0: a CPU run; none without ``telemetry``), evaluations, checkpoints and previews
    every few steps, ``inference`` jobs ({checkpoint step: metrics}) finished after their checkpoint, and
    a last status (``state``: finished, or running for a run whose engine died: crashed)."""
    from engine.protocol import (
        Checkpoint,
        Eval,
        GpuStat,
        Inference,
        ParamRow,
        ParamTable,
        Preview,
        RunInfo,
        Status,
        Step,
        Telemetry,
    )

    evs: list = [Status(state="starting", message="rank 0 of 1"),
                 ParamTable(rows=[ParamRow("language_model.layers (lora)", 32768, 0, 0), ParamRow("lm_head", 0, 8388608, 0)],
                            trainable=32768, total=8421376),
                 RunInfo(model_id=model, world_size=ranks, device="cuda" if gpus else "cpu", train_rows=100, val_rows=10,
                         total_steps=steps, steps_per_epoch=steps, config=cfg or {}),
                 Status(state="running", message="training", step=0)]
    best = math.inf
    for s in range(1, steps + 1):
        loss = loss0 * math.exp(-decay * s) + 0.5
        evs.append(Step(step=s, loss=loss, lr=lr * min(1.0, s / 2), grad_norm=1.0 / s, tokens_per_s=tokens_per_s + 10 * s,
                        epoch=s / steps, tokens=tokens, tokens_per_s_rank=[(tokens_per_s + 10 * s) / ranks] * ranks,
                        step_time=tokens / (tokens_per_s + 10 * s), step_time_rank=[tokens / (tokens_per_s + 10 * s)] * ranks,
                        mfu=0.25 if gpus else None, mem_allocated=2.0, mem_reserved=3.0, mem_peak=2.5 + s / 100))
        for r in range(ranks if telemetry else 0):
            evs.append(Telemetry(host="node0", rank=r, rss=1.0 + s / 10, cpu_percent=50.0 + r,
                                 gpus=[GpuStat(index=r * gpus + g, name="H200", util=80.0 + g, mem_used=20.0 + s,
                                               mem_total=140.0, power=300.0 + 10 * g, temp=60.0, sm_clock=1900.0)
                                       for g in range(gpus)]))
        if eval_every and s % eval_every == 0:
            vl = loss * 1.1
            improved = vl < best
            best = min(best, vl)
            evs.append(Eval(step=s, loss=vl, ppl=math.exp(vl), tokens=1000, best_loss=best, improved=improved))
        if save_every and s % save_every == 0:
            evs.append(Checkpoint(step=s, path=f"runs/x/checkpoints/checkpoint-{s}", final=s == steps))
            for job_step, metrics in (inference or {}).items():
                if job_step == s:
                    name = f"checkpoint-{s}-val"
                    evs.append(Inference(name=name, checkpoint=f"checkpoint-{s}", state="started", total=10))
                    evs.append(Inference(name=name, checkpoint=f"checkpoint-{s}", state="finished", done=10, total=10,
                                         metrics=metrics))
        if preview_every and s % preview_every == 0:
            for i in range(2):
                evs.append(Preview(step=s, prompt=f"prompt {i}", text=f"answer {i}", temperature=0.7, top_p=0.9,
                                   index=i, reference=f"answer {i}!", rougeL=0.5 + i / 10))
    if state == "finished":
        evs.append(Status(state="finished", message="done", step=steps, outcome="completed"))
    return evs


def encode(events: list, run: str = "run") -> bytes:
    """The lines of events.jsonl as the engine writes them: numbered from 1, stamped, one per line."""
    from engine.protocol import event_encoder, stamp

    out = []
    for i, ev in enumerate(events, 1):
        ev.time = ev.time or T0 + i
        out.append(event_encoder.encode(stamp(ev, i, run)))
    return b"\n".join(out) + b"\n"


def make_run(root: Path, name: str, *, config_changes: dict | None = None, events: list | None = None,
             infer_files: dict[int, dict] | None = None, **kw) -> Path:
    """``root/name``: config.toml (the recorded config with ``config_changes``), events.jsonl (``run_events``
    with ``kw``, or ``events``) and, for ``infer_files`` ({checkpoint step: metrics}), the
    ``infer/checkpoint-N-val/metrics.json`` that ``voxtui infer`` writes."""
    import msgspec

    from engine.config import TrainConfig, write_config

    run = Path(root) / name
    run.mkdir(parents=True)
    cfg = config(output_dir=str(run), **(config_changes or {}))
    write_config(msgspec.convert(cfg, TrainConfig), run / "config.toml")
    if events is None:
        events = run_events(cfg=cfg, lr=cfg["lr"], **kw)
    (run / "events.jsonl").write_bytes(encode(events, name))
    for step, metrics in (infer_files or {}).items():
        job = run / "infer" / f"checkpoint-{step}-val"
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(
            {**metrics, "checkpoint": f"checkpoint-{step}", "rows": 10, "time": T0 + step,
             "params": {"checkpoint": f"checkpoint-{step}", "data": "/data/val.jsonl"}}))
    return run
