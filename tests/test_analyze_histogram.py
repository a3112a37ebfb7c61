"""``voxtui data analyze``'s token-length histogram drawn in the terminal: on stdout with the text report,
on stderr (a terminal only) when stdout carries the JSON; the JSON itself unchanged."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_progress import run_with_stderr

from conftest import write_jsonl
from engine.data.analyze import BAR_WIDTH, analyze, histogram, histogram_lines, render

ROWS = [{"instruction": f"question {i}?", "output": "word " * (1 + (i * 7) % 60)} for i in range(120)]
LINE = re.compile(r"^  +(\d+)–(\d+) +([█▏▎▍▌▋▊▉]*) +(\d+)$")


def cells(bar: str) -> float:
    return sum(1 if c == "█" else (" ▏▎▍▌▋▊▉".index(c) / 8) for c in bar)


def parsed(lines: list[str]) -> list[tuple[int, int, str, int]]:
    rows = [LINE.match(line) for line in lines]
    return [(int(m[1]), int(m[2]), m[3], int(m[4])) for m in rows if m]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=400), st.none() | st.integers(1, 5000))
def test_bars_proportional_and_every_row_counted(values, max_len):
    hist = histogram(np.asarray(values))
    drawn = histogram_lines(hist, max_len)
    bins = parsed(drawn)
    assert [(lo, hi, n) for lo, hi, _, n in bins] == [(b["lo"], b["hi"], b["count"]) for b in hist]
    assert sum(n for *_, n in bins) == len(values)
    peak = max(n for *_, n in bins)
    for _, _, bar, n in bins:
        assert (bar != "") == (n > 0)  # a bin with rows always shows, an empty one never
        assert abs(cells(bar) - BAR_WIDTH * n / peak) <= 1 / 16 + 1e-9 or (n > 0 and cells(bar) == 1 / 8)
    assert max(len(line) for line in drawn) <= 80  # fits an 80-column terminal
    rules = [i for i, line in enumerate(drawn) if "over --max-len" in line]
    first_over = next((i for i, b in enumerate(hist) if max_len and b["lo"] > max_len), None)
    if first_over is None:
        assert rules == []
    else:  # the rule stands right before the first bin whose rows are all over --max-len
        assert rules == [first_over] and all(b["lo"] > max_len for b in hist[first_over:])
        assert all(b["lo"] <= max_len for b in hist[:first_over])


def test_render_draws_the_report_histogram(tmp_path):
    report = analyze(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), max_len=40)
    text = render(report).splitlines()
    assert "total tokens per row:" in text and text[-1] == f"over --max-len 40: {report['over_max_len']} rows"
    bins = parsed(text)
    assert [n for *_, n in bins] == [b["count"] for b in report["histogram"]] and sum(n for *_, n in bins) == 120
    assert max(cells(bar) for _, _, bar, _ in bins) == BAR_WIDTH


def test_cli_histogram_where_the_output_contract_allows(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    base = [sys.executable, "-m", "engine", "data", "analyze", str(data), "--max-len", "40"]
    # text report: the histogram on stdout, nothing on stderr (a pipe)
    code, out, err = run_with_stderr(base, tty=False)
    assert code == 0 and err == b""
    assert len(parsed(out.decode().splitlines())) == 16 and "over --max-len 40 ─" in out.decode()
    # --json -: stdout is exactly the JSON; the histogram goes to stderr only when it is a terminal
    code, out, err = run_with_stderr([*base, "--json", "-"], tty=False)
    assert code == 0 and err == b""
    report = json.loads(out)
    assert sum(b["count"] for b in report["histogram"]) == 120
    code, out, err = run_with_stderr([*base, "--json", "-"], tty=True)
    assert code == 0 and json.loads(out) == report
    drawn = parsed(err.decode().replace("\r\n", "\n").splitlines())
    assert [n for *_, n in drawn] == [b["count"] for b in report["histogram"]]
    # --json FILE: the file holds the JSON, stdout the text report with its histogram
    code, out, err = run_with_stderr([*base, "--json", str(tmp_path / "a.json")], tty=False)
    assert code == 0 and json.loads((tmp_path / "a.json").read_text()) == report
    assert len(parsed(out.decode().splitlines())) == 16


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=300), st.integers(1, 32))
@settings(max_examples=200, deadline=None)
def test_every_length_falls_in_the_one_bin_whose_label_holds_it(lengths, bins):
    """Bin labels are the whole lengths each bin holds: they never overlap, and each length is counted
    in the bin whose [lo, hi] contains it (an edge on a whole number belongs to the bin above)."""
    hist = histogram(np.asarray(lengths), bins)
    assert sum(b["count"] for b in hist) == len(lengths)
    for a, b in zip(hist, hist[1:]):
        assert a["hi"] < b["lo"]
    for b in hist:
        assert b["count"] == sum(b["lo"] <= v <= b["hi"] for v in lengths)


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=300), st.integers(1, 32), st.integers(0, 40))
@settings(max_examples=300, deadline=None)
def test_bins_never_inverted_and_cover_min_to_max(lengths, bins, spread):
    """Every bin holds at least one whole length (``lo <= hi``), the bins touch end to end from min to
    max, and a range of fewer whole lengths than ``bins`` gets one bin per length. ``spread`` narrows the
    lengths to a few tokens' range, where inverted bins used to appear."""
    lengths = [lengths[0] + (v % (spread + 1)) for v in lengths]
    hist = histogram(np.asarray(lengths), bins)
    assert all(b["lo"] <= b["hi"] for b in hist)
    assert sum(b["count"] for b in hist) == len(lengths)
    assert hist[0]["lo"] == min(lengths) and hist[-1]["hi"] == max(lengths)
    assert all(a["hi"] + 1 == b["lo"] for a, b in zip(hist, hist[1:]))
    assert len(hist) == min(bins, max(lengths) - min(lengths) + 1)


def test_cli_one_bin_when_every_row_has_the_same_length(tmp_path):
    """Two rows of equal length: one bin ``12–12`` holding both, text and JSON (was 16 bins, 15 inverted)."""
    data = write_jsonl(tmp_path / "same.jsonl", [{"instruction": f"Question {i}?", "output": f"Answer {i}."}
                                                 for i in (1, 2)])
    base = [sys.executable, "-m", "engine", "data", "analyze", str(data)]
    code, out, err = run_with_stderr(base, tty=False)
    assert code == 0, err
    bins = parsed(out.decode().splitlines())
    assert len(bins) == 1 and bins[0][0] == bins[0][1] and bins[0][3] == 2
    code, out, err = run_with_stderr([*base, "--json", "-"], tty=False)
    report = json.loads(out)
    n = report["length"]["total"]["min"]
    assert report["histogram"] == [{"lo": n, "hi": n, "count": 2}]
