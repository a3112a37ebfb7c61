"""Previews: the latest generation per prompt, one prompt's history beside its reference, and the
controls for temperature / top-p / max new tokens and "preview now"."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, OptionList, Static

from app.state import RunState


class Previews(Vertical):
    class ParamsRequested(Message):
        """The user asked for new preview parameters (already validated)."""

        def __init__(self, temperature: float, top_p: float, max_new_tokens: int) -> None:
            super().__init__()
            self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    class PreviewRequested(Message):
        pass

    def compose(self) -> ComposeResult:
        with Horizontal(id="pv-controls"):
            yield Label("temp")
            yield Input(value="0.7", id="pv-temperature", type="number", max_length=5)
            yield Label("top-p")
            yield Input(value="0.9", id="pv-top-p", type="number", max_length=5)
            yield Label("max")
            yield Input(value="64", id="pv-max", type="integer", max_length=4)
            yield Button("Apply", id="pv-apply", variant="primary")
            yield Button("Preview now", id="pv-now")
        yield Static(id="pv-reply")
        with Horizontal(id="pv-body"):
            yield OptionList(id="pv-prompts")
            with VerticalScroll(id="pv-detail"):
                yield Static(id="pv-text")
        self.selected = 0
        self._count = 0

    def values(self) -> tuple[float, float, int] | str:
        try:
            t = float(self.query_one("#pv-temperature", Input).value)
            p = float(self.query_one("#pv-top-p", Input).value)
            n = int(self.query_one("#pv-max", Input).value)
        except ValueError:
            return "temperature, top-p and max tokens must be numbers"
        if not 0 <= t <= 2:
            return "temperature must be in [0, 2]"
        if not 0 < p <= 1:
            return "top-p must be in (0, 1]"
        if not 1 <= n <= 4096:
            return "max new tokens must be in [1, 4096]"
        return t, p, n

    @on(Button.Pressed, "#pv-apply")
    @on(Input.Submitted)
    def apply(self) -> None:
        v = self.values()
        if isinstance(v, str):
            self.show_reply("error", v)
            return
        self.show_reply("pending", "sent; applied when the engine replies ok")
        self.post_message(self.ParamsRequested(*v))

    @on(Button.Pressed, "#pv-now")
    def now(self) -> None:
        self.post_message(self.PreviewRequested())

    @on(OptionList.OptionHighlighted, "#pv-prompts")
    def pick(self, event: OptionList.OptionHighlighted) -> None:
        self.selected = event.option_index
        self.show_detail(self.app.state)  # type: ignore[attr-defined]

    def show_reply(self, status: str, reason: str) -> None:
        color = {"ok": "green", "error": "red"}.get(status, "yellow")
        self.query_one("#pv-reply", Static).update(f"[{color}]{status}[/] {reason}")

    def show(self, s: RunState) -> None:
        prompts = self.query_one("#pv-prompts", OptionList)
        if len(s.previews) != self._count:
            self._count = len(s.previews)
            prompts.clear_options()
            prompts.add_options([f"{i}: {evs[-1].prompt[:40]}" for i, evs in sorted(s.previews.items())])
            prompts.highlighted = min(self.selected, max(self._count - 1, 0))
        self.show_detail(s)

    def show_detail(self, s: RunState) -> None:
        text = self.query_one("#pv-text", Static)
        history = s.previews.get(self.selected)
        if not history:
            text.update("no previews yet (they come every --preview_steps, or press Preview now)")
            return
        last = history[-1]
        lines = [f"[b]prompt[/b] {last.prompt}", f"[b]reference[/b] {last.reference}", ""]
        for ev in reversed(history[-8:]):
            score = f" rougeL {ev.rougeL:.3f}" if ev.rougeL is not None else ""
            lines.append(f"[b]step {ev.step}[/b] T={ev.temperature:g} top-p={ev.top_p:g} max={ev.max_new_tokens}"
                         f"{score} (rank {ev.rank})\n{ev.text}\n")
        text.update("\n".join(lines))
