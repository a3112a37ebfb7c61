"""Who starts a run's engine: one ``voxtui run`` at a time (its flock on the folder ``RUN/`` itself, taken before it
writes config.toml, let go once its engine holds the event log); a second launcher, or a second engine, is
refused in one line."""

import synthetic_runs

from conftest import digest, write_jsonl


def test_a_second_resume_while_one_is_starting_is_refused_at_once_and_writes_nothing(tmp_path, capsys):
    """Two `voxtui run --resume` of one run at once: the one that finds the other's lock is refused at once
    (exit 2, one line), and the run folder is as it was — config.toml keeps the other's flags."""
    from engine.cli import main
    from engine.daemon.launch import LaunchLock

    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 8)
    run = synthetic_runs.make_run(tmp_path / "runs", "t3\x1b]0;PWN\x07한국", steps=12, state="running",
                                  config_changes={"train_jsonl": str(data), "val_jsonl": str(data)})
    other = LaunchLock(run, resume=True)
    other.take()  # the other launcher, between its checks and its engine's start
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    try:
        rc = main(["run", "--resume", str(run), "--max_steps", "4000", "--min_lr_ratio", "0.1", "--skip_preflight",
                   "--detach"])
    finally:
        other.release()
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [f"voxtui: error: {run}: another `voxtui run --resume` is starting it"
                                .replace("\x1b", "\\x1b").replace("\x07", "\\x07")]
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before


def test_an_engine_that_cannot_take_the_event_log_exits_with_one_line(tmp_path, capsys, monkeypatch):
    """A second engine on a run whose event log another process holds: one line and exit 2, no traceback
    (a detached engine's stderr is the live run's engine.log)."""
    from engine.daemon import engine, store
    from engine.runs import lock_events

    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.2)
    run = synthetic_runs.make_run(tmp_path / "runs", "held\x1b[31m", steps=4)
    held = lock_events(run)
    try:
        rc = engine.main([str(run), "--resume", "--worker_cmd", '["true"]'])
    finally:
        import os

        os.close(held)
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("engine: error: ") and "Traceback" not in err
    assert "another process holds its event log" in err and "\x1b" not in err
