"""Summarise a run's events.jsonl: steady-state tokens/s, step time, MFU (and the factor by which counting
attention raises it) and peak memory.

    python bench/summarize_run.py runs/RUN [--skip 5]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarize(run: str | Path, skip: int = 5) -> dict:
    events = [json.loads(line) for line in (Path(run) / "events.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in events if e["type"] == "step"]
    steady = steps[skip:] or steps
    info = next((e for e in events if e["type"] == "run_info"), {})
    starting = next((e for e in events if e["type"] == "status" and e["state"] == "starting"), None)
    first_step = steps[0] if steps else None
    return {
        "run": str(run), "steps": len(steps), "world_size": info.get("world_size"),
        "tokens_per_s": round(statistics.median(e["tokens_per_s"] for e in steady), 1) if steady else None,
        "step_time_s": round(statistics.median(e["step_time"] for e in steady), 4) if steady else None,
        "mfu": round(statistics.median(e["mfu"] for e in steady), 4) if steady and steady[0].get("mfu") else None,
        # the MFU that counts attention over the matmuls' alone (the worker's step events carry both)
        "attn_factor": round(statistics.median(e["mfu_attn"] / e["mfu"] for e in steady), 4)
        if steady and steady[0].get("mfu") and steady[0].get("mfu_attn") else None,
        "pad_frac": round(statistics.median(e["pad_frac"] for e in steady), 4) if steady else None,
        "peak_gib": round(max(e["mem_peak"] for e in steps), 2) if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "start_to_first_step_s": round(first_step["time"] - starting["time"], 1) if first_step and starting else None,
        "state": events[-1].get("state") if events else None,
    }


if __name__ == "__main__":
    skip = int(sys.argv[sys.argv.index("--skip") + 1]) if "--skip" in sys.argv else 5
    for run in [a for a in sys.argv[1:] if not a.startswith("--") and not a.isdigit()]:
        print(json.dumps(summarize(run, skip)))
