"""Workers that outlive their engine keep their events in the spool; when no engine comes back to store
them (the workers finished the run alone), the first reader that finds the engine and those workers gone
stores them in events.jsonl (`fold_spool`): once, in each worker's order, after an alert that says what
happened — never beside a live engine (the event-log lock), never while a spooling worker runs."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEAD = 2**22 + 4321  # above any pid_max: no such process


def spool_run(root, n_stored: int, spooled: list[int], worker_pid: int = DEAD, engine: dict | None = None,
              host: str | None = None):
    """A run folder: events.jsonl with ``n_stored`` steps (the last ones carrying the worker's id, as a
    relaying engine stores them), the worker's spool with the steps ``spooled`` (wseq = step)."""
    from engine.eventlog import host_tag
    from engine.protocol import Status, Step, event_encoder, stamp
    from engine.runs import write_engine_info

    run = root / "r"
    (run / "spool").mkdir(parents=True)
    worker = f"{host or host_tag()}-{worker_pid}-18c0ffee"
    lines = [event_encoder.encode(stamp(Status(state="running", time=1.0), 1, "r"))]
    for i in range(1, n_stored + 1):
        lines.append(event_encoder.encode(stamp(Step(step=i, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0,
                                                     time=1.0 + i, worker=worker, wseq=i), i + 1, "r")))
    (run / "events.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))
    spool = []
    for i in spooled:
        spool.append(event_encoder.encode(Step(step=i, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0,
                                               time=1.0 + i, worker=worker, wseq=i)))
    (run / "spool" / f"{worker}.{min(spooled or [1]):012d}.jsonl").write_bytes(b"".join(x + b"\n" for x in spool))
    write_engine_info(run, engine if engine is not None else {"pid": DEAD, "started": 1.0})
    return run


def events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_bytes().splitlines() if line.strip()]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(n_stored=st.integers(0, 6), extra=st.integers(0, 6), overlap=st.integers(0, 6), again=st.booleans())
def test_fold_stores_each_spooled_event_once_after_the_alert(tmp_path_factory, n_stored, extra, overlap, again):
    from engine.runs import fold_spool, summary

    # the spool holds some steps the engine stored too (it relayed them before it died) and some it never saw
    spooled = list(range(max(1, n_stored - overlap + 1), n_stored + extra + 1))
    run = spool_run(tmp_path_factory.mktemp("f"), n_stored, spooled)
    fresh = [s for s in spooled if s > n_stored]
    assert fold_spool(run) == (len(fresh) + 1 if fresh else 0)
    if again:
        assert fold_spool(run) == 0  # nothing left: the spool is gone
    evs = events(run)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert [e["step"] for e in evs if e["type"] == "step"] == list(range(1, n_stored + extra + 1))
    alerts = [i for i, e in enumerate(evs) if e["type"] == "alert"]
    assert len(alerts) == (1 if fresh else 0)
    if fresh:
        assert evs[alerts[0]]["kind"] == "engine_lost" and evs[alerts[0] + 1]["step"] == fresh[0]
        assert json.loads((run / "engine.json").read_text())["folded"] == len(evs)
    assert not (run / "spool").exists()
    assert summary(run)["step"] == n_stored + extra


def test_no_fold_beside_a_live_engine_a_held_lock_or_a_running_worker(tmp_path):
    from engine.runs import fold_spool, lock_events

    # a spooling worker still runs (this process): its events may still come
    run = spool_run(tmp_path / "a", 2, [3, 4], worker_pid=os.getpid())
    before = (run / "events.jsonl").read_bytes()
    assert fold_spool(run) == 0 and (run / "events.jsonl").read_bytes() == before
    # an engine runs (this process, started before its engine.json)
    run = spool_run(tmp_path / "b", 2, [3, 4], engine={"pid": os.getpid(), "started": 9e12})
    assert fold_spool(run) == 0 and (run / "spool").exists()
    # the lock is held (an engine starting up): nothing is written; once it is free, the fold goes on
    run = spool_run(tmp_path / "c", 2, [3, 4])
    fd = lock_events(run)
    try:
        assert fold_spool(run) == 0 and (run / "spool").exists()
    finally:
        os.close(fd)
    assert fold_spool(run) == 3
    # a worker, or the engine, of another machine (a shared filesystem): a pid says nothing here
    run = spool_run(tmp_path / "e", 2, [3, 4], host="othernode")
    assert fold_spool(run) == 0 and (run / "spool").exists()
    run = spool_run(tmp_path / "f", 2, [3, 4], engine={"pid": DEAD, "started": 1.0, "host": "othernode"})
    assert fold_spool(run) == 0 and (run / "spool").exists()
    # a folder it may not write: nothing happens, readers go on as before
    run = spool_run(tmp_path / "d", 2, [3, 4])
    os.chmod(run / "events.jsonl", 0o444)
    if not os.access(run / "events.jsonl", os.W_OK):  # (root writes anyway)
        assert fold_spool(run) == 0 and (run / "spool").exists()


def test_a_second_engine_waits_for_the_lock_then_refuses(tmp_path):
    import time

    import pytest

    from engine.runs import lock_events
    from engine.util import UsageError

    (tmp_path / "r").mkdir()
    fd = lock_events(tmp_path / "r")
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="another process holds its event log"):
        lock_events(tmp_path / "r", wait_s=0.3)
    assert time.monotonic() - t0 >= 0.3
    os.close(fd)
    os.close(lock_events(tmp_path / "r", wait_s=0.3))
