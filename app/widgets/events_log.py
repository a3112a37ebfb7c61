"""Every event, filterable by type and searchable by text: the history (the newest SHOWN of the events
kept) as soon as the tab opens, then live ones appended."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, RichLog

from app.state import RunState
from app.text import NEWLINE, assemble, data

SHOWN = 2000


def field(value: object, limit: int) -> Text:
    """A run's text in an event's line: a newline in it is shown (⏎), so one event reads as one line (a long
    one wrapped under it), never as more events."""
    return data(value, limit=limit, newline=NEWLINE)


def describe(ev) -> Text:
    match ev.type:
        case "step":
            loss = f"{ev.loss:.4f}" if ev.loss is not None else "non-finite"
            return assemble(f"step {ev.step} loss {loss} lr {ev.lr:.2e} {ev.tokens_per_s:,.0f} tok/s")
        case "status":
            return assemble(field(ev.state, 20), " ", field(getattr(ev, "outcome", ""), 20), " ", field(ev.message, 300))
        case "alert":
            return assemble(field(ev.level, 10), " ", field(ev.kind, 40), ": ", field(ev.message, 300))
        case "log":
            return assemble(field(ev.level, 10), f" rank {ev.rank}: ", field(ev.message, 300))
        case "eval":
            return assemble(f"step {ev.step} val loss {ev.loss:.4f} ppl {ev.ppl:.2f}")
        case "preview":
            return assemble(f"step {ev.step} #{ev.index} T={ev.temperature:g}: ", field(ev.text, 80))
        case "preview_start":
            return assemble(f"step {ev.step}: generating {ev.count} preview(s) of up to {ev.max_new_tokens} new tokens")
        case "checkpoint":
            return assemble(f"step {ev.step} ", field(ev.path, 200))
        case "telemetry":
            return assemble(field(ev.host, 60), f" gpus={len(ev.gpus)} rss={ev.rss or 0:.2f}GiB")
        case "ack":
            return assemble(field(ev.command, 40), f" applied at step {ev.step}")
        case "inference":
            return assemble(field(ev.name, 80), " ", field(ev.state, 20), f" {ev.done}/{ev.total} ", field(ev.message, 200))
        case "run_info":
            return assemble(field(ev.model_id, 100), f" on {ev.world_size} rank(s), {ev.total_steps} steps")
    return assemble(ev.type)


class EventsLog(Vertical):
    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter (/): a type (step, alert…) or any text", id="ev-filter")
        # long lines wrap (an alert's whole message can be read; cut at the edge, nothing said it went on),
        # and are wrapped again when the log's width changes (``on_resize``)
        yield RichLog(id="ev-log", max_lines=SHOWN, wrap=True, markup=False, min_width=20)

    def on_mount(self) -> None:
        self._written = None  # the newest event written to the log (the event itself: seqs need not rise)
        self._filter = ""
        self._width: int | None = None  # the log's width its lines were wrapped to
        # kept at its end when the terminal is resized too (else, grown then shrunk, its last row was an old
        # event: a finished run's earlier status read as its state); scrolling up lets go, the end takes it back
        self.query_one("#ev-log", RichLog).anchor()

    @on(Input.Changed, "#ev-filter")
    def refilter(self, event: Input.Changed) -> None:
        self._filter = event.value.strip().lower()
        self.rewrite()

    def rewrite(self, follow: bool = True) -> None:
        """Every shown event written again (another filter, another width); ``follow``: then to the end."""
        self._written = None
        self.query_one("#ev-log", RichLog).clear()
        self.show(self.app.state, follow)  # type: ignore[attr-defined]

    def on_resize(self, event) -> None:
        self.call_after_refresh(self._rewrap)  # once the log has its new size

    def _rewrap(self) -> None:
        log = self.query_one("#ev-log", RichLog)
        width = log.scrollable_content_region.width
        if width and width != self._width:
            known, self._width = self._width is not None, width
            if known:
                # where the user scrolled to stays put (near enough: the lines wrap anew); at the end, the end
                share = log.scroll_y / log.max_scroll_y if log.max_scroll_y else 1.0
                following = log.scroll_y >= log.max_scroll_y
                self.rewrite(following)
                if not following:
                    log.call_after_refresh(lambda: log.scroll_to(y=round(share * log.max_scroll_y), animate=False))

    def line(self, ev) -> Text | None:
        text = assemble(f"{ev.seq:>6} {ev.type:<10} ", describe(ev))
        f = self._filter
        return text if not f or ev.type == f or f in text.plain.lower() else None

    def show(self, s: RunState, follow: bool = True) -> None:
        log = self.query_one("#ev-log", RichLog)
        new = []
        for ev in reversed(s.events):  # the newest first, back to what the log already has
            if ev is self._written:
                break
            line = self.line(ev)
            if line is not None:
                new.append(line)
                if len(new) >= SHOWN:
                    break
        if s.events:
            self._written = s.events[-1]
        for line in reversed(new):
            log.write(line, scroll_end=None if follow else False)
        if new and log.auto_scroll and follow:
            # once the layout has settled: a long line's horizontal scrollbar must not hide the newest one
            log.call_after_refresh(log.scroll_end, animate=False)
