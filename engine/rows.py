"""Reading instruction rows from JSONL: one parser shared by every tool, training and inference.

A row is ``{"instruction", "input", "output"}`` (``input`` may be empty, null or absent) or
``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn. Parsing never raises:
it returns the example (when it is usable) and the list of defects found, each a ``(kind, detail)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from engine.util import UsageError

# Kinds that make a row unusable; the others (control_chars, duplicate, too_long, leak) flag a usable row.
FATAL_KINDS = ("bad_encoding", "invalid_json", "not_object", "missing_field", "wrong_type", "empty_field")
# Kinds about the file as a whole (reported on line 0): no_rows, an empty file or one of blank lines only.
FILE_KINDS = ("no_rows",)
DEFECT_KINDS = FILE_KINDS + FATAL_KINDS + ("control_chars", "duplicate", "too_long", "leak")

# C0 and C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_decoder = msgspec.json.Decoder()


@dataclass
class Example:
    """One training example: earlier (user, assistant) turns, then the final prompt and its target."""

    turns: list[tuple[str, str]]  # every (user, assistant) pair; the last assistant is the target
    system: str = ""
    record: dict = field(default_factory=dict)  # the source row as parsed, written back by split

    @property
    def prompt_text(self) -> str:
        return self.turns[-1][0]

    @property
    def target_text(self) -> str:
        return self.turns[-1][1]


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_line)`` for each line (1-based), without its ending (LF or CRLF).

    Lines are read in binary, so invalid UTF-8 and a single very long line are both handled;
    a UTF-8 byte-order mark at the start of the file is dropped.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            yield lineno, line


def open_checked(path: str | os.PathLike) -> int:
    """Return the size of a readable regular file, or raise UsageError with a one-line reason."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UsageError(f"{p}: no such file")
    if os.path.isdir(p):
        raise UsageError(f"{p}: is a folder, not a JSONL file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{p}: cannot read ({e.strerror})") from None
    return os.path.getsize(p)


def check_outputs(inputs: dict[str, str | os.PathLike | None], outputs: dict[str, str | os.PathLike | None]) -> None:
    """UsageError when an output (``{"--json": path}``; ``-`` is stdout) names an input or another output,
    a folder, or a place under a file (checked before any work, not found when writing at the end)."""
    from pathlib import Path

    from engine.util import same_file

    seen: list[tuple[str, str | os.PathLike]] = [(k, v) for k, v in inputs.items() if v]
    for flag, out in outputs.items():
        if not out or out == "-":
            continue
        path = Path(out)
        if path.is_dir():
            raise UsageError(f"{flag} {os.fspath(out)}: is a folder; name a file")
        above = next((a for a in path.absolute().parents if a.exists()), None)
        if above is not None and not above.is_dir():
            raise UsageError(f"{flag} {os.fspath(out)}: {above} is a file, not a folder")
        for other_flag, other in seen:
            if same_file(out, other):
                raise UsageError(f"{flag} {os.fspath(out)}: would overwrite {other_flag}")
        seen.append((flag, out))


def parse_line(raw: bytes) -> tuple[Example | None, list[tuple[str, str]]]:
    """Parse one non-blank line into an example and its defects (never raises)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [("bad_encoding", f"invalid UTF-8 at byte {e.start}")]
    try:
        obj = _decoder.decode(text)
    except msgspec.DecodeError as e:
        return None, [("invalid_json", str(e))]
    except RecursionError:
        return None, [("invalid_json", "nested too deeply")]
    if not isinstance(obj, dict):
        return None, [("not_object", f"a JSON {_json_type(obj)}, not an object")]
    if "messages" in obj and "instruction" not in obj:
        return _parse_messages(obj)
    return _parse_instruction(obj)


def _parse_instruction(obj: dict) -> tuple[Example | None, list[tuple[str, str]]]:
    defects: list[tuple[str, str]] = []
    values: dict[str, str] = {}
    for name, required in (("instruction", True), ("input", False), ("output", True)):
        v = obj.get(name)
        if v is None:
            if required:
                defects.append(("missing_field", name))
            values[name] = ""
        elif not isinstance(v, str):
            defects.append(("wrong_type", f"{name} is {_a_json_type(v)}, not a string"))
        else:
            values[name] = v
            if required and not v.strip():
                defects.append(("empty_field", name))
    if defects:
        return None, defects
    for name in ("instruction", "input", "output"):
        m = _CONTROL.search(values[name])
        if m:
            defects.append(("control_chars", f"{name} has U+{ord(m.group()):04X}"))
    inp = values["input"].strip()
    user = values["instruction"].strip() + ("\n\n" + inp if inp else "")
    return Example(turns=[(user, values["output"].strip())], record=obj), defects


def _parse_messages(obj: dict) -> tuple[Example | None, list[tuple[str, str]]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        return None, [("wrong_type", f"messages is {_a_json_type(msgs)}, not a list")]
    system, turns, pending = "", [], None
    defects: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return None, [("wrong_type", f"messages[{i}] is {_a_json_type(m)}, not an object")]
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            return None, [("missing_field", f"messages[{i}].{'role' if role is None else 'content'}")]
        if not isinstance(role, str) or not isinstance(content, str):
            return None, [("wrong_type", f"messages[{i}] role and content must be strings")]
        if _CONTROL.search(content) and not defects:
            defects.append(("control_chars", f"messages[{i}].content"))
        if role == "system" and not turns and pending is None:
            system = content.strip()
        elif role == "user" and pending is None:
            pending = content.strip()
        elif role == "assistant" and pending is not None:
            turns.append((pending, content.strip()))
            pending = None
        else:
            return None, [("wrong_type", f"messages[{i}]: unexpected role {role!r} here")]
        if role != "system" and not content.strip():
            return None, [("empty_field", f"messages[{i}].content")]
    if not turns or pending is not None:
        return None, [("missing_field", "messages must end with an assistant turn")]
    return Example(turns=turns, system=system, record=obj), defects


def _json_type(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _a_json_type(v: object) -> str:
    """The JSON type of ``v`` with its article, to follow "is": "an array", "a number", "null"."""
    name = _json_type(v)
    if name == "null":
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def fold(text: str) -> str:
    """NFC-normalise and fold every run of white space into one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def prompt_key(ex: Example) -> bytes:
    """Digest of everything before the target: rows with the same key ask the same question."""
    parts = [fold(ex.system)] + [fold(p) for pair in ex.turns[:-1] for p in pair] + [fold(ex.turns[-1][0])]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()


def row_key(ex: Example) -> bytes:
    """Digest of the whole normalised row: rows with the same key are duplicates."""
    h = hashlib.blake2b(prompt_key(ex), digest_size=16)
    h.update(fold(ex.turns[-1][1]).encode())
    return h.digest()


def clean_text(s: str) -> str:
    """NFC-normalise, drop control characters and trim."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", s)).strip()


def clean_record(record: dict) -> dict:
    """The source row with every text field cleaned (other fields kept as they are)."""
    out = dict(record)
    if "messages" in out and "instruction" not in out:
        out["messages"] = [{**m, "content": clean_text(m["content"])} for m in out["messages"]]
        return out
    for name in ("instruction", "input", "output"):
        if isinstance(out.get(name), str):
            out[name] = clean_text(out[name])
    return out


def read_examples(path: str | os.PathLike) -> Iterator[tuple[int, Example]]:
    """Yield ``(line_number, example)`` for every usable row; stop with UsageError at the first broken one."""
    open_checked(path)
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        ex, defects = parse_line(raw)
        if ex is None:
            kind, detail = defects[0]
            raise UsageError(f"{os.fspath(path)}:{lineno}: {kind}: {detail}")
        yield lineno, ex
