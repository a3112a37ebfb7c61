"""Dashboard latency and throughput, measured in one run on this machine.

A real engine relays step events from a stand-in worker (bench/fake_worker.py) that emits them at a
fixed rate; the real dashboard (headless, Textual's Pilot) follows the run. For each event we record
the time from the worker's emit to the redraw that shows it. Phases: 50 events/s (latency), 500
events/s (does it keep up?), then idle (the dashboard's CPU use with nothing happening).

    python bench/tui_latency.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_engine(run_dir: Path, rate: float, seconds: float) -> subprocess.Popen:
    (run_dir / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    worker = [sys.executable, str(ROOT / "bench" / "fake_worker.py"), str(run_dir / "engine.json"), str(rate), str(seconds)]
    return subprocess.Popen([sys.executable, "-m", "engine.daemon", str(run_dir), "--worker_cmd", json.dumps(worker)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def follow(run_dir: Path, seconds: float, idle_s: float) -> dict:
    import psutil

    from app.app import VoxApp
    from app.screens.run import RunScreen

    latencies: list[float] = []
    seen = {"seq": 0}
    original = RunScreen.render_if_dirty

    def timed_render(screen):
        """The screen's own redraw, timed: each step event it shows for the first time → its latency."""
        if not screen._dirty:
            return
        original(screen)
        now = time.time()
        shown = app.state.last_seq
        fresh = shown - seen["seq"]
        for ev in list(app.state.events)[-fresh:] if fresh > 0 else []:
            if ev.type == "step":
                latencies.append(now - ev.time)
        seen["seq"] = shown

    RunScreen.render_if_dirty = timed_render
    app = VoxApp(str(run_dir))
    async with app.run_test(size=(160, 50)) as pilot:
        deadline = time.monotonic() + seconds + 30
        while app.state.state != "finished" and time.monotonic() < deadline:
            await pilot.pause(0.05)
        behind = app.state.last_seq - seen["seq"]
        proc = psutil.Process()
        c0, t0 = proc.cpu_times(), time.monotonic()
        await pilot.pause(idle_s)
        c1, t1 = proc.cpu_times(), time.monotonic()
        idle_cpu = 100 * ((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0)
        steps = len(app.state.steps)
        await pilot.press("q")
    RunScreen.render_if_dirty = original
    lat = sorted(latencies)
    return {"events_shown": len(lat), "steps_in_state": steps, "behind_at_end": behind,
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
            "max_ms": round(1000 * lat[-1], 1) if lat else None, "idle_cpu_percent": round(idle_cpu, 1)}


def phase(rate: float, seconds: float, idle_s: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="voxtui-tui-bench-")) / f"rate{int(rate)}"
    run_dir.mkdir(parents=True)
    engine = start_engine(run_dir, rate, seconds)
    while not (run_dir / "engine.json").exists():
        time.sleep(0.05)
    try:
        result = asyncio.run(follow(run_dir, seconds, idle_s))
    finally:
        engine.terminate()
        engine.wait(timeout=30)
    return {"rate": rate, "seconds": seconds, "emitted": int(rate * seconds), **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = [phase(50, a.seconds, 5.0), phase(500, a.seconds, 0.5)]
    for r in results:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
