"""Overview: state, progress + ETA, loss curves, sparklines, the latest alerts."""

from __future__ import annotations

import math

from rich.segment import Segment
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Sparkline, Static
from textual_plotext import PlotextPlot

from app.state import RunState, fmt_duration
from app.text import assemble, data, lines, mfu_unknown, show_text
from app.widgets.charts import fit_axes

STATE_STYLE = {"crashed": "bold red", "unknown": "bold red", "failed": "bold red", "finished": "bold green", "paused": "bold yellow",
               "pausing": "bold yellow", "stopping": "bold yellow", "stopped": "bold yellow"}


def state_line(s: RunState, limit: int = 200):
    """``run  STATE  outcome or message`` as Text."""
    shown = s.shown_state
    detail = s.outcome_text() or s.status_message
    if s.from_engine_status and s.outcome_text():  # where the state comes from is said all the same
        detail = f"{s.outcome_text()}; {s.status_message}"
    if s.previewing is not None and not s.crashed and s.state in ("running", "pausing", "paused"):
        p = s.previewing
        then = "; the pause follows" if s.state == "pausing" else ""
        detail = (f"previewing… (step {p.step}: {p.count} prompt(s), up to {p.max_new_tokens} new tokens; "
                  f"training and commands wait for it{then})")
    if s.crashed:
        detail = "the engine is gone" + (f" (last status: {s.status_message})" if s.status_message else "")
    elif shown == "unknown":
        detail = "the run folder is gone; none of it was read"
    return assemble(data(s.folder or s.run, "bold", limit=60), "  ", data(shown.upper(), STATE_STYLE.get(shown, "bold"), limit=20),
                    "  ", data(detail, limit=limit))


class _Runs:
    """A renderable's segments with neighbours of one style joined: written as one run, one colour code."""

    def __init__(self, renderable) -> None:
        self.renderable = renderable

    def __rich_console__(self, console, options):
        yield from Segment.simplify(console.render(self.renderable, options))


class Spark(Sparkline):
    """A sparkline in one colour (app.tcss), its bars written as runs: Textual's own writes each bar with
    its colour codes (≈ 36 bytes a cell, at every redraw)."""

    def render(self):
        return _Runs(super().render())


class Overview(Vertical):
    _bar_at: tuple = (None, -1, False)

    def compose(self) -> ComposeResult:
        with Vertical(id="ov-head"):  # three lines, each repainted only when its text changes
            for key in ("state", "step", "speed"):
                yield Static(id=f"ov-{key}", classes="ov-line", markup=False)
        yield ProgressBar(id="ov-progress", show_eta=False)
        with Horizontal(id="ov-body"):
            yield PlotextPlot(id="ov-plot")
            with Vertical(id="ov-side"):
                for key, title in (("lr", "lr"), ("gn", "grad norm"), ("tps", "tokens/s"), ("mfu", "MFU")):
                    yield Label(title, id=f"ov-{key}-label", classes="spark-label", markup=False)
                    yield Spark([], id=f"ov-{key}", classes="spark")
        yield Static(id="ov-alerts", markup=False)

    def show(self, s: RunState) -> None:
        """The text (cheap; at every news): state, progress, ETA, the latest alerts."""
        last = s.last_step
        loss = f"{s.loss:.4f}" if s.loss is not None else "–"
        tps = f"{last.tokens_per_s:,.0f}" if last is not None else "–"
        best = f"{s.best[1]:.4f} @{s.best[0]}" if s.best else "–"
        ranks = s.info.get("world_size", "?")
        device = s.info.get("device", "")
        # three short lines, the important first: nothing that matters is cut at 80 columns
        show_text(self.query_one("#ov-state", Static), state_line(s))
        eta = "paused" if s.state == "paused" and not s.crashed else fmt_duration(s.eta_s())
        show_text(self.query_one("#ov-step", Static), assemble(
            f"step {s.step}/{s.total_steps or '?'}  ETA {eta}  epoch {s.epoch():.2f}  "
            f"loss {loss}  best val {best}"))
        # nothing trains now (paused, ended, crashed): the figure is the last step's
        when = " (last)" if last is not None and (s.state not in ("running", "pausing") or s.crashed) else ""
        show_text(self.query_one("#ov-speed", Static), assemble(
            f"{tps} tok/s{when}  {ranks} rank{'' if ranks == 1 else 's'}", (f" ({device})" if device else ""), "  ",
            data(s.info.get("model_id", ""), limit=80)))
        # the bar moved only when it can show a change: a half cell of its width, or a percent
        bar, total = self.query_one("#ov-progress", ProgressBar), s.total_steps or None
        quanta = max(2 * bar.size.width, 100)
        quantum = (total, s.step * quanta // total, s.step == total) if total else (None, 0, False)
        if quantum != self._bar_at:
            self._bar_at = quantum
            bar.update(total=total, progress=s.step)
        alerts = list(s.alerts)[-3:]
        text = lines(*(assemble(data(a.level, "red" if a.level == "error" else "yellow", limit=10), " ",
                                data(a.kind, limit=40),
                                ": ", data(a.message, limit=400)) for a in alerts))
        show_text(self.query_one("#ov-alerts", Static), text if alerts else assemble("no alerts"))

    def show_plots(self, s: RunState) -> None:
        """The loss plot and the sparklines: drawn at a bounded rate by the screen (they are most of the
        bytes sent to the terminal)."""
        plot = self.query_one("#ov-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.title("loss (press 7 for every curve)")  # the Charts tab's key
        plt.xlabel("step")
        stride = max(1, len(s.steps) // 400)  # a terminal plot shows a few hundred points at most
        pts = [(st, lo) for st, lo, *_ in s.steps[::stride] if lo is not None and math.isfinite(lo)]
        if pts:
            plt.plot([p[0] for p in pts], [p[1] for p in pts], label="train")
        evals = [(e[0], e[1]) for e in s.evals if math.isfinite(e[1])]
        if evals:
            plt.plot([e[0] for e in evals], [e[1] for e in evals], label="val", marker="o")
        fit_axes(plot, [p[0] for p in pts] + [e[0] for e in evals], [p[1] for p in pts] + [e[1] for e in evals])
        plot.refresh()
        recent = s.steps[-120:]
        for key, col in (("lr", 2), ("gn", 3), ("tps", 4), ("mfu", 5)):
            values = [r[col] for r in recent if r[col] is not None and math.isfinite(r[col])]
            spark = self.query_one(f"#ov-{key}", Spark)
            if list(spark.data or []) != values:
                spark.data = values
            label = {"lr": "lr", "gn": "grad norm", "tps": "tokens/s", "mfu": "MFU"}[key]
            now = f" {values[-1]:.3g}" if values else " –"
            if key == "mfu":  # steps without MFU: no peak FLOP/s is known for the device (a CPU without --peak_tflops)
                unknown = bool(recent) and not values
                spark.display = not unknown
                if unknown:
                    now = f": {mfu_unknown(s.info.get('device', ''))}"
            show_text(self.query_one(f"#ov-{key}-label", Label), label + now)
