"""`last_event` (what `engine list`, `status` and the run picker show) reads events.jsonl backwards once,
then only what was appended: whatever is appended, cut or replaced between two calls — torn lines,
malformed lines, events of other types, lines longer than its blocks — it answers what a fresh
backwards read of the file answers (hypothesis-generated histories)."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KINDS = ("status", "step")
line = st.one_of(
    st.builds(lambda k, n: json.dumps({"type": k, "n": n}, separators=(",", ":")).encode(), st.sampled_from(KINDS),
              st.integers(0, 10**6)),
    st.builds(lambda k: f'{{"type":"{k}","n":'.encode(), st.sampled_from(KINDS)),  # malformed: cut short
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.just(b'{"type":"step","pad":"' + b"x" * (1 << 20) + b'"}'),  # longer than one block
    st.just(b'{"text":"\\"type\\":\\"status\\""}'),  # the tag inside a string: not a status
)
# what happens to the file between two reads
change = st.one_of(
    st.tuples(st.just("append"), st.lists(line, max_size=4), st.booleans()),  # bool: the last line torn
    st.tuples(st.just("finish"), st.just([]), st.just(False)),  # the torn line gets its newline
    st.tuples(st.just("cut"), st.integers(0, 200), st.just(False)),  # shorter (a torn tail repaired)
    st.tuples(st.just("replace"), st.lists(line, max_size=3), st.just(False)),  # a new file in its place
    # rewritten in place (the same inode: a folder deleted and a run of the same name started again)
    st.tuples(st.just("rewrite"), st.lists(line, max_size=3), st.integers(10**8, 10**9)),
)


def fresh(run, kind):
    from engine import runs

    runs._LAST_EVENT.clear()
    return runs.last_event(run, kind)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(change, min_size=1, max_size=8))
def test_incremental_read_equals_a_fresh_read(tmp_path_factory, changes):
    from engine import runs

    run = tmp_path_factory.mktemp("r")
    path = run / "events.jsonl"
    path.write_bytes(b"")
    runs._LAST_EVENT.clear()
    cached = {}
    for what, arg, torn in changes:
        if what == "append":
            body = b"\n".join(arg)
            with open(path, "ab") as f:
                f.write(body + (b"" if torn or not arg else b"\n"))
        elif what == "finish":
            with open(path, "ab") as f:
                f.write(b"\n")
        elif what == "cut":
            size = path.stat().st_size
            os.truncate(path, max(size - arg, 0))
        elif what == "rewrite":
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(b"".join(x + b"\n" for x in arg) + f'{{"type":"note","id":{torn}}}\n'.encode())
        else:
            tmp = run / "events.tmp"
            tmp.write_bytes(b"".join(x + b"\n" for x in arg))
            os.replace(tmp, path)
        for kind in KINDS:
            cached[kind] = runs.last_event(run, kind)
        saved = dict(runs._LAST_EVENT)
        for kind in KINDS:
            assert cached[kind] == fresh(run, kind), (kind, what)
        runs._LAST_EVENT.clear()
        runs._LAST_EVENT.update(saved)  # go on from the incremental state
