"""``EngineClient``: what the TUI, tests and scripts use to follow and steer a run.

    client = EngineClient("runs/RUN")          # or the path of engine.json
    for ev in client.history(): ...            # every event so far, in order
    for ev in client.events(timeout=5): ...    # live, continuing exactly after history (no gap, no duplicate)
    reply = client.send(SetPreviewParams(temperature=0.3))   # Reply(status="ok"|"error", reason=...)

The client subscribes to the live stream before it asks for history, and re-syncs from history
whenever a sequence number is skipped (a slow client whose messages the engine dropped). A run
whose engine is gone is read from ``events.jsonl``. ``EngineLost`` is raised when a live engine
falls silent for ``lost_after`` seconds (heartbeats come every second).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import zmq

from engine.eventlog import decode_event
from engine.protocol import Message, Reply, Request, decode, reply_decoder
from engine.runs import (  # noqa: F401 (the run folder's views, for clients: the dashboard imports them from here)
    checkpoint_states,
    complete_checkpoints,
    engine_alive,
    engine_info,
    engine_json_problem,
    final_adapter,
    fold_spool,
    inference_results,
    inference_samples,
    list_runs,
    read_engine_info,
    read_events,
    run_config,
    summary,
)
from engine.session import Session


class EngineLost(ConnectionError):
    """The engine stopped answering (no heartbeat for a few seconds)."""


class HistoryRefused(EngineLost):
    """The engine answers, but cannot serve the run's events (its reply's reason: events.jsonl unreadable,
    missing)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"history refused: {reason}")
        self.reason = reason


class EngineClient:
    def __init__(self, target: str | os.PathLike, lost_after: float = 3.0, request_timeout: float = 5.0,
                 remote: bool = False) -> None:
        """``target``: a run folder or an engine.json. ``remote``: use the engine's CURVE endpoints
        (``--listen``), as from another machine with a copy of engine.json."""
        path = Path(target)
        self.run_dir = path if path.is_dir() else path.parent
        self.info = engine_info(self.run_dir) if path.is_dir() else read_engine_info(path)
        try:
            self.key = bytes.fromhex(str(self.info.get("key", "")))
        except ValueError:
            raise ValueError(f"{self.run_dir / 'engine.json'}: the key is not hex") from None
        self.session = Session(self.key)
        self.endpoints = self.info.get("endpoints", {}) if isinstance(self.info.get("endpoints"), dict) else {}
        self.curve = None
        if remote:
            r = self.info.get("remote")
            if not r:
                raise ValueError("this engine does not listen for remote clients (start it with --listen)")
            self.endpoints = {"events": r["events"], "control": r["control"]}
            self.curve = r
        self.lost_after = lost_after
        self.request_timeout = request_timeout
        self.command_attempts = 3  # a command unanswered in request_timeout is sent again, same id
        self.last = 0  # seq of the last event handed out
        self._file_mark = (0, 0)  # events.jsonl read up to this byte offset, and the seq of the event before it
        self._ctx = zmq.Context.instance()
        self._sub = None
        self._dealer = None
        self._buffer: list[Message] = []
        # the highest seq a heartbeat announced that history was asked for: a file whose last lines were
        # deleted serves none of them, and asking again at every heartbeat would change nothing
        self._asked = 0
        self._last_heard = time.monotonic()
        self.answered = False  # whether the engine has been heard (a reply, an event or a heartbeat) since connecting
        self.live = bool(self.endpoints) and (remote or engine_alive(self.info))
        if self.live:
            self._connect()
        elif not remote:
            fold_spool(self.run_dir)  # the workers' last events, when they outlived their engine

    # ---- sockets
    def _secure(self, sock: zmq.Socket) -> zmq.Socket:
        if self.curve:
            sock.curve_serverkey = self.curve["server_public"].encode()
            sock.curve_publickey = self.curve["client_public"].encode()
            sock.curve_secretkey = self.curve["client_secret"].encode()
        return sock

    def _connect(self) -> None:
        self._sub = self._secure(self._ctx.socket(zmq.SUB))
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(self.endpoints["events"])
        self._new_dealer()
        self._last_heard = time.monotonic()

    def _new_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close()
        self._dealer = self._secure(self._ctx.socket(zmq.DEALER))
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(self.endpoints["control"])

    def close(self) -> None:
        for s in (self._sub, self._dealer):
            if s is not None:
                s.close()
        self._sub = self._dealer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, req: Request, attempts: int = 1) -> tuple[Reply, list[bytes]]:
        """Send ``req`` and wait for its reply; after a timeout, send it again (a fresh nonce, the same
        command id: the engine applies a command once and answers a retry with the first reply)."""
        for attempt in range(attempts):
            self._dealer.send_multipart([b"", *self.session.sign_request(req)])
            if self._dealer.poll(int(self.request_timeout * 1000)):
                break
            self._new_dealer()  # drop the unanswered request so a late reply cannot be mistaken for the next
            if attempt == attempts - 1 or not (self.curve or engine_alive(self.info)):
                raise EngineLost(f"no reply from the engine in {self.request_timeout * (attempt + 1):.0f} s")
        frames = self._dealer.recv_multipart()
        if frames and frames[0] == b"":
            frames = frames[1:]
        self._last_heard, self.answered = time.monotonic(), True
        reply, why = decode(reply_decoder, frames[0]) if frames else (None, "no frames")
        if reply is None:
            raise EngineLost(f"an unreadable reply from the engine ({why})")
        return reply, frames[1:]

    # ---- the API
    def history(self) -> list[Message]:
        """Every event so far, in order; ``events()`` then continues right after the last one."""
        out = self._history_after(0)
        self.last = out[-1].seq if out else 0
        self._buffer = []
        return out

    def _history_after(self, after: int) -> list[Message]:
        if not self.live:
            return self._file_after(after)
        out: list[Message] = []
        while True:
            reply, lines = self._request(Request(op="history", after=after))
            if reply.status != "ok":
                raise HistoryRefused(reply.reason)
            for line in lines:
                ev = decode_event(line)
                if ev is not None:
                    out.append(ev)
            after = reply.last
            if not reply.more or not lines:
                return out

    def _file_after(self, after: int) -> list[Message]:
        """The events after ``after`` from events.jsonl (no engine to ask). Only what the file gained since
        the last call is read (a finished run's dashboard asks every few seconds: re-reading a long file
        each time would cost it the CPU); a file that shrank (replaced) or a question about events before
        that point reads from the start. A torn last line is not an event yet. Read on from the last call's
        end, every line appended since is an event after it, in the file's order whatever its seq (one line
        with a high seq, written by hand, must not hide the real events after it); from the start, those
        numbered above ``after``."""
        path = self.run_dir / "events.jsonl"
        try:
            f = open(path, "rb")
        except OSError:
            return []
        out = []
        with f:
            pos, seen = self._file_mark  # where the last read ended, and the seq of the event it ended after
            by_seq = pos == 0 or os.fstat(f.fileno()).st_size < pos or after != seen
            if by_seq:
                pos, seen = 0, after
            f.seek(pos)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last line, still being written
                pos += len(line)
                ev = decode_event(line) if line.strip() else None
                if ev is not None and (not by_seq or ev.seq > after):
                    out.append(ev)
                    seen = ev.seq
        self._file_mark = (pos, seen)
        return out

    def events(self, timeout: float | None = None) -> Iterator[Message]:
        """Live events after the last one handed out; ends after ``timeout`` s without one."""
        if self.last == 0 and not self._buffer:
            self._buffer = self._history_after(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._buffer:
                ev = self._buffer.pop(0)
                if ev.seq <= self.last:
                    continue
                self.last = ev.seq
                if deadline is not None:
                    deadline = time.monotonic() + timeout
                yield ev
            if not self.live:
                more = self._file_after(self.last)
                for ev in more:  # in the file's order, each line once (read on from where the last read ended)
                    self.last = ev.seq
                    if deadline is not None:
                        deadline = time.monotonic() + timeout
                    yield ev
                if more:
                    continue
                return
            wait = 250 if deadline is None else max(0, min(250, int((deadline - time.monotonic()) * 1000)))
            if self._sub.poll(wait):
                while self._sub.poll(0):
                    frames = self._sub.recv_multipart()
                    self._last_heard, self.answered = time.monotonic(), True
                    if len(frames) != 2:
                        continue  # not a message of this protocol: dropped
                    kind, data = frames
                    top = max([self.last] + [e.seq for e in self._buffer])
                    if kind == b"ev":
                        ev = decode_event(data)
                        if ev is None or ev.seq <= top:
                            continue  # unreadable, or already have it
                        if ev.seq > top + 1:  # a gap: the engine dropped messages for us; re-sync
                            self._buffer += self._history_after(top)
                        self._buffer.append(ev)
                    elif kind == b"hb":
                        hb = _decode_heartbeat(data)
                        announced = hb.get("seq", 0)
                        if announced > max(top, self._asked):  # events we never saw (missed while joining, or dropped)
                            self._asked = announced
                            self._buffer += self._history_after(top)
                        if hb.get("exiting"):
                            self.live = False
                self._buffer.sort(key=lambda e: e.seq)
            elif time.monotonic() - self._last_heard > self.lost_after:
                self.live = engine_alive(self.info) if not self.curve else False  # gone: history() and events() read the file from now on
                raise EngineLost(f"no heartbeat from the engine for {self.lost_after:.0f} s")
            if deadline is not None and time.monotonic() >= deadline and not self._buffer:
                return

    def has_pending(self) -> bool:
        """Whether ``events()`` would yield again at once (buffered or already received)."""
        return bool(self._buffer) or (self._sub is not None and bool(self._sub.poll(0)))

    def not_live(self) -> str:
        """Why no engine takes requests (``not_live``)."""
        return not_live(self.run_dir if not self.curve else None)

    def send(self, command) -> Reply:
        """Send a command; returns the engine's reply. A command without an id gets a fresh one."""
        if not self.live:
            return Reply(status="error", reason=self.not_live())
        if not command.id:
            command.id = secrets.token_hex(8)
        reply, _ = self._request(Request(op="command", command=command), attempts=self.command_attempts)
        return reply

    def status(self) -> Reply:
        if not self.live:
            return Reply(status="error", reason=self.not_live())
        reply, _ = self._request(Request(op="status"))
        return reply

    # ---- async (for the TUI and other asyncio code)


def not_live(run_dir) -> str:
    """Why no engine takes a run's requests: its engine.json cannot be read (the engine may be running still,
    its sockets unknown), or no engine runs (``run_dir`` None: not looked at)."""
    problem = engine_json_problem(run_dir) if run_dir is not None else ""
    return f"{problem}: the engine cannot be reached (it may still be running)" if problem else \
        "the engine is not running"


def status_reply(run_dir, timeout: float = 2.0):
    """The run's engine's answer to a status request within ``timeout`` s (state, seq, step, loss, total
    steps), or None: its process can be alive and answer nothing (stopped with SIGSTOP, swapped out, hung),
    which the run's files alone cannot tell. What ``runs.summary`` asks where events.jsonl cannot say."""
    try:
        with EngineClient(run_dir, request_timeout=timeout) as c:
            return c.status() if c.live else None
    except Exception:  # EngineLost, a socket's error, an engine.json gone meanwhile: no answer
        return None


def _decode_heartbeat(raw: bytes) -> dict:
    try:
        hb = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(hb, dict) or not isinstance(hb.get("seq", 0), int):
        return {}
    return hb


def age_text(seconds: float | None) -> str:
    """A compact age: 42s, 5m, 3h, 2d."""
    if seconds is None:
        return "–"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"
