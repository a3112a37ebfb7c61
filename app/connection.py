"""The engine stream, run in a thread worker: history first, then live, batched into messages;
reconnects with back-off when the engine is lost (engine.json is re-read each time, so a restarted
engine is found). Whether an engine process serves the run is posted on every change (EngineSeen),
before the events it relates to, so the screen never shows a dead run as running."""

from __future__ import annotations

import time

from app.messages import EngineLost as EngineLostMessage
from app.messages import EngineSeen, EventsReceived
from engine.client import EngineClient, EngineLost


def follow(target, post, cancelled, batch_s: float = 0.02) -> None:
    """Post EventsReceived batches until ``cancelled()``; ``post`` must be thread-safe (post_message)."""
    backoff, last, lost, client, seen = 0.5, 0, False, None, None

    def see(live: bool, pid) -> None:
        nonlocal seen
        if (live, pid) != seen:
            seen = (live, pid)
            post(EngineSeen(live, pid))

    while not cancelled():
        try:
            if client is None:
                client = EngineClient(target)
                pid = client.info.get("pid") if isinstance(client.info.get("pid"), int) else None
                if not client.live:
                    see(False, pid)
                if last == 0:
                    events = client.history()
                    if events:
                        post(EventsReceived(events))
                        last = events[-1].seq
                else:
                    client.last = last  # continue exactly after what the screen already has
                if client.live:
                    see(True, pid)  # after the history: it was read from this engine
                    lost = False
                backoff = 0.5
            batch, flushed = [], time.monotonic()
            for ev in client.events(timeout=0.5):
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
                see(False, client.info.get("pid") if isinstance(client.info.get("pid"), int) else None)
                client.close()
                client = None
                for _ in range(20):
                    if cancelled():
                        return
                    time.sleep(0.1)
        except Exception as e:  # EngineLost, OSError, …: never the end of the dashboard; reconnect
            if not lost:
                post(EngineLostMessage(str(e) if isinstance(e, EngineLost) else f"{type(e).__name__}: {e}"))
                lost = True
                seen = None  # whatever comes next is news
            if client is not None:
                client.close()
                client = None
            time.sleep(min(backoff, 5.0))
            backoff *= 2
    if client is not None:
        client.close()
