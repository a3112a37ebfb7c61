"""What the engine prints in the foreground (``voxtui run`` without ``--detach``): one line per status,
eval, checkpoint, alert and every tenth step, with the run's text made safe for a terminal."""

from __future__ import annotations

from engine.protocol import shown_state
from engine.util import printable


def one_line(ev) -> str | None:
    """The line printed for an event, or None for one not shown."""
    line = _describe(ev)
    return printable(line) if line is not None else None


def _describe(ev) -> str | None:
    match ev.type:
        case "status":
            state = shown_state(ev.state, ev.outcome, ev.pending)  # the state `voxtui engine list` names
            if state == "stopped" and ev.step:
                return f"[stopped] saved at step {ev.step} ({ev.message or 'stopped on request'})"
            return f"[{state}] {ev.message}".rstrip()
        case "step" if ev.step % 10 == 0 or ev.step == 1 or ev.skipped:
            loss = f"{ev.loss:.4f}" if ev.loss is not None else "non-finite"
            return f"step {ev.step}: loss {loss}, lr {ev.lr:.2e}, {ev.tokens_per_s:,.0f} tokens/s"
        case "eval":
            return f"eval step {ev.step}: loss {ev.loss:.4f}, ppl {ev.ppl:.2f}" + (" (best)" if ev.improved else "")
        case "checkpoint":
            return f"checkpoint {ev.path}"
        case "alert":
            return f"[{ev.level}] {ev.kind}: {ev.message}"
    return None
