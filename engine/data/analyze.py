"""``voxtui data analyze``: token-length statistics of the formatted examples, with a histogram."""

from __future__ import annotations

import sys

import numpy as np

from engine.data.scan import data_format, percentiles, scan_file
from engine.formatting import over_max_len
from engine.rows import check_outputs
from engine.util import write_json


def analyze(path: str, model: str | None = None, max_len: int | None = None, workers: int | None = None) -> dict:
    fmt = data_format(model)
    scan = scan_file(path, fmt, workers=workers, label="analyze")
    total = scan.total_len
    over = over_max_len(scan.prompt_len, scan.target_len, max_len) if max_len else np.zeros(len(total), bool)
    report = {
        "file": path,
        "tokenizer": str(fmt.path),
        "rows": scan.rows,
        "usable": len(scan.lines),
        "invalid": scan.rows - len(scan.lines),
        "tokens": {"prompt": int(scan.prompt_len.sum()), "target": int(scan.target_len.sum()), "total": int(total.sum())},
        "length": {
            "total": percentiles(total),
            "prompt": percentiles(scan.prompt_len),
            "target": percentiles(scan.target_len),
        },
        "max_len": max_len,
        "over_max_len": int(over.sum()),
        "histogram": histogram(total),
    }
    if max_len:
        report["over_max_len_lines"] = scan.lines[over][:1000].tolist()
    return report


def histogram(values: np.ndarray, bins: int = 16) -> list[dict]:
    """Bins of whole lengths over the observed range: ``[{"lo", "hi", "count"}]``, ``lo`` and ``hi`` the first
    and last length a bin holds (``lo <= hi``; the bins touch, cover min..max and never overlap). At most
    ``bins`` of them: a range of fewer whole lengths than that gets one bin per length."""
    if len(values) == 0:
        return []
    lo, hi = int(values.min()), int(values.max())
    span = hi - lo + 1  # whole lengths in the range
    n = max(1, min(bins, span))
    # integer edges, strictly increasing as span >= n: bin i holds [edges[i], edges[i + 1] - 1]
    edges = lo + (np.arange(n + 1, dtype=np.int64) * span) // n
    counts = np.bincount(np.searchsorted(edges, np.asarray(values, np.int64), side="right") - 1, minlength=n)
    return [{"lo": int(edges[i]), "hi": int(edges[i + 1]) - 1, "count": int(counts[i])} for i in range(n)]


def render(report: dict) -> str:
    out = [f"{report['file']}: {report['rows']} rows, {report['usable']} usable"
           + (f", {report['invalid']} broken (see `voxtui data audit`)" if report["invalid"] else "")]
    if not report["usable"]:
        out.append("no usable row: nothing to measure" if report["rows"] else
                   "no rows: the file is empty or holds only blank lines")
        return "\n".join(out)
    out.append(f"tokens: {report['tokens']['total']:,} total ({report['tokens']['prompt']:,} prompt, "
               f"{report['tokens']['target']:,} target)")
    out.append(f"{'':8}{'min':>8}{'mean':>10}{'p50':>8}{'p90':>8}{'p95':>8}{'p99':>8}{'max':>8}")
    for part in ("prompt", "target", "total"):
        s = report["length"][part]
        out.append(f"{part:8}{s['min']:>8}{s['mean']:>10.1f}{s['p50']:>8.0f}{s['p90']:>8.0f}{s['p95']:>8.0f}"
                   f"{s['p99']:>8.0f}{s['max']:>8}")
    hist = report["histogram"]
    if hist:
        out.append("total tokens per row:")
        out.extend(histogram_lines(hist, report["max_len"]))
    if report["max_len"]:
        out.append(f"over --max-len {report['max_len']}: {report['over_max_len']} rows")
    return "\n".join(out)


BAR_WIDTH = 40
EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(count: int, peak: int, width: int = BAR_WIDTH) -> str:
    """``count`` as a bar of ``width`` cells at ``peak``, in eighths of a cell; any non-zero count shows."""
    if count <= 0 or peak <= 0:
        return ""
    eighths = max(1, round(8 * width * count / peak))
    return "█" * (eighths // 8) + EIGHTHS[eighths % 8].strip()


def histogram_lines(hist: list[dict], max_len: int | None = None) -> list[str]:
    """The histogram drawn in text, one line a bin: ``lo–hi  bar  count``. With ``max_len``, a rule
    stands before the first bin whose rows are all over it."""
    peak = max(b["count"] for b in hist)
    out, marked = [], False
    for b in hist:
        if max_len and not marked and b["lo"] > max_len:
            out.append(f"  {'':>7} {'─' * 8} over --max-len {max_len} {'─' * 8}")
            marked = True
        out.append(f"  {b['lo']:>7}–{b['hi']:<7} {bar(b['count'], peak):<{BAR_WIDTH}} {b['count']}")
    return out


def main(args) -> int:
    check_outputs({"the input": args.file}, {"--json": args.json})
    report = analyze(args.file, args.model, args.max_len, args.workers)
    if args.json:
        write_json(args.json, report)
    if args.json != "-":
        print(render(report), file=sys.stdout)
    elif sys.stderr.isatty():  # stdout holds the JSON: the report and its histogram go to the terminal
        print(render(report), file=sys.stderr)
    return 0
