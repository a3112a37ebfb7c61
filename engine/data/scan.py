"""One pass over a JSONL file: parse, validate and (optionally) measure and fingerprint every row.

The file is read in the main process and cut into chunks of lines; chunks are parsed and tokenized by
a pool of worker processes (forked after the tokenizer is loaded, so it is loaded once). Results come
back in order and hold only numbers, digests and defects, never token lists.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field

import numpy as np

from engine.formatting import ChatFormat, resolve_tokenizer_file
from engine.rows import iter_lines, open_checked, parse_line, prompt_key, row_key
from engine.util import Progress

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 4096
INLINE_BELOW = 8 << 20  # files smaller than this are scanned in-process

_fmt: ChatFormat | None = None  # the worker's formatter (inherited through fork)


_formats: dict[tuple, ChatFormat] = {}


def data_format(model: str | os.PathLike | None = None) -> ChatFormat:
    """``load_format(model)``, kept for the life of the process (keyed by the tokenizer file, its size and
    modification time), so a process that runs several tools (preflight: audit, then analyze) loads it once."""
    path = resolve_tokenizer_file(model)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    fmt = _formats.get(key)
    if fmt is None:
        if len(_formats) >= 4:
            _formats.pop(next(iter(_formats)))
        fmt = _formats[key] = ChatFormat(path)
    return fmt


@dataclass
class Scan:
    """What one pass learned about a file. Arrays are aligned: one entry per usable row."""

    path: str
    rows: int = 0  # non-blank lines
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prompt_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    target_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    row_keys: list[bytes] = field(default_factory=list)
    prompt_keys: list[bytes] = field(default_factory=list)
    defects: list[tuple[int, str, str]] = field(default_factory=list)  # per-row defects found while parsing

    @property
    def total_len(self) -> np.ndarray:
        return self.prompt_len + self.target_len


def _scan_chunk(chunk: list[tuple[int, bytes]], lengths: bool, keys: bool) -> tuple:
    lines, examples, defects, rkeys, pkeys = [], [], [], [], []
    for lineno, raw in chunk:
        ex, found = parse_line(raw)
        defects.extend((lineno, kind, detail) for kind, detail in found)
        if ex is not None:
            lines.append(lineno)
            examples.append(ex)
            if keys:
                rkeys.append(row_key(ex))
                pkeys.append(prompt_key(ex))
    plen = tlen = None
    if lengths and examples:
        p, t = _fmt.lengths(examples)
        plen, tlen = np.asarray(p, np.int64), np.asarray(t, np.int64)
    return len(chunk), lines, plen, tlen, rkeys, pkeys, defects


def _chunks(path: str, progress: Progress):
    chunk, size = [], 0
    for lineno, raw in iter_lines(path):
        progress.update(len(raw) + 1)
        if not raw.strip():
            continue
        chunk.append((lineno, raw))
        size += len(raw)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_LINES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def scan_file(path: str | os.PathLike, fmt: ChatFormat | None = None, *, keys: bool = False,
              workers: int | None = None, label: str = "scan") -> Scan:
    """Parse every row of ``path``; with ``fmt``, measure token lengths; with ``keys``, fingerprint rows."""
    global _fmt
    path = os.fspath(path)
    size = open_checked(path)
    _fmt = fmt
    lengths = fmt is not None
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    progress = Progress(size, label)
    parts = []
    try:
        if size < INLINE_BELOW or workers <= 1:
            parts = [_scan_chunk(c, lengths, keys) for c in _chunks(path, progress)]
        else:
            ctx = mp.get_context("fork")
            with ctx.Pool(workers) as pool:
                jobs = (pool.apply_async(_scan_chunk, (c, lengths, keys)) for c in _chunks(path, progress))
                # keep a bounded number of chunks in flight so memory stays flat on huge files
                pending: list = []
                for job in jobs:
                    pending.append(job)
                    if len(pending) >= 4 * workers:
                        parts.append(pending.pop(0).get())
                parts.extend(j.get() for j in pending)
    finally:
        progress.close()
    scan = Scan(path=path)
    scan.rows = sum(p[0] for p in parts)
    scan.lines = np.asarray([n for p in parts for n in p[1]], np.int64)
    if lengths:
        empty = np.zeros(0, np.int64)
        scan.prompt_len = np.concatenate([p[2] if p[2] is not None else empty for p in parts] or [empty])
        scan.target_len = np.concatenate([p[3] if p[3] is not None else empty for p in parts] or [empty])
    else:
        scan.prompt_len = scan.target_len = np.zeros(len(scan.lines), np.int64)
    for p in parts:
        scan.row_keys.extend(p[4])
        scan.prompt_keys.extend(p[5])
        scan.defects.extend(p[6])
    return scan


def percentiles(values: np.ndarray) -> dict[str, float]:
    """min, mean, p50, p90, p95, p99, max of ``values`` (zeros for an empty set)."""
    if len(values) == 0:
        return {k: 0 for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")}
    q = np.percentile(values, [50, 90, 95, 99])
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2),
            "p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]),
            "max": int(values.max())}
