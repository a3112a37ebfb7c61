"""How a worker's events leave it, and how its commands arrive.

Standalone, rank 0 numbers the events itself (continuing after the last line on resume) and appends
them, flushed, to ``runs/<run>/events.jsonl`` (``JsonlSink``). Under the engine, rank 0 spools each
event and PUSHes it unnumbered to the engine, which numbers, stores and relays it (``PushSink``);
commands come back on the engine's PUB, read at each step boundary (``ControlInbox``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import deque
from pathlib import Path

from engine.eventlog import WAITING_MAX, Spool, append_whole, last_seq, worker_id
from engine.protocol import AnyCommand, Message, command_decoder, decode, event_encoder, stamp
from engine.util import printable


class JsonlSink:
    """Numbers events and appends them to ``events.jsonl`` (thread-safe). Lines the file cannot take (a full
    disk) wait in memory, in order, and are written before the next event once it can: seq stays gapless."""

    def __init__(self, path: str | os.PathLike, run: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq = last_seq(self.path)
        self.run = run
        self._lock = threading.Lock()
        self._waiting: deque[bytes] = deque()
        self._failed = ""  # why the file takes no line now ("" while it does)
        self._f = open(self.path, "ab")
        # a torn last line from a crash would glue onto the next one: start on a fresh line
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._waiting.append(b"\n")

    def emit(self, event: Message) -> None:
        with self._lock:
            self.seq += 1
            self._waiting.append(event_encoder.encode(stamp(event, self.seq, self.run)) + b"\n")
            if len(self._waiting) > WAITING_MAX:
                self._waiting.popleft()
            self._write_waiting()

    def _write_waiting(self) -> None:
        while self._waiting:
            try:
                append_whole(self._f.fileno(), self._waiting[0])
            except OSError as e:
                if not self._failed:
                    self._failed = e.strerror or str(e)
                    _say(f"[voxtui] {self.path}: {self._failed}; events wait in memory (up to {WAITING_MAX:,}) "
                         "until it can take them")
                return
            self._waiting.popleft()
        if self._failed:
            self._failed = ""
            _say(f"[voxtui] {self.path}: written again, the events that waited with it")

    def close(self) -> None:
        with self._lock:
            self._write_waiting()
            self._f.close()


def _say(line: str) -> None:
    """A line on stderr (worker.log), lost rather than raised where that file's disk is full too."""
    try:
        print(printable(line), file=sys.stderr, flush=True)
    except OSError:
        pass


class PushSink:
    """Sends events to the engine (PUSH → its PULL); the engine numbers and stores them. With ``spool``
    (a folder), every event is first appended to this worker's spool there (see ``Spool``)."""

    def __init__(self, endpoint: str, run: str = "", spool: str | os.PathLike | None = None) -> None:
        import zmq

        self.run = run
        self.worker = worker_id()
        self.wseq = 0
        self._spool = Spool(spool, self.worker) if spool else None
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.connect(endpoint)
        self._lock = threading.Lock()

    def emit(self, event: Message) -> None:
        import zmq

        with self._lock:
            self.wseq += 1
            event.worker, event.wseq = self.worker, self.wseq
            data = event_encoder.encode(stamp(event, 0, self.run))
            if self._spool is not None:
                try:
                    self._spool.write(self.wseq, data)
                except OSError:
                    pass  # a full disk must not stop training; the engine, if it listens, still stores it
            try:
                self._sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                pass  # the engine is not reading: never block training on telemetry

    def close(self, linger: float | None = None) -> None:
        """``linger``: seconds to go on delivering what is queued (default 2): a process's last events with no
        spool behind them (an inference job's result or failure) are given longer on a busy machine."""
        import zmq

        with self._lock:
            if linger is not None:
                self._sock.setsockopt(zmq.LINGER, int(linger * 1000))
            self._sock.close()
            if self._spool is not None:
                self._spool.close()


class NullSink:
    def emit(self, event: Message) -> None:
        pass

    def close(self) -> None:
        pass


class ControlInbox:
    """Commands for the workers, read by rank 0 at each step boundary.

    Under the engine: a SUB socket on the engine's control endpoint. Always: signals —
    SIGTERM / SIGINT mean stop (save, then exit 0), SIGUSR1 means save a checkpoint now.
    """

    def __init__(self, endpoint: str | None = None, engine_timeout: float = 30.0) -> None:
        import time

        self._pending: list[AnyCommand] = []
        self._sock = None
        self._seen: dict[str, None] = {}
        self.dropped = 0  # unreadable frames from the engine
        self.engine_timeout = engine_timeout
        self.last_heartbeat = time.monotonic()
        self.engine_lost = False
        if endpoint:
            import zmq

            self._sock = zmq.Context.instance().socket(zmq.SUB)
            self._sock.setsockopt(zmq.SUBSCRIBE, b"")
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(endpoint)

    @property
    def listening(self) -> bool:
        """Whether commands come from an engine (not only signals)."""
        return self._sock is not None

    def install_signal_handlers(self) -> None:
        from engine.protocol import SaveCheckpoint, Stop

        def on_stop(signum, frame):
            self._pending.append(Stop(id=f"signal-{signum}"))

        def on_save(signum, frame):
            self._pending.append(SaveCheckpoint(id="signal-usr1"))

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGUSR1, on_save)

    def poll(self) -> list[AnyCommand]:
        """New commands (each id once: the engine re-sends until it sees the ack)."""
        import time

        from engine.protocol import Heartbeat, Stop

        out, self._pending = self._pending, []
        if self._sock is not None:
            import zmq

            while True:
                try:
                    raw = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                cmd, why = decode(command_decoder, raw)
                if cmd is None:  # the engine sends only what it validated: say it, drop it
                    self.dropped += 1
                    if self.dropped == 1:
                        print(printable(f"[voxtui] dropped an unreadable command from the engine ({why}); "
                                        "further ones go unsaid"), file=sys.stderr, flush=True)
                    continue
                if isinstance(cmd, Heartbeat):
                    self.last_heartbeat = time.monotonic()
                    continue
                if cmd.id and cmd.id in self._seen:
                    continue
                if cmd.id:
                    self._seen[cmd.id] = None
                    if len(self._seen) > 4096:
                        self._seen.pop(next(iter(self._seen)))
                out.append(cmd)
            if not self.engine_lost and time.monotonic() - self.last_heartbeat > self.engine_timeout:
                self.engine_lost = True
                out.append(Stop(id="engine-lost"))
        return out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
