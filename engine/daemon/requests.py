"""Clients' requests, as the engine's ROUTERs receive them (docs/protocol.md has the frames).

Each request is checked first (signed, fresh, with a nonce never seen: engine/session.py), then
answered: ``history`` (events after a seq, in chunks of up to 5,000, read from ``events.jsonl``),
``status`` (the state, step, loss and total steps as the engine knows them: what a reader whose
``events.jsonl`` cannot say is told), or ``command`` — a command is applied once per id, by the engine's ``apply``, and a retry
with the same id gets the first reply.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable

import msgspec
import zmq

from engine.daemon.store import EventStore, Unreadable
from engine.protocol import CLIENT_COMMANDS, AnyCommand, Reply
from engine.session import Session
from engine.util import printable

HISTORY_CHUNK = 5000  # events in one history reply at most
KEEP_REPLIES = 4096  # command ids remembered, so that a retry gets the first reply


class RequestHandler:
    """Answers one client request at a time; ``state`` gives the run's state, ``apply`` carries out a
    client's command and returns its reply."""

    def __init__(self, session: Session, log: EventStore, state: Callable[[], str],
                 apply: Callable[[AnyCommand], Reply], progress: Callable[[], dict] = dict) -> None:
        self.session = session
        self.log = log
        self.state = state
        self.apply = apply
        self.progress = progress  # the step, loss, total steps and outcome a status reply carries
        self.replies: OrderedDict[str, Reply] = OrderedDict()  # command id → its reply
        self.said: set[str] = set()  # reasons events.jsonl could not be read, logged once each

    def handle(self, frames: list[bytes], router: zmq.Socket) -> None:
        """One request's frames (the client's identity first), answered on ``router``."""
        ident = frames[0]
        body = frames[2:] if len(frames) > 2 and frames[1] == b"" else frames[1:]

        def reply(r: Reply, extra: list[bytes] = ()) -> None:
            router.send_multipart([ident, b"", msgspec.json.encode(r), *extra])

        op = "request"
        try:
            req, problem = self.session.verify(body)
            if req is None:
                return reply(Reply(status="error", reason=problem))
            op = req.op
            self.answer(req, reply)
        except Unreadable as e:  # events.jsonl gone or replaced: said to the client, logged once
            reply(Reply(status="error", reason=str(e), state=self.state()))
            if str(e) not in self.said:
                self.said.add(str(e))
                print(printable(f"engine: {e} (history requests get an error reply until it is a file again)"),
                      file=sys.stderr, flush=True)
        except Exception as e:
            # whatever failed, the client gets an answer (it would wait for nothing); the engine's guard logs it
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            reply(Reply(status="error", reason=f"the engine failed to answer {op!r}: {reason}"))
            raise

    def answer(self, req, reply: Callable) -> None:
        """A verified request, answered through ``reply``."""
        match req.op:
            case "history":
                limit = max(1, min(req.limit, HISTORY_CHUNK))
                lines, last, more = self.log.read(max(0, req.after), limit)
                reply(Reply(status="ok", last=last, more=more, state=self.state()), lines)
            case "status":
                reply(Reply(status="ok", last=self.log.seq, state=self.state(), **self.progress()))
            case "command":
                reply(self.command(req.command))
            case _:
                reply(Reply(status="error", reason=f"unknown op {req.op!r}"))

    def command(self, cmd: AnyCommand | None) -> Reply:
        """A client's command: one a client may send, with an id; applied once, a retry answered alike."""
        if cmd is None or cmd.type not in CLIENT_COMMANDS:
            return Reply(status="error", reason="no command, or not one a client may send")
        if not cmd.id:
            return Reply(status="error", reason="a command needs an id (for replies and retries)")
        if cmd.id in self.replies:  # a retry: applied once, same answer
            return self.replies[cmd.id]
        r = self.apply(cmd)
        r.id = cmd.id
        self.replies[cmd.id] = r
        while len(self.replies) > KEEP_REPLIES:
            self.replies.popitem(last=False)
        return r
