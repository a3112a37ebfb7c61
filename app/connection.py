"""The engine stream, run in a thread worker: history first, then live, batched into messages;
reconnects with back-off when the engine is lost (engine.json is re-read each time, so a restarted
engine is found). Whether an engine process serves the run is posted on every change (EngineSeen),
before the events it relates to, so the screen never shows a dead run as running; a live one only once the
engine has been heard since connecting, so a frozen engine (alive, not answering) stays lost."""

from __future__ import annotations

import os
import time

from app.messages import EngineLost as EngineLostMessage
from app.messages import EngineSeen, EngineStatusRead, EventsReceived
from engine.client import EngineClient, EngineLost, HistoryRefused, decode_event
from engine.protocol import with_pending


class FileTail:
    """The events appended to a run's events.jsonl since the last read (a run no engine serves: finished,
    crashed, or a worker run on its own), read from where the last read ended, never the whole file
    again: a dashboard left open on a long finished run stays idle. Complete lines only (a torn last line
    waits); a file that shrank (replaced) is read again from its start, by seq."""

    BLOCK = 1 << 16

    def __init__(self, path) -> None:
        self.path, self.offset = path, None  # None: not placed yet

    def _place(self, f, size: int, last: int) -> int:
        """Where the lines after event ``last`` start: found from the end, a block at a time (the file's
        start when no line at or before ``last`` is found)."""
        pos, tail = size, b""
        while pos > 0:
            start = max(0, pos - self.BLOCK)
            f.seek(start)
            buf = f.read(pos - start) + tail  # the bytes [start, start + len(buf))
            lines = buf.split(b"\n")
            spans, at = [], start
            for line in lines:  # (line, offset just after its newline)
                spans.append((line, at + len(line) + 1))
                at += len(line) + 1
            first = 1 if start > 0 else 0  # a block's first piece may be the end of a longer line
            for line, after in reversed(spans[first:]):
                if after > size or not line.strip():
                    continue  # no newline yet (a torn last line), or empty
                ev = decode_event(line)
                if ev is not None and ev.seq <= last:
                    return after
            tail, pos = (lines[0] if first else b""), start
        return 0

    def after(self, last: int) -> list:
        """The events after event ``last``: once placed, every line appended since the last read, in the
        file's order whatever their seqs (one line with a high seq, written by hand, must not hide the real
        events after it); on placing, and in a file that shrank, those numbered above ``last``."""
        by_seq = False
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if self.offset is None:
                    self.offset, by_seq = self._place(f, size, last), True
                if size < self.offset:
                    self.offset, by_seq = 0, True
                if size == self.offset:
                    return []
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            if line.strip():
                ev = decode_event(line)
                if ev is not None and (not by_seq or ev.seq > last):
                    out.append(ev)
        return out


def engine_status(client) -> EngineStatusRead | None:
    """The engine's status reply, as a message (None: no answer, or an error)."""
    try:
        reply = client.status()
    except Exception:  # EngineLost, a socket's error: no answer this time
        return None
    if reply.status != "ok" or not reply.state:
        return None
    return EngineStatusRead(with_pending(reply.state, reply.pending), reply.step, reply.loss, reply.total_steps,
                            reply.outcome, reply.last)


def silent(client) -> str:
    """Why an engine does not answer, where its process says: "" when it cannot be told."""
    import psutil

    pid = client.info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or client.info.get("remote"):
        return ""
    try:
        status = psutil.Process(pid).status()
    except psutil.Error:
        return ""
    if status == psutil.STATUS_STOPPED:
        return (f" — its process (pid {pid}) is stopped (SIGSTOP, Ctrl-Z): `kill -CONT {pid}` continues it; "
                "shown meanwhile: what events.jsonl holds")
    if status != psutil.STATUS_ZOMBIE:
        return f" — its process (pid {pid}) is alive but silent (busy, swapping?); shown meanwhile: what events.jsonl holds"
    return ""


def follow(target, post, cancelled, batch_s: float = 0.02) -> None:
    """Post EventsReceived batches until ``cancelled()``; ``post`` must be thread-safe (post_message)."""
    # lost: False (not yet heard), True (lost, said so), None (heard since this client connected)
    backoff, last, lost, client, seen, pid = 0.5, 0, False, None, None, None
    tail = None  # FileTail, once a client has found the run's folder
    silent_tail = None  # FileTail of an engine alive but silent (hung, SIGSTOPped): what its file holds

    def read_silent(client) -> None:
        """An engine alive that does not answer: what its events.jsonl holds meanwhile (a fresh attach showed
        NEW at step 0 for as long as the engine hung, however much the file held). ``last`` advances only
        through consecutive seqs: when the engine answers again it serves what follows, and an event read here
        and served again is known again by its seq (RunState)."""
        nonlocal silent_tail, last
        if client.run_dir is None:
            return
        silent_tail = silent_tail or FileTail(client.run_dir / "events.jsonl")
        events = silent_tail.after(last)
        if events:
            post(EventsReceived(events))
            for ev in events:
                if ev.seq == last + 1:
                    last = ev.seq

    def see(live: bool, pid, workers: tuple = ()) -> None:
        nonlocal seen
        if (live, pid, workers) != seen:
            seen = (live, pid, workers)
            post(EngineSeen(live, pid, workers))

    def orphans(client) -> tuple:
        """The workers that outlive a gone engine, on this machine (none for a remote run)."""
        from engine.runs import orphan_workers

        try:
            return tuple(orphan_workers(client.run_dir, client.info)) if client.run_dir is not None else ()
        except OSError:
            return ()

    while not cancelled():
        try:
            if client is None:
                client = EngineClient(target)
                lost = False if lost is None else lost  # this client has not heard the engine yet
                pid = client.info.get("pid") if isinstance(client.info.get("pid"), int) else None
                if not client.live:
                    see(False, pid, orphans(client))
                if last == 0:
                    events = client.history()
                    if events:
                        post(EventsReceived(events))
                        last = events[-1].seq
                else:
                    client.last = last  # continue exactly after what the screen already has
                backoff = 0.5
            if not client.live:  # no engine: what the file gained since the last look, not the whole file
                tail = tail or FileTail(client.run_dir / "events.jsonl")
                events = tail.after(last)
                if events:
                    post(EventsReceived(events))
                    last = events[-1].seq
            if client.live:
                tail = None  # the engine appends meanwhile: read the file again from where the events seen end
            if client.live and client.answered and lost is not None:
                # live once the engine has been heard since connecting (the history's reply, a heartbeat): a
                # process that is alive but frozen (SIGSTOP, swapped out) is still lost
                see(True, pid)
                lost, silent_tail = None, None
            batch, flushed = [], time.monotonic()
            for ev in client.events(timeout=0.5) if client.live else ():
                batch.append(ev)
                last = ev.seq
                if not client.has_pending() or time.monotonic() - flushed >= batch_s:
                    # nothing more queued: show it now; a burst: at most every batch_s
                    post(EventsReceived(batch))
                    batch, flushed = [], time.monotonic()
                if cancelled():
                    break
            if batch:
                post(EventsReceived(batch))
            if not client.live:  # no engine (a finished or crashed run): look for a new one now and then
                see(False, client.info.get("pid") if isinstance(client.info.get("pid"), int) else None,
                    orphans(client))
                client.close()
                client = None
                for _ in range(20):
                    if cancelled():
                        return
                    time.sleep(0.1)
        except Exception as e:  # EngineLost, OSError, …: never the end of the dashboard; reconnect
            if isinstance(e, HistoryRefused) and client is not None:
                # it answers but serves no events: its status says the state and step (at every retry: they go on)
                said = engine_status(client)
                if said is not None:
                    post(said)
            if isinstance(e, EngineLost) and not isinstance(e, HistoryRefused) and client is not None:
                try:
                    read_silent(client)
                except Exception:  # what the file holds is a bonus: never the end of the loop
                    pass
            if lost is not True:
                if isinstance(e, HistoryRefused):
                    post(EngineLostMessage(e.reason, refused=True))
                else:
                    reason = str(e) if isinstance(e, EngineLost) else f"{type(e).__name__}: {e}"
                    post(EngineLostMessage(reason + (silent(client) if client is not None else "")))
                lost = True
                seen = None  # whatever comes next is news
            if client is not None:
                client.close()
                client = None
            time.sleep(min(backoff, 5.0))
            backoff *= 2
    if client is not None:
        client.close()
