"""A line written into events.jsonl by another process (by hand: a status "finished" numbered 100000, in
the middle of a live run) is not one of the run's events: the engine, which numbers them, never serves a
line numbered beyond its own count, and readers of the file (the dashboard without an engine, a client)
read on in the file's order, so the real events after such a line are never hidden behind its number
(the trial's dashboards froze on FINISHED while the run trained on)."""

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, pilot_wait
from engine.protocol import Status, Step

BOGUS = {"type": "status", "state": "finished", "outcome": "completed", "message": "written by hand", "seq": 100000,
         "time": 0.0, "run": "r", "v": 1}


def line(ev: dict) -> str:
    return json.dumps(ev) + "\n"


def real(seq: int, step: int | None = None, state: str = "") -> dict:
    base = {"seq": seq, "time": time.time(), "run": "r", "v": 1}
    if state:
        return {**base, "type": "status", "state": state, "message": ""}
    return {**base, "type": "step", "step": step, "loss": 2.0 - step / 100, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 100.0}


def stored(run: Path, pred, timeout: float = 20.0) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if x.strip()]
        if pred(events):
            return events
        time.sleep(0.05)
    raise AssertionError("the engine did not store what was pushed")


@contextlib.contextmanager
def replayed(tmp_path: Path):
    """A real engine (the replay engine) serving a run that is running; stopped after."""
    from engine.client import engine_alive, engine_info

    seed = tmp_path / "seed.jsonl"
    seed.write_text(line(real(1, state="starting")) + line(real(2, state="running")))
    run = tmp_path / "r"
    subprocess.run([sys.executable, "-m", "engine", "engine", "replay", str(seed), "--run-dir", str(run)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    info = engine_info(run)
    assert engine_alive(info)
    try:
        stored(run, lambda evs: any(e.get("state") == "running" for e in evs))
        yield run, info
    finally:
        subprocess.run([sys.executable, "-m", "engine", "engine", "stop", str(run)], cwd=ROOT, capture_output=True,
                       timeout=120)


async def shown(run: Path, step: int, state: str, then=None) -> None:
    """A fresh dashboard on ``run`` comes to ``step`` and ``state`` (and ``then()``, a file change, is
    followed too)."""
    from app.app import VoxApp

    app = VoxApp(str(run))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot_wait(pilot, lambda: app.state.step == step and app.state.state == state, timeout=30)
        if then is not None:
            step, state = then()
            await pilot_wait(pilot, lambda: app.state.step == step and app.state.state == state, timeout=30)
        await pilot.press("q")


def test_a_hand_made_line_in_a_finished_runs_file_hides_nothing(tmp_path):
    """No engine: the dashboard and a client read the file in its order; the line is one event among the
    others, and the events after it (and those appended later) are the run's state."""
    from engine.client import EngineClient

    run = tmp_path / "r"
    run.mkdir()
    events = [real(1, state="starting"), real(2, state="running")] + [real(2 + s, s) for s in (1, 2, 3)]
    tail = [real(6, 4), real(7, 5), real(8, state="running")]
    (run / "events.jsonl").write_text("".join(map(line, events)) + line(BOGUS) + "".join(map(line, tail)))

    with EngineClient(run) as c:
        got = c.history()
        assert [e.seq for e in got] == [1, 2, 3, 4, 5, 100000, 6, 7, 8]
        with (run / "events.jsonl").open("a") as f:
            f.write(line(real(9, 6)))
        assert [e.seq for e in c.events(timeout=0.5)] == [9]  # the next line, not hidden behind 100000

    def more():
        with (run / "events.jsonl").open("a") as f:
            f.write(line(real(10, 7)))
        return 7, "running"

    asyncio.run(shown(run, 6, "running", then=more))


def test_an_engine_serves_no_line_numbered_beyond_its_own(tmp_path):
    """A live engine (the replay engine, events pushed into it as a worker pushes them): a line appended to
    its events.jsonl by hand with seq 100000 is not in its history; a fresh dashboard shows the run running
    at its real step, and follows the events after it."""
    from engine.client import EngineClient
    from engine.worker.sinks import PushSink

    with replayed(tmp_path) as (run, info):
        sink = PushSink(info["endpoints"]["worker_events"], run.name)
        try:
            for s in (1, 2, 3):
                sink.emit(Step(step=s, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0))
            stored(run, lambda evs: any(e.get("step") == 3 for e in evs))
            with (run / "events.jsonl").open("a") as f:
                f.write(line({**BOGUS, "run": run.name}))
            for s in (4, 5):
                sink.emit(Step(step=s, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0))
            sink.emit(Status(state="running", message="after the line"))
            events = stored(run, lambda evs: any(e.get("message") == "after the line" for e in evs))
            assert any(e["seq"] == 100000 for e in events)  # the line is in the file …
            with EngineClient(run) as c:
                history = c.history()
                assert 100000 not in [e.seq for e in history]  # … and not in what the engine serves
                assert history[-1].seq == max(e["seq"] for e in events if e["seq"] != 100000)

            def later():
                sink.emit(Step(step=6, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0))
                return 6, "running"

            asyncio.run(shown(run, 5, "running", then=later))
        finally:
            sink.close()


def test_an_engine_key_with_no_engine_to_reach_says_why(tmp_path):
    """engine.json garbled by hand while the engine runs: a dashboard attached then cannot reach it (its
    sockets are in that file). An engine key (greyed) is answered with why — not dropped in silence — and
    a client's send says the engine cannot be reached, not that it is not running."""
    from app.app import VoxApp
    from engine.client import EngineClient
    from engine.protocol import SaveCheckpoint

    with replayed(tmp_path) as (run, _):
        good = (run / "engine.json").read_bytes()
        (run / "engine.json").write_text('{"pid": 1, garbage')
        with EngineClient(run) as c:
            reason = c.send(SaveCheckpoint()).reason
        assert reason.startswith("engine.json unreadable (line 1 column 12)") and "cannot be reached" in reason

        async def flow():
            app = VoxApp(str(run))
            async with app.run_test(size=(100, 30)) as pilot:
                await pilot_wait(pilot, lambda: app.state.state == "running" and app.state.engine_live is False)
                await pilot.press("s")
                await pilot_wait(pilot, lambda: any("save: not sent — engine.json unreadable" in str(n.message)
                                                    for n in app._notifications), timeout=5)
                await pilot.press("q")

        try:
            asyncio.run(flow())
        finally:
            (run / "engine.json").write_bytes(good)  # for the engine's stop
