"""Previews: the latest generation per prompt, one prompt's history beside its reference, and the
controls for temperature / top-p / max new tokens and "preview now".

The inputs show the values in force (the run's config, then the latest accepted change, this dashboard's
or another's: the ``ack`` of ``set_preview_params`` carries them); Apply sends only the fields the user
changed (a missing field is unchanged for the engine; an input left empty is unchanged too, and Apply shows
its value in force again). An input holding the user's unsent edit is never overwritten by news from the
run: the reply line says what is in force then."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from app.state import RunState
from app.text import assemble, data, lines, show_text
from engine.protocol import preview_param_problems

# input id, protocol field, parse, format, label (the limits are the protocol's: preview_param_problems)
FIELDS = (
    ("pv-temperature", "temperature", float, lambda v: f"{float(v):g}", "temperature"),
    ("pv-top-p", "top_p", float, lambda v: f"{float(v):g}", "top-p"),
    ("pv-max", "max_new_tokens", int, lambda v: str(int(v)), "max new tokens"),
)
SHORT = {"temperature": "T", "top_p": "top-p", "max_new_tokens": "max"}  # as a preview's parameters are shown


class Previews(Vertical):
    class ParamsRequested(Message):
        """The user asked for new preview parameters (validated; only the changed ones)."""

        def __init__(self, changed: dict) -> None:
            super().__init__()
            self.changed = changed

    class PreviewRequested(Message):
        pass

    def compose(self) -> ComposeResult:
        with Horizontal(id="pv-controls"):
            yield Label("temp")
            yield Input(id="pv-temperature", type="number", max_length=6, placeholder="–")
            yield Label("top-p")
            yield Input(id="pv-top-p", type="number", max_length=6, placeholder="–")
            yield Label("max")
            yield Input(id="pv-max", type="integer", max_length=4, placeholder="–")
            yield Button("Apply", id="pv-apply", variant="primary")
            yield Button("Preview now", id="pv-now")
        yield Static(id="pv-reply", markup=False)
        with Horizontal(id="pv-body"):
            yield OptionList(id="pv-prompts", markup=False)
            with VerticalScroll(id="pv-detail"):
                yield Static(id="pv-text", markup=False)
        self.selected = 0
        self._count = 0
        self._prompts: list = []
        self.in_force: dict = {}  # field → the value in force that the input was last filled with
        self._filled: dict = {}  # field → the text put into the input then
        self._force_text: dict = {}  # field → the value in force as text (kept current while an input is edited)
        self._ended = ""  # why no worker is left to preview (said on the reply line once)

    NARROW = 72  # columns the controls' one row needs; below, they take two (app.tcss: Previews.-narrow)

    def on_resize(self, event) -> None:
        self.set_class(event.size.width < self.NARROW, "-narrow")

    def fill(self, params: dict) -> None:
        """Show a value in force when it changes (any client's ack), except in an input that holds the user's
        unsent edit (text typed there, not sent): that one is kept, and the reply line says what is in force
        now. The values in force are kept either way (what Apply compares with and what an emptied field
        shows again). An input whose text was sent is no edit: the ack's value replaces it (another client's
        later change, or max new tokens cut by the workers), focused or not."""
        kept = []
        for input_id, key, parse, fmt, label in FIELDS:
            if params.get(key) is None:
                continue
            try:
                text = fmt(params[key])
            except (TypeError, ValueError, OverflowError):
                continue  # not a number: nothing to show
            moved = text != self._force_text.get(key)
            self.in_force[key], self._force_text[key] = parse(text), text
            box = self.query_one(f"#{input_id}", Input)
            if box.value == text:  # shows the value in force (typed, sent or filled): nothing of the user's to keep
                self._filled[key] = text
            elif not moved:
                continue  # unchanged: a value sent and not acked yet, or refused, stays as it is
            elif box.value == self._filled.get(key, ""):  # no unsent edit
                self._filled[key] = box.value = text
                box.cursor_position = len(text)  # typing goes on after the value, not before it
            else:
                kept.append(label)
        if kept:  # as the previews write them (T=… top-p=… max=…)
            now = " ".join(f"{SHORT[key]}={self._force_text[key]}" for _, key, *_ in FIELDS if key in self._force_text)
            self.show_reply("in force", f"{now} — your {', '.join(kept)} edit is kept, not sent")

    def changed(self) -> dict | str:
        """The fields whose input differs from the value in force (checked), or what is wrong."""
        out, wrong = {}, []  # every field's problem, not the first one's alone
        for input_id, key, parse, _, label in FIELDS:
            text = self.query_one(f"#{input_id}", Input).value.strip()
            if not text:
                continue  # empty: unchanged
            try:
                value = parse(text)
            except (ValueError, OverflowError):
                wrong.append(f"{label} must be a number")
                continue
            problems = preview_param_problems(**{key: value}, names={key: label})
            if problems:
                wrong.append(problems[0])
            elif value != self.in_force.get(key):
                out[key] = value
        return "; ".join(wrong) if wrong else out

    @on(Button.Pressed, "#pv-apply")
    @on(Input.Submitted)
    def apply(self) -> None:
        v = self.changed()
        if isinstance(v, str):
            self.show_reply("error", v)
            return
        emptied = self.refill_empty()
        if not v:
            if not emptied:
                why = "these are the values in force"
            elif all(emptied.values()):  # an emptied field is "unchanged": it shows the value in force again
                why = "an empty field keeps its value in force (shown again)"
            else:
                why = "an empty field keeps its value in force (not known yet)"
            self.show_reply("unchanged", f"nothing to send: {why}")
            return
        for input_id, key, _, _, _ in FIELDS:  # sent: no longer an edit (the ack's value, or a later one, replaces it)
            if key in v:
                self._filled[key] = self.query_one(f"#{input_id}", Input).value
        self.show_reply("pending", "sent " + ", ".join(f"{k}={v[k]:g}" for k in v) + "; applied when the engine replies ok")
        self.post_message(self.ParamsRequested(v))

    def refill_empty(self) -> dict:
        """Each empty input (unchanged, for Apply) filled again with the value in force; returns field →
        whether that value was known (an input never filled stays empty)."""
        out = {}
        for input_id, key, _, _, _ in FIELDS:
            box = self.query_one(f"#{input_id}", Input)
            if box.value.strip():
                continue
            out[key] = key in self._force_text
            if out[key]:
                box.value = self._filled[key] = self._force_text[key]
                box.cursor_position = len(box.value)  # a 1 typed next goes after 0.7, not before it (10.7)
        return out

    @on(Button.Pressed, "#pv-now")
    def now(self) -> None:
        self.post_message(self.PreviewRequested())

    @on(OptionList.OptionHighlighted, "#pv-prompts")
    def pick(self, event: OptionList.OptionHighlighted) -> None:
        self.selected = self._prompts[event.option_index] if event.option_index < len(self._prompts) else 0
        self.show_detail(self.app.state)  # type: ignore[attr-defined]

    def ended(self, why: str) -> None:
        """``why`` no worker is left to preview, a sentence ("" while one is): the reply line says so, not a last "ok"
        that no longer means anything; cleared when workers are back (a resumed run)."""
        if why and why != self._ended:
            self.show_reply("no workers", why)
        elif not why and self._ended:
            self.show_reply("", "")
        self._ended = why

    def show_reply(self, status: str, reason: str) -> None:
        color = {"ok": "green", "error": "red"}.get(status, "yellow")
        reply = self.query_one("#pv-reply", Static)
        reply.set_class(status == "error", "-error")  # an error's whole reason, on up to 3 lines; the rest: one line
        reply.update(assemble((status, color), " ", data(reason, limit=300)) if status else "")

    def show(self, s: RunState) -> None:
        self.fill(s.preview_params)
        prompts = self.query_one("#pv-prompts", OptionList)
        if len(s.previews) != self._count:
            self._count = len(s.previews)
            self._prompts = sorted(s.previews)
            prompts.clear_options()
            prompts.add_options([Option(assemble(f"{i}: ", data(s.previews[i][-1].prompt, limit=40)))
                                 for i in self._prompts])
            if self.selected not in s.previews and self._prompts:
                self.selected = self._prompts[0]
            if self._prompts:
                prompts.highlighted = self._prompts.index(self.selected)
        self.show_detail(s)

    def show_detail(self, s: RunState) -> None:
        text = self.query_one("#pv-text", Static)
        history = s.previews.get(self.selected)
        if not history:
            show_text(text, assemble("no previews yet (they come every --preview_steps, or press Preview now)"))
            return
        last = history[-1]
        rows = [assemble(("prompt", "bold"), " ", data(last.prompt, limit=2000, one_line=False)),
                assemble(("reference", "bold"), " ", data(last.reference, limit=2000, one_line=False)), ""]
        for ev in reversed(history[-8:]):
            score = f" rougeL {ev.rougeL:.3f}" if ev.rougeL is not None else ""
            rows.append(assemble((f"step {ev.step}", "bold"),
                                 f" T={ev.temperature:g} top-p={ev.top_p:g} max={ev.max_new_tokens}{score} "
                                 f"(rank {ev.rank})"))
            rows.append(data(ev.text, limit=4000, one_line=False))
            rows.append("")
        show_text(text, lines(*rows))
