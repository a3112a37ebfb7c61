"""Clients' requests, as the engine's ROUTERs receive them (docs/protocol.md has the frames).

Each request is checked first (signed, fresh, with a nonce never seen: engine/session.py), then
answered: ``history`` (events after a seq, in chunks of up to 5,000, read from ``events.jsonl``),
``status``, or ``command`` — a command is applied once per id, by the engine's ``apply``, and a retry
with the same id gets the first reply.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import msgspec
import zmq

from engine.daemon.store import EventStore
from engine.protocol import CLIENT_COMMANDS, AnyCommand, Reply
from engine.session import Session

HISTORY_CHUNK = 5000  # events in one history reply at most
KEEP_REPLIES = 4096  # command ids remembered, so that a retry gets the first reply


class RequestHandler:
    """Answers one client request at a time; ``state`` gives the run's state, ``apply`` carries out a
    client's command and returns its reply."""

    def __init__(self, session: Session, log: EventStore, state: Callable[[], str],
                 apply: Callable[[AnyCommand], Reply]) -> None:
        self.session = session
        self.log = log
        self.state = state
        self.apply = apply
        self.replies: OrderedDict[str, Reply] = OrderedDict()  # command id → its reply

    def handle(self, frames: list[bytes], router: zmq.Socket) -> None:
        """One request's frames (the client's identity first), answered on ``router``."""
        ident = frames[0]
        body = frames[2:] if len(frames) > 2 and frames[1] == b"" else frames[1:]

        def reply(r: Reply, extra: list[bytes] = ()) -> None:
            router.send_multipart([ident, b"", msgspec.json.encode(r), *extra])

        req, problem = self.session.verify(body)
        if req is None:
            return reply(Reply(status="error", reason=problem))
        match req.op:
            case "history":
                limit = max(1, min(req.limit, HISTORY_CHUNK))
                after = max(0, req.after)
                lines = self.log.read(after, limit)
                last = min(after, self.log.seq) + len(lines)
                reply(Reply(status="ok", last=last, more=last < self.log.seq, state=self.state()), lines)
            case "status":
                reply(Reply(status="ok", last=self.log.seq, state=self.state()))
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
