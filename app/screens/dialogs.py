"""Small modal screens: confirmation and the key help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "yes", "Yes"), Binding("n,escape", "no", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Grid(id="confirm"):
            yield Label(self.question, id="confirm-question")
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


KEYS = """[b]voxtui keys[/b]

1–6     Overview, GPUs, Previews, Checkpoints, Preflight, Events
n       preview now            s   save a checkpoint now
e       evaluate now           p   pause / resume
x       stop the run (asks first; the workers save, then exit)
Ctrl+P  command palette        ?   this help
q       quit the dashboard (the run keeps going; `voxtui attach RUN` comes back)
In Previews: edit temperature / top-p / max tokens, Enter or Apply sends them.
"""


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        yield Static(KEYS, id="help")

    def action_dismiss(self) -> None:
        self.dismiss(None)
