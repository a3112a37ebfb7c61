"""Every event, filterable by type and searchable by text."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, RichLog

from app.state import RunState


def describe(ev) -> str:
    match ev.type:
        case "step":
            loss = f"{ev.loss:.4f}" if ev.loss is not None else "non-finite"
            return f"step {ev.step} loss {loss} lr {ev.lr:.2e} {ev.tokens_per_s:,.0f} tok/s"
        case "status":
            return f"{ev.state} {ev.message}"
        case "alert":
            return f"{ev.level} {ev.kind}: {ev.message}"
        case "eval":
            return f"step {ev.step} val loss {ev.loss:.4f} ppl {ev.ppl:.2f}"
        case "preview":
            return f"step {ev.step} #{ev.index} T={ev.temperature:g}: {ev.text[:60]}"
        case "checkpoint":
            return f"step {ev.step} {ev.path}"
        case "telemetry":
            return f"{ev.host} gpus={len(ev.gpus)} rss={ev.rss or 0:.2f}GiB"
        case "ack":
            return f"{ev.command} applied at step {ev.step}"
        case "inference":
            return f"{ev.name} {ev.state} {ev.done}/{ev.total}"
    return ev.type


class EventsLog(Vertical):
    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter: a type (step, alert…) or any text", id="ev-filter")
        yield RichLog(id="ev-log", max_lines=2000, wrap=False)
        self._shown = 0
        self._filter = ""

    @on(Input.Changed, "#ev-filter")
    def refilter(self, event: Input.Changed) -> None:
        self._filter = event.value.strip().lower()
        self._shown = 0
        self.query_one("#ev-log", RichLog).clear()
        self.show(self.app.state)  # type: ignore[attr-defined]

    def matches(self, ev, line: str) -> bool:
        f = self._filter
        return not f or ev.type == f or f in line.lower()

    def show(self, s: RunState) -> None:
        log = self.query_one("#ev-log", RichLog)
        events = list(s.events)
        start = 0 if self._shown == 0 else len(events) - max(s.last_seq - self._shown, 0)
        for ev in events[max(start, 0):]:
            line = f"{ev.seq:>6} {ev.type:<10} {describe(ev)}"
            if self.matches(ev, line):
                log.write(line)
        self._shown = s.last_seq
