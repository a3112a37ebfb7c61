"""Small shared helpers: one-line errors, atomic file writes, a stderr progress bar."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class UsageError(Exception):
    """Bad arguments or an unusable input file: printed as one line, exit status 2."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename it.

    A reader never sees a half-written file, and on error the target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {"encoding": encoding, "newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, or to stdout when ``path`` is ``-``/None."""
    text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    if path in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_write(path) as f:
        f.write(text)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class Progress:
    """A progress bar on stderr, only when stderr is a terminal (or ``force``); never on stdout."""

    def __init__(self, total: int, label: str, unit: str = "B", force: bool = False) -> None:
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.done = 0
        self.enabled = force or sys.stderr.isatty()
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self._start, 1e-9)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {_human(rate)}{self.unit}/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _human(x: float) -> str:
    for suffix in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{suffix}"
        x /= 1000
    return f"{x:.1f}T"
