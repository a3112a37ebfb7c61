"""RunState's per-step history stays bounded however long the run, and still covers all of it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.state import History, RunState
from engine.protocol import Step


@settings(max_examples=60, deadline=None)
@given(recent=st.integers(1, 40), older=st.integers(1, 40), n=st.integers(0, 3000))
def test_history_bounded_newest_whole_oldest_kept(recent, older, n):
    h = History(recent=recent, older=older)
    for i in range(n):
        h.append(i)
    rows = list(h)
    assert len(rows) == len(h) <= recent + older + max(1, recent // 4)
    assert rows == sorted(set(rows))  # in order, no row twice
    assert h.appended == n
    if n:
        assert rows[0] == 0  # the run's start is still there ("all" covers the whole run)
        tail = min(n, recent)
        assert rows[-tail:] == list(range(n - tail, n))  # the newest ones, every one
        assert h[-tail:] == rows[-tail:] and h[-1] == n - 1
        assert list(reversed(h)) == rows[::-1]
        gaps = {b - a for a, b in zip(rows, rows[1:])}
        assert max(gaps, default=1) <= 2 * n / max(1, older) + 1  # thinned evenly, not cut
    assert h == rows and bool(h) == bool(n)


def test_state_steps_bounded_over_a_long_run():
    s = RunState()
    for i in range(1, 50_001):
        s.apply(Step(seq=i, time=float(i), run="r", step=i, loss=1.0 / i, lr=1e-4, grad_norm=1.0, tokens_per_s=10.0,
                     mem_allocated=1.0))
    assert len(s.steps) <= 5000 and len(s.memory) <= 5000
    assert s.steps[0][0] == 1 and s.steps[-1][0] == 50_000
    assert [r[0] for r in s.steps[-1000:]] == list(range(49_001, 50_001))  # the Charts' last-1000 window whole
    assert s.step == 50_000 and s.eta_s() is None  # no total: no ETA, no crash
