"""Small modal screens: confirmation and the key help."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from app.text import assemble, lines


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "yes", "Yes"), Binding("n,escape", "no", "No")]

    def __init__(self, question: str | Text) -> None:
        super().__init__()
        self.question = question if isinstance(question, Text) else assemble(question)

    def compose(self) -> ComposeResult:
        with Grid(id="confirm"):
            yield Label(self.question, id="confirm-question", markup=False)
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


KEYS = lines(
    assemble(("voxtui keys", "bold"), "   (Esc, q or ? closes this)"),
    "",
    "1–6     Overview, GPUs, Previews, Checkpoints, Preflight, Events",
    "7 8 9 0 Charts, Evals, Config (& model), Logs",
    "n       preview now            s   save a checkpoint now",
    "e       evaluate now           p   pause / resume",
    "x       stop the run (asks first; the workers save, then exit)",
    "o       save the screen as SVG (into the run folder)",
    "Charts: w window (last 200 / 1000 / all steps)   l loss log scale",
    "Logs:   f follow on/off   / search   ] next log file",
    "Events: / filter (a type or any text; Esc leaves it)",
    "Checkpoints: ↑↓ choose   i infer the chosen one   a infer all",
    "GPUs:   straggler = step time > 1.2 × the other ranks' median",
    "Ctrl+P  command palette        ?   this help",
    "Esc     leave a text field (then the digits switch tabs again)",
    "q       quit (the run keeps going; `voxtui attach RUN` comes back)",
    "Previews: Enter or Apply sends the temperature / top-p / max tokens",
    "          you changed (the others stay as they are).",
    "Picker: space mark, move down   c compare   b (in a run): back here",
    "Compare: a by step / tokens seen   m metric   1 2 tabs   Esc back",
)


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-scroll"):  # a terminal smaller than the text: ↑↓ scroll it
            yield Static(KEYS, id="help", markup=False)

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()

    def action_dismiss(self) -> None:
        self.dismiss(None)
