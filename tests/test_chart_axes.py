"""The plots' axes (app/widgets/charts.py fit_axes): whole x ticks that never print over each other however
narrow the plot, and a flat series (one point) drawn inside a range around its value, not below 0."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from textual_plotext import PlotextPlot

from app.widgets.charts import fit_axes, tick_label

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def drawn(xs, ys, width, height=12, floor=0.0):
    """The figure's text lines, ``xs``/``ys`` drawn at ``width`` × ``height``, its axes fitted."""
    plot = PlotextPlot()
    plt = plot.plt
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.plot(xs, ys)
    fit_axes(plot, xs, ys, floor=floor, width=width)
    return ANSI.sub("", plt.build()).splitlines()


@settings(max_examples=60, deadline=None)
@given(lo=st.integers(0, 3_000_000), span=st.integers(0, 3_000_000), width=st.integers(30, 160))
def test_x_ticks_are_whole_and_never_overprint(lo, span, width):
    xs = [lo, lo + span]
    ticks = drawn(xs, [2.0, 1.0], width)[-1].split()
    assert ticks, "no x tick label"
    # every label a whole number as tick_label writes it (12.3k, 1.23M), each one apart: none printed over another
    assert all(re.fullmatch(r"\d+|\d+(\.\d+)?[kM]", t) for t in ticks), ticks
    values = [float(t[:-1]) * {"k": 1e3, "M": 1e6}[t[-1]] if t[-1] in "kM" else float(t) for t in ticks]
    assert all(lo - 0.01 * lo - 1 <= v <= lo + span + 0.01 * (lo + span) + 1 for v in values), (ticks, lo, span)
    assert tick_label(lo + span) in ticks or tick_label(lo) in ticks


def test_a_single_point_is_drawn_in_a_range_around_it_not_below_0():
    # the trial's ROUGE-L chart: one checkpoint at 0 had an axis from -1.00 to 1.00
    lines = drawn([40], [0.0], 60)
    labels = [float(m.group(1)) for line in lines[:-2] if (m := re.match(r"\s*(-?[\d.]+)\s*┤", line))]
    assert labels and min(labels) == 0.0 and max(labels) > 0, lines
    assert drawn([40], [0.0], 60)[-1].split() == ["40"]  # a whole step, not 37.5 … 42.5
    lines = drawn([3, 9], [2.5, 2.5], 60)  # flat: 2.25 … 2.75
    labels = [float(m.group(1)) for line in lines[:-2] if (m := re.match(r"\s*(-?[\d.]+)\s*┤", line))]
    assert min(labels) >= 2.2 and max(labels) <= 2.8, lines
    # no floor (a log scale's log10 values): a range on both sides of a negative value
    lines = drawn([1], [-2.0], 60, floor=None)
    labels = [float(m.group(1)) for line in lines[:-2] if (m := re.match(r"\s*(-?[\d.]+)\s*┤", line))]
    assert min(labels) < -2.0 < max(labels), lines


def test_a_plot_redrawn_with_more_points_gets_plotexts_range_back():
    plot = PlotextPlot()
    plt = plot.plt
    plt.clear_figure()
    plt.plotsize(60, 12)
    plt.plot([1], [0.0])
    fit_axes(plot, [1], [0.0], width=60)
    plt.clear_data()  # as the Overview and the comparison redraw
    plt.plot([1, 2, 3], [1.0, 5.0, 2.0])
    fit_axes(plot, [1, 2, 3], [1.0, 5.0, 2.0], width=60)
    lines = ANSI.sub("", plt.build()).splitlines()
    labels = [float(m.group(1)) for line in lines[:-2] if (m := re.match(r"\s*(-?[\d.]+)\s*┤", line))]
    assert max(labels) == 5.0 and min(labels) == 1.0, lines
