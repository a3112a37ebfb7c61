"""What the real dashboard writes to its terminal during a live run, and how late the screen is.

A real engine relays events from a stand-in run (bench/fake_ranks.py); the real ``voxtui attach RUN``
runs in a pseudo-terminal of COLS×ROWS (TERM=xterm-256color, COLORTERM=truecolor). Everything it writes
is read from the pty's master side and counted per second; the number keys switch the tabs (written to
the pty as a user would type them), each tab held for ``--per-tab`` seconds. From the same stream, with
the escape sequences taken out, each "step N" that reaches the terminal for the first time is matched
to the time step N was emitted: the emit → terminal latency, the whole path (worker, engine, client,
state, widgets, Textual's compositor, the write).

    python bench/tui_pty_bytes.py [--cols 120 --rows 40] [--per-tab 10] [--steps 10 --telemetry 1 --ranks 8]
                                  [--only overview,gpus] [--json OUT]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ESC = re.compile(rb"\x1b(\[[0-9;?<>=$ ]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[PX^_][^\x1b]*\x1b\\|[()][0-9A-Za-z]|[=>78DEHMc])")
CUP = re.compile(rb"\x1b\[(\d+);(\d+)H")
STEP = re.compile(rb"step (\d+)")


def tabs() -> list[tuple[str, str]]:
    """The run screen's tabs and their keys, as the app defines them: [(tab id, key)]."""
    from app.screens.run import TABS

    return [(t, str(i + 1)) if isinstance(t, str) else (t[0], t[1]) for i, t in enumerate(TABS)]


def start_engine(run_dir: Path, step_rate: float, telemetry_rate: float, ranks: int, seconds: float):
    run_dir.mkdir(parents=True, exist_ok=True)
    worker = [sys.executable, str(ROOT / "bench" / "fake_ranks.py"), str(run_dir / "engine.json"), str(step_rate),
              str(telemetry_rate), str(ranks), str(seconds)]
    return subprocess.Popen([sys.executable, "-m", "engine.daemon", str(run_dir), "--worker_cmd", json.dumps(worker)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def spawn_attach(run_dir: Path, cols: int, rows: int) -> tuple[int, int]:
    """``voxtui attach run_dir`` on a new pty of cols×rows: (pid, master fd)."""
    pid, master = os.forkpty()
    if pid == 0:  # the child: its stdin/stdout/stderr are the pty's slave side
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLORTERM": "truecolor",
               "COLUMNS": str(cols), "LINES": str(rows)}
        env.pop("NO_COLOR", None)
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "engine", "attach", str(run_dir)], env)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return pid, master


def read_for(master: int, seconds: float, chunks: list) -> None:
    """Append (time, bytes) read from ``master`` for ``seconds``."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        r, _, _ = select.select([master], [], [], min(left, 0.05))
        if r:
            try:
                data = os.read(master, 1 << 16)
            except OSError:
                return
            if not data:
                return
            chunks.append((time.time(), data))


def emit_times(run_dir: Path) -> dict[int, float]:
    out = {}
    with open(run_dir / "events.jsonl", "rb") as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("type") == "step":
                out[ev["step"]] = ev["time"]
    return out


def spans_written(data: bytes) -> dict[tuple[int, int], int]:
    """Bytes written after each cursor move, by where it moved to ((x, y), 0-based): what redrawing the
    widget found there cost (Textual moves the cursor to the start of each changed span it paints)."""
    per: dict[tuple[int, int], int] = {}
    moves = list(CUP.finditer(data))
    for m, nxt in zip(moves, moves[1:] + [None]):
        at = (int(m[2]) - 1, int(m[1]) - 1)
        per[at] = per.get(at, 0) + (nxt.start() if nxt is not None else len(data)) - m.start()
    return per


def widgets_at(run_dir: Path, cols: int, rows: int, points: dict[str, set]) -> dict[str, dict]:
    """The dashboard's own layout at cols×rows (Textual's Pilot on the same run, now finished): for each
    tab, the widget found at each point, named ``Type#id`` (the nearest ancestor with an id when it has none)."""
    import asyncio

    async def probe() -> dict[str, dict]:
        from app.app import VoxApp

        app = VoxApp(str(run_dir))
        out: dict[str, dict] = {}
        async with app.run_test(size=(cols, rows)) as pilot:
            await pilot.pause(1.0)
            for tab, key in tabs():
                await pilot.press(key)
                await pilot.pause(0.5)
                names = {}
                for x, y in points.get(tab, ()):
                    try:
                        w, _ = app.screen.get_widget_at(x, y)
                    except Exception:  # nothing there (outside every widget)
                        names[(x, y)] = "?"
                        continue
                    named = next((a for a in w.ancestors_with_self if getattr(a, "id", None)), w)
                    names[(x, y)] = f"{type(w).__name__}" + (f" in #{named.id}" if named is not w else
                                                             (f"#{w.id}" if w.id else ""))
                out[tab] = names
            await pilot.press("q")
        return out

    return asyncio.run(probe())


def measure(a) -> dict:
    base = Path(tempfile.mkdtemp(prefix="voxtui-pty-bench-"))
    run_dir = base / "ptyrun"
    chosen = [(t, k) for t, k in tabs() if not a.only or t in a.only.split(",")]
    seconds = a.settle + a.per_tab * len(chosen) + 2
    engine = start_engine(run_dir, a.steps, a.telemetry, a.ranks, seconds)
    while not (run_dir / "engine.json").exists():
        time.sleep(0.05)
    pid, master = spawn_attach(run_dir, a.cols, a.rows)
    chunks: list[tuple[float, bytes]] = []
    phases = []
    try:
        read_for(master, a.settle, chunks)  # start-up: the first full paint and the history
        for tab, key in chosen:
            os.write(master, key.encode())
            t0, n0 = time.time(), len(chunks)
            read_for(master, a.per_tab, chunks)
            phases.append((tab, t0, time.time(), n0, len(chunks)))
        os.write(master, b"q")
        read_for(master, 3, chunks)
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(master)
        try:  # the stand-in run ends on its own a few seconds after the last tab
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    emitted = emit_times(run_dir)
    first_seen: dict[int, float] = {}
    carry = b""
    for t, data in chunks:
        text = ESC.sub(b"", carry + data)
        for m in STEP.finditer(text):
            first_seen.setdefault(int(m[1]), t)
        carry = data[-64:]
    result = {"cols": a.cols, "rows": a.rows, "step_rate": a.steps, "telemetry_rate_per_rank": a.telemetry,
              "ranks": a.ranks, "events_per_s": a.steps + a.telemetry * a.ranks,
              "startup_bytes": sum(len(d) for _, d in chunks[:phases[0][3]]), "tabs": {}}
    spans: dict[str, dict] = {}
    for tab, t0, t1, n0, n1 in phases:
        data = b"".join(d for _, d in chunks[n0:n1])
        # the switch itself repaints the screen once: count the steady state apart from that first second
        steady = b"".join(d for t, d in chunks[n0:n1] if t >= t0 + 1.0)
        spans[tab] = spans_written(steady)
        lat = sorted(first_seen[s] - emitted[s] for s in first_seen if s in emitted and t0 + 1.0 <= first_seen[s] < t1)
        result["tabs"][tab] = {
            "bytes_per_s": round(len(data) / (t1 - t0)),
            "steady_bytes_per_s": round(len(steady) / max(t1 - t0 - 1.0, 1e-9)),
            "writes_per_s": round(sum(1 for t, _ in chunks[n0:n1] if t >= t0 + 1.0) / max(t1 - t0 - 1.0, 1e-9), 1),
            "steps_seen": len(lat),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
        }
    names = widgets_at(run_dir, a.cols, a.rows, {tab: set(sp) for tab, sp in spans.items()})
    for tab, t0, t1, _, _ in phases:
        by_widget: dict[str, int] = {}
        for at, n in spans[tab].items():
            by_widget[names[tab].get(at, "?")] = by_widget.get(names[tab].get(at, "?"), 0) + n
        top = sorted(by_widget.items(), key=lambda kv: -kv[1])[:8]
        result["tabs"][tab]["by_widget_bytes_per_s"] = {k: round(v / max(t1 - t0 - 1.0, 1e-9)) for k, v in top}
    if a.dump:
        Path(a.dump).write_bytes(b"".join(d for _, d in chunks))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cols", type=int, default=120)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--per-tab", type=float, default=10.0, help="seconds on each tab")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds before the first tab is measured")
    ap.add_argument("--steps", type=float, default=10.0, help="step events a second")
    ap.add_argument("--telemetry", type=float, default=1.0, help="telemetry events a second, each rank")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--only", default="", help="these tabs only (ids, comma-separated: overview,gpus,…)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dump", default=None, help="write every byte the dashboard wrote here")
    a = ap.parse_args()
    result = measure(a)
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
