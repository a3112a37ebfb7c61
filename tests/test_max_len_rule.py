"""Rows longer than --max_len: one rule (``engine.formatting``), and the worker's tokenisation and the data
tools (analyze, audit, find-long, split) agree on it row by row, on generated rows."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from engine.data.analyze import analyze
from engine.data.audit import audit
from engine.data.find_long import find_long
from engine.data.split import split
from engine.formatting import fit_target, kept_target_len, over_max_len, shortest_max_len
from engine.rows import parse_line
from engine.util import UsageError
from engine.worker.batching import tokenize

lengths = st.integers(1, 300)


@settings(max_examples=300, deadline=None)
@given(p=lengths, t=lengths, max_len=st.integers(1, 400), long=st.sampled_from(["truncate", "drop"]))
def test_the_rule(p, t, max_len, long):
    keep = kept_target_len(p, t, max_len, long)
    assert keep == int(kept_target_len(np.array([p]), np.array([t]), max_len, long)[0])  # one row = a column
    if not over_max_len(p, t, max_len):
        assert keep == t and p + t <= max_len
    elif long == "drop" or p > max_len - 2:
        assert keep == 0  # dropped: --long drop, or a prompt that leaves no room for an answer token and EOS
    else:
        assert keep == max_len - p >= 2 and p + keep == max_len
    target = list(range(100, 100 + t - 1)) + [2]  # the answer, then EOS
    kept = fit_target([1] * p, target, max_len, long)
    assert (kept is None) == (keep == 0)
    if kept is not None:
        assert len(kept) == keep and kept[-1] == 2 and kept[:-1] == target[:keep - 1]  # cut before the EOS
    need = shortest_max_len(p, t, long)
    assert kept_target_len(p, t, need, long) > 0 and (need == 1 or kept_target_len(p, t, need - 1, long) == 0)


WORDS = ["the", "airway", "inflammation", "chronic", "uric", "acid", "joint", "diuretics", "blood", "pressure",
         "천식", "기도에", "만성", "염증이", "생기는", "질환입니다", "혈압이", "높은", "상태", "두통", "42", "7.5", "—", "é"]


def text(draw, lo, hi):
    return " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=lo, max_size=hi)))


@st.composite
def datasets(draw):
    n = draw(st.integers(1, 12))
    rows = []
    for i in range(n):
        question = f"Q{i}: " + text(draw, 0, 25)
        answer = text(draw, 1, 40)
        if draw(st.booleans()):
            rows.append({"instruction": question, "input": text(draw, 0, 8), "output": answer})
        else:
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows, draw(st.integers(8, 120))


def worker_row(tmp_path, fmt, row, max_len, long):
    """What the worker's tokenize makes of one row: None (dropped) or (ids, prompt length)."""
    tok = tokenize(str(write_jsonl(tmp_path / "one.jsonl", [row])), fmt, max_len, long, None)
    assert len(tok) + tok.dropped == 1
    return (tok.example(0)[0].tolist(), tok.example(0)[1]) if len(tok) else None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=datasets())
def test_worker_and_data_tools_agree(tmp_path, fmt, data):
    rows, max_len = data
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    full = [len(p) + len(t) for p, t in fmt.encode([parse_line(json.dumps(r, ensure_ascii=False).encode())[0]
                                                    for r in rows])]
    truncate = [worker_row(tmp_path, fmt, r, max_len, "truncate") for r in rows]
    drop = [worker_row(tmp_path, fmt, r, max_len, "drop") for r in rows]
    over = [i + 1 for i, n in enumerate(full) if n > max_len]  # 1-based lines
    # the worker: over rows are exactly those --long drop drops; --long truncate keeps max_len tokens of them
    assert over == [i + 1 for i, w in enumerate(drop) if w is None]
    for i, w in enumerate(truncate):
        if w is not None and i + 1 in over:
            assert len(w[0]) == max_len and w[0][-1] == fmt.eos
    whole_t = tokenize(path, fmt, max_len, "truncate", None)
    whole_d = tokenize(path, fmt, max_len, "drop", None)
    dropped_t = [i + 1 for i, w in enumerate(truncate) if w is None]
    truncated_t = [i + 1 for i, w in enumerate(truncate) if w is not None and i + 1 in over]
    assert (whole_t.dropped, whole_t.truncated, whole_d.dropped, whole_d.truncated) == (
        len(dropped_t), len(truncated_t), len(over), 0)
    assert whole_t.full_lengths.tolist() == full

    a = analyze(path, max_len=max_len, workers=1)
    assert a["over_max_len"] == len(over) and a["over_max_len_lines"] == over
    assert [d["line"] for d in audit(path, max_len=max_len, workers=1)["defects"] if d["kind"] == "too_long"] == over

    f = find_long(path, max_len, workers=1)
    assert [r["line"] for r in f["long_rows"]] == over
    t = f["remedies"]["truncate"]
    assert (t["rows_truncated"], t["rows_unsaveable"]) == (len(truncated_t), len(dropped_t))
    lost = sum(full[i - 1] - len(truncate[i - 1][0]) for i in truncated_t)  # target tokens the worker cuts
    assert t["target_tokens_lost"] == lost
    assert f["remedies"]["drop"]["rows_lost"] == len(over)

    def answer(w):  # the text of the answer tokens the worker keeps
        return fmt.decode(w[0][w[1]:-1]).rstrip("\ufffd").strip()

    for long, worker in (("drop", drop), ("truncate", truncate)):
        train, val = tmp_path / f"t-{long}.jsonl", tmp_path / f"v-{long}.jsonl"
        # split writes text, so it cuts at a character: a row whose kept answer tokens hold no whole
        # character (the limit falls inside the answer's first one) it drops, where the worker keeps a fragment
        gone = [i + 1 for i, w in enumerate(worker) if w is None or not answer(w)]
        kept = [i + 1 for i in range(len(rows)) if i + 1 not in gone]
        if not kept:
            with pytest.raises(UsageError, match="no usable row, nothing written"):
                split(path, str(train), str(val), val_frac=0.0, max_len=max_len, long=long)
            continue
        s = split(path, str(train), str(val), val_frac=0.0, max_len=max_len, long=long)
        assert [d["line"] for d in s["dropped"]] == gone and all(d["reason"] == "too_long" for d in s["dropped"])
        assert s["truncated"] == len(set(truncated_t) & set(kept))
        # split's file fits as it is, and trains as the worker trains the original rows
        again = tokenize(str(train), fmt, max_len, long, None)
        assert (again.dropped, again.truncated, len(again)) == (0, 0, len(kept))
        for j, line in enumerate(kept):
            ids, prompt_len = worker[line - 1]
            got, got_prompt = again.example(j)
            assert got_prompt == prompt_len and got[-1] == fmt.eos and len(got) <= len(ids)
            assert fmt.decode(got[prompt_len:-1].tolist()) == answer(worker[line - 1])
