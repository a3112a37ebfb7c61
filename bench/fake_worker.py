"""A stand-in worker for the dashboard benchmark: pushes step events at a fixed rate to the engine,
each stamped with the time it was emitted. Not a training worker.

    python bench/fake_worker.py ENGINE_JSON RATE SECONDS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.protocol import RunInfo, Status, Step  # noqa: E402
from engine.worker.sinks import PushSink  # noqa: E402


def main(engine_json: str, rate: float, seconds: float) -> None:
    info = json.loads(Path(engine_json).read_text())
    sink = PushSink(info["endpoints"]["worker_events"], info["run"])
    total = int(rate * seconds)
    sink.emit(RunInfo(model_id="bench", world_size=1, device="cpu", train_rows=0, val_rows=0, total_steps=total,
                      steps_per_epoch=total))
    sink.emit(Status(state="running"))
    time.sleep(1.0)
    start = time.perf_counter()
    for i in range(total):
        target = start + i / rate
        while (now := time.perf_counter()) < target:
            time.sleep(min(target - now, 0.002))
        sink.emit(Step(step=i + 1, loss=2.0 + 1.0 / (i + 1), lr=1e-4, grad_norm=1.0, tokens_per_s=1000.0,
                       time=time.time()))
    time.sleep(0.5)
    sink.emit(Status(state="finished", message="bench done"))
    time.sleep(0.5)
    sink.close()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
