"""Supervisor.first_death: which rank is at fault, from when each rank's process was seen gone and when the
workers' final status was sent (its own time) — not when a busy engine got round to reading it."""

import time

from engine.daemon.supervisor import EXIT_WAIT, Supervisor
from engine.protocol import Status


def supervisor(gone: dict[int, tuple[float, float]], killed: dict[int, int | None]) -> Supervisor:
    """``gone``: rank → (monotonic, wall) times its process was seen gone; no watcher thread is started
    (no rank pids are known)."""
    s = Supervisor(2)
    s.gone = {r: m for r, (m, _) in gone.items()}
    s.gone_wall = {r: w for r, (_, w) in gone.items()}
    s.killed = dict(killed)
    return s


def test_a_rank_that_exits_after_sending_the_failure_did_not_die_however_late_it_is_read():
    """How each rank ended is unknown here (None: torchrun reaped it before /proc was read), so the times
    decide — the case a loaded machine produced in CI."""
    mono, wall = time.monotonic(), time.time()
    final = Status(state="failed", message="--grad_accum 64: no step can run", time=wall - 1.0)
    # exited 0.1 s after the status was sent; the engine, busy, read the status 0.5 s after the exit
    s = supervisor({0: (mono - 0.9, wall - 0.9)}, {0: None})
    assert s.first_death(final, final_at=mono - 0.4) is None
    # a rank gone before its peers sent the failure (it crashed; they noticed) is at fault
    s = supervisor({1: (mono - 3.0, wall - 3.0), 0: (mono - 0.9, wall - 0.9)}, {1: None, 0: None})
    assert s.first_death(final, final_at=mono - 0.4) == 1
    # one that exited by itself (status 0) with a final status sent: not a death
    assert supervisor({0: (mono - 3.0, wall - 3.0)}, {0: 0}).first_death(final, final_at=mono - 0.4) is None
    # killed by a signal: died, whatever followed
    s = supervisor({0: (mono - 0.9, wall - 0.9)}, {0: 9})
    assert s.first_death(final, final_at=mono - 0.4) == 0


def test_a_rank_gone_without_a_final_status_dies_after_a_moment():
    mono, wall = time.monotonic(), time.time()
    assert supervisor({0: (mono - 0.5, wall - 0.5)}, {0: 0}).first_death(None, float("inf")) is None
    s = supervisor({0: (mono - EXIT_WAIT - 0.5, wall - EXIT_WAIT - 0.5)}, {0: 0})
    assert s.first_death(None, float("inf")) == 0
    assert Supervisor(2).first_death(None, float("inf")) is None  # nobody gone
