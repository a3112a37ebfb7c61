"""One inference job per checkpoint: the Checkpoints tab's `i` and `a` never start a second `engine infer`
on a checkpoint whose inference runs already (two jobs would write the same infer/checkpoint-N-… folder) —
started from here (with or without an engine) or by anyone else on this machine (seen among its processes):
`a` skips it, `i` is refused with a notice. The jobs are stand-ins: processes whose command line is the
job's (``… engine infer --run RUN --checkpoint N``) that only sleep."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest
import synthetic_runs
from test_app_live import checkpoint_on_disk

from conftest import pilot_wait, write_jsonl

SLEEP = "import time; time.sleep(120)"


@pytest.fixture
def jobs():
    """Stand-in inference processes, killed after the test."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], cwd=None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", SLEEP, *args], cwd=cwd, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def infer_run(tmp_path, state: str):
    """A run with checkpoint-4 and checkpoint-8 on disk and a val_jsonl that is there."""
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "q", "output": "a"}])
    run = synthetic_runs.make_run(tmp_path / "runs", "infer", steps=8, state=state, config_changes={"val_jsonl": str(val)})
    for step in (4, 8):
        checkpoint_on_disk(run, step)
    return run


def checkpoints_of(argv: list[str]) -> str:
    return argv[argv.index("--checkpoint") + 1] if "--checkpoint" in argv else "all" if "--all-checkpoints" in argv \
        else "?"


def notices(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


def test_without_an_engine_i_then_a_skips_the_running_checkpoint_and_i_is_refused(tmp_path, monkeypatch, jobs):
    from textual.widgets import DataTable, Static

    import app.screens.run as run_screen
    from app.app import VoxApp

    run = infer_run(tmp_path, "finished")
    started: list[list[str]] = []

    def popen(argv, **kw):  # the job's command line, sleeping
        started.append(argv)
        return jobs(argv[1:] if argv[0] == sys.executable else [])

    monkeypatch.setattr(run_screen, "subprocess", SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL,
                                                                  STDOUT=subprocess.STDOUT))

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "finished", timeout=20, every=0.05)
            await pilot.press("4")
            screen = app.screen
            table, note = screen.query_one("#ck-table", DataTable), screen.query_one("#ck-note", Static)
            await pilot_wait(pilot, lambda: table.row_count == 2, timeout=10, every=0.05)
            table.move_cursor(row=0)  # checkpoint-4
            await pilot.press("i")
            await pilot_wait(pilot, lambda: len(started) == 1, timeout=10, every=0.05)
            await pilot.press("a")  # every checkpoint but checkpoint-4, running already
            await pilot.pause(0.3)
            assert [checkpoints_of(a) for a in started] == ["4", "8"]
            assert any("running on checkpoint-4 already: skipped" in n for n in notices(app))
            await pilot.press("i", "a")  # both running: nothing more
            await pilot.pause(0.3)
            assert len(started) == 2 and "already" in str(note.render())
            # the jobs end; another dashboard (or a shell) starts checkpoint-8's, its --run relative to its folder
            for proc in set(screen.offline.values()):
                proc.kill()
            await pilot_wait(pilot, lambda: not screen.offline, timeout=10)
            # the note said "running already": no longer true, so no longer shown
            await pilot_wait(pilot, lambda: "already" not in str(note.render()), timeout=10, every=0.05)
            jobs(["-m", "engine", "infer", "--run", "infer", "--checkpoint", "8", "--data", "v.jsonl"],
                 cwd=run.parent)
            screen.scan_disk()
            await pilot_wait(pilot, lambda: "checkpoint-8" in screen.inferring(), timeout=10, every=0.05)
            table.move_cursor(row=1)  # checkpoint-8
            await pilot.press("i")
            await pilot.pause(0.3)
            assert len(started) == 2 and "inference on checkpoint-8 is running already" in str(note.render())
            await pilot.press("a")
            await pilot_wait(pilot, lambda: len(started) == 3, timeout=10, every=0.05)
            assert checkpoints_of(started[2]) == "4"

    asyncio.run(flow())


def test_with_an_engine_i_then_a_asks_for_the_running_checkpoint_once(tmp_path, jobs):
    from textual.widgets import DataTable

    from app.app import VoxApp
    from app.messages import CommandReplied, EngineSeen

    run = infer_run(tmp_path, "running")
    sent = []

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 8, timeout=20, every=0.05)
            screen = app.screen
            screen.post_message(EngineSeen(True, 4242))

            def send(command, key):  # the engine: the job started (its process), then the reply
                sent.append(command)
                jobs(["-m", "engine", "infer", "--run", str(run), "--checkpoint", str(command.checkpoint)])
                screen.post_message(CommandReplied(command.type, "ok", "inference started", key))

            screen.send = send
            await pilot.press("4")
            table = screen.query_one("#ck-table", DataTable)
            await pilot_wait(pilot, lambda: table.row_count == 2 and app.state.engine_live, timeout=10, every=0.05)
            table.move_cursor(row=0)  # checkpoint-4
            await pilot.press("i")
            await pilot_wait(pilot, lambda: not screen.in_flight, timeout=10, every=0.05)
            await pilot.press("a")
            await pilot.pause(0.3)
            assert [c.checkpoint for c in sent] == [4, 8]
            await pilot.press("i")
            await pilot.pause(0.3)
            assert [c.checkpoint for c in sent] == [4, 8]
            assert any("inference on checkpoint-4 is running already" in n for n in notices(app))

    asyncio.run(flow())


def test_a_new_job_is_brought_into_view_in_the_jobs_table():
    """Jobs are listed by name: one started later could land below the table's fold with nothing to say
    it came; the table's cursor goes to a job that appears (the table scrolls to it). At 80 × 24 beside
    sample generations the table keeps its header and two jobs."""
    from textual.app import App
    from textual.widgets import DataTable

    from app.app import VoxApp
    from app.state import RunState
    from app.widgets.checkpoints import Checkpoints

    def job(name: str) -> dict:
        return {"state": "finished", "rows": 10, "rougeL": 0.4, "checkpoint": name.rsplit("-", 1)[0],
                "samples": [{"line": 1, "prompt": "q", "prediction": "a", "reference": "r"}] * 5}

    class Host(App):
        CSS_PATH = VoxApp.CSS_PATH  # the dashboard's layout

        def compose(self):
            yield Checkpoints()

    async def flow():
        app = Host()
        async with app.run_test(size=(80, 24)) as pilot:
            ck = app.query_one(Checkpoints)
            s = RunState(folder="r")
            s.disk_checkpoints = [{"step": n, "name": f"checkpoint-{n}"} for n in (10, 20, 30, 40, 50, 60)]
            s.disk_inference = {f"checkpoint-{n}-val": job(f"checkpoint-{n}-val") for n in (10, 20, 30, 40, 50)}
            ck.show(s)
            await pilot.pause()
            table = ck.query_one("#ck-metrics", DataTable)
            assert table.cursor_row == 0 and table.region.height >= 3, table.region
            s.disk_inference["checkpoint-60-val"] = job("checkpoint-60-val")
            ck.show(s)
            await pilot.pause()
            assert table.get_row_at(table.cursor_row)[-1].plain == "checkpoint-60-val"
            assert table.scroll_y > 0  # scrolled to it: the sixth job of a table that shows fewer

    asyncio.run(flow())
