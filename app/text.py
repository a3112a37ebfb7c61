"""The one rule for what a run says: it is data, never markup.

Every string that comes from a run (alerts, logs, status messages, previews, prompts, references,
sample generations, run names, paths, model ids, preflight messages, engine replies) reaches the
screen through ``data()`` (or ``assemble()`` / ``plain()``): a ``rich.text.Text`` that is never parsed
for markup, with control characters (ANSI escapes included) shown as visible symbols instead of being
sent to the terminal, zero-width joiners and spaces dropped (terminals disagree on their width), and long
values cut to a limit. Styles come only from our own code.
"""

from __future__ import annotations

import re

from rich.text import Text

# C0 controls but newline and tab, DEL, C1 controls; bidi embeddings / overrides / isolates and the Unicode
# line and paragraph separators (they would reorder or break the lines around them in a terminal)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


# zero-width joiners and spaces: terminals disagree on them (a family emoji joined by ZWJ is 2 cells in one,
# 8 in another — tmux), so the width Textual lays out and the width drawn differ and borders move. Dropped:
# an emoji sequence shows as its emoji side by side, the same width everywhere
_ZERO_WIDTH = re.compile("[\u200b-\u200d\u2060\ufeff]")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    if c < 0x20:
        return chr(0x2400 + c)  # ␛ for ESC, ␍ for CR, …
    if c == 0x7F:
        return "\u2421"  # ␡
    return "\ufffd"


NEWLINE = "\u23ce"  # ⏎: a newline shown within one line, where a line stands for one thing (an event)


def plain(value: object, limit: int | None = None, one_line: bool = True, newline: str = " ") -> str:
    """A run's value as a safe plain string: control characters made visible, on one line (newlines become
    ``newline``, a space unless a line break must be seen: NEWLINE; tabs become spaces) unless ``one_line``
    is false, at most ``limit`` characters (then ending in …)."""
    s = "" if value is None else value if isinstance(value, str) else str(value)
    if limit is not None and len(s) > 4 * limit + 64:
        s = s[: 4 * limit + 64]  # no need to clean what is cut anyway
    if one_line:
        s = s.replace("\r\n", newline).replace("\n", newline).replace("\t", " ")
    else:
        s = s.replace("\r\n", "\n").replace("\t", "    ")
    s = _ZERO_WIDTH.sub("", _CONTROL.sub(_visible, s))
    if limit is not None and len(s) > limit:
        s = s[: max(limit - 1, 0)] + "…"
    return s


def data(value: object, style: str = "", limit: int | None = None, one_line: bool = True, newline: str = " ") -> Text:
    """A run's value as Text (never markup), in our own ``style``."""
    return Text(plain(value, limit, one_line, newline), style=style, end="")


def assemble(*parts: object) -> Text:
    """Text from parts: ``Text`` (from ``data()``), or ``(str, style)`` / ``str`` — each str cleaned as by
    ``plain(one_line=False)``, so even a run's string that slipped in cannot become markup or a terminal
    control sequence."""
    out = Text(end="")
    for part in parts:
        if isinstance(part, Text):
            out.append_text(part)
        elif isinstance(part, tuple):
            text, style = part
            out.append(plain(text, one_line=False), style=style or None)
        elif part is not None:
            out.append(plain(part, one_line=False))
    return out


def lines(*rows: Text | str) -> Text:
    """Rows joined by newlines."""
    return Text("\n", end="").join(r if isinstance(r, Text) else assemble(r) for r in rows)


def show_text(widget, content: Text | str) -> bool:
    """``widget.update(content)`` (a Static or Label) unless it shows exactly that already: an update repaints
    the widget's lines even when nothing changed, and those are bytes sent to the terminal at every redraw.
    Use it for every update of that widget (it remembers what it last set). True when it updated."""
    key = (content.plain, tuple(content.spans), str(content.style)) if isinstance(content, Text) else content
    if getattr(widget, "_voxtui_shown", None) == key:
        return False
    widget._voxtui_shown = key
    widget.update(content)
    return True


class _Bleu:
    """BLEU (0–100) as the dashboard writes it, the same in every tab: one decimal from 1 up, two significant
    digits below (a small model's 0.0031 would read 0.0 with one decimal). Used like a format string."""

    @staticmethod
    def format(v: float) -> str:
        return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2g}"


BLEU_FORMAT = _Bleu()


def mfu_unknown(device: str) -> str:
    """What the Overview and the Charts say where steps carry no MFU: no peak FLOP/s is known for the
    device (a CPU, or a GPU not in the table) — the one flag that gives it."""
    return ("n/a on CPU" if device == "cpu" else "n/a (peak unknown)") + ": set --peak_tflops"
