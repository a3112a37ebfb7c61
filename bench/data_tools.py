"""Data-tool throughput against the floor, measured in one run.

Generates N rows of medical-QA-like text (Korean and English, log-normal lengths, median ~250 tokens)
and times, on the same file:
  floor    a bare loop that only parses each line (msgspec) and batch-tokenizes its texts (tiktoken core),
           in one process;
  analyze  `voxtui data analyze FILE` (parse, validate, format, measure, statistics);
  audit    `voxtui data audit FILE --max-len 1024` (parse, validate, fingerprint, dedupe, measure).
The tools run in-process through the same functions the CLI calls (workers = CPU count).

    python bench/data_tools.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data.analyze import analyze  # noqa: E402
from engine.data.audit import audit  # noqa: E402
from engine.formatting import load_format  # noqa: E402
from engine.samples import TRAIN  # noqa: E402


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    sentences = {"en": [], "ko": []}
    for line in TRAIN.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        sentences[r["lang"]].append(r["output"])
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            lang = "ko" if i % 2 else "en"
            pool = sentences[lang]
            n_out = max(1, min(int(rng.lognormvariate(1.9, 0.6)), 40))  # ~7 sentences (~200 tokens) median
            row = {
                "instruction": rng.choice(pool)[:120] + (" 무엇인가요?" if lang == "ko" else " What should I do?"),
                "input": f"case {i}" if i % 3 == 0 else "",
                "output": " ".join(rng.choice(pool) for _ in range(n_out)),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def floor(path: Path) -> tuple[int, int]:
    """Parse + batch-tokenize, nothing else: the least any analysis must do."""
    import msgspec

    fmt = load_format()
    bpe = fmt.tekken._model._core_bpe
    dec = msgspec.json.Decoder()
    rows = tokens = 0
    batch: list[str] = []

    def flush():
        nonlocal tokens
        tokens += sum(len(bpe.encode_ordinary(t)) for t in batch)
        batch.clear()

    with open(path, "rb") as f:
        for line in f:
            obj = dec.decode(line)
            batch.append(obj["instruction"] + "\n\n" + obj["input"])
            batch.append(obj["output"])
            rows += 1
            if len(batch) >= 8192:
                flush()
    flush()
    return rows, tokens


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="where to write the generated file (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="voxtui-bench-"))
    data = folder / f"rows-{args.rows}.jsonl"
    if not data.exists():
        _, gen_s = timed(lambda: generate(data, args.rows))
        print(f"generated {args.rows:,} rows ({data.stat().st_size / 1e6:.0f} MB) in {gen_s:.1f}s", flush=True)

    (rows, tokens), floor_s = timed(lambda: floor(data))
    print(f"floor    {floor_s:7.1f}s  {rows / floor_s:>10,.0f} rows/s  {tokens / floor_s / 1e6:6.2f} M tok/s  ({tokens:,} text tokens)", flush=True)
    report, analyze_s = timed(lambda: analyze(str(data), max_len=1024))
    total = report["tokens"]["total"]
    print(f"analyze  {analyze_s:7.1f}s  {rows / analyze_s:>10,.0f} rows/s  {total / analyze_s / 1e6:6.2f} M tok/s  "
          f"({analyze_s / floor_s:.2f}× floor; {total:,} formatted tokens)", flush=True)
    areport, audit_s = timed(lambda: audit(str(data), max_len=1024))
    print(f"audit    {audit_s:7.1f}s  {rows / audit_s:>10,.0f} rows/s  {total / audit_s / 1e6:6.2f} M tok/s  "
          f"({audit_s / floor_s:.2f}× floor; {len(areport['defects'])} defects)", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "rows": rows, "tokens": total, "floor_s": round(floor_s, 2), "analyze_s": round(analyze_s, 2),
        "audit_s": round(audit_s, 2), "analyze_vs_floor": round(analyze_s / floor_s, 3),
        "audit_vs_floor": round(audit_s / floor_s, 3),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.dir:
        data.unlink()


if __name__ == "__main__":
    main()
