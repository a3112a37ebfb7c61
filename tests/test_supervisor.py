"""Supervisor.first_death: which rank is at fault, from when each rank's process was seen gone and when the
workers' final status was sent (its own time) — not when a busy engine got round to reading it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from engine.daemon.supervisor import EXIT_WAIT, Supervisor, exit_status, torchrun_root_cause
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


def test_a_rank_gone_without_a_final_status_is_named_with_how_it_ended():
    mono, wall = time.monotonic(), time.time()
    s = supervisor({1: (mono - EXIT_WAIT - 1, wall - EXIT_WAIT - 1)}, {1: 0})
    s.codes = {1: 2}  # it refused the configuration, and rank 0 never said why: counts once the moment passed
    assert s.first_death(None, float("inf")) == 1
    assert s.ended(1) == "exited with code 2"
    assert supervisor({}, {1: None}).ended(1) == "exited unexpectedly"  # reaped before /proc was read
    assert supervisor({}, {1: int(signal.SIGSEGV)}).ended(1) == "was killed by SIGSEGV"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how,expected", [("exit", (0, 2)), ("kill", (signal.SIGKILL, 0))])
def test_exit_status_reads_how_a_zombie_ended(how, expected):
    """A real child, not yet reaped: its signal or exit code from /proc, as the rank watcher reads them."""
    code = "import sys; sys.exit(2)" if how == "exit" else "import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        if how == "kill":
            os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while exit_status(child.pid) in (None, (0, 0)) and time.monotonic() < deadline:
            time.sleep(0.02)  # alive: field 52 reads 0 until it ends
        assert exit_status(child.pid) == expected
        s = Supervisor(1)
        s.killed, s.codes = {0: expected[0]}, ({0: expected[1]} if not expected[0] else {})
        assert s.ended(0) == ("exited with code 2" if how == "exit" else
                              "was killed by SIGKILL (if no one sent it, the kernel's out-of-memory killer did: see dmesg)")
    finally:
        child.kill()
        child.wait()
    assert exit_status(child.pid) is None  # reaped: unknown


REPORT = """============================================================
engine.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_07:28:25
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 6452)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_07:28:25
  host      : localhost
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: 6451){sig}
  error_file: <N/A>
============================================================
"""


def test_torchrun_s_own_report_names_the_rank_a_signal_ended(tmp_path):
    """Where torchrun reaped a rank before the watcher saw it: its failure report's root cause, in the part
    of worker.log this torchrun wrote (an earlier run's report before it does not count)."""
    log = tmp_path / "worker.log"
    log.write_text("step 1\n" + REPORT.format(rank=1, code=-9, sig="  (SIGKILL)"))
    assert torchrun_root_cause(log) == (1, 9)
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("resumed\n" + REPORT.format(rank=0, code=2, sig=""))
    assert torchrun_root_cause(log, start) is None  # this run's rank exited with a code: no signal
    assert torchrun_root_cause(log, log.stat().st_size) is None  # nothing written since
    assert torchrun_root_cause(tmp_path / "none.log") is None
