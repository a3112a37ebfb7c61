"""Where a worker's events go: ``events.jsonl`` (standalone) or the engine's PULL socket.

Standalone, rank 0 numbers the events itself (continuing after the last line on resume) and
appends them, flushed, to ``runs/<run>/events.jsonl``. Under the engine, workers PUSH unnumbered
events and the engine numbers, stores and relays them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from engine.protocol import AnyCommand, Message, command_decoder, event_encoder, stamp


def last_seq(path: Path) -> int:
    """The sequence number of the last event in an events file (0 if none); a torn last line, or a line
    that is not an event, is passed over."""
    if not path.exists():
        return 0
    for line in lines_backwards(path):
        ev = decode_event(line)
        if ev is not None:
            return ev.seq
    return 0


class JsonlSink:
    """Numbers events and appends them to ``events.jsonl`` (thread-safe)."""

    def __init__(self, path: str | os.PathLike, run: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq = last_seq(self.path)
        self.run = run
        self._lock = threading.Lock()
        self._f = open(self.path, "ab")
        # a torn last line from a crash would glue onto the next one: start on a fresh line
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._f.write(b"\n")

    def emit(self, event: Message) -> None:
        with self._lock:
            self.seq += 1
            self._f.write(event_encoder.encode(stamp(event, self.seq, self.run)) + b"\n")
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


SPOOL_SEGMENT = 5000  # events per spool file; the engine deletes a file once every event in it is stored


def worker_id() -> str:
    """This process, unique across restarts and machines: ``<host>-<pid>-<start>`` (file-name safe)."""
    import re
    import socket
    import time

    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{int(time.time() * 1000):x}"


class Spool:
    """Every event a worker sends, also appended (flushed) to ``runs/<run>/spool/<worker>.<first wseq>.jsonl``.

    The engine records each event's ``worker`` and ``wseq``; when an engine dies, the next one replays the
    spooled events it never stored, in order, so nothing trained while no engine listened is lost. Files
    hold ``SPOOL_SEGMENT`` events each, so the engine can delete the ones it has stored while the run goes on.
    """

    def __init__(self, folder: str | os.PathLike, worker: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.worker = worker
        self._f = None
        self._count = 0

    def write(self, wseq: int, data: bytes) -> None:
        if self._f is None or self._count >= SPOOL_SEGMENT:
            if self._f is not None:
                self._f.close()
            self._f = open(self.folder / f"{self.worker}.{wseq:012d}.jsonl", "ab")
            self._count = 0
        self._f.write(data + b"\n")
        self._f.flush()  # in the page cache: it survives this process being killed
        self._count += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_spool(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """Spool files by worker: ``{worker: [(first wseq, path), …]}`` in order."""
    out: dict[str, list[tuple[int, Path]]] = {}
    if not folder.is_dir():
        return out
    for p in folder.glob("*.jsonl"):
        worker, _, first = p.stem.rpartition(".")
        if worker and first.isdigit():
            out.setdefault(worker, []).append((int(first), p))
    for files in out.values():
        files.sort()
    return out


def stored_wseq(events_path: Path, worker: str) -> int:
    """The highest ``wseq`` of ``worker`` in events.jsonl (0 if none), read backwards until found."""
    if not events_path.exists():
        return 0
    needle = b'"worker":' + json.dumps(worker).encode()
    for line in lines_backwards(events_path):
        if needle in line:
            ev = decode_event(line)
            if ev is not None and ev.worker == worker:
                return ev.wseq
    return 0


def spooled_events(events_path: Path, spool: dict[str, list[tuple[int, Path]]], stored: dict[str, int]) -> list:
    """The spooled events not yet in events.jsonl (``stored``: worker → highest wseq stored, filled in
    from the file where missing), merged by time with each worker's own order kept."""
    import heapq

    streams = []
    for worker, files in spool.items():
        if worker not in stored:
            stored[worker] = stored_wseq(events_path, worker)
        mine = []
        for _, path in files:
            try:
                lines = path.read_bytes().split(b"\n")
            except OSError:
                continue
            for line in lines:
                ev = decode_event(line) if line.strip() else None
                if ev is not None and ev.worker == worker and ev.wseq > stored[worker]:
                    mine.append(ev)
        mine.sort(key=lambda e: e.wseq)
        streams.append(mine)
    return list(heapq.merge(*streams, key=lambda e: e.time))


def lines_backwards(path: Path, block: int = 1 << 20):
    """The complete lines of a file, last first (a torn last line, with no newline yet, is skipped)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf = b""
        torn = True  # what follows the last newline is not a line yet
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + buf).split(b"\n")
            buf = lines.pop(0)  # its start may lie in the block before
            if torn and lines:
                lines.pop()
                torn = False
            for line in reversed(lines):
                if line.strip():
                    yield line
        if not torn and buf.strip():
            yield buf


def decode_event(raw: bytes) -> Message | None:
    """An event from bytes another process wrote, or None when they are not one (any decode failure)."""
    import msgspec

    from engine.protocol import event_decoder

    try:
        return event_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return None


def spool_worker_pid(worker: str) -> int | None:
    """The pid in a worker id made by ``worker_id()`` (``<host>-<pid>-<start>``)."""
    parts = worker.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


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

    def close(self) -> None:
        with self._lock:
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
        self.engine_timeout = engine_timeout
        self.last_heartbeat = time.monotonic()
        self.engine_lost = False
        if endpoint:
            import zmq

            self._sock = zmq.Context.instance().socket(zmq.SUB)
            self._sock.setsockopt(zmq.SUBSCRIBE, b"")
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(endpoint)

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
                try:
                    cmd = command_decoder.decode(raw)
                except Exception:
                    continue  # the engine validates; a bad frame here is dropped
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
