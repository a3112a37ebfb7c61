"""The dashboard with Textual's Pilot, against a real engine running the tiny model on the CPU."""

import asyncio
import json
import re
import time

import pytest

from conftest import pilot_wait, start_detached, voxtui, write_jsonl
from engine.client import EngineClient, engine_alive
from engine.protocol import Stop


def rows(n):
    return [{"instruction": f"Describe symptom {i}.", "output": f"Symptom {i} is mild."} for i in range(n)]


def screen_text(svg: str) -> str:
    """The characters of an SVG screenshot, tags removed."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


def test_keyboard_flow_changes_temperature_and_next_preview_carries_it(tmp_path, tiny_model):
    """The preview inputs start at the run's own values; changing the temperature sends the temperature
    alone (top-p and max new tokens stay as the run has them); an input being edited is not overwritten
    by the events that keep coming; the Events tab opens with the whole history."""
    from textual.widgets import Input, RichLog, Static

    from app.app import VoxApp

    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    run = start_detached(tiny_model, tmp_path / "runs", "tui", train, nproc=1, max_steps=100000, preview_file=train,
                         preview_count=2, max_new_tokens=4, top_p=0.8)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step > 0)
            assert app.state.state == "running" and app.state.last_seq > 0
            await pilot.press("3")  # Previews
            await pilot.pause(0.3)
            temp, top_p, most = (app.screen.query_one(f"#{i}", Input) for i in ("pv-temperature", "pv-top-p", "pv-max"))
            assert (temp.value, top_p.value, most.value) == ("0.7", "0.8", "4")  # the run's values, not defaults
            temp.focus()
            await pilot.pause(0.2)
            assert "0.7" in screen_text(app.export_screenshot())  # wide enough: a focused 0.7 is not ".7"
            temp.value = ""
            await pilot.press("0", ".", "3", "enter")
            reply = app.screen.query_one("#pv-reply", Static)
            await pilot_wait(pilot, lambda: "ok" in str(reply.render()))
            await pilot_wait(pilot, lambda: any(e.type == "ack" and e.command == "set_preview_params"
                                                for e in app.state.events))
            ack = next(e for e in app.state.events if e.type == "ack" and e.command == "set_preview_params")
            assert ack.params == {"temperature": 0.3, "top_p": 0.8, "max_new_tokens": 4}  # only the temperature changed
            await pilot.press("escape")  # leave the input so that "n" is a key binding, not text
            assert app.focused is None
            await pilot.press("n")  # preview now
            await pilot_wait(pilot, lambda: any(e.temperature == 0.3 for evs in app.state.previews.values() for e in evs))
            await pilot.pause(0.5)
            detail = str(app.screen.query_one("#pv-text", Static).render())
            assert "T=0.3 top-p=0.8 max=4" in detail
            # the user's edit in a focused input survives the events that arrive meanwhile
            top_p.focus()
            await pilot.press("end", "5")
            seq = app.state.last_seq
            await pilot_wait(pilot, lambda: app.state.last_seq > seq + 3)
            await pilot.pause(0.3)
            assert top_p.value == "0.85" and temp.value == "0.3"
            top_p.value = "0.8"
            # an invalid value is refused before it is sent
            temp.focus()
            temp.value = "5"
            await pilot.press("enter")
            assert "error" in str(reply.render())
            await pilot.press("escape")
            await pilot.press("6")  # Events: the history at once, then live
            await pilot.pause(0.5)
            log = app.screen.query_one("#ev-log", RichLog)
            assert log.lines[0].text.startswith("     1 status") and len(log.lines) >= min(seq, 2000)
            await pilot.press("q")
        return app

    asyncio.run(flow())
    info = json.loads((run / "engine.json").read_text())
    assert engine_alive(info)  # quitting the dashboard never stops the run
    with EngineClient(run) as c:
        assert c.send(Stop()).status == "ok"


@pytest.mark.slow
def test_a_command_is_retried_with_its_id_and_sent_once(tmp_path, tiny_model):
    """The engine does not answer for a while (stopped with SIGSTOP): "save" is retried with the same id
    until it answers, and pressed again meanwhile it is not sent twice: exactly one checkpoint is saved."""
    import os
    import signal

    from app.app import VoxApp

    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    run = start_detached(tiny_model, tmp_path / "runs", "retry", train, nproc=1, max_steps=100000)
    info = json.loads((run / "engine.json").read_text())

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step > 0)
            os.kill(info["pid"], signal.SIGSTOP)
            try:
                await pilot.press("s")
                await pilot.pause(0.5)
                await pilot.press("s")  # still waiting: not sent again
                await pilot.pause(0.3)
                notes = [str(n.message) for n in app._notifications]
                assert any("already sent" in n for n in notes)
                await pilot.pause(7.0)  # past one try's timeout (5 s)
                banner = app.screen.query_one("#banner")
                assert str(banner.render()).startswith("ENGINE LOST — no heartbeat") and "reconnecting" in str(banner.render())
                # the process is alive but answers nothing: every reconnection finds it so, and the banner
                # stays (it once went away for ~18 s of every ~21 while the dashboard reconnected)
                for _ in range(14):
                    await pilot.pause(1.0)
                    assert banner.display and str(banner.render()).startswith("ENGINE LOST"), banner.render()
                    assert app.screen.engine_keys_state()[1]  # the engine's keys stay greyed
                # `engine status` asks the engine too: alive is not answering
                out = (await asyncio.to_thread(voxtui, "engine", "status", run, check=True)).stdout
                assert "answers: no: its process is alive but did not answer" in out and "state: running" in out
                # what the workers trained meanwhile (their spool: the frozen engine stores nothing) is said
                said = re.search(r"the engine does not answer: its workers' own record \(their spool, not yet "
                                 r"stored\) says step (\d+)", out)
                assert said and int(said.group(1)) > app.state.step, out
            finally:
                os.kill(info["pid"], signal.SIGCONT)
            await pilot_wait(pilot, lambda: any(str(n.message).startswith("save_checkpoint: ok")
                                                for n in app._notifications), timeout=40)
            await pilot_wait(pilot, lambda: any(e.type == "checkpoint" for e in app.state.events), timeout=60)
            await pilot.pause(2.0)
            acks = [e for e in app.state.events if e.type == "ack" and e.command == "save_checkpoint"]
            assert len(acks) == 1 and not any("no reply" in str(n.message) for n in app._notifications)
            assert len([e for e in app.state.events if e.type == "checkpoint"]) == 1
            await pilot.press("q")

    asyncio.run(flow())
    assert "answers: yes" in voxtui("engine", "status", run, check=True).stdout
    with EngineClient(run) as c:
        assert c.send(Stop()).status == "ok"


@pytest.fixture(scope="session")  # trained once a test process (module scope: again each time the module comes back)
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
            await pilot_wait(pilot, lambda: isinstance(app.screen, RunScreen) and app.state.state == "finished")
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
            await pilot_wait(pilot, lambda: app.state.state == "finished")
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
    from conftest import descendants_of

    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    run = start_detached(tiny_model, tmp_path / "runs", "restart", train, nproc=1, max_steps=100000, save_steps=5,
                         env={"VOXTUI_ENGINE_TIMEOUT": "2"})

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step > 0)
            info = json.loads((run / "engine.json").read_text())
            workers = descendants_of(info["pid"])
            os.kill(info["pid"], signal.SIGKILL)
            banner = app.screen.query_one("#banner", Static)
            t0 = time.monotonic()
            await pilot_wait(pilot, lambda: banner.display, timeout=15)
            assert time.monotonic() - t0 < 6 and "ENGINE LOST" in str(banner.render())
            # no engine process: the run is shown crashed, with how to continue it
            await pilot_wait(pilot, lambda: app.state.shown_state == "crashed", timeout=15)
            said = " ".join(str(banner.render()).split())
            assert f"the engine is not running (pid {info['pid']} gone)" in said and "voxtui run --resume" in said
            # the orphaned workers save and stop; then the run is resumed by a new engine
            await pilot_wait(pilot, lambda: all(not psutil.pid_exists(p) or
                                                psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in workers),
                             timeout=60)
            before = app.state.last_seq
            proc = voxtui("run", "--resume", run, "--detach", "--skip_preflight")
            assert proc.returncode == 0, proc.stderr
            # the first reader to find the old engine and workers gone (this dashboard, or `run --resume`)
            # stores their spooled end (the workers' "finished") first: wait for the new engine's events
            await pilot_wait(pilot, lambda: not banner.display and app.state.last_seq > before + 3
                             and app.state.engine_live and app.state.shown_state in ("starting", "running"),
                             timeout=90)
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


@pytest.mark.slow
def test_infer_selected_without_an_engine_runs_it_and_shows_the_results(finished_runs):
    """A finished run has no engine: "Infer selected" starts ``voxtui infer`` on its own (detached, log
    in infer.log) and the results appear from infer/*/metrics.json."""
    from textual.widgets import DataTable

    from app.app import VoxApp

    run = finished_runs / "beta"

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "finished" and app.state.disk_checkpoints)
            await pilot.press("4")
            table = app.screen.query_one("#ck-table", DataTable)
            await pilot_wait(pilot, lambda: table.row_count >= 2)
            names = [str(table.get_row_at(i)[4]) for i in range(table.row_count)]
            assert names == ["checkpoint-2", "checkpoint-4", "lora_final"]
            # the final checkpoint is "final"; lora_final, the same weights as an adapter alone, is "adapter"
            # with the final step's val loss
            final, adapter = ([str(c) for c in table.get_row_at(i)] for i in (1, 2))
            assert final[3] == "final" and adapter[3] == "adapter" and adapter[:2] == final[:2]
            table.move_cursor(row=1)
            await pilot.click("#ck-one")
            await pilot.pause(0.3)
            assert any("started without the engine" in str(n.message) for n in app._notifications)
            assert app.screen.query_one("#ck-one").disabled  # running already: it cannot be started twice
            metrics = app.screen.query_one("#ck-metrics", DataTable)
            await pilot_wait(pilot, lambda: metrics.row_count and str(metrics.get_row_at(0)[0]) == "finished",
                             timeout=240)
            row = [str(c) for c in metrics.get_row_at(0)]
            assert row[7] == "checkpoint-4-t" and row[1] == "16" and row[2] != "–"  # state, rows, ROUGE-L, …, job
            await pilot.press("q")

    asyncio.run(flow())
    assert (run / "infer" / "checkpoint-4-t" / "metrics.json").is_file() and (run / "infer.log").is_file()
