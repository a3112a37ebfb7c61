"""``voxtui data find-long``: rows whose formatted example exceeds ``--max-len`` tokens, and the cost
of each remedy (truncate the target, drop the row, raise the limit to p99)."""

from __future__ import annotations

import json
import sys

import numpy as np

from engine.data.scan import data_format, scan_file
from engine.formatting import kept_target_len, over_max_len
from engine.rows import check_outputs, iter_lines, parse_line
from engine.util import atomic_write, write_json


def find_long(path: str, max_len: int, model: str | None = None, workers: int | None = None) -> dict:
    fmt = data_format(model)
    scan = scan_file(path, fmt, workers=workers, label="find-long")
    total = scan.total_len
    over = over_max_len(scan.prompt_len, scan.target_len, max_len)
    p99 = int(np.ceil(np.percentile(total, 99))) if len(total) else 0
    # what --long truncate keeps of each long row (the worker's rule): 0 when the prompt leaves no room
    kept = kept_target_len(scan.prompt_len[over], scan.target_len[over], max_len, "truncate")
    saved = kept > 0
    rows = [{"line": int(line), "prompt_tokens": int(p), "target_tokens": int(t), "total_tokens": int(p + t),
             "over_by": int(p + t - max_len)}
            for line, p, t in zip(scan.lines[over], scan.prompt_len[over], scan.target_len[over])]
    usable = set(scan.lines.tolist())
    broken = sorted({line for line, _, _ in scan.defects if line not in usable})
    return {
        "file": path,
        "max_len": max_len,
        "rows": scan.rows,
        "usable": len(scan.lines),
        "invalid": scan.rows - len(scan.lines),
        "invalid_lines": broken[:1000],
        "long": len(rows),
        "remedies": {
            "truncate": {
                "rows_truncated": int(saved.sum()),
                "target_tokens_lost": int((scan.target_len[over] - kept)[saved].sum()),
                "rows_unsaveable": int((~saved).sum()),
            },
            "drop": {"rows_lost": len(rows), "tokens_lost": int(total[over].sum()),
                     "fraction_of_rows": round(len(rows) / max(len(total), 1), 6)},
            "raise_to_p99": {"max_len": p99, "rows_still_long": int((total > p99).sum()),
                             "sequence_cost_factor": round(p99 / max_len, 3) if max_len else None},
        },
        "long_rows": rows,
    }


def write_rows(path: str, report: dict, out: str) -> None:
    """The long rows as JSONL: their counts and the original row."""
    wanted = {r["line"]: r for r in report["long_rows"]}
    with atomic_write(out) as f:
        for lineno, raw in iter_lines(path):
            r = wanted.get(lineno)
            if r is not None:
                ex, _ = parse_line(raw)  # the parser that measured it (a long row is always a usable one)
                f.write(json.dumps({**r, "row": ex.record}, ensure_ascii=False) + "\n")


def render(report: dict, limit: int = 20) -> str:
    rem = report["remedies"]
    out = [f"{report['file']}: {report['long']} of {report['usable']} rows exceed {report['max_len']} tokens"
           + (f", {broken_text(report)} not measured (see `voxtui data audit`)" if report["invalid"] else "")]
    if not report["usable"]:
        out.append("  no usable row to measure" + ("" if report["rows"] else " (the file holds no rows)"))
    for r in report["long_rows"][:limit]:
        out.append(f"  line {r['line']:>7}  {r['total_tokens']:>7} tokens (prompt {r['prompt_tokens']}, "
                   f"target {r['target_tokens']}, over by {r['over_by']})")
    if report["long"] > limit:
        out.append(f"  … and {report['long'] - limit} more")
    if report["long"]:
        t, d, p = rem["truncate"], rem["drop"], rem["raise_to_p99"]
        out.append("remedies:")
        out.append(f"  --long truncate: {t['rows_truncated']} rows lose {t['target_tokens_lost']:,} target tokens"
                   + (f"; {t['rows_unsaveable']} rows have a prompt that leaves no room for an answer token "
                      "and are dropped"
                      if t["rows_unsaveable"] else ""))
        out.append(f"  --long drop:     {d['rows_lost']} rows ({d['fraction_of_rows']:.2%}) and {d['tokens_lost']:,} tokens lost")
        out.append(f"  --max_len {p['max_len']} (p99): {p['rows_still_long']} rows still long; "
                   f"every padded sequence may grow {p['sequence_cost_factor']}×")
    return "\n".join(out)


def broken_text(report: dict, shown: int = 5) -> str:
    """``1 broken (line 7)``, ``12 broken (lines 3, 5, 8, 13, 21, …)``."""
    lines = report["invalid_lines"]
    named = ", ".join(map(str, lines[:shown])) + (", …" if report["invalid"] > shown else "")
    return f"{report['invalid']} broken (line{'s' if report['invalid'] > 1 else ''} {named})"


def main(args) -> int:
    check_outputs({"the input": args.file}, {"--out": args.out, "--json": args.json})
    report = find_long(args.file, args.max_len, args.model, args.workers)
    if args.out:
        write_rows(args.file, report, args.out)
    if args.json:
        write_json(args.json, report)
    if args.json != "-":
        print(render(report), file=sys.stdout)
    return 0
