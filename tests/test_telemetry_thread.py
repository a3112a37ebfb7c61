"""The telemetry thread stops and joins cleanly (its stop event no longer hides threading.Thread._stop,
which join calls), and says once on stderr what failed instead of skipping samples silently."""

import time


def test_telemetry_thread_stops_joins_and_says_once_what_failed(capfd):
    from engine.worker.telemetry import TelemetryThread

    calls = []

    def failing_emit(ev):
        calls.append(ev)
        raise ValueError("the sink is gone")

    t = TelemetryThread(failing_emit, 0.01, None)
    t.start()
    deadline = time.time() + 30
    while len(calls) < 5 and time.time() < deadline:
        time.sleep(0.01)
    t.stop()
    t.join(timeout=10)  # threading.Thread.join calls self._stop(): the thread's own Event must not hide it
    assert not t.is_alive() and len(calls) >= 5
    err = capfd.readouterr().err
    assert err.count("[voxtui] telemetry: a sample failed") == 1, err
    assert "ValueError: the sink is gone" in err

    got = []
    ok = TelemetryThread(got.append, 0.01, None, rank=3)
    ok.start()
    while not got and time.time() < deadline:
        time.sleep(0.01)
    ok.stop()
    ok.join(timeout=10)
    assert not ok.is_alive() and got[0].rank == 3 and got[0].rss > 0
    assert capfd.readouterr().err == ""
