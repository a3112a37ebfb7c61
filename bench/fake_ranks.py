"""A stand-in for a multi-rank run, for the dashboard benchmarks: pushes ``step`` events (with per-rank
step times and tokens/s for RANKS ranks) at STEP_RATE a second and one ``telemetry`` event per rank (its
own GPU, 8 GPUs a host) at TELEMETRY_RATE a second each, for SECONDS. Every event is stamped with the
time it was emitted. Not a training worker.

    python bench/fake_ranks.py ENGINE_JSON STEP_RATE TELEMETRY_RATE RANKS SECONDS

16 ranks at 200 steps/s and 50 telemetry/s each: 200 + 16 × 50 = 1,000 events a second.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.protocol import GpuStat, RunInfo, Status, Step, Telemetry  # noqa: E402
from engine.worker.sinks import PushSink  # noqa: E402


def step_event(i: int, ranks: int) -> Step:
    times = [0.50 + 0.01 * ((i + r) % 7) for r in range(ranks)]
    return Step(step=i, loss=2.0 + 1.0 / i + 0.05 * math.sin(i / 7), lr=1e-4 * min(1.0, i / 100),
                grad_norm=1.0 + 0.2 * math.cos(i / 5), tokens_per_s=28000.0 * ranks, epoch=i / 1000,
                tokens=14000 * ranks, tokens_per_s_rank=[28000.0 - 100 * r for r in range(ranks)],
                step_time=max(times), step_time_rank=times, mfu=0.52, mem_allocated=40.0, mem_reserved=56.0,
                mem_peak=56.6, time=time.time())


def telemetry_event(rank: int, k: int) -> Telemetry:
    gpu = GpuStat(index=rank % 8, name="NVIDIA H200", util=90.0 + (k + rank) % 10, mem_used=56.6,
                  mem_total=139.8, power=600.0 + (k % 50), temp=60.0 + (k % 5), sm_clock=1980.0)
    return Telemetry(host=f"node{rank // 8}", rank=rank, gpus=[gpu], cpu_percent=None, rss=12.0,
                     mem_used_frac=0.4, time=time.time())


def main(engine_json: str, step_rate: float, telemetry_rate: float, ranks: int, seconds: float) -> None:
    info = json.loads(Path(engine_json).read_text())
    sink = PushSink(info["endpoints"]["worker_events"], info["run"])
    total = int(step_rate * seconds)
    sink.emit(RunInfo(model_id="bench", world_size=ranks, device="cuda", train_rows=0, val_rows=0,
                      total_steps=total, steps_per_epoch=1000))
    sink.emit(Status(state="running"))
    time.sleep(1.0)
    # one timeline of (when, what): steps at step_rate, each rank's telemetry at telemetry_rate (staggered)
    due = [(i / step_rate, 0, i + 1) for i in range(total)]
    if telemetry_rate > 0:
        n = int(telemetry_rate * seconds)
        due += [((k + r / ranks) / telemetry_rate, 1, (r, k)) for k in range(n) for r in range(ranks)]
    due.sort(key=lambda d: d[0])
    start = time.perf_counter()
    for at, kind, what in due:
        target = start + at
        while (now := time.perf_counter()) < target:
            time.sleep(min(target - now, 0.002))
        sink.emit(step_event(what, ranks) if kind == 0 else telemetry_event(*what))
    time.sleep(0.5)
    sink.emit(Status(state="finished", message="bench done"))
    time.sleep(0.5)
    sink.close()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
