"""Overview: state, progress + ETA, loss curves, sparklines, the latest alerts."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Sparkline, Static
from textual_plotext import PlotextPlot

from app.state import RunState, fmt_duration
from app.text import assemble, data, lines

STATE_STYLE = {"crashed": "bold red", "failed": "bold red", "finished": "bold green", "paused": "bold yellow",
               "stopping": "bold yellow"}


def state_line(s: RunState, limit: int = 200):
    """``run  STATE  outcome or message`` as Text."""
    shown = s.shown_state
    detail = s.outcome_text() or s.status_message
    if s.crashed:
        detail = "the engine is gone" + (f" (last status: {s.status_message})" if s.status_message else "")
    return assemble(data(s.run, "bold", limit=60), "  ", data(shown.upper(), STATE_STYLE.get(shown, "bold"), limit=20),
                    "  ", data(detail, limit=limit))


class Overview(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="ov-head", markup=False)
        yield ProgressBar(id="ov-progress", show_eta=False)
        with Horizontal(id="ov-body"):
            yield PlotextPlot(id="ov-plot")
            with Vertical(id="ov-side"):
                for key, title in (("lr", "lr"), ("gn", "grad norm"), ("tps", "tokens/s"), ("mfu", "MFU")):
                    yield Label(title, id=f"ov-{key}-label", classes="spark-label", markup=False)
                    yield Sparkline([], id=f"ov-{key}", classes="spark")
        yield Static(id="ov-alerts", markup=False)

    def show(self, s: RunState) -> None:
        """The text (cheap; at every news): state, progress, ETA, the latest alerts."""
        last = s.last_step
        loss = f"{last.loss:.4f}" if last is not None and last.loss is not None else "–"
        tps = f"{last.tokens_per_s:,.0f}" if last is not None else "–"
        best = f"{s.best[1]:.4f} @{s.best[0]}" if s.best else "–"
        ranks = s.info.get("world_size", "?")
        device = s.info.get("device", "")
        # three short lines, the important first: nothing that matters is cut at 80 columns
        self.query_one("#ov-head", Static).update(lines(
            state_line(s),
            assemble(f"step {s.step}/{s.total_steps or '?'}  ETA {fmt_duration(s.eta_s())}  epoch {s.epoch():.2f}  "
                     f"loss {loss}  best val {best}"),
            assemble(f"{tps} tok/s  {ranks} rank{'' if ranks == 1 else 's'}", (f" ({device})" if device else ""),
                     "  ", data(s.info.get("model_id", ""), limit=80))))
        bar = self.query_one("#ov-progress", ProgressBar)
        bar.update(total=s.total_steps or None, progress=s.step)
        alerts = list(s.alerts)[-3:]
        text = lines(*(assemble(data(a.level, "red" if a.level == "error" else "yellow", limit=10), " ",
                                data(a.kind, limit=40),
                                ": ", data(a.message, limit=400)) for a in alerts))
        self.query_one("#ov-alerts", Static).update(text if alerts else assemble("no alerts"))

    def show_plots(self, s: RunState) -> None:
        """The loss plot and the sparklines: drawn at a bounded rate by the screen (they are most of the
        bytes sent to the terminal)."""
        plot = self.query_one("#ov-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.title("loss (7: every curve)")
        plt.xlabel("step")
        stride = max(1, len(s.steps) // 400)  # a terminal plot shows a few hundred points at most
        pts = [(st, lo) for st, lo, *_ in s.steps[::stride] if lo is not None and math.isfinite(lo)]
        if pts:
            plt.plot([p[0] for p in pts], [p[1] for p in pts], label="train")
        evals = [(e[0], e[1]) for e in s.evals if math.isfinite(e[1])]
        if evals:
            plt.plot([e[0] for e in evals], [e[1] for e in evals], label="val", marker="o")
        plot.refresh()
        recent = s.steps[-120:]
        for key, col in (("lr", 2), ("gn", 3), ("tps", 4), ("mfu", 5)):
            values = [r[col] for r in recent if r[col] is not None and math.isfinite(r[col])]
            self.query_one(f"#ov-{key}", Sparkline).data = values
            label = {"lr": "lr", "gn": "grad norm", "tps": "tokens/s", "mfu": "MFU"}[key]
            now = f" {values[-1]:.3g}" if values else ""
            self.query_one(f"#ov-{key}-label", Label).update(label + now)
