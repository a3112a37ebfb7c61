"""events.jsonl is a file people (and other processes) can edit while the engine serves it: lines deleted,
copied, garbage added, the file cut, emptied or replaced. The engine's store never fails on what it finds
there, and every history request gets an answer — the events the file holds, or an error saying why
none can be read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import ROOT, read_events, voxtui, wait_for
from engine.client import EngineClient, engine_alive
from engine.daemon.store import EventStore, Unreadable
from engine.protocol import Log, Request, Stop, event_encoder, reply_decoder
from engine.session import sign

RECORDED = ROOT / "tests" / "data" / "recorded_run" / "events.jsonl"

garbage = st.one_of(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
                    st.builds(lambda n: json.dumps({"type": "log", "seq": n}).encode(), st.integers(-3, 40)),
                    st.just(b'{"seq": "x"}'), st.just(b"[" * 3000), st.just(b"{\xff\xfe}"))
edit = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 40)),
    st.tuples(st.just("copy"), st.integers(0, 40)),
    st.tuples(st.just("insert"), st.integers(0, 40), garbage),
    st.tuples(st.just("cut"), st.integers(0, 4000)),  # to so many bytes (a torn last line, maybe)
    st.tuples(st.just("append"), garbage, st.booleans()),  # with or without its newline
    st.tuples(st.just("swap"), st.integers(0, 40), st.integers(0, 40)),
)


def apply(path: Path, op: tuple) -> None:
    """One edit of events.jsonl, in place (the inode the engine appends to stays)."""
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
    match op:
        case ("delete", i) if lines:
            del lines[i % len(lines)]
        case ("copy", i) if lines:
            lines.insert(i % len(lines), lines[i % len(lines)])
        case ("insert", i, junk):
            lines.insert(i % (len(lines) + 1), junk)
        case ("swap", i, j) if lines:
            i, j = i % len(lines), j % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        case ("cut", n):
            with open(path, "r+b") as f:
                f.truncate(min(n, len(data)))
            return
        case ("append", junk, newline):
            with open(path, "ab") as f:
                f.write(junk + (b"\n" if newline else b""))
            return
        case _:
            return
    with open(path, "r+b") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.truncate()


def check(store: EventStore, after: int, limit: int) -> list[int]:
    """``store.read``: never raises (but ``Unreadable``); events above ``after``, in order, each a line of the file."""
    lines, last, more = store.read(after, limit)
    on_disk = set(store.path.read_bytes().split(b"\n"))
    seqs = [msgspec.json.decode(line)["seq"] for line in lines]
    assert len(lines) <= limit and all(line in on_disk for line in lines)
    assert seqs == sorted(set(seqs)) and all(s > after for s in seqs)
    assert last == (seqs[-1] if seqs else min(after, store.seq))
    assert isinstance(more, bool) and (not more or len(lines) == limit)
    return seqs


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 25), st.lists(edit, max_size=6), st.lists(st.tuples(st.integers(-2, 40), st.integers(1, 30)),
                                                                 min_size=1, max_size=5), st.integers(0, 4), st.booleans())
# found by CI: a hand-made last line with seq -1, then a resume — the engine numbered its next event 0
@example(9, [("delete", 0)] * 5 + [("insert", 4, b'{"type": "log", "seq": -1}')], [(0, 1)], 1, True)
# a line of an older seq moved to the end: the engine goes on after the highest, not after the last line's
@example(5, [("insert", 5, b'{"type": "log", "seq": 2}')], [(0, 1)], 2, True)
def test_store_reads_whatever_the_file_became(n, edits, reads, later, reopen):
    """Edited while the engine runs, or before it starts again on the run (``reopen``: a resume)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore(Path(tmp), "r")
        store.open()
        try:
            for i in range(n):
                store.append(Log(message=f"event {i}"))
            for op in edits:
                apply(store.path, op)
            if reopen:
                store.close()
                store = EventStore(Path(tmp), "r")
                store.open()
                n = store.seq
            for after, limit in reads:
                check(store, after, limit)
            for i in range(later):  # the engine goes on appending to what is there
                store.append(Log(message=f"later {i}"))
            seqs = check(store, n, 100)
            assert set(range(n + 1, n + later + 1)) <= set(seqs)  # its own lines are served, each on a line
            unchanged = check(store, 0, 5000)
            assert unchanged == sorted(set(unchanged))
        finally:
            store.close()


def test_store_reads_an_untouched_file_by_seq(tmp_path):
    store = EventStore(tmp_path, "r")
    store.open()
    for i in range(30):
        store.append(Log(message=f"{i}"))
    assert check(store, 0, 10) == list(range(1, 11)) and store.read(0, 10)[2] is True
    assert check(store, 25, 10) == [26, 27, 28, 29, 30] and store.read(25, 10)[2] is False
    assert store.read(30, 10) == ([], 30, False) and store.read(99, 10) == ([], 30, False)
    store.close()
    again = EventStore(tmp_path, "r")  # a resumed engine indexes what the file holds
    again.open()
    again.append(Log(message="after resume"))
    assert check(again, 28, 10) == [29, 30, 31]
    again.path.unlink()
    with pytest.raises(Unreadable, match="events.jsonl missing"):
        again.read(0, 10)
    again.close()


def test_a_request_that_fails_to_be_served_gets_an_error_reply(tmp_path, monkeypatch):
    """Whatever goes wrong while a request is served, its client gets an answer (and the engine's guard the
    exception, to log): it would otherwise wait for nothing."""
    from engine.daemon.requests import RequestHandler
    from engine.session import Session

    store = EventStore(tmp_path, "r")
    store.open()
    store.append(Log(message="one"))
    key = os.urandom(32)
    handler = RequestHandler(Session(key), store, lambda: "running", lambda cmd: None)
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")

    def ask():
        payload = msgspec.json.encode(Request(op="history", time=time.time(), nonce=os.urandom(8).hex()))
        dealer.send_multipart([b"", payload, sign(key, payload)])
        assert router.poll(5000)
        frames = router.recv_multipart()
        try:
            handler.handle(frames, router)
        except Exception as e:  # what the engine's guard logs
            raised = e
        else:
            raised = None
        assert dealer.poll(5000), "no reply"
        return reply_decoder.decode(dealer.recv_multipart()[1]), raised

    try:
        reply, raised = ask()
        assert reply.status == "ok" and raised is None
        monkeypatch.setattr(store, "read", lambda after, limit: 1 / 0)
        reply, raised = ask()
        assert reply.status == "error" and isinstance(raised, ZeroDivisionError)
        assert reply.reason == "the engine failed to answer 'history': ZeroDivisionError: division by zero"
    finally:
        router.close()
        dealer.close()
        store.close()


def recording(tmp_path: Path, lines: list[bytes]) -> Path:
    """A recorded run of these lines of the recorded run's events.jsonl (with its config.toml), to replay."""
    recorded = tmp_path / "recorded" / "events.jsonl"
    recorded.parent.mkdir()
    recorded.write_bytes(b"".join(lines))
    shutil.copyfile(RECORDED.parent / "config.toml", recorded.parent / "config.toml")
    return recorded


def serve(run: Path, recorded: Path, events: int) -> dict:
    """A real engine serving a recorded run (its worker: the replay stand-in, which then waits), once it has
    stored ``events``; its engine.json."""
    proc = subprocess.run([sys.executable, "-m", "engine", "engine", "replay", str(recorded), "--run-dir", str(run)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: (run / "events.jsonl").exists() and len(read_events(run)) >= events, timeout=60,
             what=f"{events} events")
    return json.loads((run / "engine.json").read_text())


def stop(run: Path, info: dict) -> None:
    if engine_alive(info):
        if (run / "events.jsonl").is_dir():
            shutil.rmtree(run / "events.jsonl")
        with EngineClient(run) as c:
            c.send(Stop())


@contextlib.contextmanager
def its_log_a_folder(run: Path, recorded: Path):
    """A real engine serving ``recorded`` (its first 20 events stored), its events.jsonl then replaced by a
    folder while it runs; stopped at the end."""
    info = serve(run, recorded, 20)
    try:
        (run / "events.jsonl").unlink()
        (run / "events.jsonl").mkdir()
        yield
    finally:
        stop(run, info)


@pytest.fixture
def served(tmp_path):
    run = tmp_path / "served"
    info = serve(run, RECORDED, 21)
    yield run, info
    stop(run, info)


def history(info: dict, after: int) -> tuple[object, list[dict]]:
    """One signed history request: the engine's reply (within 5 s, or None) and the events it sent."""
    key = bytes.fromhex(info["key"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info["endpoints"]["control"])
    try:
        payload = msgspec.json.encode(Request(op="history", after=after, time=time.time(), nonce=os.urandom(8).hex()))
        sock.send_multipart([b"", payload, sign(key, payload)])
        if not sock.poll(5000):
            return None, []
        _, reply, *lines = sock.recv_multipart()
        return reply_decoder.decode(reply), [json.loads(line) for line in lines]
    finally:
        sock.close()


def push(info: dict, message: str) -> None:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(info["endpoints"]["worker_events"])
    sock.send(event_encoder.encode(Log(message=message)))
    sock.close()


def test_history_of_a_served_run_whose_file_was_edited(served):
    run, info = served
    path = run / "events.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    with open(path, "r+b") as f:  # lines 5 to 7 deleted in place (the engine appends to the same file)
        f.write(b"".join(line + b"\n" for i, line in enumerate(lines) if i not in (4, 5, 6)))
        f.truncate()
    for after in (0, 3, 4, 6, 10, 20, 21, 50):
        reply, events = history(info, after)
        assert reply is not None, f"no reply to history after {after}"
        assert reply.status == "ok" and [e["seq"] for e in events] == [s for s in range(1, 22)
                                                                       if s > after and s not in (5, 6, 7)]
    push(info, "after the edit")
    wait_for(lambda: history(info, 21)[1], timeout=20, what="the event pushed after the edit")
    reply, events = history(info, 20)
    assert [e["seq"] for e in events] == [21, 22] and events[-1]["message"] == "after the edit"
    with EngineClient(run) as c:  # the client's own history: what the file holds
        assert [e.seq for e in c.history()] == [s for s in range(1, 23) if s not in (5, 6, 7)]

    path.write_bytes(b"")  # `: > events.jsonl`
    for after in (0, 10, 22):
        reply, events = history(info, after)
        assert reply is not None and reply.status == "ok" and events == []
    push(info, "after emptying")
    wait_for(lambda: history(info, 0)[1], timeout=20, what="the event pushed after emptying")
    assert [e["seq"] for e in history(info, 0)[1]] == [23]

    kept = path.read_bytes()
    path.unlink()  # replaced (as sed -i does): the engine's appends go to the old file, the path names another
    path.write_bytes(kept + b"garbage\n" + lines[0] + b"\n")
    reply, events = history(info, 0)
    assert reply.status == "ok" and [e["seq"] for e in events] == [1, 23]
    path.unlink()
    path.mkdir()  # replaced by a folder: a clear error, at once
    reply, events = history(info, 0)
    assert reply is not None and reply.status == "error" and reply.reason == "events.jsonl unreadable: Is a directory"
    status = EngineClient(run, request_timeout=5)
    assert status.status().status == "ok"  # still serving
    status.close()
    log = (run / "engine.log").read_text()
    assert "handle failed" not in log and log.count("events.jsonl unreadable: Is a directory") == 1


def test_list_and_status_ask_the_engine_when_events_jsonl_cannot_say(tmp_path):
    """events.jsonl gone, emptied or replaced by a folder while the engine runs: `engine status` and `engine
    list` give the engine's own state and step (not `starting`), and say what became of the file; a
    history request gets an error that says it (the engine is fine)."""
    recorded = recording(tmp_path, RECORDED.read_bytes().splitlines(True)[:20])  # up to its last step: running
    run = tmp_path / "runs" / "live"
    info = serve(run, recorded, 20)
    path = run / "events.jsonl"
    kept = path.read_bytes()
    try:
        for how, said, history_says in (
                ("folder", "events.jsonl unreadable: Is a directory", "events.jsonl unreadable: Is a directory"),
                ("emptied", "events.jsonl empty", None), ("removed", "events.jsonl missing", "events.jsonl missing")):
            if how == "folder":
                path.unlink()
                path.mkdir()
            elif how == "emptied":
                path.write_bytes(b"")
            else:
                path.unlink()
            s = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
            assert (s["state"], s["step"], s["total_steps"], s["engine_answers"]) == ("running", 6, 6, True), (how, s)
            assert round(s["loss"], 4) == 9.6115 and s["engine_pid"] == info["pid"]
            assert s["message"] == s["problem"] + "; state and step from the engine" and s["problem"] == said
            text = voxtui("engine", "status", run, check=True).stdout
            assert f"message: {said}; state and step from the engine" in text and "answers: yes" in text
            listed = voxtui("engine", "list", "--runs", run.parent, check=True)
            row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("live"))
            assert row[1:4] == ["running", "6/6", "9.6115"], listed.stdout
            assert listed.stderr.strip() == f"note: live: {said}; state and step from the engine"
            reply, events = history(info, 0)
            assert reply is not None, how
            if history_says:
                assert (reply.status, reply.reason, reply.state) == ("error", history_says, "running")
            else:
                assert reply.status == "ok" and events == []
            if path.is_dir():
                path.rmdir()
            path.write_bytes(kept)
        s = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
        assert (s["state"], s["problem"], s["message"]) == ("running", "", "")  # the file says it again
        log = (run / "engine.log").read_text()
        assert "handle failed" not in log and "Traceback" not in log
    finally:
        stop(run, info)


def test_a_dashboard_says_the_event_log_is_unreadable_not_that_the_engine_is_lost(tmp_path):
    """events.jsonl replaced by a folder while the engine runs: a fresh `voxtui attach` got no history, and
    said ENGINE LOST though the engine answered. Now the banner says what is lost: the event log."""
    import asyncio

    from textual.widgets import Static

    from app.app import VoxApp
    from conftest import pilot_wait

    run = tmp_path / "runs" / "live"
    with its_log_a_folder(run, RECORDED):

        async def flow():
            app = VoxApp(str(run))
            async with app.run_test(size=(120, 30)) as pilot:
                banner = app.screen.query_one("#banner", Static)
                await pilot_wait(pilot, lambda: banner.display, timeout=20, every=0.1)
                return " ".join(str(banner.render()).split())

        said = asyncio.run(flow())
        assert said.startswith("EVENT LOG UNREADABLE — the engine answers, but cannot serve the run's events: "
                               "events.jsonl unreadable: Is a directory"), said
        assert "ENGINE LOST" not in said


@pytest.mark.parametrize("how", ["folder", "removed"])
def test_a_dashboard_shows_the_engines_state_and_step_where_the_event_log_is_unreadable(tmp_path, how):
    """A fresh attach while events.jsonl is a folder (or removed) and the engine runs: the banner said so, but
    the run read NEW at step 0. Now the state, step, loss and total steps are the engine's status reply's, and
    the Overview says they come from it; once the file is back, the events say it again."""
    import asyncio

    from textual.widgets import Static

    from app.app import VoxApp
    from conftest import pilot_wait

    recorded = recording(tmp_path, RECORDED.read_bytes().splitlines(True)[:20])  # up to its last step: running
    run = tmp_path / "runs" / "live"
    info = serve(run, recorded, 20)
    path = run / "events.jsonl"
    kept = path.read_bytes()
    try:
        path.unlink()
        if how == "folder":
            path.mkdir()

        def text(screen, widget: str) -> str:
            return " ".join(str(screen.query_one(widget, Static).render()).split())

        async def flow():
            app = VoxApp(str(run))
            async with app.run_test(size=(120, 30)) as pilot:
                screen = app.screen
                await pilot_wait(pilot, lambda: screen.query_one("#banner", Static).display
                                 and app.state.from_engine_status and "RUNNING" in text(screen, "#ov-state"),
                                 timeout=30, every=0.1)
                said = {"banner": text(screen, "#banner"), "state": text(screen, "#ov-state"),
                        "step": text(screen, "#ov-step"), "sub_title": screen.sub_title,
                        "values": (app.state.state, app.state.step, app.state.total_steps, app.state.loss)}
                if path.is_dir():
                    path.rmdir()
                path.write_bytes(kept)  # the file is back: history is served again, the events say the rest
                await pilot_wait(pilot, lambda: app.state.last_seq >= 20 and not screen.query_one("#banner", Static).display,
                                 timeout=30, every=0.1)
                await pilot.pause(0.3)
                said["after"] = (app.state.from_engine_status, app.state.engine_status, app.state.state, app.state.step,
                                 text(screen, "#ov-state"), text(screen, "#ov-step"))
                return said

        said = asyncio.run(flow())
        reason = "events.jsonl unreadable: Is a directory" if how == "folder" else "events.jsonl missing"
        assert said["banner"] == (f"EVENT LOG UNREADABLE — the engine answers, but cannot serve the run's events: {reason} "
                                  "(the state, step and loss shown are the engine's status; the rest is what was read); "
                                  "retrying…"), said
        state, step, total, loss = said["values"]
        assert (state, step, total, round(loss, 4)) == ("running", 6, 6, 9.6115), said
        assert said["sub_title"] == "running"
        assert said["state"] == "live RUNNING state, step and loss from the engine's status, not the event log", said
        assert said["step"].startswith("step 6/6 ") and "loss 9.6115" in said["step"], said
        assert "NEW" not in said["state"] and "step 0/" not in said["step"]
        from_engine, engine_status, state, step, state_line, step_line = said["after"]
        assert (from_engine, engine_status, state, step) == (False, None, "running", 6), said
        assert state_line == "live RUNNING" and step_line.startswith("step 6/6 ") and "loss 9.6115" in step_line, said
    finally:
        stop(run, info)


def test_a_client_asks_once_for_events_the_file_no_longer_holds(served):
    """The file's last lines deleted while the engine runs: its heartbeats announce events history cannot
    serve; the client asked for them again at every heartbeat (once a second, for good). Now once."""
    run, info = served
    path = run / "events.jsonl"
    lines = path.read_bytes().splitlines(True)
    path.write_bytes(b"".join(lines[:-3]))  # in place: the inode the engine appends to stays
    last = json.loads(lines[-4])["seq"]
    client = EngineClient(run)
    try:
        client.last = last
        asked = []
        real = client._history_after

        def counting(after):
            asked.append(after)
            return real(after)

        client._history_after = counting
        assert list(client.events(timeout=3.5)) == []  # nothing new is stored meanwhile
        assert asked == [last], asked  # heartbeats come every second: asked once, not at each
    finally:
        client.close()


def test_events_go_to_the_file_the_path_names_now(served):
    """events.jsonl replaced (`sed -i`, a restored copy) or removed while the engine runs: the engine went on
    appending to the file it had open — replaced, its events never reached the file everyone reads; removed,
    they were lost with the engine's end. Now they go to the path's file (a new one where it was removed)."""
    run, info = served
    path = run / "events.jsonl"
    kept = path.read_bytes()
    path.unlink()
    path.write_bytes(kept)  # another file (inode) under the same name
    push(info, "after the replacement")
    wait_for(lambda: b"after the replacement" in path.read_bytes(), timeout=20, what="the event in the new file")
    assert [json.loads(line)["seq"] for line in path.read_bytes().splitlines()][-1] == 22
    reply, events = history(info, 21)
    assert reply.status == "ok" and [e["message"] for e in events] == ["after the replacement"]

    path.unlink()  # removed: a new file holds what comes after
    push(info, "after the removal")
    wait_for(lambda: path.is_file() and b"after the removal" in path.read_bytes(), timeout=20,
             what="the event in a new file")
    assert [json.loads(line)["seq"] for line in path.read_bytes().splitlines()] == [23]
    with EngineClient(run) as c:
        assert [e.message for e in c.history()] == ["after the removal"]


def test_a_run_folder_named_with_a_byte_that_is_no_utf8_is_served(tmp_path):
    """A folder name holding a byte that is no UTF-8 (a copy, a rename): every event the engine stored failed
    to encode (the name is in each). Its events carry the name with U+FFFD for that byte."""
    run = Path(os.fsdecode(os.fsencode(tmp_path) + b"/runs/bad\xff"))
    info = serve(run, RECORDED, 20)
    try:
        events = read_events(run)
        assert len(events) >= 20 and {e["run"] for e in events} == {"bad\ufffd"}
        listed = voxtui("engine", "list", "--runs", run.parent, check=True).stdout
        assert "bad\\udcff" in listed or "bad\\xff" in listed or "bad\ufffd" in listed, listed
    finally:
        stop(run, info)


def test_the_run_picker_asks_the_engine_where_the_event_log_is_unreadable(tmp_path):
    """`voxtui attach` without a run: the picker listed a live run whose events.jsonl is a folder as
    `starting`, step 0 (it read the files alone). Now, as `engine list`, it asks the engine: running, step 6."""
    import asyncio

    from textual.widgets import DataTable

    from app.app import VoxApp
    from conftest import pilot_wait

    recorded = recording(tmp_path, RECORDED.read_bytes().splitlines(True)[:20])  # up to its last step: running
    run = tmp_path / "runs" / "live"
    with its_log_a_folder(run, recorded):

        def row(app):
            table = app.screen.query_one(DataTable)
            return [str(c) for c in table.get_row_at(0)] if table.row_count else []

        async def flow():
            app = VoxApp(None, str(run.parent))
            async with app.run_test(size=(160, 30)) as pilot:
                await pilot_wait(pilot, lambda: "running" in row(app), timeout=20, every=0.1)
                return row(app)

        cells = asyncio.run(flow())
        assert cells[:2] == ["live", "running"] and "6" in cells and "9.6115" in cells, cells


@pytest.mark.parametrize("lines,state,outcome", [(None, "finished", "early_stopped"), (20, "stopped", "stopped")])
def test_a_stopped_replay_ends_as_recorded(tmp_path, lines, state, outcome):
    """`engine stop` on a replay said "the workers save a checkpoint first", then "stopped", while the run read
    finished with its recorded outcome wiped and step 0. Now a replay of a run that ended ends as it did (its
    state, outcome and step as recorded) and one cut short ends as a run stopped on request, at its last step;
    the command says a replay saves nothing, and names the state it ended in."""
    kept = RECORDED.read_bytes().splitlines(True)
    if lines:
        kept = kept[:lines]
    else:  # the recording ended by early stopping
        last = json.loads(kept[-1])
        assert last["type"] == "status" and last["state"] == "finished"
        kept[-1] = json.dumps({**last, "outcome": "early_stopped"}).encode() + b"\n"
    recorded = recording(tmp_path, kept)
    run = tmp_path / "runs" / "replayed"
    info = serve(run, recorded, lines or 21)
    try:
        proc = voxtui("engine", "stop", run, "--wait", "60")
        assert proc.returncode == 0, proc.stderr
        assert "stopping (a replay: nothing trains, nothing to save)" in proc.stderr, proc.stderr
        assert proc.stdout.strip() == f"{run}: {state}", proc.stdout
        last = [e for e in read_events(run) if e["type"] == "status"][-1]
        assert (last["state"], last["outcome"], last["step"]) == ("finished", outcome, 6), last
        s = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
        assert (s["state"], s["step"]) == (state, 6), s
    finally:
        stop(run, info)


def test_a_full_disk_keeps_the_events_in_memory_and_the_file_gapless(tmp_path, monkeypatch, capsys):
    """events.jsonl that takes no line (ENOSPC, injected: the store's one write) costs no event and no traceback per
    event in engine.log: one line and an alert say it, the events are published and served from memory meanwhile,
    and once it takes lines again they are written in order, seq gapless (it lost 129–137 to a full disk)."""
    import errno

    from engine import eventlog
    from engine.daemon import engine as daemon

    class FullDisk:
        """``os`` as the event log's writer sees it, on a disk with 30 bytes left: a short write, then ENOSPC."""
        room = 30

        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            n = min(len(data), self.room)
            if not n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return os.write(fd, data[:n])

    run = tmp_path / "runs" / "full"
    e = daemon.Engine(run)
    e.open()
    try:
        e.emit(Log(message="before"))
        monkeypatch.setattr(eventlog, "os", FullDisk())
        for i in range(5):
            e.emit(Log(message=f"while full {i}"))
        e._tick(time.monotonic())  # tried again each second: still full
        assert [ev["message"] for ev in read_events(run)] == ["before"]
        lines, last, more = e.log.read(0, 100)
        assert [json.loads(x)["seq"] for x in lines] == list(range(1, 8)) and last == 7 and not more
        said = capsys.readouterr().err
        assert said.count("engine: events.jsonl cannot be written (No space left on device)") == 1, said
        assert "Traceback" not in said
        monkeypatch.setattr(eventlog, "os", os)  # space again
        e._tick(time.monotonic())
        events = read_events(run)
        assert [ev["seq"] for ev in events] == list(range(1, len(events) + 1)) and len(events) == 8
        kinds = [(ev["type"], ev.get("kind")) for ev in events]
        assert kinds[2] == ("alert", "event_log") and kinds[-1] == ("alert", "event_log")
        assert "No space left on device" in events[2]["message"] and events[1]["message"] == "while full 0"
        assert "written again" in events[-1]["message"] and "engine: events.jsonl written again" in capsys.readouterr().err
    finally:
        e.close()
