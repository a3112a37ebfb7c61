"""``voxtui data audit``: every defect of a JSONL file, with its 1-based line number."""

from __future__ import annotations

import os
import sys
from collections import Counter

from engine.data.scan import Scan, data_format, scan_file
from engine.formatting import over_max_len
from engine.rows import DEFECT_KINDS, check_outputs
from engine.util import write_json


def audit(path: str, against: str | None = None, max_len: int | None = None, model: str | None = None,
          workers: int | None = None) -> dict:
    fmt = data_format(model) if max_len else None
    scan = scan_file(path, fmt, keys=True, workers=workers, label=f"audit {os.path.basename(path)}")
    defects = list(scan.defects)
    defects += duplicates(scan)
    if max_len:
        total, over = scan.total_len, over_max_len(scan.prompt_len, scan.target_len, max_len)
        defects += [(int(line), "too_long", f"{int(n)} tokens > {max_len}")
                    for line, n in zip(scan.lines[over], total[over])]
    if against:
        other = scan_file(against, None, keys=True, workers=workers, label=f"against {os.path.basename(against)}")
        defects += leaks(scan, other)
    if scan.rows == 0:
        empty = os.path.getsize(path) == 0
        defects.append((0, "no_rows", "the file is empty" if empty else "the file holds only blank lines"))
    defects.sort(key=lambda d: (d[0], DEFECT_KINDS.index(d[1])))
    bad_lines = {d[0] for d in defects if d[0] > 0}
    counts = Counter(kind for _, kind, _ in defects)
    return {
        "file": path,
        "rows": scan.rows,
        "valid": scan.rows - len(bad_lines),
        "defects": [{"line": line, "kind": kind, "detail": detail} for line, kind, detail in defects],
        "counts": {k: counts[k] for k in DEFECT_KINDS if counts[k]},
    }


def duplicates(scan: Scan) -> list[tuple[int, str, str]]:
    """Rows equal to an earlier row after NFC normalisation and white-space folding."""
    first: dict[bytes, int] = {}
    out = []
    for line, key in zip(scan.lines.tolist(), scan.row_keys):
        if key in first:
            out.append((line, "duplicate", f"same as line {first[key]}"))
        else:
            first[key] = line
    return out


def leaks(scan: Scan, other: Scan) -> list[tuple[int, str, str]]:
    """Rows whose prompt (or whole row) also stands in ``other``."""
    rows = {}
    for line, key in zip(other.lines.tolist(), other.row_keys):
        rows.setdefault(key, line)
    prompts = {}
    for line, key in zip(other.lines.tolist(), other.prompt_keys):
        prompts.setdefault(key, line)
    out = []
    for line, rkey, pkey in zip(scan.lines.tolist(), scan.row_keys, scan.prompt_keys):
        if rkey in rows:
            out.append((line, "leak", f"same row as {other.path}:{rows[rkey]}"))
        elif pkey in prompts:
            out.append((line, "leak", f"same prompt as {other.path}:{prompts[pkey]}"))
    return out


def render(report: dict, limit: int = 50) -> str:
    out = [f"{report['file']}: {report['rows']} rows, {report['valid']} without defects"]
    if report["counts"]:
        out.append("  " + ", ".join(f"{k}: {n}" for k, n in report["counts"].items()))
    for d in report["defects"][:limit]:
        where = f"line {d['line']:>7}" if d["line"] else f"{'file':<12}"
        out.append(f"  {where}  {d['kind']:<14} {d['detail'][:120]}")
    if len(report["defects"]) > limit:
        out.append(f"  … and {len(report['defects']) - limit} more (--json for the full list)")
    return "\n".join(out)


def main(args) -> int:
    check_outputs({"the input": args.file, "--against": args.against}, {"--json": args.json})
    report = audit(args.file, args.against, args.max_len, args.model, args.workers)
    if args.json:
        write_json(args.json, report)
    if args.json != "-":
        print(render(report), file=sys.stdout)
    return 1 if args.strict and report["defects"] else 0
