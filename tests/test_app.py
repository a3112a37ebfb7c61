"""The dashboard with Textual's Pilot, against a real engine running the tiny model on the CPU."""

import asyncio
import json
import time

import pytest

from conftest import start_detached, write_jsonl
from engine.client import EngineClient, engine_alive
from engine.protocol import Stop


def rows(n):
    return [{"instruction": f"Describe symptom {i}.", "output": f"Symptom {i} is mild."} for i in range(n)]


def screen_text(svg: str) -> str:
    """The characters of an SVG screenshot, tags removed."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


async def wait_until(pilot, pred, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await pilot.pause(0.2)
    raise AssertionError("timed out")


def test_keyboard_flow_changes_temperature_and_next_preview_carries_it(tmp_path, tiny_model):
    from textual.widgets import Input, Static

    from app.app import VoxApp

    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    run = start_detached(tiny_model, tmp_path / "runs", "tui", train, nproc=1, max_steps=100000, preview_file=train,
                         preview_count=2, max_new_tokens=4)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.state.step > 0)
            assert app.state.state == "running" and app.state.last_seq > 0
            await pilot.press("3")  # Previews
            temp = app.screen.query_one("#pv-temperature", Input)
            temp.focus()
            temp.value = ""
            await pilot.press("0", ".", "3", "enter")
            reply = app.screen.query_one("#pv-reply", Static)
            await wait_until(pilot, lambda: "ok" in str(reply.render()))
            app.screen.set_focus(None)  # leave the input so that "n" is a key binding, not text
            await pilot.press("n")  # preview now
            await wait_until(pilot, lambda: any(e.temperature == 0.3 for evs in app.state.previews.values() for e in evs))
            await pilot.pause(0.5)
            detail = str(app.screen.query_one("#pv-text", Static).render())
            assert "T=0.3" in detail
            # an invalid value is refused before it is sent
            temp.focus()
            temp.value = "5"
            await pilot.press("enter")
            assert "error" in str(reply.render())
            await pilot.press("escape")
            await pilot.press("6")  # Events
            await pilot.pause(0.5)
            await pilot.press("q")
        return app

    asyncio.run(flow())
    info = json.loads((run / "engine.json").read_text())
    assert engine_alive(info)  # quitting the dashboard never stops the run
    with EngineClient(run) as c:
        assert c.send(Stop()).status == "ok"


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_model):
    """Two finished runs (with evals, previews and checkpoints), trained by the real worker."""
    from conftest import train_args, worker

    root = tmp_path_factory.mktemp("tui") / "runs"
    train = write_jsonl(root.parent / "t.jsonl", rows(16))
    for name in ("alpha", "beta"):
        proc = worker(train_args(tiny_model, root / name, train, train, max_steps=4, eval_steps=2, save_steps=2,
                                 preview_steps=2, preview_count=2, max_new_tokens=3))
        assert proc.returncode == 0, proc.stderr
    return root


def test_run_picker_and_a_finished_run(finished_runs):
    from textual.widgets import DataTable

    from app.app import VoxApp
    from app.screens.run import RunScreen

    async def flow():
        app = VoxApp(None, str(finished_runs))
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.pause(0.5)
            table = app.screen.query_one(DataTable)
            assert table.row_count == 2
            names = {str(table.get_row_at(i)[0]) for i in range(2)}  # cells are Text: run names are data
            assert names == {"alpha", "beta"} and str(table.get_row_at(0)[1]) == "finished"
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, RunScreen) and app.state.state == "finished")
            assert app.state.step == 4 and app.state.total_steps == 4
            await pilot.press("question_mark")
            await pilot.pause(0.3)
            assert app.screen.__class__.__name__ == "Help"
            await pilot.press("escape")
            await pilot.press("q")

    asyncio.run(flow())


@pytest.mark.parametrize("size", [(80, 24), (160, 50)])
def test_every_tab_renders(finished_runs, size):
    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(finished_runs / "alpha"))
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.state.state == "finished")
            shown = {}
            for key, tab in zip("123456", ("overview", "gpus", "previews", "checkpoints", "preflight", "events")):
                await pilot.press(key)
                await pilot.pause(0.3)
                assert app.screen.query_one("TabbedContent").active == tab
                shown[tab] = screen_text(app.export_screenshot())
            assert "FINISHED" in shown["overview"] and "CPU run" in shown["gpus"]
            assert "step 2 T=0.7" in shown["previews"] and "checkpoint-4" in shown["checkpoints"]
            assert "preflight" in shown["preflight"].lower() and "status" in shown["events"]
            await pilot.press("q")

    asyncio.run(flow())


def test_engine_lost_banner_and_reconnect_after_restart(tmp_path, tiny_model):
    import os
    import signal

    import psutil
    from textual.widgets import Static

    from app.app import VoxApp
    from conftest import descendants_of, voxtui

    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    run = start_detached(tiny_model, tmp_path / "runs", "restart", train, nproc=1, max_steps=100000, save_steps=5,
                         env={"VOXTUI_ENGINE_TIMEOUT": "2"})

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.state.step > 0)
            info = json.loads((run / "engine.json").read_text())
            workers = descendants_of(info["pid"])
            os.kill(info["pid"], signal.SIGKILL)
            banner = app.screen.query_one("#banner", Static)
            t0 = time.monotonic()
            await wait_until(pilot, lambda: banner.display, timeout=15)
            assert time.monotonic() - t0 < 6 and "ENGINE LOST" in str(banner.render())
            # the orphaned workers save and stop; then the run is resumed by a new engine
            await wait_until(pilot, lambda: all(not psutil.pid_exists(p) or
                                                psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in workers),
                             timeout=60)
            before = app.state.last_seq
            proc = voxtui("run", "--resume", run, "--detach", "--skip_preflight")
            assert proc.returncode == 0, proc.stderr
            await wait_until(pilot, lambda: not banner.display and app.state.last_seq > before + 3, timeout=90)
            seqs = [e.seq for e in app.state.events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and app.state.gaps == 0  # no gap, no duplicate
            await pilot.press("q")

    asyncio.run(flow())
    with EngineClient(run) as c:
        assert c.send(Stop()).status == "ok"


def test_checkpoints_tab_shows_sample_generations_of_a_finished_job():
    """A finished inference job's sample generations appear under the metrics table, beside their
    references (markup in the text is shown as text)."""
    from textual.app import App

    from app.state import RunState
    from app.widgets.checkpoints import Checkpoints
    from engine.protocol import Checkpoint, Inference

    state = RunState()
    state.apply(Checkpoint(seq=1, step=4, path="runs/x/checkpoints/checkpoint-4"))
    state.apply(Inference(seq=2, name="checkpoint-4-val", checkpoint="checkpoint-4", state="finished", done=2, total=2,
                          metrics={"rougeL": 0.5},
                          samples=[{"line": 3, "prompt": "Describe [b]fever[/b].", "prediction": "Fever is heat.",
                                    "reference": "Fever is a high temperature.", "rougeL": 0.4}]))

    class Host(App):
        def compose(self):
            yield Checkpoints()

    async def flow():
        app = Host()
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one(Checkpoints).show(state)
            await pilot.pause(0.2)
            text = screen_text(app.export_screenshot())
            assert "checkpoint-4-val" in text and "Fever is heat." in text and "Fever is a high temperature." in text
            assert "[b]fever[/b]" in text and "line 3 ROUGE-L 0.40" in text

    asyncio.run(flow())
