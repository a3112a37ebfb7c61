"""What the dashboard shows follows the run as it changes: the picker reads the runs again by itself (a
new run appears, a state changes, the cursor stays on its run); the footer offers the engine's commands
only while an engine can take them; a paused run shows no ETA and its pause is no part of the pace."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import synthetic_runs

from conftest import pilot_wait


def test_picker_follows_the_runs_without_a_key(tmp_path, monkeypatch):
    from textual.widgets import DataTable

    from app.app import VoxApp
    from app.screens import picker
    from engine.protocol import Status

    reads = []
    real = picker.list_runs
    monkeypatch.setattr(picker, "list_runs", lambda root, **kw: reads.append(1) or real(root, **kw))
    root = tmp_path / "runs"
    synthetic_runs.make_run(root, "alpha", steps=8)
    synthetic_runs.make_run(root, "beta", steps=8, state="running")  # no engine: crashed

    async def flow():
        app = VoxApp(None, str(root))
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.screen.query_one(DataTable)
            await pilot_wait(pilot, lambda: table.row_count == 2, timeout=15, every=0.05)
            states = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[1]) for i in range(2)}
            assert states == {"alpha": "finished", "beta": "crashed"}
            before = [str(table.get_row_at(i)[0]) for i in range(2)]
            table.move_cursor(row=before.index("alpha"))
            # a new run appears; beta gets its last status (finished): no key pressed
            shutil.copytree(root / "alpha", root / "gamma")
            with open(root / "beta" / "events.jsonl", "ab") as f:
                f.write(synthetic_runs.encode([Status(state="finished", time=synthetic_runs.T0 + 500)], "beta"))
            await pilot_wait(pilot, lambda: table.row_count == 3, timeout=3 * picker.REFRESH_S + 10, every=0.1)
            await pilot_wait(pilot, lambda: "crashed" not in {str(table.get_row_at(i)[1]) for i in range(3)},
                             timeout=3 * picker.REFRESH_S + 10, every=0.1)
            # the cursor is still on alpha; the rows listed before keep their order, the new run comes first
            assert str(table.get_row_at(table.cursor_row)[0]) == "alpha"
            names = [str(table.get_row_at(i)[0]) for i in range(3)]
            assert names[0] == "gamma" and names[1:] == before
            # beta's state grew wider (crashed → finished): the column shows it whole
            assert "finished" in [str(table.get_row_at(i)[1]) for i in range(3)]
            # more activity elsewhere reorders nothing until r
            (root / "alpha" / "events.jsonl").touch()
            await pilot.pause(2.5 * picker.REFRESH_S)
            assert [str(table.get_row_at(i)[0]) for i in range(3)] == names
            # attached to a run, the picker reads nothing
            await pilot.press("enter")
            await pilot_wait(pilot, lambda: app.screen.__class__.__name__ == "RunScreen", timeout=15)
            await pilot.pause(1.0)  # a read started just before the run's screen covered the picker ends
            before = len(reads)
            await pilot.pause(2.5 * picker.REFRESH_S)
            assert len(reads) == before
            await pilot.press("b")  # back to the picker: it reads again at once
            await pilot_wait(pilot, lambda: len(reads) > before, timeout=10, every=0.1)
            assert app.screen.__class__.__name__ == "RunPicker" and len(app.screen_stack) == 2  # the default + it

    asyncio.run(flow())


def test_a_state_that_grows_wider_is_shown_whole(tmp_path):
    """A picker that opened on runs whose states are short (crashed) widens the column when one becomes
    finished (the cell is updated in place)."""
    from textual.widgets import DataTable

    from app.app import VoxApp
    from app.screens import picker
    from engine.protocol import Status

    root = tmp_path / "runs"
    synthetic_runs.make_run(root, "beta", steps=8, state="running")  # no engine: crashed

    async def flow():
        app = VoxApp(None, str(root))
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.screen.query_one(DataTable)
            await pilot_wait(pilot, lambda: table.row_count == 1, timeout=15, every=0.05)
            with open(root / "beta" / "events.jsonl", "ab") as f:
                f.write(synthetic_runs.encode([Status(state="finished", time=synthetic_runs.T0 + 500)], "beta"))
            await pilot_wait(pilot, lambda: str(table.get_row_at(0)[1]) == "finished",
                             timeout=3 * picker.REFRESH_S + 10, every=0.1)
            column = next(c for k, c in table.columns.items() if k.value == "state")

            def width() -> int:  # (the table measures an updated cell when it next idles)
                return column.get_render_width(table) - 2 * table.cell_padding

            try:
                await pilot_wait(pilot, lambda: width() >= len("finished"), timeout=10, every=0.05)
            except AssertionError:
                pass
            return width()

    assert asyncio.run(flow()) >= len("finished")


def test_ended_run_offers_no_engine_commands_and_an_unseen_engine_greys_them(tmp_path):
    from app.app import VoxApp
    from engine import runs

    root = tmp_path / "runs"
    finished = synthetic_runs.make_run(root, "done", steps=8)
    unseen = synthetic_runs.make_run(root, "unseen", steps=8, state="running")  # no engine.json: not seen yet
    crashed = synthetic_runs.make_run(root, "gone", steps=8, state="running")
    runs.write_engine_info(crashed, {"pid": 2**22 + 12345,  # no such process (pid_max is 2**22)
                                        "started": time.time() - 60, "endpoints": {}})

    async def check(run):
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 8, timeout=20, every=0.05)
            await pilot.pause(0.3)
            screen = app.screen
            answers = {a: screen.check_action(a, ()) for a in ("stop", "pause", "save", "eval_now", "preview_now")}
            footer = {b.key for _, b, enabled, _ in screen.active_bindings.values() if b.show and enabled}
            buttons = (screen.query_one("#pv-apply").disabled, screen.query_one("#pv-now").disabled)
            return answers, footer, buttons

    answers, footer, buttons = asyncio.run(check(finished))
    assert set(answers.values()) == {False}  # hidden: nothing left to command
    assert not footer & {"n", "s", "e", "p", "x"} and {"q", "question_mark"} <= footer
    assert buttons == (True, True)
    answers, footer, buttons = asyncio.run(check(crashed))
    assert set(answers.values()) == {False}  # a crashed run has ended too (resume starts a new engine)
    assert not footer & {"n", "s", "e", "p", "x"}
    answers, footer, buttons = asyncio.run(check(unseen))
    assert set(answers.values()) == {None}  # greyed: no engine seen to take them


def test_paused_run_has_no_eta_and_the_pause_is_not_part_of_the_pace():
    from app.state import RunState
    from engine.protocol import RunInfo, Status, Step

    s = RunState()
    seq = iter(range(1, 10_000))

    def feed(ev, t):
        ev.seq, ev.time, ev.run = next(seq), t, "r"
        s.apply(ev)

    feed(Status(state="running"), 0.0)
    feed(RunInfo(model_id="m", world_size=1, device="cpu", train_rows=1, val_rows=0, total_steps=100,
                 steps_per_epoch=100), 0.0)
    for i in range(1, 11):  # 1 s a step
        feed(Step(step=i, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0), float(i))
    assert s.eta_s() == 90.0
    feed(Status(state="paused"), 10.5)
    assert s.eta_s() is None
    feed(Status(state="running"), 1000.0)  # an hour's pause
    assert s.eta_s() is None  # no step since the resume: too few to tell
    for i in range(11, 14):  # 2 s a step now
        feed(Step(step=i, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0), 1000.0 + 2 * (i - 10))
    assert s.eta_s() == 87 * 2.0  # the pace since the resume, the pause not in it


def test_a_run_with_no_readable_event_and_a_dead_engine_is_crashed_under_its_folder_name(tmp_path):
    """events.jsonl empty, missing or unreadable, and the engine.json's process gone: the dashboard says
    crashed, as `voxtui engine list` does (it said NEW, and on leaving "the run keeps going"); and the header
    names the folder read — a copied or renamed run's events still carry the old name."""
    from app.app import VoxApp
    from engine import runs

    root = tmp_path / "runs"
    for name, events in (("empty", b""), ("garbage", bytes(range(256)) * 40), ("missing", None)):
        run = synthetic_runs.make_run(root, name, steps=3, state="running")
        if events is None:
            (run / "events.jsonl").unlink()
        else:
            (run / "events.jsonl").write_bytes(events)
        runs.write_engine_info(run, {"pid": 2**22 + 12345, "started": time.time() - 60, "endpoints": {}})
        assert runs.summary(run)["state"] == "crashed"

        async def flow(run=run):
            app = VoxApp(str(run))
            async with app.run_test(size=(120, 30)) as pilot:
                await pilot_wait(pilot, lambda: app.state.shown_state == "crashed", timeout=20, every=0.05)
                await pilot.pause(0.2)
                header = app.screen.query_one("#ov-state").render()
                return str(header), app.state.crashed

        header, crashed = asyncio.run(flow())
        assert crashed and header.split()[:2] == [name, "CRASHED"], header
    # a renamed run: its events say "alpha", the folder (and so the dashboard) "renamed"
    old = synthetic_runs.make_run(root, "alpha", steps=3)
    old.rename(root / "renamed")

    async def renamed():
        app = VoxApp(str(root / "renamed"))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 3, timeout=20, every=0.05)
            await pilot.pause(0.2)
            return str(app.screen.query_one("#ov-state").render()), app.state.run

    header, events_name = asyncio.run(renamed())
    assert events_name == "alpha" and header.split()[:2] == ["renamed", "FINISHED"], header


def test_a_run_folder_deleted_or_moved_while_attached_is_said(tmp_path):
    """The dashboard keeps what it read, and says the folder is gone (it went on showing FINISHED with an
    empty Checkpoints tab); the folder back, the banner goes."""
    import shutil

    from textual.widgets import Static

    from app.app import VoxApp

    run = synthetic_runs.make_run(tmp_path / "runs", "moving", steps=5)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 5, timeout=20, every=0.05)
            banner = app.screen.query_one("#banner", Static)
            assert not banner.display
            shutil.move(run, tmp_path / "elsewhere")
            await pilot_wait(pilot, lambda: banner.display, timeout=10, every=0.1)
            said = " ".join(str(banner.render()).split())
            assert said.startswith("RUN FOLDER GONE") and "no longer exists" in said and app.state.step == 5
            shutil.move(tmp_path / "elsewhere", run)
            await pilot_wait(pilot, lambda: not banner.display, timeout=10, every=0.1)

    asyncio.run(flow())


def test_a_run_folder_gone_before_anything_was_read_is_not_shown_new(tmp_path):
    """`voxtui attach` racing an `rm -rf` of the run: nothing of it was read, and the Overview said NEW under
    the RUN FOLDER GONE banner (the run had run and crashed). Now UNKNOWN, with why."""
    import shutil

    from textual.widgets import Static

    from app.app import VoxApp

    run = tmp_path / "runs" / "racing"
    run.mkdir(parents=True)  # a folder with no events.jsonl yet: nothing to read

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.pause(0.3)
            state = app.screen.query_one("#ov-state", Static)
            assert "NEW" in str(state.render())
            shutil.rmtree(run)
            banner = app.screen.query_one("#banner", Static)
            await pilot_wait(pilot, lambda: banner.display, timeout=10, every=0.1)
            await pilot_wait(pilot, lambda: "UNKNOWN" in str(state.render()), timeout=5, every=0.1)
            said = " ".join(str(state.render()).split())
            assert "NEW" not in said and "the run folder is gone; none of it was read" in said, said

    asyncio.run(flow())


def acking_engine(screen, sent: list, params: dict, most: int = 512) -> None:
    """The screen's commands answered as an engine and its workers would (``ok``, and an ``ack`` carrying
    the preview parameters now in force: ``params``, updated; max new tokens cut to ``most``), without one;
    each command is appended to ``sent``."""
    from app.messages import CommandReplied, EventsReceived

    def send(command, key):
        sent.append(command)
        screen.post_message(CommandReplied(command.type, "ok", "", key))
        if command.type == "set_preview_params":
            params.update({k: getattr(command, k) for k in params if getattr(command, k) is not None})
            params["max_new_tokens"] = min(params["max_new_tokens"], most)
            screen.post_message(EventsReceived([ack(screen, dict(params), command.id)]))

    screen.send = send


def ack(screen, params: dict, id: str = "another-dashboard"):
    from engine.protocol import Ack

    return Ack(seq=screen.app.state.last_seq + 1, time=time.time(), id=id, command="set_preview_params", params=params)


def test_a_preview_field_follows_another_dashboards_change_after_its_own(tmp_path):
    """Two dashboards on one run: this one sets the temperature to 0.2 (acked), then the other sets 1.5 (its
    ack): the field shows 1.5 (it kept showing 0.2, even after Esc, and Enter sent 0.2 again). A field holding
    an unsent edit keeps it, and the reply line says what is in force now."""
    from textual.widgets import Input, Static

    from app.app import VoxApp
    from app.messages import EventsReceived

    run = synthetic_runs.make_run(tmp_path, "two", steps=6, state="running")

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 6, timeout=20, every=0.05)
            screen, sent = app.screen, []
            params = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 6}
            screen.post_message(EventsReceived([ack(screen, dict(params))]))
            acking_engine(screen, sent, params, most=38)
            await pilot.press("3")
            temp = screen.query_one("#pv-temperature", Input)
            reply = screen.query_one("#pv-reply", Static)
            await pilot_wait(pilot, lambda: temp.value == "0.7", timeout=10, every=0.05)
            temp.focus()
            await pilot.press("ctrl+u", *"0.2", "enter")
            await pilot_wait(pilot, lambda: app.state.preview_params["temperature"] == 0.2, timeout=10, every=0.05)
            screen.post_message(EventsReceived([ack(screen, {**params, "temperature": 1.5})]))  # the other's
            await pilot_wait(pilot, lambda: app.state.preview_params["temperature"] == 1.5, timeout=10, every=0.05)
            await pilot.pause(0.2)
            assert temp.value == "1.5"  # focused, but no unsent edit in it: the value in force
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert temp.value == "1.5"
            temp.focus()
            await pilot.press("enter")  # nothing changed here: nothing sent (it sent 0.2 again)
            await pilot.pause(0.2)
            assert [c.temperature for c in sent] == [0.2]
            # an unsent edit is kept while the other dashboard changes the value; the reply line says so
            await pilot.press("ctrl+u", *"0.4")
            screen.post_message(EventsReceived([ack(screen, {**params, "temperature": 1.9})]))
            await pilot_wait(pilot, lambda: "T=1.9" in str(reply.render()), timeout=10, every=0.05)
            assert temp.value == "0.4" and "your temperature edit is kept, not sent" in str(reply.render())
            await pilot.press("enter")
            await pilot_wait(pilot, lambda: app.state.preview_params["temperature"] == 0.4, timeout=10, every=0.05)
            await pilot.pause(0.2)
            assert [c.temperature for c in sent] == [0.2, 0.4] and temp.value == "0.4"
            # the workers cut max new tokens: the field shows the value cut, not the one sent
            most = screen.query_one("#pv-max", Input)
            most.focus()
            await pilot.press("ctrl+u", *"500", "enter")
            await pilot_wait(pilot, lambda: app.state.preview_params["max_new_tokens"] == 38, timeout=10, every=0.05)
            await pilot.pause(0.2)
            assert [c.max_new_tokens for c in sent] == [None, None, 500] and most.value == "38"

    asyncio.run(flow())


def checkpoint_on_disk(run, step: int) -> None:
    """A complete checkpoint folder as the worker leaves it (renamed into place once written)."""
    import json

    folder = run / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "best_step": step, "best_loss": 1.5,
                                                            "reason": "periodic"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")


def test_the_checkpoints_note_goes_when_checkpoints_come_and_when_the_folder_is_read_again(tmp_path, monkeypatch):
    """"no complete checkpoint in the run folder yet" goes once one is in the table (it stayed under the
    table's rows), and "could not read …" once a later read succeeds."""
    from textual.widgets import DataTable, Static

    import engine.client
    from app.app import VoxApp

    run = synthetic_runs.make_run(tmp_path, "ckpts", steps=6, save_every=0)
    real, failing = engine.client.checkpoint_states, []

    def checkpoint_states(root):
        if failing:
            raise PermissionError(13, "Permission denied")
        return real(root)

    monkeypatch.setattr(engine.client, "checkpoint_states", checkpoint_states)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 6, timeout=20, every=0.05)
            await pilot.press("4")
            screen = app.screen
            note, table = screen.query_one("#ck-note", Static), screen.query_one("#ck-table", DataTable)
            said = lambda: str(note.render())  # noqa: E731
            await pilot_wait(pilot, lambda: said() == "no complete checkpoint in the run folder yet", timeout=10)
            checkpoint_on_disk(run, 4)
            screen.scan_disk()
            await pilot_wait(pilot, lambda: table.row_count == 1, timeout=10, every=0.05)
            await pilot.pause(0.2)
            assert said() == ""
            failing.append(1)
            screen.scan_disk()
            await pilot_wait(pilot, lambda: said().startswith("could not read"), timeout=10, every=0.05)
            failing.clear()
            checkpoint_on_disk(run, 6)
            screen.scan_disk()
            await pilot_wait(pilot, lambda: table.row_count == 2, timeout=10, every=0.05)
            await pilot.pause(0.2)
            assert said() == ""

    asyncio.run(flow())


def test_the_config_tab_reads_config_toml_again_when_it_changes(tmp_path):
    """config.toml overwritten with garbage mid-run: the Config tab says it is not readable TOML now and keeps
    the last good copy, labelled as the last one read (it went on saying "config.toml" as if all were well);
    written again, the new copy shows."""
    from textual.widgets import DataTable

    from app.app import VoxApp

    run = synthetic_runs.make_run(tmp_path, "cfg", steps=6, state="running")
    good = (run / "config.toml").read_text()

    def config_rows(screen) -> dict:
        table = screen.query_one("#cfg-table", DataTable)
        return {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[1]) for i in range(table.row_count)}

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 6, timeout=20, every=0.05)
            await pilot.press("9")
            screen = app.screen
            head = lambda: str(screen.query_one("#cfg-head").render())  # noqa: E731
            await pilot_wait(pilot, lambda: head() == "resolved config: config.toml", timeout=10, every=0.05)
            lr = config_rows(screen)["lr"]
            (run / "config.toml").write_text("this is [not TOML\n")
            await pilot_wait(pilot, lambda: "not readable TOML" in head(), timeout=10, every=0.1)
            assert head() == "resolved config: config.toml as last read (now: config.toml is not readable TOML)"
            assert config_rows(screen)["lr"] == lr
            (run / "config.toml").write_text(good.replace("seed = ", "seed = 4242 #", 1))
            await pilot_wait(pilot, lambda: head() == "resolved config: config.toml", timeout=10, every=0.1)
            assert config_rows(screen)["seed"] == "4242"

    asyncio.run(flow())


def test_p_pressed_again_before_the_workers_pause_sends_nothing(tmp_path, monkeypatch):
    """The engine says ok to a pause at once and the workers pause at the next step boundary: p pressed again
    meanwhile is ignored with a notice (it sent another pause, then a resume before the first was acked);
    once their ack (and paused) comes, p resumes."""
    import app.connection  # noqa: F401 (the stream keeps the real client: only the commands' is played)
    import engine.client
    from app.app import VoxApp
    from app.messages import EngineSeen, EventsReceived
    from engine.protocol import Ack, Reply, Status

    run = synthetic_runs.make_run(tmp_path, "pause", steps=6, state="running")
    sent = []

    class Client:  # the engine: every command forwarded to the workers, answered ok
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def send(self, command):
            sent.append(command)
            return Reply(status="ok", id=command.id, state="running")

    monkeypatch.setattr(engine.client, "EngineClient", Client)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.step == 6, timeout=20, every=0.05)
            screen = app.screen
            screen.post_message(EngineSeen(True, 4242))
            await pilot_wait(pilot, lambda: app.state.engine_live, timeout=10, every=0.05)
            await pilot.press("p")
            await pilot_wait(pilot, lambda: sent and any("pause: ok" in str(n.message) for n in app._notifications),
                             timeout=10, every=0.05)
            await pilot.press("p", "p")
            await pilot.pause(0.5)
            assert [c.type for c in sent] == ["pause"]
            assert any("pause: already sent; waiting for the workers to apply it" in str(n.message)
                       for n in app._notifications)
            seq = app.state.last_seq
            screen.post_message(EventsReceived([Ack(seq=seq + 1, time=time.time(), id=sent[0].id, command="pause"),
                                                Status(seq=seq + 2, time=time.time(), state="paused")]))
            await pilot_wait(pilot, lambda: app.state.state == "paused", timeout=10, every=0.05)
            await pilot.press("p")
            await pilot_wait(pilot, lambda: len(sent) == 2, timeout=10, every=0.05)
            assert sent[1].type == "resume"

    asyncio.run(flow())


def test_the_dashboard_reads_pausing_until_the_workers_pause_after_the_save_due_at_that_step(tmp_path, tiny_model):
    """A real engine and worker, a checkpoint due at every step (3 s each here): the workers acknowledge p's pause
    when they take it, then save, then pause. The dashboard showed RUNNING meanwhile and p worked again at the
    ack (a second pause). Now it reads PAUSING from the request until the workers pause; p meanwhile says what
    it waits for and sends nothing; once paused, p resumes."""
    from textual.widgets import Static

    from app.app import VoxApp
    from conftest import start_detached, write_jsonl
    from engine.client import EngineClient
    from engine.protocol import Stop

    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"Capital of region {i}?", "output": f"City {i}."}
                                                for i in range(40)])
    run = start_detached(tiny_model, tmp_path / "runs", "toggled", train, nproc=1, max_steps=100000, save_steps=1,
                         env={"VOXTUI_FAULT_SLOW_SAVE": "3"})

    def notes(app) -> list[str]:
        return [str(n.message) for n in app._notifications]

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            screen = app.screen
            await pilot_wait(pilot, lambda: app.state.step > 0 and app.state.engine_live, timeout=120, every=0.1)
            await pilot.press("p")
            await pilot_wait(pilot, lambda: app.state.state == "pausing", timeout=20, every=0.05)
            await pilot_wait(pilot, lambda: screen.sub_title == "pausing"
                             and "PAUSING" in str(screen.query_one("#ov-state", Static).render()), timeout=10, every=0.05)
            await pilot_wait(pilot, lambda: any(e.type == "ack" and e.command == "pause" for e in app.state.events),
                             timeout=60, every=0.05)
            ack = next(e for e in app.state.events if e.type == "ack" and e.command == "pause")
            await pilot.press("p")  # taken, not paused yet (saving): nothing is sent
            await pilot.pause(0.3)
            assert app.state.state == "pausing", "paused within the save"
            said = (f"pause: the workers took it at step {ack.step}; waiting for them to pause (once what falls due at "
                    "that step boundary is done: an evaluation, previews, a checkpoint)")
            assert said in notes(app), notes(app)
            await pilot_wait(pilot, lambda: app.state.state == "paused", timeout=60, every=0.05)
            # the header follows at the screen's next redraw (paced: not within the message that brought "paused")
            await pilot_wait(pilot, lambda: screen.sub_title == "paused", timeout=10, every=0.05)
            acks = [e for e in app.state.events if e.type == "ack"]
            assert [e.command for e in acks] == ["pause"] and not any("error" in n for n in notes(app)), notes(app)
            await pilot.press("p")  # paused now: p resumes
            await pilot_wait(pilot, lambda: any(n.startswith("resume: ok") for n in notes(app)), timeout=20, every=0.05)
            await pilot_wait(pilot, lambda: app.state.state == "running", timeout=60, every=0.05)
            assert "pause/resume" not in screen.in_flight

    try:
        asyncio.run(flow())
    finally:
        with EngineClient(run) as c:
            c.send(Stop())


@pytest.mark.parametrize("saved", [True, False])
def test_a_failed_run_says_what_to_do_next(tmp_path, monkeypatch, saved):
    """A failed run said why (cut at the screen's width) and nothing more: now a banner says why whole and what
    to do — `voxtui run --resume RUN` from the latest complete checkpoint, or, with none saved, the same
    command starting it over from step 0 (leaving the dashboard says the same: app/main.py)."""
    from textual.widgets import Static

    from app.app import VoxApp
    from engine.protocol import Status

    monkeypatch.chdir(tmp_path)
    why = "rank 1 was killed by SIGKILL (out of memory? the kernel's OOM killer, `dmesg` says); see worker.log"
    events = synthetic_runs.run_events(cfg=synthetic_runs.config(), lr=1e-4, steps=8, state="running")
    events.append(Status(state="failed", message=why, step=8))
    run = synthetic_runs.make_run(tmp_path / "runs", "broke", events=events)
    if saved:
        checkpoint_on_disk(run, 4)
        checkpoint_on_disk(run, 8)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(100, 30)) as pilot:
            banner = app.screen.query_one("#banner", Static)
            await pilot_wait(pilot, lambda: app.state.shown_state == "failed" and app.state.disk_checkpoints is not None
                             and banner.display and "being read" not in str(banner.render()), timeout=20, every=0.05)
            said = " ".join(str(banner.render()).split())
            assert said.startswith(f"RUN FAILED — {why} — "), said
            if saved:
                assert "`voxtui run --resume runs/broke` continues from checkpoint-8" in said, said
            else:
                assert "no checkpoint was saved before it failed: `voxtui run --resume runs/broke` starts it over from " \
                    "step 0" in said, said
            await pilot.press("q")

    asyncio.run(flow())
