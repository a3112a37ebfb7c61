"""The engine's health alerts and what it does about them.

``Health`` is pure logic, fed here real protocol events with a clock the test moves. Then real
engines (``python -m engine.daemon RUN --worker_cmd …``) whose worker is a stand-in script that pushes
crafted events through the worker's own ``PushSink`` and reads commands with its ``ControlInbox``,
like ``engine/daemon/replay.py``: a loss spike with ``--alert_action save`` makes the engine send
the workers a save per alert, a throttling GPU with ``--alert_action stop`` stops the run, a run with
no step reports a stall, a nearly full disk is reported, and workers that ignore a stop are killed
once the stop timeout has passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, read_events, wait_for
from engine.client import EngineClient, engine_alive
from engine.daemon.health import Health
from engine.protocol import GpuStat, Status, Step, Stop, Telemetry, event_encoder


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def step(n: int, loss: float | None = 1.0, grad_norm: float | None = 1.0, tps: float = 1000.0) -> Step:
    return Step(step=n, loss=loss, lr=1e-3, grad_norm=grad_norm, tokens_per_s=tps)


def steady(h: Health, n: int = 20, **kw) -> None:
    for i in range(1, n + 1):
        assert h.step(step(i, **kw)) == []


def kinds(alerts) -> list[str]:
    return [a.kind for a in alerts]


# ---- Health, fed events


def test_a_loss_spike_is_over_three_times_the_median_once_twenty_steps_are_known_and_once_per_five_minutes():
    clock = Clock()
    early = Health(clock=clock)
    steady(early, 19)
    assert early.step(step(20, loss=100.0)) == []  # 19 steps known: not judged yet

    h = Health(clock=clock)
    steady(h, 20)
    assert h.step(step(21, loss=3.0)) == []  # exactly 3×: not over
    [alert] = h.step(step(22, loss=3.5))
    assert (alert.kind, alert.level, alert.step) == ("loss_spike", "warning", 22)
    assert "loss 3.500 at step 22" in alert.message and "median 1.000" in alert.message
    clock.t += 299
    assert h.step(step(23, loss=50.0)) == []  # within 5 minutes of the last one
    clock.t += 2
    assert kinds(h.step(step(24, loss=50.0))) == ["loss_spike"]


def test_a_grad_norm_blowup_is_over_ten_times_the_median_and_a_zero_median_never_is():
    h = Health(clock=Clock())
    steady(h, 20, grad_norm=0.5)
    assert h.step(step(21, grad_norm=5.0)) == []  # exactly 10×
    [alert] = h.step(step(22, grad_norm=5.1))
    assert (alert.kind, alert.step) == ("grad_norm_blowup", 22) and "grad norm 5.1 at step 22" in alert.message

    zero = Health(clock=Clock())
    steady(zero, 30, grad_norm=0.0)
    assert zero.step(step(31, grad_norm=1e6)) == []


def test_a_throughput_drop_is_under_half_the_median():
    h = Health(clock=Clock())
    steady(h, 20, tps=1000.0)
    assert h.step(step(21, tps=500.0)) == []  # exactly half
    [alert] = h.step(step(22, tps=499.0))
    assert (alert.kind, alert.step) == ("throughput_drop", 22) and "499 tokens/s at step 22" in alert.message


def test_non_finite_steps_are_neither_judged_nor_counted():
    h = Health(clock=Clock())
    for i in range(1, 31):
        assert h.step(step(i, loss=None, grad_norm=None)) == []
    assert len(h.loss) == 0 and len(h.gnorm) == 0  # 19 finite steps after them are still too few
    steady(h, 19)
    assert h.step(step(50, loss=10.0, grad_norm=100.0)) == []


def test_one_step_can_raise_three_alerts():
    h = Health(clock=Clock())
    steady(h, 20)
    assert kinds(h.step(step(21, loss=10.0, grad_norm=50.0, tps=100.0))) == [
        "loss_spike", "grad_norm_blowup", "throughput_drop"]


def test_a_throttling_gpu_is_reported_per_gpu_once_per_five_minutes_and_power_capping_is_not_throttling():
    clock = Clock()
    h = Health(clock=clock)
    capped = GpuStat(index=0, throttle=["sw_power_cap", "gpu_idle"])
    hot = GpuStat(index=1, throttle=["sw_thermal", "hw_slowdown", "sw_power_cap"], temp=91.4, power=301.0)
    [alert] = h.telemetry(Telemetry(gpus=[capped, hot]))
    assert alert.kind == "gpu_throttle" and alert.level == "warning"
    assert alert.message == "GPU 1 is throttling (sw_thermal, hw_slowdown) at 91°C, 301 W"
    assert h.telemetry(Telemetry(gpus=[hot])) == []
    [other] = h.telemetry(Telemetry(gpus=[GpuStat(index=0, throttle=["hw_power_brake"])]))  # another GPU
    assert other.message.startswith("GPU 0 is throttling (hw_power_brake)")
    clock.t += 301
    assert kinds(h.telemetry(Telemetry(gpus=[hot]))) == ["gpu_throttle"]


def test_a_stall_is_no_step_for_the_timeout_and_the_clock_starts_again_after_it():
    clock = Clock()
    h = Health(stall_timeout=10.0, clock=clock)
    clock.t += 10.0
    assert h.stall() is None  # not over yet
    clock.t += 0.5
    alert = h.stall()
    assert alert.kind == "stall" and alert.message == "no optimizer step for 10 s"
    assert h.stall() is None
    clock.t += 9.0
    h.step(step(1))
    clock.t += 9.0
    assert h.stall() is None  # 9 s since the step
    clock.t += 1.5
    assert h.stall() is not None


def test_the_disk_is_nearly_full_under_the_minimum_or_five_percent_reported_every_ten_minutes():
    gib = 2**30
    clock = Clock()
    h = Health(min_free_bytes=2 * gib, clock=clock)
    assert h.disk(free=3 * gib, total=50 * gib) is None
    alert = h.disk(free=int(1.5 * gib), total=50 * gib)
    assert alert.kind == "disk_nearly_full" and alert.message == "1.5 GiB free on the run's disk"
    clock.t += 599
    assert h.disk(free=40 * gib, total=1000 * gib) is None  # 4% free, but reported 599 s ago
    clock.t += 2
    assert h.disk(free=40 * gib, total=1000 * gib).message == "40.0 GiB free on the run's disk"


@settings(max_examples=60, deadline=None)
@given(history=st.lists(st.floats(1.0, 2.9), min_size=20, max_size=80), loss=st.floats(1.0, 2.9))
def test_losses_within_a_factor_of_three_never_spike_and_one_over_three_times_all_of_them_does(history, loss):
    h = Health(clock=Clock())
    for i, x in enumerate(history, 1):
        assert "loss_spike" not in kinds(h.step(step(i, loss=x)))
    assert "loss_spike" not in kinds(h.step(step(len(history) + 1, loss=loss)))
    assert "loss_spike" in kinds(h.step(step(len(history) + 2, loss=3.01 * max(history[-50:] + [loss]))))


# ---- a real engine, its worker a stand-in that pushes crafted events and reports the commands it gets

STAND_IN = '''
import argparse, json, os, signal, sys, time
from pathlib import Path

from engine.protocol import Ack, Log, Status, event_decoder
from engine.worker.sinks import ControlInbox, PushSink

p = argparse.ArgumentParser()
p.add_argument("--engine", required=True)
p.add_argument("--events", required=True)
p.add_argument("--ignore_stop", action="store_true")  # and SIGTERM: only SIGKILL ends it
a = p.parse_args()
if a.ignore_stop:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
info = json.loads(Path(a.engine).read_text())
inbox = ControlInbox(info["endpoints"]["worker_control"], engine_timeout=60.0)
sink = PushSink(info["endpoints"]["worker_events"], info["run"])
time.sleep(0.2)  # let the PUSH socket connect
sink.emit(Log(message=f"stand-in pid {os.getpid()}"))
for line in Path(a.events).read_bytes().splitlines():
    sink.emit(event_decoder.decode(line))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for cmd in inbox.poll():
        sink.emit(Ack(id=cmd.id, command=cmd.type))
        sink.emit(Log(message=f"got {cmd.type} {cmd.id}"))
        if cmd.type == "stop" and not a.ignore_stop:
            sink.emit(Status(state="finished", outcome="stopped", message="stopped on request"))
            sink.close()
            sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
'''


class StandIn:
    """A real engine for ``run``, its worker the stand-in pushing ``events``."""

    def __init__(self, tmp_path: Path, events: list, *flags: str, ignore_stop: bool = False) -> None:
        script = tmp_path / "stand_in.py"
        script.write_text(STAND_IN)
        pushed = tmp_path / "pushed.jsonl"
        pushed.write_bytes(b"".join(event_encoder.encode(e) + b"\n" for e in events))
        self.run = tmp_path / "runs" / "health"
        worker = [sys.executable, str(script), "--engine", str(self.run / "engine.json"), "--events", str(pushed)]
        worker += ["--ignore_stop"] if ignore_stop else []
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.daemon", str(self.run), "--worker_cmd",
                                      json.dumps(worker), *flags], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def events(self) -> list[dict]:
        path = self.run / "events.jsonl"
        return read_events(self.run) if path.exists() else []

    def wait_for_event(self, pred, timeout: float = 30.0, what: str = "an event") -> dict:
        return wait_for(lambda: next((e for e in self.events() if pred(e)), None), timeout=timeout, what=what)

    def logs(self, prefix: str) -> list[str]:
        return [e["message"] for e in self.events() if e["type"] == "log" and e["message"].startswith(prefix)]

    def worker_pid(self) -> int:
        return int(self.wait_for_event(lambda e: e["type"] == "log" and e["message"].startswith("stand-in pid"),
                                       what="the stand-in's pid")["message"].split()[-1])

    def stop(self) -> None:
        with EngineClient(self.run) as c:
            assert c.send(Stop()).status == "ok"

    def exit_code(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def stand_in(tmp_path):
    made = []

    def make(events, *flags, ignore_stop=False) -> StandIn:
        made.append(StandIn(tmp_path, events, *flags, ignore_stop=ignore_stop))
        return made[-1]

    yield make
    for s in made:
        s.close()


RUNNING = Status(state="running", message="stand-in")


def test_alert_action_save_sends_the_workers_a_save_for_each_alert_of_a_spiking_step(stand_in):
    events = [RUNNING, *(step(i) for i in range(1, 21)), step(21, loss=10.0, grad_norm=50.0, tps=100.0)]
    eng = stand_in(events, "--alert_action", "save")
    wait_for(lambda: len(eng.logs("got save_checkpoint")) == 3, timeout=30, what="three saves reaching the worker")
    stored = eng.events()
    alerts = [e for e in stored if e["type"] == "alert"]
    assert [(a["kind"], a["step"]) for a in alerts] == [
        ("loss_spike", 21), ("grad_norm_blowup", 21), ("throughput_drop", 21)]
    # each save is named after its alert's place in the log, and reached the worker once (acked, not re-sent)
    assert eng.logs("got save_checkpoint") == [f"got save_checkpoint alert-save-{a['seq']}" for a in alerts]
    assert {e["id"] for e in stored if e["type"] == "ack"} == {f"alert-save-{a['seq']}" for a in alerts}
    assert not [e for e in stored if e["type"] == "status" and e["state"] == "stopping"]  # saving is not stopping
    eng.stop()
    assert eng.exit_code() == 0
    last = [e for e in eng.events() if e["type"] == "status"][-1]
    assert (last["state"], last["outcome"]) == ("finished", "stopped")
    assert not engine_alive(json.loads((eng.run / "engine.json").read_text()))


def test_alert_action_stop_stops_the_run_on_a_throttling_gpu(stand_in):
    hot = Telemetry(gpus=[GpuStat(index=0, name="H200", throttle=["hw_thermal"], temp=92.0, power=350.0)])
    eng = stand_in([RUNNING, hot], "--alert_action", "stop")
    assert eng.exit_code() == 0  # the worker stopped when asked, and the engine left with it
    stored = eng.events()
    order = [(e["type"], e.get("kind") or e.get("state") or e.get("message")) for e in stored
             if e["type"] in ("alert", "status") or (e["type"] == "log" and e["message"].startswith("got"))]
    stop_id = next(e["id"] for e in stored if e["type"] == "ack")
    assert order == [("status", "running"), ("alert", "gpu_throttle"), ("status", "stopping"),
                     ("log", f"got stop {stop_id}"), ("status", "finished")]
    assert stop_id.startswith("engine-stop-")
    stopping = next(e for e in stored if e["type"] == "status" and e["state"] == "stopping")
    assert stopping["message"] == "stopping on an alert (alert_action = stop)"


def test_no_step_for_the_stall_timeout_is_a_stall_and_a_nearly_full_disk_is_said_once(stand_in):
    # a minimum of free space no disk has: the disk is nearly full from the first check on
    eng = stand_in([RUNNING, step(1)], "--stall_timeout", "1", "--min_free_gib", "1e9", "--alert_action", "stop")
    disk = eng.wait_for_event(lambda e: e["type"] == "alert" and e["kind"] == "disk_nearly_full", timeout=20,
                              what="the disk alert")
    assert disk["level"] == "warning" and disk["message"].endswith("GiB free on the run's disk")
    the_step = eng.wait_for_event(lambda e: e["type"] == "step")

    def stalls() -> list[dict]:  # (one may come before the step, if it reaches the engine a second after "running")
        return [e for e in eng.events() if e["type"] == "alert" and e["kind"] == "stall" and e["seq"] > the_step["seq"]]

    first, second = wait_for(lambda: stalls()[:2] if len(stalls()) >= 2 else None, timeout=20, what="two stalls")
    assert first["message"] == "no optimizer step for 1 s" and first["level"] == "warning"
    assert first["time"] - the_step["time"] >= 1.0
    assert second["time"] - first["time"] >= 0.9  # the clock starts again after each
    # neither is a health alert of the step stream: alert_action stop does not stop the run for them
    assert not [e for e in eng.events() if e["type"] == "status" and e["state"] == "stopping"]
    eng.stop()
    assert eng.exit_code() == 0
    assert len([e for e in eng.events() if e["type"] == "alert" and e["kind"] == "disk_nearly_full"]) == 1


@pytest.mark.slow
def test_workers_that_ignore_a_stop_are_killed_after_the_stop_timeout(stand_in):
    eng = stand_in([RUNNING, step(1)], "--stop_timeout", "2", ignore_stop=True)
    pid = eng.worker_pid()
    eng.stop()
    stopping = eng.wait_for_event(lambda e: e["type"] == "status" and e["state"] == "stopping")
    got = eng.wait_for_event(lambda e: e["type"] == "log" and e["message"].startswith("got stop"))
    assert psutil.pid_exists(pid)  # it took the stop and went on
    timeout = eng.wait_for_event(lambda e: e["type"] == "alert" and e["kind"] == "stop_timeout", timeout=20,
                                 what="the stop timeout")
    assert timeout["message"] == "workers did not stop in time: killing them"
    assert 1.9 <= timeout["time"] - stopping["time"] < 10 and got["seq"] < timeout["seq"]
    assert eng.exit_code(timeout=60) == 1  # SIGTERM ignored: SIGKILL after the grace period
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    last = [e for e in eng.events() if e["type"] == "status"][-1]
    assert last["state"] == "failed" and last["message"] == "workers exited with code -9 (see worker.log)"


def test_a_rank_killed_by_a_signal_is_named_however_fast_torchrun_leaves(tmp_path):
    """A rank SIGKILLed (what the out-of-memory killer does) under a real torchrun, which reaps it and leaves
    at once: the run's failure names the rank and the signal (it said "workers exited with code 1"), with a
    rank_died alert — from the rank watcher where it saw the dead rank, else from torchrun's own report."""
    script = tmp_path / "rank.py"
    script.write_text("import os, signal, time\ntime.sleep(2.0)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    run = tmp_path / "runs" / "oom"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    proc = subprocess.run([sys.executable, "-m", "engine.daemon", str(run), "--worker_cmd", json.dumps(torchrun)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    events = read_events(run)
    alert = next(e for e in events if e["type"] == "alert" and e["kind"] == "rank_died")
    assert alert["rank"] == 0 and "was killed by SIGKILL (if no one sent it, the kernel's out-of-memory killer did" in alert["message"]
    last = [e for e in events if e["type"] == "status"][-1]
    assert last["state"] == "failed" and last["message"].startswith("rank 0 was killed by SIGKILL"), last
