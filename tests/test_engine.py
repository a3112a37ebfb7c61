"""The engine with real ZeroMQ, real torchrun (2 gloo ranks) and the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time

import msgspec
import psutil
import pytest
import zmq

from conftest import descendants_of, read_events, start_detached, voxtui, wait_for, write_jsonl
from engine.client import EngineClient, engine_alive
from engine.protocol import Request, SetPreviewParams, Stop, reply_decoder
from engine.session import sign


def rows(n):
    return [{"instruction": f"Capital of region {i}?", "output": f"Region {i} has capital city {i * 3}."} for i in range(n)]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("edata") / "t.jsonl", rows(64))


def last_state(run):
    """The state of the last event when it is a status (one read of the file: it grows meanwhile)."""
    last = read_events(run)[-1]
    return last["state"] if last["type"] == "status" else None


def gone(pids):
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


def test_late_attach_history_then_live_commands_and_finish(tmp_path, tiny_model, train_file):
    run = start_detached(tiny_model, tmp_path / "runs", "relay", train_file, max_steps=40, save_steps=10,
                         preview_steps=10, preview_file=train_file, preview_count=2, max_new_tokens=4)
    info = json.loads((run / "engine.json").read_text())
    assert oct((run / "engine.json").stat().st_mode)[-3:] == "600" and oct(run.stat().st_mode)[-3:] == "700"
    assert len(info["key"]) == 64 and engine_alive(info)
    wait_for(lambda: (run / "events.jsonl").exists() and any(e["type"] == "step" for e in read_events(run)))
    client = EngineClient(run)
    history = client.history()
    assert [e.seq for e in history] == list(range(1, len(history) + 1)) and history
    assert client.send(SetPreviewParams(temperature=3.0)).status == "error"
    ok = client.send(SetPreviewParams(id="t0", temperature=0.0, top_p=0.5))
    assert ok.status == "ok" and ok.id == "t0"
    assert client.send(SetPreviewParams(id="t0", temperature=0.0, top_p=0.5)) == ok  # a retry: applied once
    live = []
    for ev in client.events(timeout=120):
        live.append(ev)
        if ev.type == "status" and ev.state in ("finished", "failed"):
            break
    seqs = [e.seq for e in history + live]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate
    assert live[-1].state == "finished"
    acks = [e for e in live if e.type == "ack" and e.id == "t0"]
    assert len(acks) == 1
    later = [e for e in live if e.type == "preview" and e.step > acks[0].step]
    assert later and all(e.temperature == 0.0 and e.top_p == 0.5 for e in later)
    # what clients saw is exactly events.jsonl
    assert [e["seq"] for e in read_events(run)] == seqs
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=30)
    # a client of a finished run reads the file
    again = EngineClient(run)
    assert [e.seq for e in again.history()] == seqs and not again.live
    listing = voxtui("engine", "list", "--runs", tmp_path / "runs", check=True).stdout
    assert "relay" in listing and "finished" in listing and " 40/40 " in listing  # step of total steps
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "finished" and status["step"] == 40


def test_kill_one_rank(tmp_path, tiny_model, train_file):
    """A rank stopped (SIGSTOP) holds the other at the next gradient sync: said after VOXTUI_RANK_STOPPED_S
    (10 s by default: before, nothing until the 10-minute stall alert), with what continues it, and said
    again when it runs. Then a rank killed: named at once, the run fails, the checkpoint loads."""
    run = start_detached(tiny_model, tmp_path / "runs", "kill", train_file, max_steps=100000, save_steps=3,
                         env={"VOXTUI_RANK_STOPPED_S": "1"})
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: (run / "checkpoints" / "checkpoint-3").is_dir())
    engine_tree = [info["pid"]] + descendants_of(info["pid"])
    ranks = {}
    for pid in descendants_of(info["pid"]):
        try:
            env = psutil.Process(pid).environ()
        except psutil.Error:
            continue
        if "RANK" in env and "LOCAL_RANK" in env and psutil.Process(pid).name().startswith("python"):
            ranks[int(env["RANK"])] = pid
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        stopped = wait_for(lambda: next((e for e in read_events(run) if e["type"] == "alert"
                                         and e["kind"] == "rank_stopped"), None), timeout=30)
    finally:
        os.kill(ranks[1], signal.SIGCONT)
    assert stopped["rank"] == 1 and stopped["level"] == "warning" and stopped["message"].startswith(
        f"rank 1 (pid {ranks[1]}) is stopped (SIGSTOP, Ctrl-Z or a debugger) for ")
    assert stopped["message"].endswith(f"s: the other ranks wait for it; continue it: kill -CONT {ranks[1]}")
    going = wait_for(lambda: next((e for e in read_events(run) if e["type"] == "alert"
                                   and e["kind"] == "rank_continued"), None), timeout=30)
    assert going["rank"] == 1 and going["message"] == f"rank 1 (pid {ranks[1]}) runs again"
    assert last_state(run) != "failed"
    killed = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    alert = wait_for(lambda: next((e for e in read_events(run) if e["type"] == "alert" and e["kind"] == "rank_died"), None),
                     timeout=30)
    assert alert["rank"] == 1 and time.time() - killed < 30
    assert "killed by SIGKILL" in alert["message"]  # how it ended, read from /proc before torchrun reaped it
    wait_for(lambda: last_state(run) == "failed", timeout=30)
    wait_for(lambda: gone(engine_tree), timeout=30)  # engine, torchrun and every rank: nothing left behind
    from engine.worker.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    PeftModel.from_pretrained(VoxtralForConditionalGeneration.from_pretrained(tiny_model), ckpt)
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "failed"


def test_torchrun_killed_fails_the_run_and_its_workers_save(tmp_path, tiny_model, train_file):
    """torchrun itself killed (kill -9, or the out-of-memory killer) while its workers train: the run fails
    with an alert that says so — the workers, stopped next by the engine's SIGTERM, save first and report
    "stopped on request", which once made the run read as stopped on request, with no alert, and then (the
    failure following) still recorded "stop requested: saving" and a finished status, outcome stopped: now
    recorded as what it is."""
    run = start_detached(tiny_model, tmp_path / "runs", "torchrun", train_file, nproc=1, max_steps=100000,
                         save_steps=0)
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: sum(e["type"] == "step" for e in read_events(run)) >= 2)
    torchrun = next(p for p in psutil.Process(info["pid"]).children()
                    if "torch.distributed.run" in " ".join(p.cmdline()))
    engine_tree = [info["pid"]] + descendants_of(info["pid"])
    os.kill(torchrun.pid, signal.SIGKILL)
    wait_for(lambda: last_state(run) == "failed", timeout=60)
    events = read_events(run)
    alerts = [e for e in events if e["type"] == "alert" and e["kind"] == "torchrun_died"]
    assert len(alerts) == 1 and f"torchrun (pid {torchrun.pid}) was killed by SIGKILL" in alerts[0]["message"]
    assert "voxtui run --resume" in alerts[0]["message"]
    assert not any(e["type"] == "alert" and e["kind"] == "rank_died" for e in events)
    statuses = [e for e in events if e["type"] == "status"]
    assert not any(e["state"] == "finished" or e["outcome"] == "stopped" or "request" in e["message"]
                   for e in statuses), statuses
    after = statuses[[e["seq"] for e in statuses].index(next(e["seq"] for e in statuses if e["seq"] > alerts[0]["seq"])):]
    assert [e["message"] for e in after[:-1]] == [
        "torchrun was killed by SIGKILL: the workers save, then stop",
        f"saved at step {after[1]['step']} after torchrun was killed by SIGKILL; the run fails"], after
    assert after[-1]["state"] == "failed"
    log = (run / "engine.log").read_text()
    assert "[stopping] torchrun was killed by SIGKILL: the workers save, then stop" in log and "[stopped]" not in log
    wait_for(lambda: gone(engine_tree), timeout=30)
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "failed" and "torchrun was killed by SIGKILL" in status["message"]
    from engine.worker.checkpoint import latest_checkpoint

    assert latest_checkpoint(run / "checkpoints") is not None  # the workers saved on their way out


def test_engine_killed_then_resume(tmp_path, tiny_model, train_file):
    """Steps trained while no engine listens are kept (the workers' spool) and stored, in order, by the
    next engine, after an event that records the crash; every command reports the true state."""
    run = start_detached(tiny_model, tmp_path / "runs", "orphan", train_file, nproc=1, max_steps=100000, save_steps=0,
                         env={"VOXTUI_ENGINE_TIMEOUT": "4"})
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: sum(e["type"] == "step" for e in read_events(run)) >= 2)
    assert json.loads(voxtui("engine", "status", run, "--json", "-").stdout)["state"] == "running"
    # a detached engine's engine.log holds the lines a foreground one prints, each written as it happens
    first = (run / "engine.log").read_text().splitlines()
    assert first[0].startswith(f"[starting] engine {info['pid']} started torchrun ") and "[running]" in first, first
    assert any(line.startswith("step 1: loss ") for line in first), first
    workers = descendants_of(info["pid"])
    os.kill(info["pid"], signal.SIGKILL)
    stored_before = max(e["step"] for e in read_events(run) if e["type"] == "step")
    # the workers notice the engine is gone, save at the next step boundary, and exit
    wait_for(lambda: gone(workers), timeout=90)
    from engine.worker.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert step > stored_before  # they trained on for a few steps with nobody listening
    status = json.loads(voxtui("engine", "status", run, "--json", "-").stdout)
    assert status["state"] == "crashed" and status["step"] == step and status["checkpoint"] == str(ckpt)
    assert "crashed" in voxtui("engine", "list", "--runs", run.parent, check=True).stdout
    proc = voxtui("run", "--resume", run, "--max_steps", str(step + 3), "--detach", "--skip_preflight")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: last_state(run) == "finished", timeout=180)
    events = read_events(run)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    lost = next(i for i, e in enumerate(events) if e["type"] == "alert" and e["kind"] == "engine_lost")
    assert all(e["type"] != "step" or e["step"] <= stored_before for e in events[:lost])
    orphaned = [e for e in events[lost:] if e.get("worker") == events[lost + 1]["worker"]]
    assert [e["step"] for e in orphaned if e["type"] == "step"] == list(range(stored_before + 1, step + 1))
    assert [e["wseq"] for e in orphaned] == sorted(e["wseq"] for e in orphaned)
    assert orphaned[-1]["type"] == "status" and orphaned[-1]["outcome"] == "engine_lost"
    trained = {e["step"] for e in events if e["type"] == "step"}
    assert trained == set(range(1, step + 4))  # every trained step is in the record
    assert json.loads(voxtui("engine", "status", run, "--json", "-").stdout)["state"] == "finished"
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=30)
    assert not (run / "spool").exists()  # stored, then removed
    # the resumed engine appends its own lines: its start, where it resumed, the outcome
    log = (run / "engine.log").read_text().splitlines()
    assert log[:len(first)] == first
    second = [line for line in log if line.startswith("[starting] engine ")][1:]
    assert len(second) == 1 and f"[running] resumed from checkpoint-{step} at step {step}" in "\n".join(log)
    assert log[-1] == "[finished] done"


def test_an_engine_stopped_past_its_workers_patience_reads_crashed_in_list_and_status(tmp_path, tiny_model,
                                                                                      train_file):
    """The engine stopped (SIGSTOP) until its workers give up on it (they save and stop, spooling their last
    events): `engine status` and `engine list` both say crashed at the step the workers reached (status once
    said finished from their spool, list running at the last step stored); woken, the engine stores their
    record and leaves, its line for their end [crashed], not [finished]."""
    from engine.worker.checkpoint import latest_checkpoint

    run = start_detached(tiny_model, tmp_path / "runs", "stalled", train_file, nproc=1, max_steps=100000, save_steps=0,
                         env={"VOXTUI_ENGINE_TIMEOUT": "4"})
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: sum(e["type"] == "step" for e in read_events(run)) >= 2)
    workers = descendants_of(info["pid"])
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: gone(workers), timeout=90)
        stored = max(e["step"] for e in read_events(run) if e["type"] == "step")
        status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
        listed = voxtui("engine", "list", "--runs", run.parent, check=True)
        listing = listed.stdout
    finally:
        os.kill(info["pid"], signal.SIGCONT)
    # the list says its engine does not answer (it showed the state with no sign of it)
    assert f"note: stalled: its engine (pid {info['pid']}) does not answer (stopped with SIGSTOP? kill -CONT " \
        f"{info['pid']}; hung?)" in listed.stderr, listed.stderr
    step = json.loads((latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())["step"]
    assert step > stored  # the workers trained on, unstored, before they gave up
    assert (status["state"], status["outcome"], status["step"], status["engine_answers"]) == (
        "crashed", "engine_lost", step, False), status
    assert status["message"] == (f"the engine does not answer: its workers' own record (their spool, not yet "
                                 f"stored) says step {step}, crashed: the engine went away: saved and stopped")
    row = next(line for line in listing.splitlines() if line.startswith("stalled "))
    assert row.split()[1:3] == ["crashed", f"{step}/100000"], listing
    wait_for(lambda: not engine_alive(info), timeout=60)  # woken: it stores their record, and leaves
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert (status["state"], status["step"]) == ("crashed", step)
    log = (run / "engine.log").read_text().splitlines()
    assert log[-1] == "[crashed] the engine went away: saved and stopped", log[-3:]


def test_a_finished_run_whose_last_line_was_torn_reads_finished_not_a_crash_to_resume(tmp_path, tiny_model,
                                                                                      train_file):
    """A finished run whose events.jsonl lost its final status to a torn last line (`truncate -s -37`): every
    step trained and lora_final saved, `--resume` refuses it (nothing to resume); `engine list`, `engine status`
    and the dashboard say finished, and how it was known — they once said crashed, suggesting that resume."""
    import asyncio

    from app.app import VoxApp
    from conftest import pilot_wait

    run = start_detached(tiny_model, tmp_path / "runs", "torn", train_file, nproc=1, max_steps=4, save_steps=0)
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: not engine_alive(info), timeout=120)
    assert (run / "lora_final").is_dir() and last_state(run) == "finished"
    with open(run / "events.jsonl", "r+b") as f:
        f.truncate(f.seek(0, 2) - 37)
    assert last_state(run) != "finished"
    assert "nothing to resume" in voxtui("run", "--resume", run, "--skip_preflight").stderr
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert (status["state"], status["step"], status["total_steps"]) == ("finished", 4, 4), status
    assert status["message"] == ("events.jsonl holds no final status (its last line cut?), but all 4 steps were "
                                 "trained and lora_final/ was saved")
    row = next(line for line in voxtui("engine", "list", "--runs", run.parent, check=True).stdout.splitlines()
               if line.startswith("torn "))
    assert row.split()[1:3] == ["finished", "4/4"], row

    async def shown():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.disk_final and app.state.engine_live is False, timeout=30)
            await pilot.pause(0.3)
            return app.state.shown_state, app.screen.banner_text()

    state, banner = asyncio.run(shown())
    assert (state, banner) == ("finished", None), banner


def test_workers_that_outlive_their_engine_are_shown_and_engine_stop_stops_them(tmp_path, tiny_model, train_file):
    """The engine killed, its workers (both ranks) go on training, unseen by any engine, until they miss its
    heartbeat: `engine status`, `engine list` and the dashboard's banner name every rank's (rank 0 alone
    spools, the other is found beside it under torchrun); `engine stop` reaches them (SIGTERM: they save,
    then exit), and the run then reads as stopped, at the step they saved."""
    import asyncio

    from app.app import VoxApp
    from conftest import pilot_wait

    run = start_detached(tiny_model, tmp_path / "runs", "unseen", train_file, nproc=2, max_steps=100000,
                         save_steps=0, env={"VOXTUI_ENGINE_TIMEOUT": "600"})
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: any(e["type"] == "step" for e in read_events(run)))
    workers = [p for p in descendants_of(info["pid"]) if "engine.train" in " ".join(psutil.Process(p).cmdline())]
    ranks = {int(psutil.Process(p).environ()["RANK"]): p for p in workers if "RANK" in psutil.Process(p).environ()}
    assert set(ranks) == {0, 1}
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=30)
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "crashed" and status["worker_pids"] == [ranks[0], ranks[1]], (status, ranks)
    assert status["message"].startswith(f"the engine went away; its workers (pid {ranks[0]}, {ranks[1]}) are still "
                                        "training, unseen by any engine, until they miss its heartbeat")
    assert f"voxtui engine stop {run}" in status["message"]

    async def banner():
        app = VoxApp(str(run))
        async with app.run_test(size=(160, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.orphans, timeout=30, every=0.1)
            return app.screen.banner_text().plain

    text = asyncio.run(banner())
    assert f"its workers (pid {ranks[0]}, {ranks[1]}) are still training, unseen by any engine" in text, text
    assert "voxtui engine stop" in text, text
    proc = voxtui("engine", "stop", run, "--wait", "60")
    assert proc.returncode == 0, proc.stderr
    assert f"its workers (pid {ranks[0]}, {ranks[1]}) are stopping" in proc.stderr and "stopped (stopped)" in proc.stdout
    wait_for(lambda: gone(workers), timeout=30)  # rank 0 at once, torchrun a moment later
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    from engine.worker.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    assert status["state"] == "stopped" and status["worker_pids"] == [] and status["checkpoint"] == str(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == status["step"]


def test_workers_that_finish_the_run_after_their_engine_was_killed(tmp_path, tiny_model, train_file):
    """The engine killed a few steps before the end: its workers train the last steps alone and finish
    (they wait 60 s for an engine). None comes back to store what they spooled, so the first reader that
    finds them all gone stores it: `engine status` and `engine list` say finished with every step, the
    record holds each step once after one engine_lost alert, and a later resume says it no second time."""
    # --min_lr_ratio above 0: the finished run extended below trains on at that floor (at 0 it is refused)
    run = start_detached(tiny_model, tmp_path / "runs", "sprint", train_file, nproc=1, max_steps=30, save_steps=0,
                         min_lr_ratio=0.1, env={"VOXTUI_ENGINE_TIMEOUT": "60"})
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: sum(e["type"] == "step" for e in read_events(run)) >= 3)
    workers = descendants_of(info["pid"])
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: gone(workers), timeout=120, what="the workers to finish alone")
    assert max(e["step"] for e in read_events(run) if e["type"] == "step") < 30  # not stored: no engine
    assert (run / "spool").is_dir()
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "finished" and status["step"] == 30
    events = read_events(run)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sorted(e["step"] for e in events if e["type"] == "step") == list(range(1, 31))
    assert [e["kind"] for e in events if e["type"] == "alert"] == ["engine_lost"]
    assert events[-1]["type"] == "status" and events[-1]["state"] == "finished"
    assert not (run / "spool").exists()
    assert "finished" in voxtui("engine", "list", "--runs", run.parent, check=True).stdout
    assert read_events(run) == events  # read again: nothing stored twice
    proc = voxtui("run", "--resume", run, "--max_steps", "32", "--detach", "--skip_preflight")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: last_state(run) == "finished" and len(read_events(run)) > len(events), timeout=180)
    events = read_events(run)
    assert sorted(e["step"] for e in events if e["type"] == "step") == list(range(1, 33))
    assert [e["kind"] for e in events if e["type"] == "alert" and e["kind"] == "engine_lost"] == ["engine_lost"]


def test_malformed_unauthenticated_and_replayed_requests(tmp_path, tiny_model, train_file):
    run = start_detached(tiny_model, tmp_path / "runs", "fuzz", train_file, nproc=1, max_steps=100000)
    info = json.loads((run / "engine.json").read_text())
    key = bytes.fromhex(info["key"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info["endpoints"]["control"])

    def ask(*frames):
        sock.send_multipart([b"", *frames])
        assert sock.poll(5000), "the engine did not answer"
        return reply_decoder.decode(sock.recv_multipart()[1])

    good = msgspec.json.encode(Request(op="status", time=time.time(), nonce="nonce-0001"))
    assert ask(good, b"0" * 64).reason.startswith("unauthenticated")
    assert ask(good).status == "error"  # a missing signature frame
    assert ask(good, sign(key, good)).status == "ok"
    assert ask(good, sign(key, good)).reason == "replayed request"
    stale = msgspec.json.encode(Request(op="status", time=time.time() - 3600, nonce="nonce-0002"))
    assert "stale" in ask(stale, sign(key, stale)).reason
    import random

    rng = random.Random(0)
    for _ in range(200):  # random bytes, truncated JSON, wrong types, unknown fields: an error reply each
        junk = rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
                           b'{"op": "command", "command": {"type": "stop"', b'{"op": 3}',
                           b'{"op": "command", "command": {"type": "set_preview_params", "temperature": "hot"}}',
                           b'{"op": "status", "evil": 1}'])
        assert ask(junk, sign(key, junk)).status == "error"
    sock.send_multipart([b"", b"x" * (2 << 20), b"sig"])  # over the size cap: dropped, never a crash
    heartbeat = msgspec.json.encode(Request(op="command", command=Stop(id="s"), time=time.time(), nonce="nonce-0003"))
    assert ask(heartbeat, sign(key, heartbeat)).status == "ok"  # the engine still serves
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=120)
    sock.close()


def test_slow_client_and_lost_engine(tmp_path, tiny_model, train_file):
    """A client stopped with SIGSTOP does not slow training or grow the engine; a client notices a
    dead engine within about 3 s."""
    import statistics
    import subprocess
    import sys

    from conftest import ROOT
    from engine.client import EngineLost

    run = start_detached(tiny_model, tmp_path / "runs", "slow", train_file, nproc=1, max_steps=100000,
                         telemetry_interval=0.05)
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: sum(e["type"] == "step" for e in read_events(run)) >= 5)
    reader = subprocess.Popen([sys.executable, "-c", f"from engine.client import EngineClient\n"
                               f"for ev in EngineClient({str(run)!r}).events(): pass"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(5)  # a baseline of several seconds: a busy machine's load moves step times around
    engine = psutil.Process(info["pid"])
    rss_before = engine.memory_info().rss

    def step_times():
        return [e["step_time"] for e in read_events(run) if e["type"] == "step"]

    n_before = len(step_times())
    os.kill(reader.pid, signal.SIGSTOP)
    time.sleep(12)
    during = step_times()[n_before:]
    rss_during = engine.memory_info().rss
    os.kill(reader.pid, signal.SIGCONT)
    reader.kill()
    before = step_times()[2:n_before]
    assert len(during) >= 5
    # a client the engine waited for would stall training (no steps, or steps many times longer)
    assert statistics.median(during) < 2.0 * statistics.median(before)
    assert rss_during - rss_before < 64 * 2**20  # bounded: the engine drops what a stopped client cannot take

    client = EngineClient(run)
    client.history()
    workers = descendants_of(info["pid"])
    os.kill(info["pid"], signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(EngineLost):
        for _ in client.events():
            pass
    assert time.time() - t0 < 6
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_nodes_on_one_machine(tmp_path, tiny_model, train_file):
    """Torchrun's own rendezvous passes through: the engine's agent is node 0, a second agent node 1."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT, train_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "runs" / "nodes"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", *train_args(tiny_model, run, train_file, max_steps=6),
                           "--nproc", "1", "--nnodes", "2", "--rdzv_endpoint", f"127.0.0.1:{port}", "--detach",
                           "--skip_preflight"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hint = next(line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("torchrun"))
    args = hint.replace("--node_rank k", "--node_rank 1").split()[1:]
    node1 = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=180)
    assert node1.returncode == 0, node1.stdout + node1.stderr
    wait_for(lambda: read_events(run)[-1].get("state") == "finished", timeout=60)
    info = next(e for e in read_events(run) if e["type"] == "run_info")
    assert info["world_size"] == 2


def test_remote_clients_need_curve(tmp_path, tiny_model, train_file):
    import socket
    import subprocess
    import sys

    from conftest import ROOT, train_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VOXTUI_STEP_PAUSE": "0.1"}
    run = tmp_path / "runs" / "remote"
    proc = subprocess.run([sys.executable, "-m", "engine", "run", *train_args(tiny_model, run, train_file, max_steps=100000),
                           "--nproc", "1", "--listen", f"tcp://127.0.0.1:{port}", "--detach", "--skip_preflight"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run / "engine.json").read_text())
    assert info["remote"]["events"].endswith(f":{port}") and info["remote"]["control"].endswith(f":{port + 1}")
    wait_for(lambda: any(e["type"] == "step" for e in read_events(run)))
    # a plain (unencrypted) subscriber gets nothing
    plain = zmq.Context.instance().socket(zmq.SUB)
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(info["remote"]["events"])
    assert not plain.poll(2500)
    plain.close()
    # a CURVE client with a key the engine does not know gets nothing either
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    stranger.curve_serverkey = info["remote"]["server_public"].encode()
    stranger.curve_publickey, stranger.curve_secretkey = pub, sec
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(info["remote"]["control"])
    stranger.send_multipart([b"", b"{}", b"sig"])
    assert not stranger.poll(2500)
    stranger.close()
    # with the keys from engine.json: history, live events and commands
    client = EngineClient(run, remote=True)
    history = client.history()
    assert history[0].seq == 1
    ev = next(client.events(timeout=30))  # the live stream continues right after the history
    assert ev.seq == history[-1].seq + 1
    assert client.send(Stop()).status == "ok"
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=120)


def foreground(*args: str) -> subprocess.CompletedProcess:
    """`voxtui run` in the foreground (its engine prints a line per status, checkpoint, tenth step)."""
    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine", "run", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


# a completed run's schedule ends at 0 with --min_lr_ratio 0 (the default), and an extended run goes on from there
DECAYED = ("its learning rate has decayed to 0 (--min_lr_ratio 0), so more steps would change nothing: start a new "
           "run (or give it more steps and --min_lr_ratio above 0)")


def test_resume_of_a_finished_run_is_refused_before_anything_starts(tmp_path, tiny_model, train_file):
    """`voxtui run --resume` of a run that has trained all its steps would only evaluate and save the same
    checkpoint again: it is one line and exit 2 before any engine starts, and nothing in the run folder
    changes (a larger --max_steps resumes it: tests/test_runner.py)."""
    from conftest import ROOT, digest, train_args, worker

    run = tmp_path / "runs" / "done"
    # given as a relative path (foreground runs from ROOT): the run's folder is saved and reported absolute,
    # as a resumed run's is, so a checkpoint's path reads the same before and after a resume
    first = foreground(*train_args(tiny_model, os.path.relpath(run, ROOT), train_file, max_steps=4), "--nproc", "1",
                       "--skip_preflight")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "[finished] done"
    assert f'output_dir = "{run}"' in (run / "config.toml").read_text()
    saved = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["path"] for e in saved if e.get("type") == "checkpoint"] == [str(run / "checkpoints" / "checkpoint-4")]
    files = [run / "events.jsonl", run / "engine.json", run / "config.toml",
             run / "checkpoints" / "checkpoint-4" / "trainer_state.json"]
    before = [digest(p) for p in files]
    for flags in ((), ("--epochs", "3"), ("--skip_preflight",)):  # --epochs: --max_steps rules
        refused = voxtui("run", "--resume", run, *flags)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"voxtui: error: {run} finished all its 4 steps (completed); nothing to resume — {DECAYED}"), (
            flags, refused.stderr)
        assert refused.stdout == ""
    # the worker started alone (torchrun -m engine.train --resume RUN) refuses it the same way, before it
    # writes the folder's config.toml or a "starting" status
    alone = worker(["--resume", str(run)])
    assert alone.returncode == 2 and alone.stderr.strip().splitlines()[-1] == (
        f"voxtui: error: {run} finished all its 4 steps (completed); nothing to resume — {DECAYED}"), alone.stderr
    # with a floor above 0 the schedule ends there, and more steps train at it: the refusal says how
    refused = voxtui("run", "--resume", run, "--min_lr_ratio", "0.1")
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        f"start a new run, or give it more steps: voxtui run --resume {run} --max_steps N (N above 4)"), refused.stderr
    assert [digest(p) for p in files] == before and not (run / "engine.log").exists()


def test_resume_of_a_run_that_failed_before_its_first_save_starts_it_over(tmp_path, tiny_model, train_file):
    """A run killed before its first checkpoint (its rank kill -9'd at step 2 or so, --save_steps 50) has
    nothing saved to resume from: `voxtui run --resume` starts it over from step 0 in the same folder, and says
    so in a note. It was refused once with a line about a learning rate decayed to 0 over "all its 0 steps"
    (the default --min_lr_ratio 0, read against no checkpoint); the worker alone (engine.train.refuse_finished)
    decided the same."""
    from engine.config import TrainConfig
    from engine.worker.trainer import refuse_finished

    run = start_detached(tiny_model, tmp_path / "runs", "early", train_file, nproc=1, max_steps=100000,
                         save_steps=50)
    info = json.loads((run / "engine.json").read_text())
    wait_for(lambda: sum(e["type"] == "step" for e in read_events(run)) >= 2)
    engine_tree = [info["pid"]] + descendants_of(info["pid"])
    rank = next(pid for pid in descendants_of(info["pid"]) if "LOCAL_RANK" in psutil.Process(pid).environ()
                and psutil.Process(pid).name().startswith("python"))
    os.kill(rank, signal.SIGKILL)
    wait_for(lambda: last_state(run) == "failed", timeout=60)
    wait_for(lambda: gone(engine_tree), timeout=30)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    step = max(e["step"] for e in read_events(run) if e["type"] == "step")
    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl=str(train_file), output_dir=str(run), max_steps=100000,
                      save_steps=50, nproc=1, quant="none", bf16=False)
    assert cfg.min_lr_ratio == 0
    refuse_finished(run, cfg, 1)  # the worker alone resumes it (from step 0): not refused
    resumed = voxtui("run", "--resume", run, "--max_steps", "2", "--detach", "--skip_preflight")
    assert resumed.returncode == 0, resumed.stderr
    assert f"note: {run} has no checkpoint to resume from (it failed at step {step}, before its first save at step " \
           "50): the resume starts it over from step 0" in resumed.stderr.splitlines(), resumed.stderr
    wait_for(lambda: last_state(run) == "finished", timeout=180)
    events = read_events(run)
    again = next(i for i, e in enumerate(events) if e["type"] == "status" and e["state"] == "failed")
    assert [e["step"] for e in events[again:] if e["type"] == "step"] == [1, 2]


def test_the_steps_a_resume_would_train_to(tmp_path, tiny_model, train_file):
    """engine.runs.resume_steps on a run folder's latest complete checkpoint: --max_steps says it; a run of
    --epochs keeps the checkpoint's total while nothing that decides its plan changed (else None: preflight's
    plan counts them — for real below); and refuse_nothing_to_resume's line for a run of --epochs names both
    ways on."""
    import pytest

    from engine.config import TrainConfig, write_config
    from engine.runs import refuse_nothing_to_resume, resume_steps
    from engine.util import UsageError

    run = tmp_path / "runs" / "epochs"
    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl=str(train_file), output_dir=str(run), max_steps=0,
                      epochs=0.25, nproc=1, quant="none", bf16=False, per_device_bsz=2, packing=False)
    assert resume_steps(run, cfg, 1) == (0, None)  # no checkpoint yet
    ckpt = run / "checkpoints" / "checkpoint-8"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    saved = {k: getattr(cfg, k) for k in cfg.__struct_fields__}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 8, "epoch": 0, "micro": 0, "total_steps": 8, "world_size": 1,
                                                         "config": saved}))
    assert resume_steps(run, cfg, 1) == (8, 8)
    assert resume_steps(run, cfg, 2) == (8, None)  # other ranks: another plan
    for change in ({"epochs": 0.5}, {"per_device_bsz": 8}, {"packing": True}):
        assert resume_steps(run, msgspec.structs.replace(cfg, **change), 1) == (8, None), change
    assert resume_steps(run, msgspec.structs.replace(cfg, max_steps=12), 1) == (8, 12)
    assert resume_steps(run, msgspec.structs.replace(cfg, lr=1e-3), 1) == (8, 8)  # not a plan field
    # a step left: nothing said where the rate goes on above 0; a run whose rate decayed to 0 (--min_lr_ratio
    # 0 then and now) would train it at 0: refused
    refuse_nothing_to_resume(run, msgspec.structs.replace(cfg, min_lr_ratio=0.1), 8, 9)
    with pytest.raises(UsageError, match="its learning rate has decayed to 0"):
        refuse_nothing_to_resume(run, cfg, 8, 9)
    with pytest.raises(UsageError) as e:
        refuse_nothing_to_resume(run, cfg, 8, 4, per_epoch=16)
    assert str(e.value) == (f"{run} has trained 8 step(s), and these settings give it 4 in all; nothing to resume"
                            f" — start a new run, or give it more steps: voxtui run --resume {run} --epochs E "
                            "(E above 0.5) or --max_steps N (N above 8)")
    # stopped at 8 of 20: a --max_steps of 8 leaves no step (its rate has not decayed: not said); without
    # --max_steps, an epoch plan of 8 steps in all is said as such
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 8, "epoch": 0, "micro": 0, "total_steps": 20, "world_size": 1,
                                                         "config": saved}))
    with pytest.raises(UsageError) as e:
        refuse_nothing_to_resume(run, msgspec.structs.replace(cfg, max_steps=8), 8, 8)
    assert str(e.value) == (f"{run} has trained 8 of its 20 steps, and --max_steps 8 leaves no step to train beyond "
                            f"those; nothing to resume — give it more steps: voxtui run --resume {run} --max_steps N "
                            "(N above 8), or leave out --max_steps to train on to its 20")
    with pytest.raises(UsageError) as e:
        refuse_nothing_to_resume(run, cfg, 8, 8, per_epoch=16)
    assert str(e.value).startswith(f"{run} has trained 8 of its 20 steps, and these settings give it 8 in all; "
                                   "nothing to resume — start a new run, or give it more steps")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 8, "epoch": 0, "micro": 0, "total_steps": 8, "world_size": 1,
                                                         "config": saved}))
    # `voxtui run --resume` with another batch: preflight's plan (64 rows, 8 a step: 8 an epoch, 2 steps at
    # --epochs 0.25) gives no step beyond the checkpoint's 8: refused, nothing started
    write_config(cfg, run / "config.toml")
    refused = voxtui("run", "--resume", run, "--per_device_bsz", "8")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"voxtui: error: {run} has trained 8 step(s), and these settings give it 2 in all; nothing to resume — "
        f"start a new run, or give it more steps: voxtui run --resume {run} --epochs E (E above 1) or "
        "--max_steps N (N above 8)"), refused.stderr
    assert not (run / "engine.json").exists() and not (run / "events.jsonl").exists()


def foreground_run(tiny_model, run, train_file) -> subprocess.Popen:
    """`voxtui run` in the foreground, one rank, a long run, in a session of its own (its stdout piped)."""
    from conftest import _DETACHED, ROOT, train_args

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VOXTUI_STEP_PAUSE": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run",
                             *train_args(tiny_model, run, train_file, max_steps=100000), "--nproc", "1",
                             "--skip_preflight"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    _DETACHED.append(run)
    return proc


def test_a_stopped_foreground_run_says_stopped_as_the_listing_does(tmp_path, tiny_model, train_file):
    """A run stopped on request: the foreground's last line names the state `voxtui engine list` shows
    (stopped) and the step it saved (its resume: tests/test_runner.py)."""
    run = tmp_path / "runs" / "halt"
    proc = foreground_run(tiny_model, run, train_file)
    try:
        wait_for(lambda: (run / "events.jsonl").exists() and any(e["type"] == "step" for e in read_events(run)))
        assert voxtui("engine", "stop", run).returncode == 0
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    from engine.runs import latest_checkpoint

    step = json.loads((latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())["step"]
    assert out.strip().splitlines()[-1] == f"[stopped] saved at step {step} (stopped on request)"
    row = next(line.split() for line in voxtui("engine", "list", "--runs", run.parent, check=True).stdout.splitlines()
               if line.startswith("halt"))
    assert row[1] == "stopped" and row[2].startswith(f"{step}/")


def test_a_foreground_run_whose_terminal_hangs_up_is_saved_and_says_so(tmp_path, tiny_model, train_file):
    """The foreground's terminal closed (tmux kill-session, an SSH drop: SIGHUP to its process group): the run
    is saved and stopped as on Ctrl-C, recorded as the hangup it is — not "stopped on request" — and the
    engine's lines from then on go to engine.log."""
    run = tmp_path / "runs" / "hup"
    proc = foreground_run(tiny_model, run, train_file)
    try:
        wait_for(lambda: (run / "events.jsonl").exists() and any(e["type"] == "step" for e in read_events(run)))
        os.killpg(proc.pid, signal.SIGHUP)  # what a closing terminal does
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    final = [e for e in read_events(run) if e["type"] == "status"][-1]
    said = f"continue it with voxtui run --resume {run}"
    assert final["outcome"] == "stopped" and final["message"] == f"the terminal hung up (SIGHUP): saved and stopped; {said}"
    log = (run / "engine.log").read_text()
    assert "[stopping] the terminal hung up (SIGHUP)" in log and "[stopped] saved at step" in log and said in log


def test_ctrl_c_while_the_workers_start_reads_stopping_to_the_end(tmp_path, tiny_model, train_file):
    """Ctrl-C in the foreground before the workers are up: the stop waits for them, and every state printed
    after it is stopping, then stopped — not running in between (the workers' own "running", sent before the
    stop reached them, is stored as stopping)."""
    run = tmp_path / "runs" / "early"
    proc = foreground_run(tiny_model, run, train_file)
    try:
        wait_for(lambda: (run / "events.jsonl").exists() and any(e["type"] == "status" for e in read_events(run)),
                 every=0.05)
        assert not any(e["type"] == "step" for e in read_events(run))
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    states = [line.split("]")[0][1:] for line in out.splitlines() if line.startswith("[")]
    after = states[states.index("stopping"):]
    assert set(after[:-1]) == {"stopping"} and after[-1] == "stopped", out
    statuses = [e["state"] for e in read_events(run) if e["type"] == "status"]
    assert "running" not in statuses[statuses.index("stopping"):]


def test_a_garbled_engine_json_is_no_crash_and_engine_stop_does_not_go_around_the_engine(tmp_path, tiny_model, train_file):
    """engine.json overwritten with garbage while the engine trains: `engine status` / `list` do not call the
    run crashed (the engine still holds the run's event log), and `engine stop` refuses to SIGTERM its workers
    as if they were orphans, in one line saying how to stop the engine instead."""
    run = start_detached(tiny_model, tmp_path / "runs", "garbled", train_file, nproc=1, max_steps=100000,
                         save_steps=0, env={"VOXTUI_ENGINE_TIMEOUT": "600"})
    good = (run / "engine.json").read_bytes()
    info = json.loads(good)
    wait_for(lambda: any(e["type"] == "step" for e in read_events(run)))
    workers = [p for p in descendants_of(info["pid"]) if "engine.train" in " ".join(psutil.Process(p).cmdline())]
    assert workers
    (run / "engine.json").write_text('{"pid": "oops", [\n')
    said = "engine.json unreadable (line 1 column 17) — the engine may still be running"
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert (status["state"], status["message"], status["problem"]) == ("running", said, said), status
    assert status["worker_pids"] == [] and status["engine_pid"] is None
    assert f"message: {said}" in voxtui("engine", "status", run, check=True).stdout
    listed = voxtui("engine", "list", "--runs", run.parent, check=True)
    assert listed.stdout.splitlines()[1].split()[:2] == ["garbled", "running"] and said in listed.stderr
    proc = voxtui("engine", "stop", run)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert said in proc.stderr and f"kill {info['pid']}" in proc.stderr, proc.stderr
    time.sleep(1)
    assert not gone(workers) and psutil.pid_exists(info["pid"])  # nothing was sent to them
    assert not any(e["type"] == "status" and e["state"] == "stopping" for e in read_events(run))
    (run / "engine.json").write_bytes(good)
    proc = voxtui("engine", "stop", run, "--wait", "60")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: gone(workers), timeout=30)


def test_a_second_pause_before_the_workers_took_the_first_is_refused(tmp_path):
    """The engine forwards a pause at once; the workers take it at their next step boundary, and until
    their ack the run still reads running — a second pause (another dashboard, a script) was forwarded on
    top of it. Refused now, saying why; the same command again (a client's retry, same id) is no second one."""
    import shutil

    from test_event_store import RECORDED, serve, stop

    from engine.client import EngineClient
    from engine.protocol import Pause, Resume

    recorded = tmp_path / "recorded" / "events.jsonl"  # the recorded run up to its last step: running
    recorded.parent.mkdir()
    recorded.write_bytes(b"".join(RECORDED.read_bytes().splitlines(True)[:20]))
    shutil.copyfile(RECORDED.parent / "config.toml", recorded.parent / "config.toml")
    run = tmp_path / "runs" / "toggles"
    info = serve(run, recorded, 20)  # its stand-in worker never acknowledges: the pause stays unapplied
    try:
        with EngineClient(run) as c:
            first = Pause(id="first-pause")
            assert c.send(first).status == "ok"
            assert c.send(Pause(id="first-pause")).status == "ok"  # the retry
            for again in (Pause(), Resume()):
                reply = c.send(again)
                assert (reply.status, reply.reason) == (
                    "error", "a pause is being applied: the workers take it at their next step boundary"), reply
    finally:
        stop(run, info)


def test_engine_stop_of_an_engine_that_does_not_answer_says_so_in_one_line_within_its_wait(tmp_path):
    """An engine alive that answers nothing (stopped with SIGSTOP): `engine stop --wait 3` gives up after about
    the 3 s asked for, in one line that says so and names what stops it (it once raised EngineLost's traceback
    after 15 s); continued, it takes the stop."""
    from test_event_store import RECORDED, serve

    run = tmp_path / "runs" / "hung"
    info = serve(run, RECORDED, 21)
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        proc = voxtui("engine", "stop", run, "--wait", "3")
        took = time.monotonic() - started
    finally:
        os.kill(info["pid"], signal.SIGCONT)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"voxtui: error: {run}: stop: no reply from the engine in 3 s "
                                                   "(it may still apply it: id "), lines
    assert lines[0].endswith(f"stop it with SIGTERM (the workers save first): kill {info['pid']} (it is stopped, "
                             f"SIGSTOP: it takes that once continued: kill -CONT {info['pid']})"), lines
    assert took < 8, took  # the 3 s, and the command's own start
    proc = voxtui("engine", "stop", run, "--wait", "30")
    assert proc.returncode == 0, proc.stderr
    assert not engine_alive(info)


def test_a_pause_reads_pausing_until_the_workers_pause_after_the_save_due_at_that_step(tmp_path, tiny_model, train_file):
    """The workers acknowledge a pause when they take it at a step boundary, then save the checkpoint that falls
    due there (3 s here) and only then pause: the run read running all that while, and the guard against a
    second pause ended at the ack. Now it reads pausing from the request until the workers' paused (a running
    status with ``pending`` "pause": the status states stay the protocol's), a second pause or a resume is
    refused until then, saying why, and a resume then runs it again."""
    from engine.protocol import Pause, Resume, with_pending

    def shown(reply):
        return with_pending(reply.state, reply.pending)

    run = start_detached(tiny_model, tmp_path / "runs", "toggled", train_file, nproc=1, max_steps=100000, save_steps=1,
                         env={"VOXTUI_FAULT_SLOW_SAVE": "3"})
    wait_for(lambda: (run / "events.jsonl").exists() and any(e["type"] == "step" for e in read_events(run)))

    def first(pred):
        return next((e for e in read_events(run) if pred(e)), None)

    with EngineClient(run) as c:
        assert c.send(Pause(id="p1")).status == "ok"
        assert shown(c.status()) == "pausing"
        ack = wait_for(lambda: first(lambda e: e["type"] == "ack" and e["id"] == "p1"), timeout=60, every=0.05)
        # taken, and saving for 3 s before it pauses: still pausing, and nothing else toggles it meanwhile
        reply, again, resume = c.status(), c.send(Pause(id="p2")), c.send(Resume(id="r0"))
        assert not first(lambda e: e["type"] == "status" and e["state"] == "paused"), "paused within the save"
        assert shown(reply) == "pausing" and reply.status == "ok"
        said = (f"a pause is being applied: the workers took it at step {ack['step']} and pause once what falls due "
                "there is done (an evaluation, previews, a checkpoint)")
        assert (again.status, again.reason, again.state) == ("error", said, "running"), again
        assert (resume.status, resume.reason) == ("error", said), resume
        assert c.send(Pause(id="p1")).status == "ok"  # the first one again (a retry): no second pause
        paused = wait_for(lambda: first(lambda e: e["type"] == "status" and e["state"] == "paused"), timeout=60)
        assert shown(c.status()) == "paused" and paused["step"] == ack["step"]
        events = read_events(run)
        at = {e["seq"]: e for e in events}
        pausing = next(e for e in events if e["type"] == "status" and e.get("pending") == "pause")
        assert pausing["state"] == "running"
        saved = next(e for e in events if e["type"] == "checkpoint" and e["step"] == ack["step"])
        assert pausing["seq"] < ack["seq"] < saved["seq"] < paused["seq"], [at[s] for s in sorted(at)][-8:]
        assert not any(e["type"] == "status" and e["state"] == "running" and not e["pending"] and e["seq"] > pausing["seq"]
                       for e in events)
        assert {e["state"] for e in events if e["type"] == "status"} <= {"starting", "running", "paused", "stopping"}
        assert [e["id"] for e in events if e["type"] == "ack"] == ["p1"]
        assert c.send(Pause(id="p3")).reason == "already paused"
        assert c.send(Resume(id="r1")).status == "ok"
        wait_for(lambda: first(lambda e: e["type"] == "status" and e["state"] == "running" and e["seq"] > paused["seq"]),
                 timeout=60)
        assert shown(c.status()) == "running"
        assert c.send(Stop()).status == "ok"
    row = next(line.split() for line in voxtui("engine", "list", "--runs", run.parent).stdout.splitlines()
               if line.startswith("toggled"))
    assert row[1] in ("stopping", "stopped"), row


def test_a_pause_the_workers_never_take_is_given_up_and_the_workers_start_reads_pausing(tmp_path):
    """The engine's side of a pause, on a real engine's sockets and event log without workers: asked while the
    workers start, their own "running" is stored with the pause pending (shown pausing: they take it at their first
    step); one they
    never acknowledge is given up after RESEND_FOR_S with a status saying so, and the run reads as before."""
    from engine.daemon import engine as daemon
    from engine.protocol import Ack, Pause, Resume, Status

    run = tmp_path / "runs" / "given-up"
    e = daemon.Engine(run)
    e.open()
    try:
        e.emit(Status(state="starting"))
        assert e._apply(Pause(id="p1")).status == "ok" and (e.state, e._pending()) == ("starting", "pause")
        assert (read_events(run)[-1]["state"], read_events(run)[-1]["pending"]) == ("starting", "pause")
        e.on_worker_message(Status(state="running", worker="w", wseq=1))  # the workers' start
        assert (e.state, e._pending()) == ("running", "pause") and read_events(run)[-1]["pending"] == "pause"
        e.on_worker_message(Ack(id="p1", command="pause", step=1, worker="w", wseq=2))
        assert e._pending() == "pause" and "took it at step 1" in e._apply(Resume(id="r0")).reason
        e.on_worker_message(Status(state="paused", step=1, worker="w", wseq=3))
        assert e.state == "paused" and not e.toggles
        assert e._apply(Resume(id="r1")).status == "ok" and e.state == "paused"  # until the workers run again
        assert e._apply(Pause(id="p2")).reason == "a resume is being applied: the workers take it at their next step boundary"
        e.on_worker_message(Status(state="running", step=1, worker="w", wseq=4))
        assert e.state == "running" and not e.toggles
        assert e._apply(Pause(id="p3")).status == "ok" and e._pending() == "pause"
        data, sent = e.unacked["p3"]
        e.unacked["p3"] = (data, sent - daemon.RESEND_FOR_S - 1)  # never acknowledged: a minute has passed
        e._tick(time.monotonic())
        last = read_events(run)[-1]
        assert e.state == "running" and not e._pending() and not e.toggles and "p3" not in e.unacked
        assert (last["type"], last["state"], last["pending"]) == ("status", "running", ""), last
        assert last["message"] == f"the workers did not take the pause (p3) in {daemon.RESEND_FOR_S:.0f} s: not paused"
        assert e._apply(Pause(id="p4")).status == "ok"  # a pause can be asked for again
        e.request_stop("test")
        assert not e.toggles and e._apply(Pause(id="p5")).reason == "the run is stopping"
    finally:
        e.close()


def test_a_checkpoint_a_full_disk_refuses_pauses_the_run_until_a_resume_saves_it(tmp_path, tiny_model, train_file):
    """A checkpoint that does not fit on the disk (ENOSPC, injected while a file exists: VOXTUI_FAULT_DISK_FULL) is
    said plainly (the filesystem, what is free, the checkpoint that is intact), and the workers pause there, the model
    in memory, instead of training on for steps that could not be saved either (they trained 240 steps past it, every
    checkpoint failing, then ended failed). A resume with the disk still full pauses again; once space is freed a
    resume writes the checkpoint, and the run goes on to its end."""
    from engine.protocol import Resume

    full = tmp_path / "disk-full"
    full.write_text("")
    # two ranks: each pauses (rank 1, which takes no engine commands, once ended alone and tore the run down)
    run = start_detached(tiny_model, tmp_path / "runs", "full", train_file, nproc=2, max_steps=6, save_steps=2,
                         env={"VOXTUI_FAULT_DISK_FULL": str(full)})

    def paused_statuses():
        return [e for e in read_events(run) if e["type"] == "status" and e["state"] == "paused"]

    paused = wait_for(paused_statuses, timeout=120, what="the run paused for the full disk")[0]
    from engine.worker.saving import mount_of

    events = read_events(run)
    failed = [e for e in events if e["type"] == "alert" and e["kind"] == "checkpoint_failed"]
    mount, device = mount_of(run)
    assert failed and failed[0]["message"].startswith(
        f"checkpoint-2 not written: no space left on {mount} ({device + ', ' if device else ''}")
    assert failed[0]["message"].endswith(" MiB free); no earlier checkpoint exists"), failed[0]
    assert paused["step"] == 2 and paused["message"].startswith(failed[0]["message"] + "; free space there, then resume")
    assert "voxtui engine resume" in paused["message"]
    time.sleep(2)  # paused: no step trained past the checkpoint that could not be written
    assert max(e["step"] for e in read_events(run) if e["type"] == "step") == 2
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "paused", status
    with EngineClient(run) as c:
        assert c.send(Resume(id="r-still-full")).status == "ok"  # nothing freed: tried, and paused again
        wait_for(lambda: len(paused_statuses()) == 2, timeout=60, what="paused again")
        full.unlink()  # space freed
        wait_for(lambda: c.status().state == "paused", timeout=30)
        assert c.send(Resume(id="r-freed")).status == "ok"
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=120, what="the end")
    events = read_events(run)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4, 6]
    assert events[-1]["type"] == "status" and (events[-1]["state"], events[-1]["outcome"]) == ("finished", "completed")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_a_stop_while_paused_on_a_full_disk_stops_the_run(tmp_path, tiny_model, train_file):
    """Stopped while it waits out a full disk (the dialog's "save a checkpoint, then exit"): the stop's own
    checkpoint does not fit either, and the run ended FAILED for it. It is stopped, as asked, and its final
    status says which checkpoint could not be written and what is intact."""
    from engine.protocol import Stop

    full = tmp_path / "disk-full"
    full.write_text("")
    run = start_detached(tiny_model, tmp_path / "runs", "full-stop", train_file, nproc=1, max_steps=6, save_steps=2,
                         env={"VOXTUI_FAULT_DISK_FULL": str(full)})
    wait_for(lambda: any(e["type"] == "status" and e["state"] == "paused" for e in read_events(run)), timeout=120,
             what="the run paused for the full disk")
    with EngineClient(run) as c:
        assert c.send(Stop(id="stop-while-full")).status == "ok"
    wait_for(lambda: not engine_alive(json.loads((run / "engine.json").read_text())), timeout=120, what="the end")
    last = read_events(run)[-1]
    assert (last["type"], last["state"], last["outcome"]) == ("status", "finished", "stopped"), last
    assert last["message"].startswith("stopped on request; its checkpoint at step 2 could not be written: checkpoint-2 "
                                      "not written: no space left on "), last
    assert last["message"].endswith("no earlier checkpoint exists"), last
    assert json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)["state"] == "stopped"


def test_pause_save_resume_from_the_command_line(tmp_path, tiny_model, train_file):
    """Over SSH without a terminal for the dashboard: `voxtui engine pause | save | resume RUN` steer a real run
    through its engine (each one line; --wait until the run shows it), the engine's refusals are said with exit 1,
    and so is a run whose engine is gone; a run that is none is a usage error (2)."""
    run = start_detached(tiny_model, tmp_path / "runs", "steered", train_file, nproc=1, max_steps=100000, save_steps=0)
    wait_for(lambda: (run / "events.jsonl").exists() and any(e["type"] == "step" for e in read_events(run)))
    paused = voxtui("engine", "pause", run, "--wait", "60")
    assert paused.returncode == 0, paused.stderr
    sent, done = paused.stdout.splitlines()
    assert sent == f"{run}: pause sent — the workers pause at their next step boundary, once what falls due there is done"
    assert done.startswith(f"{run}: paused at step ")
    assert json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)["state"] == "paused"
    again = voxtui("engine", "pause", run)
    assert (again.returncode, again.stderr.strip()) == (1, f"voxtui: error: {run}: pause: already paused")
    saved = voxtui("engine", "save", run)  # while paused: saved at once, at the paused step
    assert saved.returncode == 0 and saved.stdout.strip() == (
        f"{run}: save sent — the workers save a checkpoint at their next step boundary"), saved.stderr
    step = int(done.rsplit(" ", 1)[1])
    wait_for(lambda: any(e["type"] == "checkpoint" and e["step"] == step for e in read_events(run)), timeout=60)
    assert (run / "checkpoints" / f"checkpoint-{step}").is_dir()
    resumed = voxtui("engine", "resume", run)
    assert resumed.returncode == 0 and resumed.stdout.splitlines()[-1].startswith(f"{run}: running again"), resumed
    again = voxtui("engine", "resume", run, "--wait", "0")
    assert (again.returncode, again.stderr.strip()) == (1, f"voxtui: error: {run}: resume: not paused (running)")
    assert voxtui("engine", "stop", run, "--wait", "60").returncode == 0
    ended = voxtui("engine", "eval", run)
    assert (ended.returncode, ended.stderr.strip()) == (
        1, f"voxtui: error: {run}: eval: the engine is not running: the run has ended (stopped)"), ended.stderr
    for bad in (("engine", "preview", tmp_path / "runs" / "nothing"), ("engine", "pause"),
                ("engine", "resume", run, "--wait", "-1")):
        proc = voxtui(*bad)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)
