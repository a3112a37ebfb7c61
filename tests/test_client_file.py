"""EngineClient without an engine: events come from the run's events.jsonl, and only what the file
gained since the last look is read (a finished run's dashboard asks every few seconds)."""

from synthetic_runs import encode, run_events

from engine.client import EngineClient


def test_a_finished_run_is_read_once_then_only_what_it_gains(tmp_path):
    run = tmp_path / "done"
    run.mkdir()
    lines = encode(run_events(steps=30)).splitlines(keepends=True)
    head = b"".join(lines[:20])
    path = run / "events.jsonl"
    path.write_bytes(head + lines[20][:7])  # a torn last line: not an event yet
    client = EngineClient(run)
    assert not client.live
    assert [e.seq for e in client._file_after(0)] == list(range(1, 21))
    assert client._file_mark == (len(head), 20)  # read up to the torn line, no further
    assert client._file_after(20) == [] and client._file_mark == (len(head), 20)
    path.write_bytes(head + b"".join(lines[20:]))  # the torn line completed, the rest appended
    client.last = 20
    assert [e.seq for e in client.events(timeout=0)] == list(range(21, len(lines) + 1))
    assert client._file_mark == (path.stat().st_size, len(lines))
    # asked about earlier events, or the file replaced by a shorter one: read from the start
    assert [e.seq for e in client._file_after(10)] == list(range(11, len(lines) + 1))
    path.write_bytes(b"".join(lines[:5]))
    assert [e.seq for e in client._file_after(0)] == list(range(1, 6))
    assert [e.seq for e in client._file_after(3)] == [4, 5]
