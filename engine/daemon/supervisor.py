"""The torchrun group of one engine: spawned, its ranks found, watched, and ended.

torchrun runs in a session of its own (the terminal's Ctrl-C reaches only the engine). Its ranks are
found among its children by their ``RANK``; once all are known, a thread notes every 20 ms when each
one's process ends, and by which signal (read from /proc while torchrun has not reaped it), so the
rank that went first — the one at fault — can be named. Ending the group is SIGTERM to torchrun and
every descendant, then SIGKILL to what is left after a grace period, without blocking the engine's
loop. Nothing here emits events: the engine decides what a death means for the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.protocol import Status

WATCH_EVERY = 0.02  # seconds between two looks at the ranks
EXIT_WAIT = 10.0  # a rank gone with no final status for this long died (a normal end reports at once; a busy
# engine may read that status seconds late: 3 s counted a worker that refused its plan as a rank death under load)


MONITOR_S = 0.5  # torchrun looks at its ranks this often (its default: 0.1 s)


def launch_args(run: str, nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "") -> list[str]:
    """torchrun's launch flags: standalone on one machine, c10d rendezvous across several. torchrun reaps a
    rank that ended within its monitor interval; the engine reads how the rank ended (the signal that killed
    it: SIGKILL, the OOM killer's) from /proc before that, every 20 ms — at 0.1 s a busy machine's engine
    missed it ("exited unexpectedly"), so torchrun looks every MONITOR_S."""
    monitor = ["--monitor_interval", str(MONITOR_S)]
    if nnodes <= 1:
        return ["--standalone", "--nproc_per_node", str(nproc), *monitor]
    return ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", run, *monitor]


def torchrun_cmd(run_dir: Path, nproc: int, resume: bool, nnodes: int = 1, rdzv_endpoint: str = "") -> list[str]:
    """``torchrun … -m engine.train`` for this node (rank 0 of the rendezvous) of the run."""
    return [
        sys.executable, "-m", "torch.distributed.run", *launch_args(run_dir.name, nproc, nnodes, 0, rdzv_endpoint),
        "-m", "engine.train", "--engine", str(run_dir / "engine.json"),
    ] + (["--resume", str(run_dir)] if resume else ["--config", str(run_dir / "config.toml")])


def exit_status(pid: int) -> tuple[int, int] | None:
    """How a zombie process ended, from /proc: (the signal that ended it, 0 when it exited by itself; its
    exit code); None when unknown (already reaped, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        status = int(fields[49])  # field 52, exit_code (Linux ≥ 3.5), as waitpid's status
    except (OSError, IndexError, ValueError):
        return None
    return status & 0x7F, (status >> 8) & 0xFF


def killed_by(sig: int) -> str:
    """A rank's death by a signal, in words (SIGKILL with its likely sender when no one sent it by hand)."""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    oom = " (if no one sent it, the kernel's out-of-memory killer did: see dmesg)" if sig == signal.SIGKILL else ""
    return f"was killed by {name}{oom}"


def torchrun_root_cause(log: Path, start: int = 0) -> tuple[int, int] | None:
    """(rank, signal) from the end of torchrun's output (``log`` from byte ``start``: what this torchrun
    wrote), where its failure report names a rank a signal ended as the root cause ("rank : 0 (local_rank:
    0)", "exitcode : -9"); None otherwise."""
    import re

    try:
        with open(log, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - (1 << 16)))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = re.findall(r"Root Cause \(first observed failure\):\s*\[\d+\]:.*?^\s*rank\s*:\s*(\d+).*?"
                       r"^\s*exitcode\s*:\s*(-?\d+)", tail, re.S | re.M)
    if not found:
        return None
    rank, code = map(int, found[-1])
    return (rank, -code) if code < 0 else None


class Supervisor:
    """torchrun (``proc``) and the ranks of this node (``ranks``: rank → pid)."""

    def __init__(self, nproc: int) -> None:
        self.nproc = nproc
        self.proc: subprocess.Popen | None = None
        self.ranks: dict[int, int] = {}  # rank → pid
        self.log: Path | None = None  # torchrun's output, and where this group's part of it starts
        self.log_start = 0
        self.gone: dict[int, float] = {}  # rank → when its process was first seen gone (monotonic)
        self.gone_wall: dict[int, float] = {}  # the same moment by the wall clock (the workers' events' clock)
        self.killed: dict[int, int | None] = {}  # rank → the signal that ended it (0: it exited; None: unknown)
        self.codes: dict[int, int] = {}  # rank → its exit code, where it exited by itself and that was read
        self.kill_at: float | None = None  # SIGTERM sent: SIGKILL what is left of ``dying`` at this time
        self.dying: list = []
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()

    def spawn(self, cmd: list[str], log: Path) -> int:
        """Start the group in a session of its own, its output appended to ``log``; returns its pid."""
        with open(log, "ab") as out:
            self.log, self.log_start = log, out.tell()  # what this group writes starts here
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=os.getcwd())
        return self.proc.pid

    def poll(self) -> int | None:
        """torchrun's exit code, or None while it runs."""
        return self.proc.poll()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def discover_ranks(self) -> None:
        """Note the ranks that have appeared: torchrun's children with a ``RANK`` in their environment."""
        import psutil

        for p in self._descendants():
            if p.pid in self.ranks.values():
                continue
            try:
                env = p.environ()
            except psutil.Error:
                continue
            if "RANK" in env and p.ppid() == self.proc.pid:
                self.ranks[int(env["RANK"])] = p.pid

    def first_death(self, final: Status | None, final_at: float) -> int | None:
        """The rank at fault once one has died (None until then), ``final`` being the workers' final status
        if one came (at ``final_at``). Starts the watcher once every rank is known.

        The rank that went first is at fault; a rank that ends normally is followed at once by the run's
        final status, so one gone without it is given a moment before it counts as a death. A rank
        killed by a signal died, whatever followed; one that exited after the workers *sent* their
        failure (with its reason: the status's own time, by this host's wall clock) did not, however late
        a busy engine reads that status, nor did one that exited by itself (an exit code, not a signal) with
        a final status sent, whenever it left."""
        now = time.monotonic()
        self._watch_ranks()
        rank = self.first_gone()
        if rank is None:
            return None
        sent = final.time if final is not None and final.time > 0 else None
        before_final = (self.gone_wall[rank] < sent) if sent is not None and rank in self.gone_wall else \
            self.gone[rank] < final_at
        died = self.killed.get(rank) or (final is None and now - self.gone[rank] > EXIT_WAIT) or (
            final is not None and self.killed.get(rank) is None and before_final)
        return rank if died else None

    def stopped_ranks(self) -> dict[int, int]:
        """The ranks whose process is stopped now (SIGSTOP, a Ctrl-Z in the terminal that started it, a
        debugger holding it): rank → pid. The other ranks wait for such a rank at their next collective."""
        import psutil

        out = {}
        for rank, pid in self.ranks.items():
            if rank in self.gone:
                continue
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                    out[rank] = pid
        return out

    def first_gone(self) -> int | None:
        """The rank whose process was seen gone first (None: none seen gone, or the ranks never all known)."""
        return min(self.gone, key=lambda r: (self.gone[r], r)) if self.gone else None

    def ended(self, rank: int) -> str:
        """How a gone rank ended, in words: by which signal, or with which exit code, where /proc said."""
        sig = self.killed.get(rank)
        if sig:
            return killed_by(sig)
        if rank in self.codes:
            return f"exited with code {self.codes[rank]}"
        return "exited unexpectedly"

    def _watch_ranks(self) -> None:
        """A thread that notes, every 20 ms, when each rank's process ends: the first to go is at fault
        (the others fail a moment later, when a collective finds their peer gone)."""
        if self._watcher is not None or len(self.ranks) < self.nproc:
            return
        self._watcher = threading.Thread(target=self._watch, name="voxtui-rank-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        import psutil

        procs = {}
        for rank, pid in self.ranks.items():
            try:
                procs[rank] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                self.gone_wall.setdefault(rank, time.time())
                self.gone.setdefault(rank, time.monotonic())
        while len(self.gone) < len(self.ranks) and not self._watch_stop.is_set():
            for rank, p in procs.items():
                if rank in self.gone:
                    continue
                try:
                    alive = p.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive:
                    how = exit_status(p.pid)  # readable while torchrun has not reaped it
                    self.killed[rank] = how[0] if how else None
                    if how and not how[0]:
                        self.codes[rank] = how[1]
                    self.gone_wall[rank] = time.time()
                    self.gone[rank] = time.monotonic()
            time.sleep(WATCH_EVERY)

    def kill(self, grace: float = 5.0, wait: bool = True) -> None:
        """SIGTERM torchrun, every descendant and every rank seen, then SIGKILL what is left after ``grace``:
        here (``wait``), or from the engine's loop (``reap``), which never blocks on it."""
        import psutil

        procs = self._descendants()
        for pid in [self.proc.pid, *self.ranks.values()]:
            with contextlib.suppress(psutil.Error):
                if all(p.pid != pid for p in procs):
                    procs.append(psutil.Process(pid))
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        self.dying, self.kill_at = procs, time.monotonic() + grace
        if wait:
            _, alive = psutil.wait_procs(procs, timeout=grace)
            self.kill_at = time.monotonic()
            self.reap()
            psutil.wait_procs(alive, timeout=grace)
            if self.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)

    def reap(self) -> None:
        """SIGKILL the processes told to end that are still there past their grace."""
        import psutil

        if self.kill_at is None or time.monotonic() < self.kill_at:
            return
        for p in self.dying:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
        self.kill_at = None

    def close(self) -> None:
        """Stop the watcher thread (it is a daemon thread: it never holds the engine up)."""
        self._watch_stop.set()
