"""``voxtui data split``: drop broken rows, normalise, dedupe, then split train / val deterministically.

Rows that ask the same question (same normalised prompt) always land on the same side, so no
duplicate and no leaked prompt ever stands on both. The same input and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import sys

from engine.data.scan import data_format
from engine.formatting import kept_target_len
from engine.rows import check_outputs, clean_record, iter_lines, open_checked, parse_line, prompt_key, row_key
from engine.util import (
    Progress,
    UsageError,
    atomic_write,
    counted,
    printable,
    same_file,
    shell_quote,
    write_json,
)


def split(path: str, train_out: str, val_out: str, val_frac: float = 0.1, seed: int = 0,
          max_len: int | None = None, long: str = "truncate", model: str | None = None) -> dict:
    if not 0.0 <= val_frac < 1.0:
        raise UsageError(f"--val-frac must be in [0, 1), got {val_frac}")
    size = open_checked(path)
    for out in (train_out, val_out):
        if same_file(out, path):
            raise UsageError(f"{out}: output would overwrite the input")
    if same_file(train_out, val_out):
        raise UsageError("--train and --val name the same file")
    fmt = data_format(model) if max_len else None

    kept: list[tuple[int, dict, bytes]] = []  # (line, cleaned record, prompt key)
    dropped: list[dict] = []
    seen: dict[bytes, int] = {}
    cleaned = truncated = 0
    progress = Progress(size, "split")
    for lineno, raw in iter_lines(path):
        progress.update(len(raw) + 1)
        if not raw.strip():
            continue
        ex, defects = parse_line(raw)
        if ex is None:
            kind, detail = defects[0]
            dropped.append({"line": lineno, "reason": kind, "detail": detail})
            continue
        record = clean_record(ex.record)
        if record != ex.record:
            cleaned += 1
        ex, _ = parse_line(json.dumps(record, ensure_ascii=False).encode())
        if ex is None:  # cleaning emptied a field (e.g. it held only control characters)
            dropped.append({"line": lineno, "reason": "empty_field", "detail": "empty after cleaning"})
            continue
        key = row_key(ex)
        if key in seen:
            dropped.append({"line": lineno, "reason": "duplicate", "detail": f"same as line {seen[key]}"})
            continue
        seen[key] = lineno
        if fmt is not None:
            (prompt, target), = fmt.encode([ex])
            keep = kept_target_len(len(prompt), len(target), max_len, long)  # the worker's rule
            if keep < len(target):
                record = _truncated(record, fmt, target, keep) if keep else None
                if record is None:
                    dropped.append({"line": lineno, "reason": "too_long",
                                    "detail": f"{len(prompt) + len(target)} tokens > {max_len}"})
                    continue
                truncated += 1
        kept.append((lineno, record, prompt_key(ex)))
    progress.close()

    val_idx, groups = _val_rows(kept, val_frac, seed)
    if not kept:
        raise UsageError(f"{path}: no usable row, nothing written ({_why_none(path, dropped)})")
    if len(val_idx) == len(kept):
        raise UsageError(f"{path}: every usable row would go to val ({len(kept)} row(s) sharing "
                         f"{groups} prompt(s)), none to train; nothing written (lower --val-frac or add rows)")

    n_train = n_val = 0
    with atomic_write(train_out) as ft, atomic_write(val_out) as fv:
        for i, (_, record, _) in enumerate(kept):
            line = json.dumps(record, ensure_ascii=False) + "\n"
            if i in val_idx:
                fv.write(line)
                n_val += 1
            else:
                ft.write(line)
                n_train += 1
    return {
        "file": path, "seed": seed, "val_frac": val_frac, "max_len": max_len, "long": long if max_len else None,
        "rows": len(kept) + len(dropped), "kept": len(kept), "train": n_train, "val": n_val,
        "cleaned": cleaned, "truncated": truncated, "dropped": dropped,
    }


def _val_rows(kept: list[tuple[int, dict, bytes]], val_frac: float, seed: int) -> tuple[set[int], int]:
    """Which kept rows go to val, and how many prompt groups there are: whole prompt groups go to one
    side, chosen by a seeded hash, until val holds its share."""
    groups: dict[bytes, list[int]] = {}
    for i, (_, _, pkey) in enumerate(kept):
        groups.setdefault(pkey, []).append(i)
    order = sorted(groups, key=lambda k: hashlib.blake2b(k, key=str(seed).encode()[:64], digest_size=8).digest())
    want, val_idx = round(val_frac * len(kept)), set()
    for pkey in order:
        if len(val_idx) >= want:
            break
        val_idx.update(groups[pkey])
    return val_idx, len(groups)


def _why_none(path: str, dropped: list[dict]) -> str:
    if not dropped:
        return "the file is empty or holds only blank lines"
    counts: dict[str, int] = {}
    for d in dropped:
        counts[d["reason"]] = counts.get(d["reason"], 0) + 1
    first = dropped[0]
    return (f"{len(dropped)} row(s) dropped: " + ", ".join(f"{k} {n}" for k, n in counts.items())
            + f"; first: line {first['line']} {first['reason']}; `voxtui data audit {shell_quote(path)}` lists them")


def _truncated(record: dict, fmt, target: list[int], keep: int) -> dict | None:
    """``record`` with its answer cut to the ``keep - 1`` tokens the worker keeps before the EOS, as text
    (a character split by the cut is left out, as is white space at the end); a token fewer while the text
    re-encodes longer than that (rare: tokens decoded and encoded again may merge differently). None
    when no answer text is left."""
    for cut in range(keep - 1, 0, -1):
        text = fmt.decode(target[:cut]).rstrip("\ufffd").strip()
        if text and len(fmt.encode_texts([text])[0]) + 1 <= keep:  # the answer, then its EOS
            return _truncate_target(record, text)
    return None


def _truncate_target(record: dict, text: str) -> dict:
    out = dict(record)
    if "messages" in out and "instruction" not in out:
        out["messages"] = [*out["messages"][:-1], {**out["messages"][-1], "content": text}]
    else:
        out["output"] = text
    return out


def render(report: dict, limit: int = 20) -> str:
    out = [f"{report['file']}: {counted(report['rows'], 'row')} → train {report['train']}, val {report['val']}; "
           f"dropped {len(report['dropped'])}, cleaned {report['cleaned']}, truncated {report['truncated']}"]
    for d in report["dropped"][:limit]:
        out.append(f"  dropped line {d['line']:>7}  {d['reason']:<14} {d['detail'][:100]}")
    if len(report["dropped"]) > limit:
        out.append(f"  … and {len(report['dropped']) - limit} more (--report for the full list)")
    return "\n".join(out)


def main(args) -> int:
    check_outputs({"the input": args.file}, {"--train": args.train, "--val": args.val, "--report": args.report})
    report = split(args.file, args.train, args.val, args.val_frac, args.seed, args.max_len, args.long, args.model)
    if args.report:
        write_json(args.report, report)
    if args.report != "-":
        print(render(report), file=sys.stdout)
    if args.val_frac > 0 and report["val"] == 0:
        print(f"voxtui: warning: --val-frac {args.val_frac:g} of {counted(report['kept'], 'usable row')} gives val "
              f"no row: {printable(args.val)} is empty, and a run given it as --val_jsonl has no evaluation, early "
              f"stopping or best checkpoint (a larger --val-frac, or more rows)", file=sys.stderr)
    return 0
