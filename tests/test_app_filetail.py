"""The dashboard follows a run no engine serves from its events.jsonl by what was appended, never by
reading the whole file again (a long finished run left open stays idle)."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from app.connection import FileTail
from engine.protocol import Step


def line(i: int, pad: int) -> bytes:
    ev = Step(seq=i, step=i, loss=1.0, lr=0.1, grad_norm=1.0, tokens_per_s=1.0, run="r" + "x" * pad)
    return msgspec.json.encode(ev) + b"\n"


@settings(max_examples=60, deadline=None)
@given(pads=st.lists(st.integers(0, 300), min_size=0, max_size=80), last=st.integers(0, 90),
       block=st.sampled_from([7, 64, 1000, 1 << 16]), torn=st.integers(0, 40), more=st.integers(0, 5))
def test_tail_gives_the_events_after_last_then_only_what_was_appended(tmp_path_factory, pads, last, block, torn, more):
    path = tmp_path_factory.mktemp("tail") / "events.jsonl"
    n = len(pads)
    full = [line(i + 1, p) for i, p in enumerate(pads)]
    nxt = line(n + 1, 3)
    path.write_bytes(b"".join(full) + nxt[:torn])
    tail = FileTail(path)
    tail.BLOCK = block
    assert [e.seq for e in tail.after(last)] == list(range(last + 1, n + 1))  # a torn last line waits
    with open(path, "ab") as f:
        f.write(nxt[torn:] + b"".join(line(n + 2 + k, 5) for k in range(more)))
    got = tail.after(max(last, n))
    # what was appended since, every line in the file's order, whatever its seq (the seqs are the file's
    # business: one line with a high seq written by hand must not hide the real events after it)
    assert [e.seq for e in got] == list(range(n + 1, n + 2 + more))
    assert tail.offset == path.stat().st_size and tail.after(n + 1 + more) == []
    path.write_bytes(b"".join(full[:1]))  # replaced by a shorter file: read again from its start, by seq
    assert [e.seq for e in tail.after(0)] == ([1] if n else [])
