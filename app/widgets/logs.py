"""Logs: the run folder's log files — worker.log (the workers' output through torchrun), engine.log,
infer.log — followed as they grow (the tail; ``f`` toggles) and searched (the lines holding the text,
the matches highlighted). A log's text is data: drawn as it is, control characters made visible."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, RichLog, Static

from app.text import assemble, data

LOG_FILES = ("worker.log", "engine.log", "infer.log")
KEPT = 5000  # lines kept (the newest)
FIRST_READ = 1 << 20  # on opening a log: its last MiB
READ_MAX = 4 << 20  # at most this much per read (a log growing faster is caught up over several)


def read_new(path: Path, offset: int, pending: bytes = b"") -> tuple[list[str], int, bytes]:
    """The complete lines appended to ``path`` since ``offset`` (from the last FIRST_READ bytes when
    ``offset`` is 0), the new offset, and a torn last line kept for the next read. A file shorter than
    ``offset`` (truncated, replaced) is read again from its tail. Never raises: a missing or unreadable
    file reads as nothing new."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                offset, pending = 0, b""
            skip_partial = False
            if offset == 0 and size > FIRST_READ:
                offset, skip_partial = size - FIRST_READ, True
            f.seek(offset)
            block = f.read(min(size - offset, READ_MAX))
    except OSError:
        return [], offset, pending
    offset += len(block)
    block = pending + block
    parts = block.split(b"\n")
    pending = parts.pop()
    if skip_partial and parts:
        parts = parts[1:]  # the first line read from the middle of a file is a fragment
    return [p.decode("utf-8", "replace").rstrip("\r") for p in parts], offset, pending


class Logs(Vertical):
    def compose(self) -> ComposeResult:
        with Horizontal(id="log-bar"):
            yield Input(placeholder="search the log (/)", id="log-search")
            yield Static(id="log-status", markup=False)
        yield RichLog(id="log-text", max_lines=KEPT, wrap=False, markup=False, highlight=False)

    def on_mount(self) -> None:
        self.run_dir: Path | None = None
        self.file = LOG_FILES[0]
        self.follow = True
        self.search_text = ""
        self.lines: deque[str] = deque(maxlen=KEPT)
        self.file_offset = 0
        self.pending = b""
        self.matches = 0
        self.missing = ""  # as the last read found it: "file", "folder" or "" (there)
        self.show_status()

    def files(self) -> list[str]:
        """The log files this run folder has (worker.log always offered: it appears when the workers start)."""
        have = [n for n in LOG_FILES if self.run_dir is not None and (self.run_dir / n).is_file()]
        return have if LOG_FILES[0] in have else [LOG_FILES[0], *have]

    @property
    def path(self) -> Path | None:
        return self.run_dir / self.file if self.run_dir is not None else None

    def next_file(self) -> None:
        names = self.files()
        self.file = names[(names.index(self.file) + 1) % len(names)] if self.file in names else names[0]
        self.lines.clear()
        self.file_offset, self.pending, self.missing = 0, b"", ""  # (the next read says whether it is there)
        self.redraw()

    def toggle_follow(self) -> None:
        self.follow = not self.follow
        log = self.query_one("#log-text", RichLog)
        log.auto_scroll = self.follow
        if self.follow:
            log.scroll_end(animate=False)
        self.show_status()

    def added(self, file: str, new: list[str], offset: int, pending: bytes, start: int | None = None,
              missing: str = "") -> None:
        """Lines read from ``file`` from byte ``start`` to ``offset`` (in a thread, by the screen); ``missing``:
        what was not there then ("file", "folder", "" when the file was)."""
        if file != self.file:
            return  # read before the user switched files
        self.missing = missing
        if start is not None and start != self.file_offset:
            return  # a second read from the same place (two polls before the first was shown): shown already
        if offset < self.file_offset:  # the file was replaced: start again
            self.lines.clear()
            self.query_one("#log-text", RichLog).clear()
        self.file_offset, self.pending = offset, pending
        self.lines.extend(new)
        log = self.query_one("#log-text", RichLog)
        for line in new:
            shown = self.line(line)
            if shown is not None:
                log.write(shown)
        self.show_status()

    def line(self, raw: str) -> Text | None:
        """One line as it is shown (None: filtered out by the search)."""
        # a progress bar redrawn in place (tqdm: "…\r…\r…"): what a terminal shows is its last state
        raw = raw.rstrip("\r").rsplit("\r", 1)[-1]
        if self.search_text and self.search_text.lower() not in raw.lower():
            return None
        text = data(raw, limit=2000)
        if self.search_text:
            text.highlight_words([self.search_text], "black on yellow", case_sensitive=False)
            self.matches += 1
        return text

    @on(Input.Changed, "#log-search")
    def search(self, event: Input.Changed) -> None:
        self.search_text = event.value.strip()
        self.redraw()

    def on_resize(self) -> None:
        """A new width rewraps the lines: following, the view stays on the last one."""
        if self.follow:
            log = self.query_one("#log-text", RichLog)
            log.call_after_refresh(log.scroll_end, animate=False)

    def redraw(self) -> None:
        log = self.query_one("#log-text", RichLog)
        log.clear()
        self.matches = 0
        for raw in self.lines:
            shown = self.line(raw)
            if shown is not None:
                log.write(shown)
        if self.follow:
            log.call_after_refresh(log.scroll_end, animate=False)
        self.show_status()

    def show_status(self) -> None:
        where = data(self.file, limit=40)
        if self.missing == "folder":  # the lines read before stay shown
            state = f" · {len(self.lines)} lines read · the run folder is gone (moved or removed)"
        elif self.missing == "file" and self.file_offset:
            state = f" · {len(self.lines)} lines read · the file is gone (removed or moved)"
        elif self.missing:
            state = " (not there yet)"
        elif self.search_text:
            state = f" · {self.matches} of {len(self.lines)} lines match"
        else:
            state = f" · {len(self.lines)} lines"
        self.query_one("#log-status", Static).update(assemble(
            where, state, " · ", ("f", "bold"), f" follow: {'on' if self.follow else 'off'} · ",
            ("]", "bold"), " next file"))
