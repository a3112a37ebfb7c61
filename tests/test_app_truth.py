"""The dashboard shows what is true now, not only what the events said: a run whose engine was killed
is shown crashed (on a fresh attach too), a finished run its outcome; checkpoints and inference results
come from the run folder; the Events tab opens with the history. Real engines (``voxtui engine replay``
serving recorded events), Pilot, and the real ``voxtui attach`` command line."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_app import screen_text
from test_snapshots import RECORDED

from conftest import ROOT, descendants_of, pilot_wait, voxtui, write_jsonl
from engine import protocol

TYPES = {cls.__struct_config__.tag for cls in typing.get_args(protocol.Event)}  # the events' type names

RECORDED_EVENTS = [json.loads(line) for line in (RECORDED / "events.jsonl").read_text().splitlines()]


def replay(events: list[dict], run: Path, rate: float = 0.0, wait_seq: int | None = None) -> dict:
    """A real engine serving ``events`` from ``run``; returns its engine.json once they are stored."""
    from engine.client import engine_alive, engine_info

    src = write_jsonl(run.parent / f"{run.name}.events.jsonl", events)
    subprocess.run([sys.executable, "-m", "engine", "engine", "replay", str(src), "--run-dir", str(run), "--rate",
                    str(rate)], cwd=ROOT, check=True, capture_output=True)
    info = engine_info(run)
    assert engine_alive(info)
    deadline = time.time() + 30
    while wait_seq and time.time() < deadline:
        lines = (run / "events.jsonl").read_text().splitlines() if (run / "events.jsonl").exists() else []
        if len(lines) >= wait_seq:
            break
        time.sleep(0.05)
    return info


def stop(run: Path) -> None:
    subprocess.run([sys.executable, "-m", "engine", "engine", "stop", str(run)], cwd=ROOT, capture_output=True)


def test_replay_sends_the_recorded_times_not_their_pace(tmp_path):
    """`voxtui engine replay` without --rate sends every event at once, each with the time it was recorded
    at — a recording ten minutes an event apart is stored in seconds, its times kept — and its --help says so
    (it said the events were replayed "with their recorded times", read as at their pace, beside a --rate
    whose default is "all at once")."""
    events = [{**ev, "time": RECORDED_EVENTS[0]["time"] + 600 * i} for i, ev in enumerate(RECORDED_EVENTS)]
    run = tmp_path / "paced"
    start = time.time()
    replay(events, run, wait_seq=len(events))
    try:
        stored = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        assert [e["time"] for e in stored] == [e["time"] for e in events] and time.time() - start < 60
    finally:
        stop(run)
    said = " ".join(voxtui("engine", "replay", "--help", check=True).stdout.split())
    assert "each with the time it was recorded at — sent all at once, or --rate N a second, not at the pace they " \
           "were recorded" in said, said
    assert "--rate N events sent per second (default 0: all at once; the times they say are the recorded ones " \
           "either way)" in said, said


def test_attach_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    proc = voxtui("attach", tmp_path / "photos")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"voxtui: error: {tmp_path / 'photos'}: not a run folder (no config.toml, events.jsonl, engine.json)"]
    assert voxtui("attach", tmp_path / "nothing").returncode == 2


def test_a_crashed_dashboard_says_so_and_exits_non_zero(capsys):
    """App.run() returns after an unhandled exception: attach must not then say "detached" and exit 0."""
    from app.app import VoxApp
    from app.main import run_dashboard

    class Broken(VoxApp):  # a real app that really fails while running (as a markup error did)
        def on_mount(self) -> None:
            raise RuntimeError("[/__w/pytorch/pair.cc:553] closing tag does not match")

    assert run_dashboard(Broken(None, "nowhere"), headless=True) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("voxtui: error: the dashboard failed (RuntimeError: [/__w/pytorch/pair.cc:553] closing tag")
    log = Path(err.split(" and in ")[1].split(". The run")[0])
    assert "RuntimeError" in log.read_text() and "on_mount" in log.read_text()
    log.unlink()


def test_a_fresh_attach_to_a_killed_engine_shows_the_run_crashed(tmp_path):
    from textual.widgets import Static

    from app.app import VoxApp

    run = tmp_path / "killed"
    running = RECORDED_EVENTS[:17]  # through step 5: the last status is "running"
    info = replay(running, run, wait_seq=17)
    workers = descendants_of(info["pid"])
    os.kill(info["pid"], signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.last_seq == 17 and app.state.engine_live is False)
            banner = app.screen.query_one("#banner", Static)
            await pilot_wait(pilot, lambda: banner.display)  # drawn with the next redraw (a busy machine: later)
            await pilot.pause(0.2)
            assert app.state.state == "running" and app.state.shown_state == "crashed"
            text = screen_text(app.export_screenshot())
            assert "CRASHED" in text and "RUNNING" not in text
            assert f"ENGINE LOST — the engine is not running (pid {info['pid']} gone)" in text
            said = " ".join(str(banner.render()).split())
            assert f"`voxtui run --resume {run}` continues from the latest checkpoint" in said and "(step 5)" in said
            assert "killed — crashed" in text and "step 5/" in text  # the header too (the state; the step in the head)
            await pilot.press("q")

    asyncio.run(flow())


def test_a_finished_run_shows_its_outcome(tmp_path):
    from app.app import VoxApp

    run = tmp_path / "early"
    events = RECORDED_EVENTS[:-1] + [{**RECORDED_EVENTS[-1], "outcome": "early_stopped", "message": "no improvement"}]
    replay(events, run, wait_seq=len(events))
    try:
        async def flow():
            app = VoxApp(str(run))
            app.animation_level = "none"
            async with app.run_test(size=(120, 30)) as pilot:
                await pilot_wait(pilot, lambda: app.state.state == "finished" and app.state.engine_live)
                await pilot.pause(0.2)
                text = screen_text(app.export_screenshot())
                assert "FINISHED" in text and "early stopping" in text and "ENGINE LOST" not in text
                await pilot.press("q")

        asyncio.run(flow())
    finally:
        stop(run)


def test_a_run_stopped_on_request_is_shown_stopped_as_engine_list_says():
    """A run that finished because it was asked to stop is "stopped" in the dashboard, as in `voxtui engine
    list` and the picker; one that completed is "finished"."""
    from app.state import RunState
    from app.widgets.overview import state_line
    from engine.protocol import Status

    s = RunState()
    s.apply(Status(seq=1, state="running", step=5))
    s.apply(Status(seq=2, state="finished", step=21, outcome="stopped", message="stopped on request"))
    assert s.shown_state == "stopped" and "STOPPED" in state_line(s).plain and "stopped on request" in state_line(s).plain
    done = RunState()
    done.apply(Status(seq=1, state="finished", step=63, outcome="completed"))
    assert done.shown_state == "finished" and "FINISHED" in state_line(done).plain


junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True), st.text(max_size=30),
                 st.lists(st.integers(), max_size=2))


@given(state=st.one_of(st.text(max_size=40), st.sampled_from(["running", "paused", "[bold]x[/]", "finished"]), junk),
       step=junk, loss=junk, total=junk, outcome=junk, last=junk, read=st.integers(0, 3))
@settings(max_examples=200, deadline=None)
def test_the_engines_status_is_shown_as_data_and_only_where_the_events_say_less(state, step, loss, total, outcome,
                                                                                 last, read):
    """The engine's status reply (asked where it cannot serve the run's events) is data from another process:
    whatever its fields hold, the state shown is a string, the step an int, and the state line shows it as
    text, never markup; it is shown only while the events read are behind its ``last`` seq."""
    from app.state import RunState
    from app.text import plain
    from app.widgets.overview import state_line
    from engine.protocol import Status, Step

    s = RunState(folder="r")
    for seq in range(1, read + 1):
        s.apply(Status(seq=seq, state="running") if seq == 1 else Step(seq=seq, step=seq, loss=1.0, lr=0.1,
                                                                         grad_norm=1.0, tokens_per_s=1.0))
    s.apply_engine_status(state, step, loss, total, outcome, last)
    line = state_line(s).plain
    assert isinstance(s.state, str) and isinstance(s.step, int) and isinstance(s.total_steps, int)
    assert s.loss is None or isinstance(s.loss, float)
    ahead = isinstance(last, int) and not isinstance(last, bool) and (last > read or read == 0)
    assert s.from_engine_status == ahead
    if ahead:
        shown = state if isinstance(state, str) and state else "starting"
        assert s.state == shown and "from the engine's status" in line
        assert plain(s.shown_state.upper(), limit=20) in line  # as text: "[bold]x[/]" shows its brackets
    else:
        assert s.state == ("running" if read else "new") and "engine's status" not in line
    s.apply(Status(seq=max(read, last if ahead else 0) + 1, state="paused"))  # the events catch up
    assert not s.from_engine_status and s.engine_status is None and s.state == "paused"


def write_checkpoint(run: Path, step: int, best_step: int, best_loss: float, reason: str = "periodic") -> None:
    folder = run / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "best_step": best_step,
                                                           "best_loss": best_loss, "reason": reason}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)


@pytest.mark.slow
def test_checkpoints_and_inference_results_come_from_the_run_folder(tmp_path):
    """The events announced checkpoints 2, 4 and 6, each "best" when saved. On disk: 2 was pruned,
    8 was saved after the engine's last word. Shown: 4, 6, 8 with one ★ (the best step now, 6), and a
    checkpoint saved later appears by itself; an inference job's metrics.json on disk is listed."""
    from textual.widgets import DataTable

    from app.app import VoxApp

    run = tmp_path / "ckpts"
    replay(RECORDED_EVENTS, run, wait_seq=len(RECORDED_EVENTS))
    best = RECORDED_EVENTS[18]["best_loss"]  # the eval at step 6
    write_checkpoint(run, 4, 4, RECORDED_EVENTS[12]["best_loss"])
    write_checkpoint(run, 6, 6, best, "final")
    write_checkpoint(run, 8, 6, best)
    job = run / "infer" / "checkpoint-6-val"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"rows": 2, "rougeL": 0.25, "bleu": 3.5, "distinct_1": 0.5,
                                                  "distinct_2": 0.75, "perplexity": 12.5, "checkpoint": "checkpoint-6",
                                                  "time": 1.0}))
    (job / "generations.jsonl").write_text(
        json.dumps({"index": 1, "line": 2, "prompt": "Describe b.", "output": "B is [b]bold[/b].",
                    "prediction": "B is bad."}) + "\n" +
        json.dumps({"index": 0, "line": 1, "prompt": "Describe a.", "output": "A is mild.", "prediction": "A [/INST]"})
        + "\n")
    (job / "per_row.jsonl").write_text(json.dumps({"index": 0, "line": 1, "rougeL": 0.4}) + "\n")
    try:
        async def flow():
            app = VoxApp(str(run))
            app.animation_level = "none"
            async with app.run_test(size=(160, 50)) as pilot:
                await pilot_wait(pilot, lambda: app.state.state == "finished" and app.state.disk_checkpoints)
                await pilot.press("4")
                table = app.screen.query_one("#ck-table", DataTable)
                await pilot_wait(pilot, lambda: table.row_count == 3)
                rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
                assert [r[0] for r in rows] == ["4", "6", "8"]
                assert [r[2] for r in rows] == ["", "★", ""]  # exactly one best: the run's best step now
                assert rows[1][1] == f"{best:.4f}" and rows[1][3] == "final" and rows[2][1] == "–"
                await pilot.pause(0.3)
                text = screen_text(app.export_screenshot())
                assert "checkpoint-2" not in text  # pruned: gone from disk
                assert "checkpoint-6-val" in text and "0.2500" in text and "12.50" in text
                assert "A [/INST]" in text and "A is mild." in text and "ROUGE-L 0.40" in text  # its samples, from disk
                write_checkpoint(run, 10, 6, best)  # saved now: shown without any event
                await pilot_wait(pilot, lambda: table.row_count == 4, timeout=10)
                assert str(table.get_row_at(3)[0]) == "10"
                await pilot.press("q")

        asyncio.run(flow())
    finally:
        stop(run)


@pytest.mark.slow
def test_events_tab_opens_with_the_history_then_follows(tmp_path):
    from textual.widgets import Input, RichLog

    from app.app import VoxApp

    run = tmp_path / "live"
    replay(RECORDED_EVENTS, run, rate=4)  # about five seconds of live events
    try:
        async def flow():
            app = VoxApp(str(run))
            app.animation_level = "none"
            async with app.run_test(size=(100, 30)) as pilot:
                await pilot_wait(pilot, lambda: app.state.last_seq >= 8)
                await pilot.press("6")
                await pilot.pause(0.2)
                log = app.screen.query_one("#ev-log", RichLog)
                seen = app.state.last_seq
                await pilot.pause(0.6)  # the log is written in batches, at most twice a second
                assert len(log.lines) >= seen - 1 and log.lines[0].text.startswith("     1 status")
                await pilot_wait(pilot, lambda: app.state.state == "finished")
                # the last batch is written within half a second
                await pilot_wait(pilot, lambda: len(log.lines) >= len(RECORDED_EVENTS), timeout=5)
                await pilot.pause(0.6)  # and nothing more comes (no repeat)
                # one line per event, a long one wrapped onto the lines under it (those start with no seq + type)
                heads = [re.match(r"\s*(\d+) ([a-z_]+) ", line.text) for line in log.lines]
                seqs = [int(m[1]) for m in heads if m and m[2] in TYPES]
                assert seqs == list(range(1, len(RECORDED_EVENTS) + 1))  # history, then live: no gap, no repeat
                box = app.screen.query_one("#ev-filter", Input)
                box.focus()
                await pilot.press(*"checkpoint")
                await pilot.pause(0.2)
                assert [s.text.split()[1] for s in log.lines] == ["checkpoint"] * 3
                await pilot.press("escape", "1")
                await pilot.pause(0.2)
                assert app.screen.query_one("TabbedContent").active == "overview"
                await pilot.press("q")

        asyncio.run(flow())
    finally:
        stop(run)


def test_a_straggler_is_only_a_rank_clearly_slower_than_the_others():
    from app.widgets.hardware import straggler

    assert straggler([0.5]) is None
    assert straggler([0.31, 0.31]) is None  # a CPU run's equal ranks
    assert straggler([0.30, 0.33]) is None  # within 20 %
    assert straggler([0.30, 0.45]) == 1
    assert straggler([1.0, 1.02, 0.98, 1.6]) == 3
    assert straggler([1.0, 1.1, 0.95, 1.15]) is None


def test_a_run_whose_orphaned_workers_were_stopped_shows_no_engine_lost_banner(tmp_path):
    """Attached while the engine is killed (ENGINE LOST, then its orphaned workers named), then `engine stop`
    stops the workers and their spooled "stopped" is stored: the run has ended, nothing is lost — the red
    "reconnecting…" banner once stayed on a STOPPED run for good."""
    from synthetic_runs import make_run

    from app.app import VoxApp
    from app.messages import EngineLost, EngineSeen, EventsReceived
    from engine.protocol import Status

    run = make_run(tmp_path, "orphans", steps=6, state="running")

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "running" and app.state.engine_live is False)
            screen = app.screen
            banner = screen.query_one("#banner")
            screen.post_message(EngineSeen(True, 4242))
            screen.post_message(EngineLost("no heartbeat from the engine for 3 s"))
            await pilot_wait(pilot, lambda: banner.display and "reconnecting" in str(banner.render()))
            screen.post_message(EngineSeen(False, 4242, (4243, 4244)))
            await pilot_wait(pilot, lambda: "its workers (pid 4243, 4244)" in " ".join(str(banner.render()).split()))
            screen.post_message(EngineSeen(False, 4242, ()))
            stopped = Status(seq=app.state.last_seq + 1, time=time.time(), state="finished", outcome="stopped",
                             message="stopped on request")
            screen.post_message(EventsReceived([stopped]))
            await pilot_wait(pilot, lambda: app.state.shown_state == "stopped")
            await pilot.pause(0.3)
            assert not banner.display, banner.render()
            assert "ENGINE LOST" not in screen_text(app.export_screenshot())
            await pilot.press("q")

    asyncio.run(flow())


def test_a_paused_run_whose_engine_is_gone_says_its_workers_are_paused_and_no_eta(tmp_path):
    """Paused, then the engine killed: the banner says the orphaned workers are paused (not "still
    training"), and the Overview's ETA is no longer "paused" on a run that reads CRASHED."""
    from synthetic_runs import make_run

    from app.app import VoxApp
    from app.messages import EngineLost, EngineSeen, EventsReceived
    from engine.protocol import Status

    run = make_run(tmp_path, "paused", steps=6, state="running")

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(160, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "running" and app.state.engine_live is False)
            screen = app.screen
            screen.post_message(EngineSeen(True, 4242))
            screen.post_message(EventsReceived([Status(seq=app.state.last_seq + 1, time=time.time(), state="paused",
                                                       message="paused at step 6")]))
            await pilot_wait(pilot, lambda: app.state.state == "paused")
            screen.post_message(EngineLost("no heartbeat from the engine for 3 s"))
            screen.post_message(EngineSeen(False, 4242, (4243,)))
            await pilot_wait(pilot, lambda: app.state.shown_state == "crashed")
            await pilot.pause(0.3)
            said = " ".join(str(screen.query_one("#banner").render()).split())
            assert "its workers (pid 4243) are paused, unseen by any engine" in said, said
            step_line = str(screen.query_one("#ov-step").render())
            assert "ETA –" in step_line and "paused" not in step_line, step_line
            await pilot.press("q")

    asyncio.run(flow())


@pytest.mark.parametrize("size", [(80, 24), (100, 30)])
def test_the_engine_lost_banner_leaves_every_tab_on_screen_and_its_command_whole(tmp_path, monkeypatch, size):
    """The banner (up to 3 lines) shrinks the tab under it: the screen never scrolls (at 100 × 30 the
    Overview's alerts went below the footer, a scrollbar beside them), and the command it suggests holds
    the run folder whole, as typed from here (relative to the current folder), not cut at 80 characters."""
    import synthetic_runs
    from textual.widgets import TabbedContent

    from app.app import VoxApp
    from app.messages import EngineSeen

    monkeypatch.chdir(tmp_path)
    deep = Path("runs") / "a-folder-of-runs-with-a-rather-long-name" / "and-one-more-level-of-the-same-kind"
    run = synthetic_runs.make_run(tmp_path / deep, "crashed-run-with-a-long-name", steps=8, state="running")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "engine.json").write_text(json.dumps({"pid": gone.pid}))

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=size) as pilot:
            screen = app.screen
            await pilot_wait(pilot, lambda: app.state.shown_state == "crashed" and screen.query_one("#banner").display)
            said = " ".join(str(screen.query_one("#banner").render()).split())
            assert f"`voxtui run --resume {deep / run.name}` continues" in said, said
            for orphans in ((), (4243, 4244)):
                screen.post_message(EngineSeen(False, gone.pid, orphans))
                await pilot_wait(pilot, lambda want=orphans: tuple(app.state.orphans or ()) == want)
                for key in "1234567890":
                    await pilot.press(key)
                    await pilot.pause(0.05)
                    tabs = screen.query_one(TabbedContent)
                    assert screen.max_scroll_y == 0, (orphans, key)
                    assert tabs.region.bottom <= size[1] - 1, (orphans, key, tabs.region)  # above the footer
                await pilot.press("1")
                await pilot.pause(0.2)
                shown = screen_text(app.export_screenshot())
                assert "no alerts" in shown, orphans
                if size[0] >= 100 or not orphans:  # the banner's last word, uncut (at 80 columns the orphans'
                    # banner with this 120-character folder takes 5 lines of the 4 it may)
                    assert "continues" in shown and "continu…" not in shown, orphans
            await pilot.press("q")

    asyncio.run(flow())


def test_a_fresh_attach_to_a_stopped_engine_shows_what_its_file_holds(tmp_path):
    """The engine alive but silent (SIGSTOP) when a dashboard attaches: it showed the run NEW at step 0, every
    tab empty, for as long as the engine hung. Now it shows what events.jsonl holds (the state, the step, the
    history), its banner says the process is stopped and how to continue it; once the engine answers again the
    dashboard goes on from there, nothing shown twice."""
    from textual.widgets import Static

    from app.app import VoxApp

    run = tmp_path / "hung"
    running = RECORDED_EVENTS[:17]  # through step 5: the last status is "running"
    info = replay(running, run, wait_seq=17)
    os.kill(info["pid"], signal.SIGSTOP)

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(120, 30)) as pilot:
            try:
                await pilot_wait(pilot, lambda: app.state.last_seq == 17, timeout=30, every=0.1)
                banner = app.screen.query_one("#banner", Static)
                await pilot_wait(pilot, lambda: banner.display, timeout=10)
                said = " ".join(str(banner.render()).split())
                assert said.startswith("ENGINE LOST — ") and f"its process (pid {info['pid']}) is stopped" in said, said
                assert f"`kill -CONT {info['pid']}` continues it" in said, said
                # how long nothing was heard goes on counting (it stayed at "for 3 s" however long the engine hung)
                await pilot_wait(pilot, lambda: re.search(r"nothing heard for ([2-9]|\d\d)s", " ".join(
                    str(banner.render()).split())), timeout=15)
                assert app.state.state == "running" and app.state.step == 5 and app.state.shown_state == "running"
            finally:
                os.kill(info["pid"], signal.SIGCONT)
            await pilot_wait(pilot, lambda: not app.screen.query_one("#banner").display, timeout=30)
            seqs = [ev.seq for ev in app.state.events]
            assert seqs == sorted(set(seqs)) and seqs[-1] == 17, seqs
            await pilot.press("q")

    try:
        asyncio.run(flow())
    finally:
        stop(run)
