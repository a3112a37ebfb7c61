"""A recorded run served by a real engine: ``voxtui engine replay EVENTS.jsonl [--run-dir DIR] [--rate N]``.

The engine starts as for a training run, but its "worker" is this module: it reads a recorded
``events.jsonl`` and pushes every event to the engine exactly as a training worker would (the
engine numbers, stores and publishes them; clients get history and live events from it), keeping
each event's recorded time. Then it stays until the engine stops it (``voxtui engine stop``), so the
run can be attached, demonstrated or snapshotted deterministically without training anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from engine.util import UsageError, printable, shell_quote


def read_recorded(path: Path) -> list:
    """The events of a recorded events.jsonl, in order; a bad line is a UsageError naming it."""
    import msgspec

    from engine.protocol import event_decoder

    try:
        text = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    events = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(event_decoder.decode(line))
        except msgspec.DecodeError as e:  # ValidationError is one
            raise UsageError(f"{path}:{n}: not a voxtui event ({e})") from None
    if not events:
        raise UsageError(f"{path}: no events to replay")
    return events


def last_status(recorded: list):
    """The status a stopped replay ends with: the recording's own end where it has one (finished or failed,
    its outcome and step as recorded), else what a run stopped on request says, at the last step recorded."""
    from engine.protocol import Status

    statuses = [ev for ev in recorded if ev.type == "status"]
    steps = [ev.step for ev in recorded if ev.type == "step"]
    end = statuses[-1] if statuses else None
    if end is not None and end.state in ("finished", "failed"):
        return Status(state=end.state, outcome=end.outcome, step=end.step,
                      message=f"replay stopped; as recorded: {end.message}" if end.message else "replay stopped",
                      time=time.time())
    return Status(state="finished", outcome="stopped", step=max(steps, default=0),
                  message="replay stopped", time=time.time())


def worker_main(argv: list[str] | None = None) -> int:
    """The stand-in worker the engine spawns: push the recorded events, then wait for a stop."""
    from engine.protocol import Stop
    from engine.worker.sinks import ControlInbox, PushSink

    p = argparse.ArgumentParser(prog="python -m engine.daemon.replay")
    p.add_argument("events")
    p.add_argument("--engine", required=True)
    p.add_argument("--rate", type=float, default=0.0)
    a = p.parse_args(argv)
    info = json.loads(Path(a.engine).read_text())
    endpoints = info["endpoints"]
    inbox = ControlInbox(endpoints["worker_control"], engine_timeout=30.0)
    inbox.install_signal_handlers()
    sink = PushSink(endpoints["worker_events"], info["run"])
    time.sleep(0.2)  # let the PUSH socket connect before the first event
    recorded = read_recorded(Path(a.events))
    for ev in recorded:
        ev.seq = 0  # the engine numbers them
        sink.emit(ev)
        if a.rate > 0:
            time.sleep(1.0 / a.rate)
    while not any(isinstance(c, Stop) for c in inbox.poll()) and not inbox.engine_lost:
        time.sleep(0.2)
    sink.emit(last_status(recorded))
    sink.close()
    inbox.close()
    return 0


def cmd_replay(args) -> int:
    """``voxtui engine replay``: start a detached engine serving the recorded run."""
    from engine.client import engine_alive
    from engine.daemon.launch import engine_info, launch_detached

    events = Path(args.events)
    read_recorded(events)  # check it before anything is created
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"replay-{events.parent.name or 'run'}"
    if (run_dir / "events.jsonl").exists():
        raise UsageError(f"{run_dir}: already holds a run; pick another --run-dir")
    if engine_alive(engine_info(run_dir)):
        raise UsageError(f"{run_dir}: its engine is running")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    if (events.parent / "config.toml").is_file():
        shutil.copyfile(events.parent / "config.toml", run_dir / "config.toml")
    worker = [sys.executable, "-m", "engine.daemon.replay", str(events.resolve()), "--engine",
              str((run_dir / "engine.json").resolve()), "--rate", str(args.rate)]
    pid = launch_detached(run_dir, ["--worker_cmd", json.dumps(worker)])
    print(printable(run_dir))
    print(printable(f"engine {pid} replays {events}; attach with: voxtui attach {shell_quote(run_dir)}; "
                    f"end it with: voxtui engine stop {shell_quote(run_dir)}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
