"""The learning-rate schedule as plain functions (engine/worker/schedule.py): the warm-up, the cosine to
--min_lr_ratio, and a resume's continuation, which never jumps (tests/test_schedule.py runs it in a worker)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.worker.schedule import Schedule, lr_lambda, resumed


def test_warm_up_is_linear_then_the_cosine_starts_at_the_peak():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # step s runs at (s + 1) / warmup
    assert f(4) == 1.0  # the cosine's first step is the peak
    assert f(5) < 1.0


def test_the_cosine_reaches_the_floor_at_the_total_and_stays_there():
    f = lr_lambda(warmup=2, total=12, min_ratio=0.1)
    assert f(12) == pytest.approx(0.1)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: half way between peak and floor
    assert f(40) == pytest.approx(0.1)  # past the total (a resume to fewer steps): the floor
    values = [f(s) for s in range(2, 13)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_no_warm_up_and_a_total_within_the_warm_up():
    assert lr_lambda(0, 10, 0.0)(0) == 1.0
    assert lr_lambda(0, 10, 0.0)(10) == pytest.approx(0.0)
    f = lr_lambda(warmup=5, total=3, min_ratio=0.2)  # never leaves the warm-up in 3 steps; no division by 0
    assert [f(s) for s in range(3)] == pytest.approx([0.2, 0.4, 0.6])
    assert f(5) == 1.0 and f(6) == pytest.approx(0.2)


def test_a_continued_cosine_goes_from_the_rate_in_force_to_the_floor():
    f = lr_lambda(warmup=2, total=12, min_ratio=0.1, start=3, start_ratio=0.8)
    assert f(3) == pytest.approx(0.8)
    assert f(12) == pytest.approx(0.1)
    for s in range(3, 13):
        assert f(s) == pytest.approx(0.1 + 0.7 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 9)))
    g = lr_lambda(warmup=2, total=12, min_ratio=0.1)
    assert [f(s) for s in range(3)] == [g(s) for s in range(3)]  # before the start: the run's own schedule


def test_resume_with_the_same_total_keeps_the_schedule_exactly():
    saved = Schedule(total=12, start=3, start_ratio=0.8)
    assert resumed(saved, 12, 7, 2, 0.1, lr=1e-3, base_lr=2e-3) == (saved, "")


def test_resume_with_another_total_past_the_warm_up_continues_from_the_rate_in_force():
    sched, message = resumed(Schedule(total=6), 12, 3, 2, 0.1, lr=0.004, base_lr=0.005)
    assert sched == Schedule(total=12, start=3, start_ratio=pytest.approx(0.8))
    assert message == ("resume: 6 steps before, 12 now: the learning rate goes on from 0.004 (in force at step 3) "
                       "and decays by a cosine to 0.0005 at step 12")


def test_resume_with_another_total_within_the_warm_up_goes_on_warming_up():
    sched, message = resumed(Schedule(total=6), 10, 2, 4, 0.0, lr=0.003, base_lr=0.005)
    assert sched == Schedule(total=10)
    assert "still warming up (step 2 of 4)" in message and "a cosine to 0 at step 10" in message
    # an earlier continuation is continued again, even at a step inside the (old) warm-up
    sched, _ = resumed(Schedule(total=6, start=1, start_ratio=0.5), 10, 2, 4, 0.0, lr=0.002, base_lr=0.005)
    assert sched == Schedule(total=10, start=2, start_ratio=pytest.approx(0.4))


def test_what_a_checkpoint_keeps():
    assert Schedule(total=12, start=3, start_ratio=0.8).to_dict() == {"total": 12, "start": 3, "start_ratio": 0.8}
    assert Schedule.saved({"schedule": {"total": 12, "start": 3, "start_ratio": 0.8}}) == Schedule(12, 3, 0.8)
    assert Schedule.saved({"total_steps": 9}) == Schedule(9)  # a checkpoint older than the saved schedule


@settings(max_examples=300, deadline=None)
@given(warmup=st.integers(0, 50), total=st.integers(1, 400), step=st.integers(0, 400), new_total=st.integers(1, 800),
       floor=st.floats(0.0, 0.9), twice=st.booleans(), second=st.integers(0, 400), third=st.integers(1, 800))
def test_a_resume_never_makes_the_rate_jump(warmup, total, step, new_total, floor, twice, second, third):
    """Resumed at any step to any total (maybe twice): the rate at the resume step is the one in force
    there, and from there on it never rises except by the warm-up going on (the rate a step uses is
    f(step), as torch's LambdaLR applies it)."""
    base = 2e-4
    saved = Schedule(total)
    for at, to in [(step, new_total)] + ([(max(second, step), third)] if twice else []):
        old = saved.lr_lambda(warmup, floor)
        sched, _ = resumed(saved, to, at, warmup, floor, lr=base * old(at), base_lr=base)
        new = sched.lr_lambda(warmup, floor)
        assert new(at) == pytest.approx(old(at), rel=1e-12, abs=1e-15)
        rates = [new(s) for s in range(at, max(to, at) + 3)]
        tail = [r for s, r in zip(range(at, max(to, at) + 3), rates) if s >= warmup or sched.start_ratio is not None]
        assert all(b <= a * (1 + 1e-12) + 1e-15 for a, b in zip(tail, tail[1:]))
        assert min(tail, default=floor) >= floor - 1e-12 and max(rates) <= 1.0 + 1e-12
        saved = sched
