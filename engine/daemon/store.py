"""The event log as the engine keeps it: ``runs/<run>/events.jsonl`` numbered, appended and served.

Every event gets the next ``seq`` (continuing after the file's last line on resume) and is appended
flushed, one line each; an index of each line's seq and byte offset is kept so ``history`` is read
straight from the file. The file belongs to people too (a line deleted, the file cut or replaced while
the engine runs): the index is rebuilt from what the file holds whenever it no longer matches, and
history serves the events found there, by their seq. A worker's event carries its ``worker`` id and count (``wseq``); the highest stored of each
worker is kept, so that the events a worker also wrote to its spool (``runs/<run>/spool/``) are
stored once: those that never reached an engine are stored by the next, and spool files whose events
are all stored are deleted. The formats of both files belong to ``engine/eventlog.py``.

An event the file cannot take (a full disk: ENOSPC) is numbered all the same, published, and waits in memory
in order (up to ``WAITING_MAX``), served from there to history requests; each later append, and the
engine's tick, writes the waiting ones first, so the file stays gapless once space returns.
"""

from __future__ import annotations

import contextlib
import os
import stat
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec

from engine.eventlog import (
    WAITING_MAX,
    append_whole,
    cut_torn_tail,
    last_seq,
    read_spool,
    spool_worker_pid,
    spooled_events,
)
from engine.protocol import Message, event_encoder, stamp
from engine.runs import lock_events, pid_alive

LOCK_WAIT_S = 30.0  # an engine waits this long for the event-log lock (a fold takes milliseconds)


class Unreadable(Exception):
    """events.jsonl cannot be read at all (gone, a folder, no permission): a one-line reason for the reply."""


class _Seq(msgspec.Struct):
    seq: int = 0


_seq_decoder = msgspec.json.Decoder(_Seq)


def line_seq(line: bytes) -> int:
    """The seq of an events.jsonl line, 0 when it is no event line (torn, garbage, no seq)."""
    if not line.endswith(b"\n"):
        return 0
    try:
        seq = _seq_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return 0
    return seq.seq if seq.seq > 0 else 0


class EventStore:
    """``events.jsonl`` of one run, and its workers' spool."""

    def __init__(self, run_dir: Path, run: str) -> None:
        self.path = run_dir / "events.jsonl"
        self.spool_dir = run_dir / "spool"
        self.run = run
        self.seq = 0  # the last event stored
        # the index: each event line's seq (ascending, each once) and its byte offset, for the file that
        # ``_ident`` names as it was at ``_size`` bytes
        self._seqs = array("q")
        self._offsets = array("q")
        self._ident: tuple[int, int] | None = None
        self._size = -1
        self._end = 0  # where this engine's last line ended in the file it appends to
        self.relayed: dict[str, int] = {}  # worker id → the highest wseq stored from it
        self.waiting: deque[tuple[int, bytes]] = deque()  # numbered events the file could not take yet, in order
        self.write_error = ""  # why the file takes no event now (a full disk); "" while it does
        self.dropped = 0  # waiting events let go past WAITING_MAX (their seqs are missing from the file)
        self._f = None
        self._lock: int | None = None

    def open(self) -> None:
        """Take the run's event-log lock (held while this engine lives: nobody folds the spool into the
        file meanwhile, and a second engine on the run waits, then refuses), then the file."""
        self._lock = lock_events(self.path.parent, wait_s=LOCK_WAIT_S)
        cut_torn_tail(self.path)
        self.seq = last_seq(self.path)
        self._f = open(self.path, "a+b")  # read too: whether the file still ends a line before appending
        self._end = os.fstat(self._f.fileno()).st_size
        with open(self.path, "rb") as f:
            self._index(f)
        if self._seqs:  # after the highest seq in the file, wherever its line is (a line moved, one made by hand)
            self.seq = max(self.seq, self._seqs[-1])

    def _index(self, f, upto: int | None = None) -> None:
        """The seq and byte offset of every event line of the open file ``f``, so history is served from
        it: lines that are no event (garbage, torn) are passed over, and of a seq found twice (a line
        copied) or out of order the first line is kept. ``upto``: no line numbered above it is served — this
        engine numbers the events, and a line written since with a higher seq is none of its (a line
        another process appended: served last, it would read as the run's newest event, and a client that
        took its seq as where it is would pass over every real event after it)."""
        st = os.fstat(f.fileno())
        seqs, offsets = array("q"), array("q")
        ordered, pos = True, 0
        f.seek(0)
        for line in f:
            seq = line_seq(line)
            if seq and (upto is None or seq <= upto):
                ordered = ordered and (not seqs or seq > seqs[-1])
                seqs.append(seq)
                offsets.append(pos)
            pos += len(line)
        if not ordered:  # by seq, the first line of each
            order = sorted(range(len(seqs)), key=seqs.__getitem__)  # stable: file order within a seq
            keep = [i for n, i in enumerate(order) if n == 0 or seqs[i] != seqs[order[n - 1]]]
            seqs, offsets = array("q", (seqs[i] for i in keep)), array("q", (offsets[i] for i in keep))
        self._seqs, self._offsets = seqs, offsets
        self._ident, self._size = (st.st_dev, st.st_ino), pos

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
        self.waiting.append((self.seq, data))
        if len(self.waiting) > WAITING_MAX:
            self.waiting.popleft()
            self.dropped += 1
        self.write_waiting()
        return data

    def write_waiting(self) -> bool:
        """The waiting events written, in order; False while the file cannot take them (``write_error`` says
        why: they stay in memory, tried again at the next append or tick)."""
        while self.waiting:
            seq, data = self.waiting[0]
            try:
                self._write(seq, data)
            except OSError as e:
                self.write_error = e.strerror or str(e)
                return False
            self.waiting.popleft()
        self.write_error = ""
        return True

    def _write(self, seq: int, data: bytes) -> None:
        """One numbered event's line appended (whole, or not at all: ``append_whole``), and indexed."""
        st = self._follow_the_path()
        fd = self._f.fileno()
        line = data + b"\n"
        if st.st_size != self._end and st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
            line = b"\n" + line  # someone else left a line without its end: this event gets a line of its own
        append_whole(fd, line)
        self._end = os.lseek(fd, 0, os.SEEK_END)  # where this line ends (appended at the end, wherever that was)
        if (st.st_dev, st.st_ino) == self._ident and self._end - len(line) == self._size and len(line) == len(data) + 1 \
                and (not self._seqs or seq > self._seqs[-1]):
            self._seqs.append(seq)
            self._offsets.append(self._size)
            self._size = self._end
        else:  # the file was changed by someone else (cut, appended to) or replaced: read it again when asked
            self._ident = None

    def _follow_the_path(self) -> os.stat_result:
        """Append to the file the path names now: replaced (another file moved there) or removed while the
        engine runs, the file it had open is no longer what anyone reads — its events would be lost when
        the engine ends. A path that is a folder now, or cannot be opened, keeps the open file. Returns the
        ``fstat`` of the file appended to."""
        here = os.fstat(self._f.fileno())
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError:
            return here
        if st is not None and ((st.st_dev, st.st_ino) == (here.st_dev, here.st_ino) or not stat.S_ISREG(st.st_mode)):
            return here
        try:
            f = open(self.path, "a+b")  # the new file, or a new one where it was removed
        except OSError:
            return here
        self._f.close()
        self._f = f
        here = os.fstat(f.fileno())
        self._end = here.st_size
        self._ident = None  # read it again when history is asked
        return here

    def already_stored(self, ev: Message) -> bool:
        """A worker's event stored before (it came again from the worker's spool)."""
        return bool(ev.worker) and ev.wseq <= self.relayed.get(ev.worker, 0)

    def read(self, after: int, limit: int) -> tuple[list[bytes], int, bool]:
        """The lines of up to ``limit`` events with a seq above ``after``, from the file, in seq order; the
        seq of the last one (``after``, at most the last stored, when there is none); whether the file
        holds more. Events missing from the file (lines deleted by hand) are missing from the answer;
        a file that cannot be read at all raises ``Unreadable``."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise Unreadable(f"{self.path.name} missing") from None
        except OSError as e:
            raise Unreadable(f"{self.path.name} unreadable: {e.strerror or e}") from None
        with f:
            try:
                st = os.fstat(f.fileno())
                for attempt in range(2):
                    if attempt or (st.st_dev, st.st_ino) != self._ident or st.st_size != self._size:
                        self._index(f, upto=self.seq)  # not the file indexed (changed or replaced): read it again
                    lines, last, complete = self._lines(f, after, limit)
                    if complete:
                        break
            except OSError as e:
                raise Unreadable(f"{self.path.name} unreadable: {e.strerror or e}") from None
        more = bool(lines) and bisect_right(self._seqs, last) < len(self._seqs)
        if not more and self.waiting:  # events not in the file yet (a full disk): from memory
            since, room = (last if lines else after), limit - len(lines)
            held = [(seq, data) for seq, data in self.waiting if seq > since]
            if held and room > 0:
                lines += [data for _, data in held[:room]]
                last = held[:room][-1][0]
            more = len(held) > room
        return lines, last if lines else min(after, self.seq), more

    def _lines(self, f, after: int, limit: int) -> tuple[list[bytes], int, bool]:
        """The indexed lines after ``after`` (up to ``limit``), each checked to be the event the index says;
        False where one is not (the file changed since): those found are returned all the same."""
        out, last, complete = [], after, True
        i = bisect_right(self._seqs, after)
        pos = -1
        for j in range(i, min(i + limit, len(self._seqs))):
            if self._offsets[j] != pos:
                f.seek(self._offsets[j])
            line = f.readline()
            pos = self._offsets[j] + len(line)
            if line_seq(line) != self._seqs[j]:
                complete = False
                continue
            out.append(line[:-1])
            last = self._seqs[j]
        return out, last, complete

    def sync(self) -> None:
        with contextlib.suppress(OSError):  # (a full disk: the events wait in memory, or are said lost)
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
        if self.waiting:
            return  # events not in the file yet: the spool keeps the workers' ones, for the next engine if need be
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
