"""Charts: every curve of the run with its axes and title — loss (train + validation), learning rate,
grad norm, tokens/s, MFU, torch memory, and per GPU its utilisation, memory and power (on a CPU run the
worker's CPU instead) — over a window of the last N steps or all of them, the loss on a linear or log
scale. Drawn at a bounded rate by the screen, and only while the tab shows."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Grid, VerticalScroll
from textual.widgets import Static
from textual_plotext import PlotextPlot

from app.state import RunState
from app.text import assemble, mfu_unknown

WINDOWS = (200, 1000, None)  # the window key cycles these: the last N steps, then all (None)
POINTS = 400  # a terminal plot shows a few hundred points at most: longer series are thinned
# plot id, title, y label
PLOTS = (
    ("ch-loss", "loss", "loss"),
    ("ch-lr", "learning rate", "lr"),
    ("ch-gn", "grad norm", "norm"),
    ("ch-tps", "tokens/s (all ranks)", "tokens/s"),
    ("ch-mfu", "MFU", "fraction"),
    ("ch-mem", "torch memory, rank 0 (GiB)", "GiB"),
    ("ch-gpu-util", "GPU utilisation (%)", "%"),
    ("ch-gpu-mem", "GPU memory used (GiB)", "GiB"),
    ("ch-gpu-power", "GPU power (W)", "W"),
    ("ch-cpu", "worker CPU (%)", "%"),
)


def window_text(window: int | None) -> str:
    return f"last {window} steps" if window else "all steps"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def step_ticks(lo: float, hi: float, n: int = 5) -> list[int]:
    """Up to ``n`` (at least 2) whole steps from ``lo`` to ``hi`` for the x axis (steps are whole: no 9.5)."""
    lo, hi, n = math.floor(lo), math.ceil(hi), max(2, n)
    if hi - lo < n:
        return list(range(lo, hi + 1))
    return sorted({round(lo + (hi - lo) * i / (n - 1)) for i in range(n)})


def tick_label(v: int) -> str:
    """A whole step or token count, short: 950, 12,345 → 12.3k, 1,234,567 → 1.23M."""
    if abs(v) >= 1_000_000:
        return f"{v / 1e6:.3g}M"
    if abs(v) >= 10_000:
        return f"{v / 1e3:.3g}k"
    return str(v)


def fit_axes(plot: PlotextPlot, xs: list, ys: list, floor: float | None = 0.0, width: int | None = None) -> None:
    """The axes of ``plot`` (plotext's figure, data drawn) for points at ``xs``, ``ys``: whole x ticks (steps
    and tokens are whole), only as many as their labels fit in the plot's width (a narrow terminal printed
    them over each other); a y range around a flat series (one point, or all at one value: plotext spans
    ±50%, and 0 ± 1 for a 0, below the ``floor`` the quantity cannot go — None: none). ``width``: the
    plot's, where it is not laid out (yet)."""
    plt = plot.plt
    if xs:
        lo, hi = math.floor(min(xs)), math.ceil(max(xs))
        room = (width or plot.size.width or 80) - 8  # the y axis' labels and the frame
        n = 5
        while n > 1 and n * (max(len(tick_label(lo)), len(tick_label(hi))) + 2) > room:
            n -= 1
        ticks = step_ticks(lo, hi, n) if n > 1 else [hi]
        plt.xticks(ticks, [tick_label(t) for t in ticks])
    finite = [y for y in ys if _finite(y)]
    if finite and min(finite) == max(finite):
        v = finite[0]
        pad = abs(v) * 0.1 or 0.5
        plt.ylim(v - pad if floor is None or v < floor else max(floor, v - pad), v + pad)
    else:  # plotext's own range (a plot redrawn with clear_data keeps the last one set)
        plt.ylim(None, None)


def thin(points: list) -> list:
    """At most about POINTS of ``points``, evenly spread, the last one kept."""
    if len(points) <= POINTS:
        return points
    stride = math.ceil(len(points) / POINTS)
    out = points[::stride]
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out


class Charts(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static(id="ch-head", markup=False)
        with Grid(id="ch-grid"):
            for plot_id, _, _ in PLOTS:
                yield PlotextPlot(id=plot_id, classes="chart")

    def on_mount(self) -> None:
        self.window: int | None = WINDOWS[0]
        self.log_loss = False
        self._missing: list[str] = []
        self.show_head()

    def on_resize(self) -> None:
        width = self.size.width
        self.query_one("#ch-grid", Grid).styles.grid_size_columns = 1 if width < 110 else 2 if width < 200 else 3

    def cycle_window(self) -> None:
        self.window = WINDOWS[(WINDOWS.index(self.window) + 1) % len(WINDOWS)]
        self.show_head()

    def toggle_log(self) -> None:
        self.log_loss = not self.log_loss
        self.show_head()

    def show_head(self) -> None:
        scale = "log" if self.log_loss else "linear"
        missing = f" · not recorded: {', '.join(self._missing)}" if self._missing else ""
        self.query_one("#ch-head", Static).update(assemble(
            ("w", "bold"), f" window: {window_text(self.window)} · ", ("l", "bold"), f" loss scale: {scale}{missing}"))

    def _plot(self, plot_id: str, series: list[tuple[str, list, str]], log: bool = False) -> bool:
        """Draw ``series`` ((label, [(x, y)], marker)) in a plot; hide it when none has a point."""
        plot = self.query_one(f"#{plot_id}", PlotextPlot)
        title, ylabel = next((t, y) for p, t, y in PLOTS if p == plot_id)
        series = [(label, thin([(x, y) for x, y in pts if _finite(y) and (not log or y > 0)]), marker)
                  for label, pts, marker in series]
        series = [s for s in series if s[1]]
        if not series and plot_id != "ch-loss":
            plot.display = False
            return False
        plot.display = True
        plt = plot.plt
        plt.clear_figure()
        plt.title(title + (" (log scale)" if log else ""))
        plt.xlabel("step")
        plt.ylabel(ylabel)
        if log:  # log10 of the values on a linear axis, ticked with the values (plotext's own log scale
            # transforms the data again at every redraw)
            series = [(label, [(x, math.log10(y)) for x, y in pts], marker) for label, pts, marker in series]
            ys = [y for _, pts, _ in series for _, y in pts]
            if ys:
                lo, hi = min(ys), max(ys)
                ticks = [lo + (hi - lo) * i / 4 for i in range(5)] if hi > lo else [lo]
                plt.yticks(ticks, [f"{10 ** t:.3g}" for t in ticks])
        for label, pts, marker in series:
            plt.plot([p[0] for p in pts], [p[1] for p in pts], label=label or None, marker=marker or None)
        fit_axes(plot, [x for _, pts, _ in series for x, _ in pts], [y for _, pts, _ in series for _, y in pts],
                 floor=None if log else 0.0)
        plot.refresh()
        return True

    def show_plots(self, s: RunState) -> None:
        first = s.step - self.window if self.window else -math.inf
        steps = [r for r in s.steps if r[0] > first]
        self._plot("ch-loss", [("train", [(r[0], r[1]) for r in steps], ""),
                               ("val", [(st, lo) for st, lo, _ in s.evals if st > first], "o")], log=self.log_loss)
        missing = []
        for plot_id, col in (("ch-lr", 2), ("ch-gn", 3), ("ch-tps", 4)):
            self._plot(plot_id, [("", [(r[0], r[col]) for r in steps], "")])
        # MFU two ways: the matmuls' FLOPs alone, and with attention's (docs/training.md states both)
        if not self._plot("ch-mfu", [("matmuls", [(r[0], r[5]) for r in steps], ""),
                                     ("+ attention", [(r[0], r[6]) for r in steps], "")]):
            missing.append(f"MFU ({mfu_unknown(s.info.get('device', ''))})")
        mem = [m for m in s.memory if m[0] > first]
        if not self._plot("ch-mem", [("allocated", [(m[0], m[1]) for m in mem], ""),
                                     ("reserved", [(m[0], m[2]) for m in mem], ""),
                                     ("peak", [(m[0], m[3]) for m in mem], "")]):
            missing.append("torch memory")
        samples = [h for h in s.telemetry_history if h[1] > first]
        gpus: dict[tuple, dict] = {}  # (rank, index) → {"util": [(step, v)], "mem": …, "power": …}
        for _, step, stats, *_ in samples:
            for rank, index, util, mem_used, power in stats:
                g = gpus.setdefault((rank, index), {"util": [], "mem": [], "power": []})
                g["util"].append((step, util))
                g["mem"].append((step, mem_used))
                g["power"].append((step, power))
        indexes = [i for _, i in gpus]
        unique = len(set(indexes)) == len(indexes)

        def name(rank: int, index: int) -> str:
            return f"GPU {index}" if unique else f"rank {rank} GPU {index}"

        for plot_id, key in (("ch-gpu-util", "util"), ("ch-gpu-mem", "mem"), ("ch-gpu-power", "power")):
            self._plot(plot_id, [(name(*k), g[key], "") for k, g in sorted(gpus.items())])
        cpu = [(h[1], h[3]) for h in samples if not h[2]]
        self._plot("ch-cpu", [("", cpu if not gpus else [], "")])
        if not gpus and not cpu:
            missing.append("GPU / CPU telemetry")
        if missing != self._missing:
            self._missing = missing
            self.show_head()
