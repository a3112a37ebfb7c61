"""The event log's files: ``events.jsonl`` (one event per line, numbered from 1, gapless) and the
workers' spool (``spool/<worker>.<first wseq>.jsonl``: every event a worker sent, kept until the engine
has stored it). Writers and readers of both use these functions, so the formats have one owner.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from engine.protocol import Message


def last_seq(path: Path) -> int:
    """The sequence number of the last event in an events file (0 if none); a torn last line, a line that
    is not an event, or one whose seq is no event's (0 or less: a hand-made line), is passed over."""
    if not path.exists():
        return 0
    for line in lines_backwards(path):
        ev = decode_event(line)
        if ev is not None and ev.seq > 0:
            return ev.seq
    return 0


WAITING_MAX = 100_000  # events an event log keeps in memory while its file cannot take them (a full disk)


def append_whole(fd: int, data: bytes) -> None:
    """``data`` appended to the file open for appending at ``fd``, whole or not at all: a write the disk cannot
    take (ENOSPC) is cut back off (no torn line is left for the next one to glue onto), then raises."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def cut_torn_tail(path: Path) -> None:
    """A line cut short when the last writer was killed was never stored nor published: drop it, so
    the next event starts on a line of its own."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                f.truncate(pos + nl + 1)
                return
        f.truncate(0)


SPOOL_SEGMENT = 5000  # events per spool file; the engine deletes a file once every event in it is stored


def worker_id() -> str:
    """This process, unique across restarts and machines: ``<host>-<pid>-<start>`` (file-name safe)."""
    import time

    return f"{host_tag()}-{os.getpid()}-{int(time.time() * 1000):x}"


def host_tag() -> str:
    """This machine's name as worker ids carry it (file-name safe)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"


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
        self._path: Path | None = None
        self._count = 0

    def write(self, wseq: int, data: bytes) -> None:
        if self._f is not None and not self._still_there():
            self._f.close()  # removed (the spool folder deleted while the run goes): a new file from this event
            self._f = None
        if self._f is None or self._count >= SPOOL_SEGMENT:
            if self._f is not None:
                self._f.close()
            self.folder.mkdir(parents=True, exist_ok=True)
            self._path = self.folder / f"{self.worker}.{wseq:012d}.jsonl"
            self._f = open(self._path, "ab")
            self._count = 0
        self._f.write(data + b"\n")
        self._f.flush()  # in the page cache: it survives this process being killed
        self._count += 1

    def _still_there(self) -> bool:
        """Whether the open file is still the one its name names (events appended to a removed one would
        be lost with this process: "nothing trained is lost" holds only for what the folder keeps)."""
        try:
            st = os.stat(self._path)
        except OSError:
            return False
        here = os.fstat(self._f.fileno())
        return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)

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
    from engine.protocol import decode, event_decoder

    return decode(event_decoder, raw)[0]


def worker_host(worker: str) -> str:
    """The host part of a worker id made by ``worker_id()`` (``<host>-<pid>-<start>``)."""
    return worker.rsplit("-", 2)[0]


def spool_worker_pid(worker: str) -> int | None:
    """The pid in a worker id made by ``worker_id()`` (``<host>-<pid>-<start>``)."""
    parts = worker.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


