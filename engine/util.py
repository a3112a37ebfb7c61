"""Small shared helpers: one-line errors, atomic file writes, a stderr progress bar (rich)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class Parser(argparse.ArgumentParser):
    """argparse with a bad call answered in one line (the usage is one ``--help`` away), exit status 2, and
    either spelling of a long flag: the training flags are the seed's (``--max_len``), the data tools' are
    hyphenated (``--max-len``); a hand used to one gets the other too, while ``--help`` shows one."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _parse_optional(self, arg_string):
        if arg_string.startswith("--") and len(arg_string) > 2:
            name, eq, value = arg_string.partition("=")
            if name not in self._option_string_actions:
                for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if other in self._option_string_actions:
                        arg_string = other + eq + value
                        break
        return super()._parse_optional(arg_string)


def first_on_its_node() -> bool:
    """Whether this process says a worker's usage error: under torchrun every rank meets the same bad flag or
    setting, so each node's first rank (LOCAL_RANK 0, or no torchrun) says it once and the others exit as
    quietly with the same status."""
    return os.environ.get("LOCAL_RANK", "0") in ("0", "")


class UsageError(Exception):
    """Bad arguments or an unusable input file: printed as one line, exit status 2."""


def printable(text: object) -> str:
    """Text from a run (its folder's name, a path, an event's message, a file's field), safe to print on a
    terminal: every character that is not printable — control characters, ANSI and OSC escapes among them,
    C1 controls, bidi overrides, line breaks, a file name's undecodable bytes — shown as its escape
    (``\\x1b``), on one line. The command line prints what a run says through this; the dashboard has its
    own rule for the screen (app/text.py)."""
    text = "" if text is None else str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def printable_lines(text: object) -> str:
    """``printable`` line by line, the line breaks kept: for text of several lines from a run (a traceback,
    whose paths hold the run folder's name; a table) written to a log that ``tail -f`` shows on a terminal."""
    return "\n".join(printable(line) for line in ("" if text is None else str(text)).split("\n"))


def print_traceback(file: IO | None = None) -> None:
    """The exception being handled, as ``traceback.print_exc`` prints it, each line through ``printable``."""
    import traceback

    print(printable_lines(traceback.format_exc().rstrip("\n")), file=file or sys.stderr, flush=True)


def shell_quote(text: str | os.PathLike) -> str:
    """``text`` (a run folder, a path) as one word of a command a person is told to type or paste, which bash
    runs as printed: quoted by ``shlex.quote`` when every character is printable, else in bash's ANSI-C
    quoting (``$'runs/a\\x1b]0;x\\x07b'``), each character that is not printable as the escapes of its
    UTF-8 bytes (a file name's undecodable byte as itself: ``\\xff``). Inside single quotes an escape would be
    read as the backslash and letters it is; raw, the character would reach the terminal. Every place that
    suggests a command quotes its paths with this."""
    import shlex

    text = os.fspath(text)
    if text.isprintable():
        return shlex.quote(text)
    out = []
    for c in text:
        if c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            try:
                raw = c.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # a lone surrogate no file name holds: its code point's escape
                out.append(f"\\u{ord(c):04x}")
                continue
            out.append("".join(f"\\x{b:02x}" for b in raw))
    return "$'" + "".join(out) + "'"


def short_path(path: str | os.PathLike) -> str:
    """``path`` as a person in this process's folder would type it: relative when it lies under the folder
    (``runs/demo``, not ``/home/me/project/runs/demo``), else as it is; for the commands a screen suggests,
    whose width is short."""
    text = os.fspath(path)
    try:
        rel = os.path.relpath(text)
    except (ValueError, OSError):  # another drive; the folder itself gone
        return text
    return rel if rel != ".." and not rel.startswith(".." + os.sep) and len(rel) < len(text) else text


def shell_join(words: list) -> str:
    """A command line of ``words`` quoted as ``shell_quote`` does: one a person can paste into bash."""
    return " ".join(shell_quote(str(w)) for w in words)


def cell_fit(text: str, width: int) -> str:
    """``text`` in a column ``width`` terminal cells wide (a Korean letter or an emoji is two: rich's
    ``cell_len``): cut to fit with … when longer, padded with spaces when shorter."""
    from rich.cells import cell_len, get_character_cell_size

    if cell_len(text) > width:
        out, used = [], 0
        for c in text:
            size = get_character_cell_size(c)
            if used + size > width - 1:
                break
            out.append(c)
            used += size
        text = "".join(out) + "…"
    return text + " " * max(width - cell_len(text), 0)


def counted(n: int, noun: str, plural: str = "") -> str:
    """``n`` and its noun, singular for one: "1 row", "0 rows", "3 rows" (``plural``: when not noun + "s")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def run_name(run_dir: str | os.PathLike) -> str:
    """The run's name its events carry: its folder's name, each byte of it that is no UTF-8 as U+FFFD (events
    are UTF-8 JSON: a folder named with such a byte made every event unencodable)."""
    name = os.path.basename(os.path.normpath(os.fspath(run_dir)))
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: new files get 0666 less this, as open() would give them


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename it.

    A reader never sees a half-written file, and on error the target is left as it was. A path that names
    no regular file — a device (``/dev/null``), a FIFO — is written as it is: a rename would put a file in
    its place; a symbolic link is followed, and the file it names is written (the link stays).
    """
    path = Path(path)
    kwargs = {"encoding": encoding, "newline": ""} if "b" not in mode else {}
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        with open(path, mode, **kwargs) as f:
            yield f
        return
    path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # /proc/x/y: say the file asked for and its folder, not a bare "/proc/x: No such file"
        above = next((a for a in path.parents if a.exists()), None)
        why = f"{above} is a file, not a folder" if above is not None and not above.is_dir() else \
            f"its folder {path.parent} cannot be made: {e.strerror or e}"
        raise OSError(e.errno, f"cannot write {path} ({why})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a folder one cannot write in (/proc, read-only): say which file, not the temporary
        raise OSError(e.errno, f"cannot write {path} (its folder takes no new file: {e.strerror})") from None
    try:
        # mkstemp makes 0600: give the file the mode the replaced one had, else what the umask allows
        try:
            os.fchmod(fd, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# what JSON leaves raw with ensure_ascii=False and a terminal may obey (C1 controls, DEL, bidi overrides, line
# separators) or stdout cannot encode (a file name's undecodable bytes): written as \uXXXX escapes, the same JSON
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, or to stdout when ``path`` is ``-``/None."""
    text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False, indent=2)) + "\n"
    if path in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_write(path) as f:
        f.write(text)


def looks_local(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a file or folder on this machine rather than a hub id (org/name): a path from
    the root, the home or this folder, a .json file, anything but one slash, or one whose first part is a
    folder here (``runs/_models/tiny``). A missing one is then said at once, instead of after a minute of hub
    requests that cannot succeed."""
    text = str(model)
    parts = Path(text).parts
    return (text.startswith((".", "/", "~")) or text.endswith(".json") or text.count("/") != 1
            or Path(parts[0]).is_dir())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class Progress:
    """A progress bar (``rich.progress``) on stderr, only when stderr is a terminal (or ``force``); never
    on stdout, and nothing at all when stderr is not a terminal. ``update(n)`` adds ``n`` done (bytes by
    default, ``unit`` says otherwise); ``close()`` leaves the finished bar on its line.

    The bar redraws from ``update`` (at most every 0.2 s) rather than from a thread, so the data tools'
    forked worker pools never inherit a drawing thread; output on stdout is never redirected into it.
    """

    def __init__(self, total: int, label: str, unit: str = "B", force: bool = False) -> None:
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.done = 0
        self.enabled = force or sys.stderr.isatty()
        self._last = 0.0
        self._bar = None
        if self.enabled:
            self._start(force)

    def _start(self, force: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        console = Console(file=sys.stderr, force_terminal=True if force else None, highlight=False)
        self._bar = RichProgress(TextColumn("{task.fields[label]}", markup=False), BarColumn(bar_width=30),
                                 TaskProgressColumn(), _speed_column(self.unit), TimeRemainingColumn(),
                                 console=console, auto_refresh=False, redirect_stdout=False,
                                 redirect_stderr=False)
        self._task = self._bar.add_task("", total=self.total, label=Text(self.label))
        self._bar.start()
        atexit.register(self.close)  # an error that skips close() still gives the cursor back

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is None:
            return
        self._bar.update(self._task, completed=min(self.done, self.total))
        now = time.monotonic()
        if now - self._last > 0.2 or self.done >= self.total:
            self._last = now
            self._bar.refresh()

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            atexit.unregister(self.close)
            bar.stop()  # draws the bar once more, then a newline and the cursor back


def _speed_column(unit: str):
    """A rich progress column: the rate in ``Progress``'s unit (``12.3kB/s``, ``4.0 rows/s``)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("–" if speed is None else f"{_human(speed)}{unit}/s", style="progress.data.speed")

    return SpeedColumn()


def _human(x: float) -> str:
    for suffix in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{suffix}"
        x /= 1000
    return f"{x:.1f}T"


def without_bitsandbytes() -> None:
    """For a process that loads no 4-bit weights (a run without ``--quant nf4``): PEFT imports bitsandbytes
    whenever it is installed, about a second of every start on the CPU (1.13 s against 0.11 s for ``import
    peft`` here: bitsandbytes wraps its kernels with torch.compile at import). Marked absent
    (``sys.modules[name] = None``, Python's own way to block an import), PEFT leaves it out. Call it only
    in a process that will not need it (a worker of a run that is not NF4) and before PEFT is imported."""
    import sys

    if "bitsandbytes" not in sys.modules and "peft" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def quiet_libraries() -> None:
    """transformers' progress bars (loading weights) only where a person watches stderr, not in a log file
    or a pipe (the README's rule for every progress bar); and not bitsandbytes' note, on every CPU import,
    that an optional kernels package for its CPU 4-bit products is missing; nor transformers' deprecation
    of a name PEFT still reads (``is_gradient_checkpointing``): nothing a user can act on."""
    import logging
    import sys
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
