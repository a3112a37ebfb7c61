"""Dashboard latency, throughput, memory and idle CPU, measured in one run on this machine.

A real engine relays events from a stand-in run; the real dashboard (headless, Textual's Pilot, 160×50,
Overview tab) follows it. For each step event we record the time from the worker's emit to the redraw
that shows it, split in two: emit → the screen handles the batch (worker, engine, client thread,
message queue) and handled → redrawn (the wait for the redraw tick and the redraw itself). Phases:

- ``rate50``: one rank, 50 step events/s (bench/fake_worker.py): latency.
- ``ranks16``: 16 ranks, 200 step events/s + 50 telemetry events/s from each rank = 1,000 events/s
  (bench/fake_ranks.py): does it keep up, and does memory grow (RSS sampled every second)?
- then, each time, idle: the dashboard's CPU with the run finished and nothing happening.

    python bench/tui_latency.py [--seconds 20] [--idle 10] [--phases rate50,ranks16] [--trace-memory] [--json OUT]

What reaches a real terminal, and how late, is bench/tui_pty_bytes.py's.
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

PHASES = {  # name → (stand-in worker's arguments after ENGINE_JSON; events a second)
    "rate50": (["fake_worker.py", "{engine_json}", "50", "{seconds}"], 50),
    "ranks16": (["fake_ranks.py", "{engine_json}", "200", "50", "16", "{seconds}"], 1000),
}


def start_engine(run_dir: Path, name: str, seconds: float) -> subprocess.Popen:
    args, _ = PHASES[name]
    worker = [sys.executable, str(ROOT / "bench" / args[0]),
              *(a.format(engine_json=run_dir / "engine.json", seconds=seconds) for a in args[1:])]
    return subprocess.Popen([sys.executable, "-m", "engine.daemon", str(run_dir), "--worker_cmd", json.dumps(worker)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def pct(values: list[float], q: float) -> float | None:
    v = sorted(values)
    return round(1000 * v[int(q * (len(v) - 1))], 1) if v else None


async def follow(run_dir: Path, seconds: float, idle_s: float, trace: bool = False) -> dict:
    import tracemalloc

    import psutil

    from app.app import VoxApp
    from app.screens.run import RunScreen

    latencies: list[float] = []
    transport: list[float] = []  # emit → the screen handles the batch
    renders: list[float] = []  # the redraw's own duration
    handled: dict[int, float] = {}  # step → when its batch was handled
    seen = {"seq": 0}
    original_render, original_events = RunScreen.render_if_dirty, RunScreen.on_events_received

    def timed_events(screen, message):
        now = time.time()
        for ev in message.events:
            if ev.type == "step":
                handled[ev.step] = now
                transport.append(now - ev.time)
        original_events(screen, message)

    def timed_render(screen):
        """The screen's own redraw, timed: each step event it shows for the first time → its latency."""
        if not screen._dirty:
            return original_render(screen)
        t0 = time.perf_counter()
        original_render(screen)
        renders.append(time.perf_counter() - t0)
        now = time.time()
        shown = app.state.last_seq
        fresh = shown - seen["seq"]
        for ev in list(app.state.events)[-fresh:] if fresh > 0 else []:
            if ev.type == "step":
                latencies.append(now - ev.time)
        seen["seq"] = shown

    RunScreen.render_if_dirty, RunScreen.on_events_received = timed_render, timed_events
    proc = psutil.Process()
    rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
    app = VoxApp(str(run_dir))
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            start = time.monotonic()
            deadline = start + seconds + 30
            next_sample = start
            middle = None  # --trace-memory: what Python allocated, halfway through the live phase
            if trace:
                tracemalloc.start()
            while app.state.state != "finished" and time.monotonic() < deadline:
                if trace and middle is None and time.monotonic() - start >= seconds / 2:
                    middle = tracemalloc.take_snapshot()
                if time.monotonic() >= next_sample:
                    rss.append((round(time.monotonic() - start, 1), proc.memory_info().rss / 2**20))
                    next_sample += 1.0
                await pilot.pause(0.05)
            await pilot.pause(0.5)  # the last batch drawn
            grew = []
            if trace and middle is not None:  # where Python's heap grew over the second half (top 8 lines)
                end = tracemalloc.take_snapshot()
                tracemalloc.stop()
                grew = [f"{d.traceback[0].filename.replace(str(ROOT) + '/', '')}:{d.traceback[0].lineno} "
                        f"{d.size_diff / 2**10:+.0f} KiB" for d in end.compare_to(middle, "lineno")[:8]]
            behind = app.state.last_seq - seen["seq"]
            c0, t0 = proc.cpu_times(), time.monotonic()
            await pilot.pause(idle_s)
            c1, t1 = proc.cpu_times(), time.monotonic()
            idle_cpu = 100 * ((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0)
            rss_idle = proc.memory_info().rss / 2**20
            steps = len(app.state.steps)
            await pilot.press("q")
    finally:
        RunScreen.render_if_dirty, RunScreen.on_events_received = original_render, original_events
    half = [m for t, m in rss if t >= rss[-1][0] / 2] if rss else []
    slope = None
    if len(half) >= 3:  # MiB a minute over the second half of the live phase (least squares)
        xs = [t for t, _ in rss if t >= rss[-1][0] / 2]
        mx, my = statistics.fmean(xs), statistics.fmean(half)
        slope = round(60 * sum((x - mx) * (y - my) for x, y in zip(xs, half)) / sum((x - mx) ** 2 for x in xs), 2)
    return {"events_shown_steps": len(latencies), "steps_in_state": steps, "behind_at_end": behind,
            "p50_ms": pct(latencies, 0.5), "p95_ms": pct(latencies, 0.95), "max_ms": pct(latencies, 1.0),
            "emit_to_handled_p50_ms": pct(transport, 0.5), "emit_to_handled_p95_ms": pct(transport, 0.95),
            "redraws": len(renders), "redraw_p50_ms": pct(renders, 0.5), "redraw_p95_ms": pct(renders, 0.95),
            "rss_mib": [round(m, 1) for _, m in rss], "rss_slope_mib_per_min_2nd_half": slope,
            "rss_idle_mib": round(rss_idle, 1), "idle_cpu_percent": round(idle_cpu, 2),
            **({"heap_growth_2nd_half": grew} if trace else {})}


def phase(name: str, seconds: float, idle_s: float, trace: bool = False) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="voxtui-tui-bench-")) / name
    run_dir.mkdir(parents=True)
    engine = start_engine(run_dir, name, seconds)
    while not (run_dir / "engine.json").exists():
        time.sleep(0.05)
    try:
        result = asyncio.run(follow(run_dir, seconds, idle_s, trace))
    finally:
        try:  # the stand-in run has finished: the engine leaves by itself
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    rate = PHASES[name][1]
    return {"phase": name, "events_per_s": rate, "seconds": seconds, "emitted": int(rate * seconds), **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--idle", type=float, default=10, help="seconds of idle after each run (CPU measured)")
    ap.add_argument("--phases", default="rate50,ranks16")
    ap.add_argument("--trace-memory", action="store_true",
                    help="name the lines where Python's heap grew over the live phase's second half (slower)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = [phase(name, a.seconds, a.idle, a.trace_memory) for name in a.phases.split(",")]
    for r in results:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
