"""The engine: one headless daemon per run.

It spawns torchrun (its workers in sessions of their own), numbers every event the workers push,
appends it to ``events.jsonl`` (flushed) and publishes it to any number of clients; it answers
history requests and authenticated commands on a ROUTER; it watches the worker processes and the
health of the run. It never imports Textual.

    python -m engine.daemon RUN_DIR [--nproc N] [--resume]     (``voxtui run`` starts it)

``Engine`` ties the parts, each in a module of its own: ``sockets`` (the private socket folder, the
CURVE sockets of ``--listen``), ``store`` (numbering, ``events.jsonl``, the history index, the
workers' spool), ``supervisor`` (torchrun and its ranks), ``health`` (the alerts), ``requests``
(clients' requests), ``inference`` (``voxtui infer`` jobs) and ``console`` (the foreground's lines).
Here: the loop, the commands, and what the run's end and its alerts mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import msgspec
import zmq

from engine.daemon.console import one_line
from engine.daemon.health import MIN_FREE_BYTES, Health
from engine.daemon.inference import InferenceJobs
from engine.daemon.requests import RequestHandler
from engine.daemon.sockets import Sockets
from engine.daemon.store import EventStore
from engine.daemon.supervisor import Supervisor, killed_by, torchrun_cmd, torchrun_root_cause
from engine.eventlog import WAITING_MAX
from engine.protocol import (
    PROTOCOL_VERSION,
    Alert,
    Heartbeat,
    Pause,
    Reply,
    Resume,
    RunInference,
    SaveCheckpoint,
    SetPreviewParams,
    Status,
    Stop,
    decode,
    event_decoder,
)
from engine.runs import engine_info, last_event, pid_alive, write_engine_info
from engine.session import Session
from engine.util import UsageError, print_traceback, printable, run_name, shell_quote

HEARTBEAT_S = 1.0  # to clients and workers; unacknowledged commands are sent again as often
CHECK_S = 0.25  # how often torchrun and its ranks are looked at
HOUSEKEEPING_S = 30.0  # the disk checked, the spool pruned, the sockets' times refreshed
RESEND_FOR_S = 60.0  # a command rank 0 has not acknowledged by then is given up
STOP_TIMEOUT_S = 120.0  # workers asked to stop that are still running then are killed
RANK_STOPPED_S = 10.0  # a rank's process stopped (SIGSTOP) this long is said (its peers wait for it meanwhile)


def rank_stopped_s() -> float:
    """``RANK_STOPPED_S``, or the seconds the environment's VOXTUI_RANK_STOPPED_S gives (tests set it low)."""
    try:
        s = float(os.environ.get("VOXTUI_RANK_STOPPED_S", RANK_STOPPED_S))
    except ValueError:
        return RANK_STOPPED_S
    return s if 0 < s < float("inf") else RANK_STOPPED_S


class Engine:
    """One run's engine: ``open`` (the folder, the log, the sockets, engine.json), ``spawn`` (torchrun),
    ``serve`` (the loop, until the run is over and its inference jobs have ended), ``close``."""

    def __init__(self, run_dir: Path, nproc: int = 1, resume: bool = False, stall_timeout: float = 600.0,
                 alert_action: str = "warn", worker_cmd: list[str] | None = None, nnodes: int = 1,
                 rdzv_endpoint: str = "", listen: str = "", stop_timeout: float = STOP_TIMEOUT_S,
                 min_free_bytes: float = MIN_FREE_BYTES) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run = run_name(self.run_dir)
        self.nproc, self.resume, self.nnodes, self.rdzv_endpoint = nproc, resume, nnodes, rdzv_endpoint
        self.worker_cmd = worker_cmd  # a stand-in for torchrun (a replay, a benchmark, a test)
        self.alert_action = alert_action
        self.stop_timeout = stop_timeout
        self.key = secrets.token_bytes(32)
        self.session = Session(self.key)
        self.sockets = Sockets(self.run_dir, listen)
        self.log = EventStore(self.run_dir, self.run)
        self.workers = Supervisor(nproc)
        self.health = Health(stall_timeout, min_free_bytes)
        self.inference: InferenceJobs | None = None  # once the sockets are bound
        self.requests = RequestHandler(self.session, self.log, lambda: self.state, self._apply,
                                       lambda: {**self.progress, "pending": self._pending()})
        self.progress: dict = {}  # step, loss, total_steps, outcome: the run as its events say, for status replies
        self.state = "starting"
        self.echo = False  # print a line per notable event (foreground `voxtui run`; detached: into engine.log)
        self.unacked: dict[str, tuple[bytes, float]] = {}  # command id → (command, first sent)
        # pause / resume forwarded whose effect the workers have not shown yet (id → its type): they acknowledge it
        # when they take it at a step boundary, but pause (or run again) only once what falls due there is done
        # (an evaluation, previews, a checkpoint); until their status says so, another would be sent on top of it
        self.toggles: dict[str, str] = {}
        self.taken_at: dict[str, int] = {}  # toggle id → the step at which the workers acknowledged it
        self.stopping = False
        self.stop_deadline = 0.0
        self.rank_alerted = False
        self.rank_stopped: dict[int, tuple[int, float, bool]] = {}  # rank → (pid, seen stopped since, said)
        self.rank_stopped_after = rank_stopped_s()
        self.final_status: Status | None = None  # the workers' finished / failed status
        self.final_at = float("inf")
        self.failed_message = ""  # set when the engine itself calls the run failed (a rank died)
        self.exit_code = 0
        self.bad_worker_messages = 0
        self.unwritten = ""  # events.jsonl takes no event (a full disk): why, said once; "" while it does
        self.next_housekeeping = 0.0
        self.next_inference_look = 0.0
        self.foreground = False  # in `voxtui run`'s own process, on its terminal (a SIGHUP is that terminal's end)
        self.hung_up = False  # the terminal hung up, and its hangup (not a stop someone asked for) stops the run
        self.torchrun_gone = ""  # how torchrun ended ("was killed by SIGKILL") when that, not a stop, ends the run

    @property
    def seq(self) -> int:
        return self.log.seq

    # ---- setup
    def open(self) -> None:
        """The run folder, the event log, the sockets; then what an engine that died left behind, and
        engine.json for clients and workers."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log.open()  # the event-log lock first: a reader folding the spool has finished (and said so)
        for kind in ("run_info", "step"):  # a resumed run's progress so far, until its workers say more
            last = last_event(self.run_dir, kind)
            if last:
                self._note_progress(kind, last)
        previous = engine_info(self.run_dir)
        self.sockets.bind()
        self.inference = InferenceJobs(self.run_dir, self.nproc, self.sockets.endpoints["worker_events"])
        info = {"pid": os.getpid(), "run": self.run, "host": socket.gethostname(), "version": PROTOCOL_VERSION,
                "started": time.time(), "key": self.key.hex(), "endpoints": self.sockets.endpoints, "nproc": self.nproc}
        if self.sockets.remote is not None:
            info["remote"] = self.sockets.remote
        if self.worker_cmd is not None:  # a stand-in (a replay): nothing trains, nothing is saved on a stop
            info["stand_in"] = True
        self._recover(previous)
        write_engine_info(self.run_dir, info)

    def _recover(self, previous: dict) -> None:
        """After an engine that ended without closing (killed, machine lost): record that, then store the
        events its workers kept in their spool and it never stored, in their order."""
        crashed = (previous.get("pid") and "stopped" not in previous and "folded" not in previous
                   and previous.get("pid") != os.getpid())  # folded: a reader stored its spool, and said so
        pending = self.log.spooled()
        if crashed:
            self.emit(Alert(level="error", kind="engine_lost",
                            message=f"the previous engine (pid {previous['pid']}) ended without closing (killed?) "
                                    f"after event {self.seq}; {len(pending)} event(s) its workers kept are stored "
                                    "below"))
        for ev in pending:
            self.emit(ev, relay=True)
        if pending:
            self.log.sync()
        self._prune_spool(final=True)

    def _prune_spool(self, final: bool = False) -> None:
        self.log.prune_spool(final, store=self.on_worker_message)

    def spawn(self) -> None:
        cmd = self.worker_cmd or torchrun_cmd(self.run_dir, self.nproc, self.resume, self.nnodes, self.rdzv_endpoint)
        pid = self.workers.spawn(cmd, self.run_dir / "worker.log")
        if self.worker_cmd is None:  # a stand-in worker (a replay, a benchmark) speaks for itself
            self.emit(Status(state="starting", message=f"engine {os.getpid()} started torchrun {pid} "
                                                       f"with {self.nproc} rank(s)"))

    # ---- events
    def emit(self, event, relay: bool = False) -> None:
        """Number, store (flushed) and publish one event (``relay``: one a worker sent)."""
        data = self.log.append(event, relay)
        self.sockets.publish([b"ev", data])
        if self.log.write_error or self.unwritten:
            self._note_event_log()
        if isinstance(event, Status):
            self.state = event.state
            self._settle_toggles(event.state)
        if event.type in ("step", "run_info", "status"):
            self._note_progress(event.type, event)
        if self.echo:
            line = one_line(event)
            if line:
                try:
                    print(line, flush=True)
                except OSError:  # a terminal gone (EIO) before its SIGHUP is handled: the line is lost, not the run
                    pass

    def _note_event_log(self) -> None:
        """events.jsonl that stops taking events (a full disk), or takes them again: one line in engine.log and
        an alert each time, not a traceback per event. The events meanwhile wait in memory, in order
        (store.EventStore.waiting), so the file stays gapless once there is space."""
        name, error = self.log.path.name, self.log.write_error
        if error and not self.unwritten:
            self.unwritten = error
            message = (f"{name} cannot be written ({error}): events wait in memory, in order (up to {WAITING_MAX:,}), "
                       f"and are written once there is space on {self.log.path.parent}")
        elif not error and self.unwritten:
            self.unwritten = ""
            message = (f"{name} written again: the events that waited in memory are stored, in order"
                       + (f"; {self.log.dropped:,} past {WAITING_MAX:,} were let go (their seqs are missing)"
                          if self.log.dropped else ""))
        else:
            return
        with contextlib.suppress(OSError):  # (engine.log may be on the same full disk)
            print(printable(f"engine: {message}"), file=sys.stderr, flush=True)
        self.emit(Alert(level="error" if error else "info", kind="event_log", message=message))

    def _write_waiting(self) -> None:
        self.log.write_waiting()
        self._note_event_log()

    def _note_progress(self, kind: str, ev) -> None:
        """What a status reply tells a reader whose events.jsonl cannot say (gone, emptied, a folder)."""
        get = ev.get if isinstance(ev, dict) else lambda k: getattr(ev, k, None)  # a line read back, or an event
        if kind == "step" and type(get("step")) is int:
            loss = get("loss")
            self.progress.update(step=get("step"), loss=float(loss) if type(loss) in (int, float) else None)
        elif kind == "run_info" and type(get("total_steps")) is int:
            self.progress["total_steps"] = get("total_steps")
        elif kind == "status":
            self.progress["outcome"] = get("outcome") if isinstance(get("outcome"), str) else ""
            self.progress["message"] = get("message") if isinstance(get("message"), str) else ""

    def on_worker_event(self, raw: bytes) -> None:
        ev, why = decode(event_decoder, raw)
        if ev is None:
            self.bad_worker_messages += 1
            if self.bad_worker_messages <= 10 or self.bad_worker_messages % 1000 == 0:
                print(printable(f"engine: dropped an undecodable worker message ({self.bad_worker_messages} so "
                                f"far): {why}"), file=sys.stderr, flush=True)
            return
        self.on_worker_message(ev)

    def on_worker_message(self, ev) -> None:
        """A worker's event, from its socket or (sent while nobody read) from its spool."""
        if self.log.already_stored(ev):
            return  # replayed from the worker's spool
        ev.time = ev.time if ev.time > 0 else time.time()
        if ev.type == "ack":
            self.unacked.pop(ev.id, None)
            if ev.id in self.toggles:
                self.taken_at[ev.id] = ev.step
        if ev.type == "status" and ev.state == "running" and self._toggle_applying() == "pause" and not self.stopping:
            # the workers' own "running" (their start) before they took the pause: the run is pausing all the same
            ev.pending = "pause"
        if ev.type == "status" and self.stopping and ev.state in ("starting", "running", "paused"):
            # workers that came up (or paused) before the stop reached them: the run is stopping all the same
            # (shown [stopping] [running] [stopping] when Ctrl-C came during the start)
            ev.state = "stopping"
            if self.stop_deadline != float("inf"):  # the stop reaches them at their first step: time to save
                self.stop_deadline = max(self.stop_deadline, time.monotonic() + self.stop_timeout)
        if ev.type == "status" and ev.state == "finished" and ev.outcome == "stopped" and self.hung_up:
            ev.message = self.hangup_message(done=True)  # the workers' "stopped on request": nobody asked for it
        if ev.type == "status" and self.torchrun_gone and (ev.state == "stopping" or ev.outcome == "stopped"):
            # the workers' "stop requested" and "stopped on request" after torchrun died under them: the SIGTERM
            # was the engine's, to end what was left; they saved, and the run fails (its final status follows)
            ev.message = (f"torchrun {self.torchrun_gone}: the workers save, then stop" if ev.state == "stopping"
                          else f"saved at step {ev.step} after torchrun {self.torchrun_gone}; the run fails")
            ev.state, ev.outcome = "stopping", ""
        if ev.type == "status" and ev.state in ("finished", "failed"):
            self.final_status = ev  # the run's outcome, checked again once torchrun has exited
            self.final_at = time.monotonic()
        self.emit(ev, relay=True)
        alerts = self.health.step(ev) if ev.type == "step" else self.health.telemetry(ev) if ev.type == "telemetry" else []
        for a in alerts:
            self.emit(a)
            self._act_on_alert()

    def _act_on_alert(self) -> None:
        """``--alert_action``: on a health alert, have the workers save a checkpoint, or stop the run."""
        if self.alert_action == "save":
            self.forward(SaveCheckpoint(id=f"alert-save-{self.seq}"))
        elif self.alert_action == "stop":
            self.request_stop("stopping on an alert (alert_action = stop)")

    # ---- commands
    def forward(self, cmd) -> None:
        """To the workers, again every second until rank 0 acknowledges it (by id)."""
        data = msgspec.json.encode(cmd)
        self.sockets.to_workers(data)
        if cmd.id:
            self.unacked[cmd.id] = (data, time.monotonic())

    def request_stop(self, message: str) -> None:
        """Ask the workers to save and stop; those still running ``stop_timeout`` seconds later are killed."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.stop_timeout
        self.emit(Status(state="stopping", message=message))
        self.forward(Stop(id=f"engine-stop-{self.seq}"))

    def _apply(self, cmd) -> Reply:
        """A client's command (checked by ``RequestHandler``): refused when it makes no sense now,
        carried out by the engine (stop, inference), or forwarded to the workers."""
        if self.state in ("finished", "failed") and not (isinstance(cmd, Stop) and self.workers.alive) \
                and not isinstance(cmd, RunInference):  # a checkpoint can be evaluated while the engine is here
            return Reply(status="error", reason=f"the run has {self.state}", state=self.state)
        match cmd:
            case SetPreviewParams():
                problems = cmd.problems()
                if problems:
                    return Reply(status="error", reason="; ".join(problems), state=self.state)
            case Pause() | Resume() if cmd.id in self.toggles:
                return Reply(status="ok", state=self.state)  # the same command again (a client's retry)
            case Pause() | Resume() if self._toggle_applying():
                return Reply(status="error", reason=self._applying_reason(), state=self.state)
            case Pause() | Resume() if self.stopping:
                return Reply(status="error", reason="the run is stopping", state=self.state)
            case Pause() if self.state == "paused":
                return Reply(status="error", reason="already paused", state=self.state)
            case Resume() if self.state != "paused":
                return Reply(status="error", reason=f"not paused ({self.state})", state=self.state)
            case Stop():
                self.request_stop(f"stop requested by a client ({cmd.id})")
                return Reply(status="ok", state=self.state)
            case RunInference():
                return self.inference.start(cmd, self.state)
        self.forward(cmd)
        if isinstance(cmd, (Pause, Resume)) and cmd.id:
            self.toggles[cmd.id] = cmd.type
            if isinstance(cmd, Pause):  # running (or starting) until the workers say paused: pausing meanwhile
                self.emit(Status(state=self.state, pending="pause", step=self.progress.get("step") or 0,
                                 message=f"pause requested ({cmd.id}): the workers pause at their next step boundary, "
                                         "once what falls due there is done (an evaluation, previews, a checkpoint)"))
        return Reply(status="ok", state=self.state)

    def _pending(self) -> str:
        """Status.pending now: "pause" while a pause is forwarded and the workers have not paused."""
        return "pause" if self._toggle_applying() == "pause" and self.state in ("starting", "running") else ""

    def _toggle_applying(self) -> str:
        """The pause or resume forwarded whose effect the workers have not shown yet ("" when none)."""
        return next(iter(self.toggles.values()), "")

    def _applying_reason(self) -> str:
        """Why another pause or resume is refused now."""
        cid, kind = next(iter(self.toggles.items()))
        if cid not in self.taken_at:
            return f"a {kind} is being applied: the workers take it at their next step boundary"
        then = "pause" if kind == "pause" else "run again"
        return (f"a {kind} is being applied: the workers took it at step {self.taken_at[cid]} and {then} once what "
                "falls due there is done (an evaluation, previews, a checkpoint)")

    def _settle_toggles(self, state: str) -> None:
        """A status: the pause (resume) it shows the effect of, or that a stop or the run's end overtakes, is
        done with."""
        done = {"pause": ("paused", "stopping", "finished", "failed"),
                "resume": ("running", "stopping", "finished", "failed")}
        for cid, kind in list(self.toggles.items()):
            if state in done[kind]:
                del self.toggles[cid]
                self.taken_at.pop(cid, None)

    def _toggle_given_up(self, cid: str) -> None:
        """A pause or resume the workers never acknowledged (no longer sent): forgotten; a pause's run reads
        as before it again."""
        kind = self.toggles.pop(cid, None)
        if kind == "pause" and self.state in ("starting", "running") and not self.toggles:
            self.emit(Status(state=self.state, step=self.progress.get("step") or 0,
                             message=f"the workers did not take the pause ({cid}) in {RESEND_FOR_S:.0f} s: not paused"))

    # ---- supervision
    def supervise(self) -> bool:
        """Watch torchrun and its ranks; returns False once the run is over."""
        rc = self.workers.poll()
        if rc is None:
            self._watch()
            return True
        return self._wind_up(rc)

    def _watch(self) -> None:
        """While torchrun runs: a rank that died fails the run (the others are stopped), workers that do
        not stop in time are killed, a run with no step for too long is reported."""
        self.workers.discover_ranks()
        final = self.final_status
        if not self.stopping and not self.rank_alerted and (final is None or final.state == "failed"):
            rank = self.workers.first_death(final, self.final_at)
            if rank is not None and final is None:
                # before a death is declared for want of a final status: one a gone rank 0 sent may wait
                # unread on the socket, or sit in its spool where the socket lost it
                self._drain()
                self._prune_spool(final=True)
                if self.final_status is not None:
                    rank = self.workers.first_death(self.final_status, self.final_at)
            if rank is not None:
                self._rank_died(rank, self.workers.ranks[rank], self.workers.ended(rank), "; stopping the other ranks")
                self.workers.kill(wait=False)
        self.workers.reap()
        if self.stopping and time.monotonic() > self.stop_deadline:
            self.stop_deadline = float("inf")
            self.emit(Alert(level="warning", kind="stop_timeout", message="workers did not stop in time: killing them"))
            self.workers.kill(wait=False)
        if not self.stopping and not self.rank_alerted:
            self._watch_stopped_ranks()
        if not self.stopping and self.state == "running":
            stall = self.health.stall()
            if stall is not None:
                self.emit(stall)

    def _watch_stopped_ranks(self) -> None:
        """A rank whose process is stopped (SIGSTOP, Ctrl-Z, a debugger) holds every other rank at the next
        gradient sync: after ``RANK_STOPPED_S`` it is said, with what continues it (before, the run only
        showed no step until the stall alert, ten minutes on); once it runs again, that is said too."""
        now = time.monotonic()
        stopped = self.workers.stopped_ranks()
        for rank, (pid, _since, said) in list(self.rank_stopped.items()):
            if rank not in stopped:
                del self.rank_stopped[rank]
                if said:
                    self.emit(Alert(level="info", kind="rank_continued", rank=rank,
                                    message=f"rank {rank} (pid {pid}) runs again"))
        for rank, pid in stopped.items():
            _, since, said = self.rank_stopped.setdefault(rank, (pid, now, False))
            if not said and now - since >= self.rank_stopped_after:
                self.rank_stopped[rank] = (pid, since, True)
                self.emit(Alert(level="warning", kind="rank_stopped", rank=rank, step=self.progress.get("step"),
                                message=f"rank {rank} (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) for "
                                        f"{now - since:.0f} s: the other ranks wait for it; continue it: kill -CONT {pid}"))

    def _wind_up(self, rc: int) -> bool:
        """torchrun has exited: leave nothing running, store the workers' last events and the run's
        outcome; False once the engine may leave (inference jobs it started have ended)."""
        if rc < 0 and not self.stopping and not self.rank_alerted and self.final_status is None:
            self._torchrun_died(-rc)
        self.workers.kill()  # leave nothing behind
        if self.inference.running():
            return True  # inference jobs started from this run finish before the engine leaves
        self._drain()
        self._prune_spool(final=True)  # events that never reached this engine are stored now, in order
        final = self.final_status
        if (final is None or final.state == "failed") and not self.failed_message and not self.stopping \
                and not self.rank_alerted:
            # torchrun went at once, before a look at the ranks named the death; or a rank's signal made the
            # others fail (rank 0's "Connection reset by peer") and their failure came first: the signal is
            # the cause
            self._name_a_killed_rank(after_failure=final is not None)
        if self.failed_message:
            self.emit(Status(state="failed", message=self.failed_message))
            self.exit_code = 1
        elif final is not None:
            self.state = final.state  # already stored and published when it arrived
            self.exit_code = 0 if final.state == "finished" else 1
        else:
            self.emit(Status(state="failed", message=f"workers exited with code {rc} (see worker.log)"))
            self.exit_code = 1
        return False

    def _torchrun_died(self, sig: int) -> None:
        """torchrun was ended by a signal (kill -9, the out-of-memory killer) that no one here sent, while
        its workers train on: the run fails for it, though the workers, told to stop next, save first. Their
        "stop requested" and "stopped on request" are recorded as what they are (``on_worker_message``): no one
        asked for a stop."""
        self._drain()  # a final status the workers sent just before (a run that ended as torchrun went)
        alive = [r for r, pid in self.workers.ranks.items() if pid_alive(pid)]
        if self.final_status is not None or not alive:
            return  # the workers had ended (their status, or a rank's death, says how)
        self.rank_alerted = True
        pid = self.workers.proc.pid if self.workers.proc is not None else None
        how = killed_by(sig)
        self.torchrun_gone = how.split(" (")[0]  # "was killed by SIGKILL": its likely sender said once, below
        trained = self.progress.get("step") or 0
        then = ("each saving a checkpoint first; `voxtui run --resume` continues" if trained else
                "no step trained yet, so nothing to save; `voxtui run --resume` starts the run over")
        self.emit(Alert(level="error", kind="torchrun_died",
                        message=f"torchrun (pid {pid}) {how} while its workers trained: they are stopped now, {then}"))
        self.failed_message = f"torchrun {how}; see worker.log"

    def _name_a_killed_rank(self, after_failure: bool = False) -> None:
        """torchrun has exited with no final status from the workers, or with a failure theirs: a rank that a
        signal ended (the kernel's out-of-memory killer: SIGKILL) is named, as a rank death seen while torchrun
        ran would have been. After a failure, a SIGTERM is torchrun's own, sent to the ranks left: its report's
        first observed failure says which rank went first."""
        rank = self.workers.first_gone()
        sig = self.workers.killed.get(rank) if rank is not None else None
        if sig and not (after_failure and sig == signal.SIGTERM):
            how, pid = self.workers.ended(rank), self.workers.ranks.get(rank)
        else:  # torchrun reaped it before the watcher looked: its own report says
            cause = torchrun_root_cause(self.workers.log, self.workers.log_start) if self.workers.log else None
            if cause is None:
                return
            (rank, sig), pid = cause, None
            how = killed_by(sig)
        self._rank_died(rank, pid, how)

    def _rank_died(self, rank: int, pid: int | None, how: str, then: str = "") -> None:
        """The run fails for this rank's death: an alert (once) and the reason its final status gives."""
        if not self.rank_alerted:
            self.rank_alerted = True
            self.emit(Alert(level="error", kind="rank_died", rank=rank,
                            message=f"rank {rank}{f' (pid {pid})' if pid else ''} {how}{then}"))
        self.failed_message = f"rank {rank} {how}; see worker.log"

    def hangup_message(self, done: bool = False) -> str:
        how = "saved and stopped" if done else "the workers save a checkpoint, then stop"
        return (f"the terminal hung up (SIGHUP): {how}; continue it with voxtui run --resume "
                f"{shell_quote(self.run_dir)}")

    def on_hangup(self) -> None:
        """The foreground's terminal has gone (closed, ``tmux kill-session``, an SSH drop): the run stops as on
        Ctrl-C (the workers save first), recorded as the hangup it is; the engine's lines, which the terminal
        can no longer take, go to engine.log from here on (as a detached engine's do)."""
        with contextlib.suppress(OSError):
            fd = os.open(self.run_dir / "engine.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        if self.stopping:  # a stop was asked for already (Ctrl-C, then the terminal closed): that is its record
            return
        self.hung_up = True
        self.request_stop(self.hangup_message())

    # ---- main loop
    def serve(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop("engine received SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.request_stop("engine received SIGINT"))
        if self.foreground:  # its terminal's end: the run stops, saved, and says why
            signal.signal(signal.SIGHUP, lambda *_: self.on_hangup())
        else:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a detached engine survives the SSH session that started it
        poller = zmq.Poller()
        poller.register(self.sockets.pull, zmq.POLLIN)
        for router in self.sockets.routers:  # the local one, and the remote (CURVE) one
            poller.register(router, zmq.POLLIN)
        next_tick = next_check = 0.0
        running = True
        while running:
            for sock, _ in poller.poll(100):
                if sock is self.sockets.pull:
                    self._drain(limit=1000)
                else:
                    self._take_requests(sock)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_S
                running = self._guarded(self.supervise, default=True)
            if now >= next_tick:
                next_tick = now + HEARTBEAT_S
                self._tick(now)
        self._heartbeat(exiting=True)
        time.sleep(0.1)
        return self.exit_code

    def _drain(self, limit: int | None = None) -> None:
        """Store what the workers have sent (up to ``limit`` messages, so clients are answered between)."""
        n = 0
        while limit is None or n < limit:
            try:
                raw = self.sockets.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._guarded(self.on_worker_event, raw)
            n += 1

    def _take_requests(self, router: zmq.Socket, limit: int = 100) -> None:
        for _ in range(limit):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._guarded(self.requests.handle, frames, router)

    def _tick(self, now: float) -> None:
        """Every second: the heartbeat to clients and workers, and the commands not acknowledged yet
        again (the workers ignore ids they have applied); every 30 s the disk, the spool, the sockets."""
        self._heartbeat()
        self.sockets.to_workers(msgspec.json.encode(Heartbeat()))
        if self.log.waiting:  # events.jsonl could not take them (a full disk): tried again each second
            self._guarded(self._write_waiting)
        for cid, (data, sent) in list(self.unacked.items()):
            if now - sent > RESEND_FOR_S and not (self.stopping and cid.startswith("engine-stop-")):
                # (a stop is sent until the workers take it: ones still loading a large model take a while)
                self.unacked.pop(cid)
                if cid in self.toggles:
                    self._toggle_given_up(cid)
            else:
                self.sockets.to_workers(data)
        if self.inference is not None and self.inference.queue and now >= self.next_inference_look:
            self.next_inference_look = now + 1.0  # an inference job waiting its turn starts once the last ends
            self._guarded(self.inference.running)
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_S
            self._guarded(self._check_disk)
            self._guarded(self._prune_spool)
            self._guarded(self.sockets.touch)

    def _heartbeat(self, exiting: bool = False) -> None:
        hb = {"seq": self.seq, "state": self.state, "time": time.time()}
        if exiting:
            hb["exiting"] = True
        self.sockets.publish([b"hb", json.dumps(hb).encode()])

    def _check_disk(self) -> None:
        usage = shutil.disk_usage(self.run_dir)
        alert = self.health.disk(usage.free, usage.total)
        if alert is not None:
            self.emit(alert)

    def _guarded(self, fn, *args, default=None):
        """One message or check that fails unexpectedly is logged (engine.log) and skipped; the engine,
        and with it the run, keeps going."""
        try:
            return fn(*args)
        except Exception:
            with contextlib.suppress(OSError):  # (a terminal gone: nothing to say it on)
                print(f"engine: {getattr(fn, '__name__', fn)} failed (the engine keeps serving):", file=sys.stderr)
                print_traceback()  # its paths hold the run folder's name: escaped, as every line here
            return default

    def close(self) -> None:
        self.workers.close()
        if self.log.waiting and not self.log.write_waiting():
            with contextlib.suppress(OSError):
                print(printable(f"engine: {len(self.log.waiting):,} event(s) could not be written to "
                                f"{self.log.path.name} ({self.log.write_error}) and are lost with this engine "
                                "(its workers' spool keeps theirs, for the next engine)"), file=sys.stderr, flush=True)
        self.log.close()
        self.sockets.close()
        info = engine_info(self.run_dir)
        if info.get("pid") == os.getpid():
            info.update(stopped=time.time(), state=self.state)
            try:
                write_engine_info(self.run_dir, info)
            except OSError:
                pass  # a full or vanished disk: the next engine reads this one as crashed


def run_engine(run_dir: Path, nproc: int, resume: bool, alert_action: str = "warn",
               stall_timeout: float = 600.0, echo: bool = False, nnodes: int = 1, rdzv_endpoint: str = "",
               listen: str = "", worker_cmd: list[str] | None = None, stop_timeout: float = STOP_TIMEOUT_S,
               min_free_bytes: float = MIN_FREE_BYTES, foreground: bool = False, opened=None) -> int:
    """``foreground``: in ``voxtui run``'s own process (its terminal's SIGHUP stops the run, saying so);
    ``opened``: called once the engine holds the event log and engine.json names it (the launcher lets go
    of its lock then)."""
    engine = Engine(run_dir, nproc, resume, stall_timeout=stall_timeout, alert_action=alert_action, nnodes=nnodes,
                    rdzv_endpoint=rdzv_endpoint, listen=listen, worker_cmd=worker_cmd, stop_timeout=stop_timeout,
                    min_free_bytes=min_free_bytes)
    engine.echo = echo
    engine.foreground = foreground
    try:
        engine.open()
        if opened is not None:
            opened()
        engine.spawn()
        return engine.serve()
    finally:
        if engine.workers.alive:
            engine.workers.kill()
        engine.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.daemon", description="voxtui's engine for one run")
    p.add_argument("run_dir")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--alert_action", choices=("warn", "save", "stop"), default="warn")
    p.add_argument("--stall_timeout", type=float, default=600.0)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv_endpoint", default="")
    p.add_argument("--listen", default="", help="tcp://HOST:PORT for clients on other machines (CURVE)")
    p.add_argument("--echo", action="store_true",
                   help="print a line per status, eval, checkpoint, alert and tenth step, as the foreground "
                        "`voxtui run` does (a detached engine's stdout is the run's engine.log)")
    # for tests and benchmarks, not shown: a stand-in worker (a JSON list), and thresholds they need not wait for
    p.add_argument("--worker_cmd", default="", help=argparse.SUPPRESS)
    p.add_argument("--stop_timeout", type=float, default=STOP_TIMEOUT_S, help=argparse.SUPPRESS)
    p.add_argument("--min_free_gib", type=float, default=MIN_FREE_BYTES / 2**30, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        return run_engine(Path(a.run_dir), a.nproc, a.resume, a.alert_action, a.stall_timeout, echo=a.echo,
                          nnodes=a.nnodes, rdzv_endpoint=a.rdzv_endpoint, listen=a.listen,
                          worker_cmd=json.loads(a.worker_cmd) if a.worker_cmd else None, stop_timeout=a.stop_timeout,
                          min_free_bytes=a.min_free_gib * 2**30)
    except UsageError as e:  # another engine holds the run's event log, …: one line (in engine.log, detached)
        print(f"engine: error: {printable(e)}", file=sys.stderr, flush=True)
        return 2
    except Exception:
        print_traceback()  # (its paths hold the run folder's name)
        return 1


if __name__ == "__main__":
    sys.exit(main())
