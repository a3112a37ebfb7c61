"""Signed requests between a client and its engine, one object on both sides (after jupyter_client's
``Session``): the client signs, the engine verifies — signature, decoding, protocol version, freshness
and a nonce used once (docs/protocol.md, "Client requests and replies").

    session = Session(bytes.fromhex(info["key"]))
    frames = session.sign_request(Request(op="status"))     # client: [request, signature]
    req, problem = session.verify(frames)                   # engine: the Request, or why it is refused
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict

import msgspec

from engine.protocol import PROTOCOL_VERSION, Request, decode, request_decoder

REPLAY_WINDOW_S = 300.0  # a request's time may be this far from the engine's clock
MAX_NONCES = 100_000


def sign(key: bytes, payload: bytes) -> bytes:
    """The signature frame: lowercase hex HMAC-SHA256 of the payload, as ASCII."""
    return hmac.new(key, payload, "sha256").hexdigest().encode()


class Session:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.nonces: OrderedDict[str, float] = OrderedDict()  # seen nonce → when (the engine's side)

    def sign_request(self, req: Request) -> list[bytes]:
        """The client's frames for ``req``, stamped with the time and a fresh nonce."""
        req.time = time.time()
        req.nonce = secrets.token_hex(8)
        payload = msgspec.json.encode(req)
        return [payload, sign(self.key, payload)]

    def verify(self, body: list[bytes]) -> tuple[Request | None, str]:
        """``(request, "")``, or ``(None, why it is refused)``, for the frames after the delimiter."""
        if len(body) != 2:
            return None, "expected two frames: request and signature"
        payload, signature = body
        if not hmac.compare_digest(sign(self.key, payload), signature):
            return None, "unauthenticated: bad signature"
        req, why = decode(request_decoder, payload)
        if req is None:
            return None, f"malformed request: {why}"
        if req.v != PROTOCOL_VERSION or (req.command is not None and req.command.v != PROTOCOL_VERSION):
            return None, f"unsupported protocol version (this engine speaks v={PROTOCOL_VERSION})"
        now = time.time()
        if not abs(now - req.time) <= REPLAY_WINDOW_S:  # also refuses NaN
            return None, "stale request (clock skew or replay)"
        if not 8 <= len(req.nonce) <= 64:
            return None, "a request needs a nonce: a fresh string of 8 to 64 characters"
        if req.nonce in self.nonces:
            return None, "replayed request"
        while self.nonces and (len(self.nonces) >= MAX_NONCES
                               or now - next(iter(self.nonces.values())) > 2 * REPLAY_WINDOW_S):
            self.nonces.popitem(last=False)  # older than any request the clock check still admits
        self.nonces[req.nonce] = now
        return req, ""
