"""The comparison of runs: the legend, the overlaid plots (train loss, val loss, an inference metric,
tokens/s) and the table of config values that differ."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from app.compare import METRICS, NOT_COMPARED, RunSeries, differing_config
from app.text import assemble, data, plain
from app.widgets.charts import fit_axes

# one colour and one point marker per run, the same in the legend and in every plot
PALETTE = ((86, 156, 255), (255, 160, 64), (90, 200, 110), (240, 90, 90), (190, 130, 255), (70, 210, 210),
           (235, 215, 80), (255, 125, 200))
MARKERS = ("●", "■", "▲", "◆", "✚", "✖", "★", "○")
MAX_RUNS = len(PALETTE)


def colour(i: int) -> str:
    r, g, b = PALETTE[i % len(PALETTE)]
    return f"rgb({r},{g},{b})"


class Legend(Static):
    """Each run's marker in its colour, its name (cut to fit), state and last step (or how much of its
    events.jsonl is read yet)."""

    DEFAULT_CSS = "Legend { height: auto; max-height: 3; padding: 0 1; }"

    def show(self, runs: list[RunSeries]) -> None:
        tails = [f"reading {100 * r.offset // max(r.size, 1)}%" if r.loading else f"{plain(r.state, 12)} @{r.step}"
                 for r in runs]
        limits = share(self.size.width - 2 - sum(4 + len(t) for t in tails), [len(r.name) for r in runs])
        parts: list = []
        for i, (r, tail, limit) in enumerate(zip(runs, tails, limits)):
            parts += [("  " if i else ""), (MARKERS[i % len(MARKERS)] + " ", f"bold {colour(i)}"),
                      data(r.name, f"bold {colour(i)}", limit=limit), " ",
                      (tail, "yellow" if r.loading else "dim")]
        self.update(assemble(*parts))


def share(room: int, wants: list[int], least: int = 8) -> list[int]:
    """Cut ``room`` columns among names that want ``wants`` characters: the short ones whole, the rest
    evenly (each gets at least ``least``)."""
    out = [0] * len(wants)
    left = max(room, least * len(wants))
    for n, i in enumerate(sorted(range(len(wants)), key=wants.__getitem__)):
        out[i] = max(least, min(wants[i], left // (len(wants) - n)))
        left -= out[i]
    return out


PLOTS = (("train", "train loss"), ("val", "val loss"), ("metric", ""), ("tps", "tokens/s"))


class ComparePlots(Grid):
    """Four plots, one curve per run in the run's colour: train loss, val loss, the chosen inference
    metric (by checkpoint step) and tokens/s; x is the step or the tokens seen."""

    DEFAULT_CSS = """
    ComparePlots { grid-size: 2 2; grid-gutter: 0 1; height: 1fr; }
    ComparePlots PlotextPlot { height: 1fr; min-height: 5; }
    """

    def compose(self) -> ComposeResult:
        for key, _ in PLOTS:
            yield PlotextPlot(id=f"cmp-{key}", classes="cmp-plot")

    def show(self, runs: list[RunSeries], by_tokens: bool, metric: str) -> None:
        x_name = "tokens seen" if by_tokens else "step"
        label = dict(METRICS)[metric]
        for key, title in PLOTS:
            what = metric if key == "metric" else key
            plot = self.query_one(f"#cmp-{key}", PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            drawn = 0
            all_x: list = []
            all_y: list = []
            for i, r in enumerate(runs):
                xs, ys = r.series(what, by_tokens)
                if not xs:
                    continue
                drawn += 1
                all_x += xs
                all_y += ys
                plt.plot(xs, ys, color=PALETTE[i % len(PALETTE)], marker="braille")
                if key in ("val", "metric"):  # a few measurements: each one marked with the run's marker
                    plt.scatter(xs, ys, color=PALETTE[i % len(PALETTE)], marker=MARKERS[i % len(MARKERS)])
            if key == "metric":
                title = f"{label} (inference)" if any(r.has_inference() for r in runs) else f"{label}: no inference"
            elif not drawn:
                title += ": none yet"
            plt.title(f"{title} · {x_name}")
            fit_axes(plot, all_x, all_y)  # whole steps or tokens; a flat curve (one point) gets a range around it
            plot.refresh()


class ConfigDiff(Vertical):
    """The config values that differ between the runs, side by side (the model always shown)."""

    DEFAULT_CSS = """
    ConfigDiff { height: 1fr; }
    ConfigDiff #cmp-config-note { height: auto; max-height: 2; padding: 0 1; }
    ConfigDiff #cmp-config-table { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="cmp-config-note", markup=False)
        yield DataTable(id="cmp-config-table", cursor_type="row", zebra_stripes=True)

    def show(self, runs: list[RunSeries], width: int = 80) -> None:
        rows = differing_config(runs)
        table = self.query_one(DataTable)
        table.clear(columns=True)
        limit = max(8, (width - 24) // max(len(runs), 1) - 3)
        table.add_column(Text("key"), key="key")
        for i, r in enumerate(runs):
            table.add_column(assemble((MARKERS[i % len(MARKERS)] + " ", f"bold {colour(i)}"),
                                      data(r.name, f"bold {colour(i)}", limit=limit)), key=f"run{i}")
        for key, values in rows:
            table.add_row(data(key, "bold", limit=24), *(data(v, limit=limit) for v in values), key=key)
        missing = [r.name for r in runs if not r.config]
        differ = sum(1 for key, values in rows if len(set(values)) > 1)  # the model row is there even when same
        note = assemble(f"{differ} config value(s) differ" if differ else "the configs are the same",
                        f" ({', '.join(NOT_COMPARED)}: each run's own, not compared)")
        if missing:
            note = assemble(note, ("  no config yet: ", "yellow"), data(", ".join(missing), "yellow", limit=60))
        self.query_one("#cmp-config-note", Static).update(note)
