"""Compare runs: the marked runs' curves overlaid (by step or by tokens seen) and what differs in their
configs. Read from the run folders (no engine needed); read again every few seconds, so running runs
move on."""

from __future__ import annotations

import asyncio
import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane

from app.compare import METRICS, RunSeries
from app.widgets.compare import ComparePlots, ConfigDiff, Legend

REFRESH_S = 3.0  # the run folders are read again this often (only what was appended is read)
LOAD_REDRAW_S = 0.5  # while a big events.jsonl is read: redraw at most this often


class CompareScreen(Screen):
    DEFAULT_CSS = """
    CompareScreen { layout: vertical; overflow: hidden; }
    CompareScreen #cmp-tabs { height: 1fr; }
    CompareScreen #cmp-tabs > ContentSwitcher { height: 1fr; }
    CompareScreen TabPane { height: 1fr; padding: 0; }
    """
    BINDINGS = [
        Binding("1", "tab('cmp-curves')", "Curves", show=False),
        Binding("2", "tab('cmp-config')", "Config", show=False),
        Binding("a", "align", "Step/tokens"),
        Binding("m", "metric", "Metric"),
        Binding("r", "reload", "Reload", show=False),
        Binding("escape,q", "back", "Back"),
    ]

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.runs = [RunSeries(str(p)) for p in paths]
        self.by_tokens = False
        self.metric = METRICS[0][0]
        self.loaded = False  # the first read of every run is folded in
        self._reading = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Legend(id="cmp-legend", markup=False)
        with TabbedContent(id="cmp-tabs"):
            with TabPane("Curves", id="cmp-curves"):
                yield ComparePlots(id="cmp-plots")
            with TabPane("Config", id="cmp-config"):
                yield ConfigDiff(id="cmp-config-diff")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"compare {len(self.runs)} run{'s' * (len(self.runs) != 1)}"
        self.set_interval(REFRESH_S, self.action_reload)
        self.action_reload()

    def action_reload(self) -> None:
        if not self._reading:
            self._reading = True
            self.run_worker(self._reload(), group="compare-read")

    async def _reload(self) -> None:
        """Read the folders on a thread, a piece of each file at a time (reading and folding: files and
        decoding never on the app's loop), redrawing as the pieces come in (at most every LOAD_REDRAW_S
        while a big file is read) and when anything moved."""
        try:
            last = 0.0
            while True:
                changed = await asyncio.to_thread(lambda: [r.update() for r in self.runs])
                loading = any(r.loading for r in self.runs)
                now = time.monotonic()
                if not self.loaded or (any(changed) and (not loading or now - last >= LOAD_REDRAW_S)):
                    self.loaded, last = True, now
                    self.redraw()
                if not loading:
                    break
        finally:
            self._reading = False

    def redraw(self) -> None:
        self.query_one(Legend).show(self.runs)
        self.query_one(ComparePlots).show(self.runs, self.by_tokens, self.metric)
        self.query_one(ConfigDiff).show(self.runs, self.size.width)

    def on_resize(self) -> None:
        if self.loaded:
            self.query_one(Legend).show(self.runs)
            self.query_one(ConfigDiff).show(self.runs, self.size.width)

    def action_align(self) -> None:
        self.by_tokens = not self.by_tokens
        self.query_one(ComparePlots).show(self.runs, self.by_tokens, self.metric)

    def action_metric(self) -> None:
        keys = [k for k, _ in METRICS]
        self.metric = keys[(keys.index(self.metric) + 1) % len(keys)]
        self.query_one(ComparePlots).show(self.runs, self.by_tokens, self.metric)

    def action_tab(self, tab: str) -> None:
        self.set_focus(None)
        self.query_one(TabbedContent).active = tab

    def action_back(self) -> None:
        self.app.pop_screen()
