"""The event log as the engine keeps it: ``runs/<run>/events.jsonl`` numbered, appended and served.

Every event gets the next ``seq`` (continuing after the file's last line on resume) and is appended
flushed, one line each; the byte offset of each line is kept so ``history`` is read straight from the
file. A worker's event carries its ``worker`` id and count (``wseq``); the highest stored of each
worker is kept, so that the events a worker also wrote to its spool (``runs/<run>/spool/``) are
stored once: those that never reached an engine are stored by the next, and spool files whose events
are all stored are deleted. The formats of both files belong to ``engine/eventlog.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from engine.eventlog import cut_torn_tail, last_seq, read_spool, spool_worker_pid, spooled_events
from engine.protocol import Message, event_encoder, stamp
from engine.runs import lock_events, pid_alive

LOCK_WAIT_S = 30.0  # an engine waits this long for the event-log lock (a fold takes milliseconds)


class EventStore:
    """``events.jsonl`` of one run, and its workers' spool."""

    def __init__(self, run_dir: Path, run: str) -> None:
        self.path = run_dir / "events.jsonl"
        self.spool_dir = run_dir / "spool"
        self.run = run
        self.seq = 0  # the last event stored
        self.offsets: list[int] = []  # the byte offset of event seq at index seq - 1
        self.relayed: dict[str, int] = {}  # worker id → the highest wseq stored from it
        self._f = None
        self._lock: int | None = None

    def open(self) -> None:
        """Take the run's event-log lock (held while this engine lives: nobody folds the spool into the
        file meanwhile, and a second engine on the run waits, then refuses), then the file."""
        self._lock = lock_events(self.path.parent, wait_s=LOCK_WAIT_S)
        cut_torn_tail(self.path)
        self.seq = last_seq(self.path)
        self.offsets = self._index()
        self._f = open(self.path, "ab")

    def _index(self) -> list[int]:
        """Byte offset of each event line (index seq-1), so history is served from the file."""
        offsets = []
        if self.path.exists():
            pos = 0
            with open(self.path, "rb") as f:
                for line in f:
                    if line.strip() and line.endswith(b"\n"):
                        offsets.append(pos)
                    pos += len(line)
        return offsets[: self.seq]

    def append(self, event: Message, relay: bool = False) -> bytes:
        """Number and store (flushed) one event; returns its line, to publish. ``relay``: one a worker
        sent, whose worker id and count are kept so that its spool is stored once; the engine's own
        events carry neither."""
        if relay and event.worker:
            self.relayed[event.worker] = max(self.relayed.get(event.worker, 0), event.wseq)
        elif not relay:
            event.worker, event.wseq = "", 0
        self.seq += 1
        data = event_encoder.encode(stamp(event, self.seq, self.run))
        self.offsets.append(self._f.tell())
        self._f.write(data + b"\n")
        self._f.flush()
        return data

    def already_stored(self, ev: Message) -> bool:
        """A worker's event stored before (it came again from the worker's spool)."""
        return bool(ev.worker) and ev.wseq <= self.relayed.get(ev.worker, 0)

    def read(self, after: int, limit: int) -> list[bytes]:
        """The lines of up to ``limit`` events after ``after``, from the file."""
        if after >= self.seq:
            return []
        out = []
        with open(self.path, "rb") as f:
            f.seek(self.offsets[after])
            for _ in range(min(limit, self.seq - after)):
                out.append(f.readline().rstrip(b"\n"))
        return out

    def sync(self) -> None:
        os.fsync(self._f.fileno())

    def spooled(self, spool: dict | None = None) -> list:
        """The events in the spool (or in ``spool``, a part of it) not stored yet, in order."""
        return spooled_events(self.path, read_spool(self.spool_dir) if spool is None else spool, self.relayed)

    def prune_spool(self, final: bool = False, store: Callable[[Message], None] | None = None) -> None:
        """Delete spool files whose events are all stored: every file but a worker's newest while it
        runs; at the end (``final``), the newest too, once its events are stored — those of workers that
        are gone and never reached an engine are handed to ``store`` (the engine's path for a worker's
        event) first, in order."""
        spool = read_spool(self.spool_dir)
        if final:
            for ev in self.spooled({w: f for w, f in spool.items() if not pid_alive(spool_worker_pid(w))}):
                store(ev)  # sent while nobody read, or dropped in transit: stored now
        for worker, files in spool.items():
            stored = self.relayed.get(worker, 0)
            done_with = not pid_alive(spool_worker_pid(worker)) and final
            for (_, path), nxt in zip(files, [f for f, _ in files[1:]] + [None]):
                if (nxt is not None and nxt - 1 <= stored) or done_with:
                    with contextlib.suppress(OSError):
                        path.unlink()
        with contextlib.suppress(OSError):
            self.spool_dir.rmdir()  # only when empty

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._lock is not None:
            os.close(self._lock)  # the lock goes with it
            self._lock = None
