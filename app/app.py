"""The Textual app: thin. It holds the run's state and routes between the picker and a run."""

from __future__ import annotations

from pathlib import Path

from textual.app import App, SystemCommand

from app.screens.picker import RunPicker
from app.screens.run import RunScreen
from app.state import RunState


class VoxApp(App):
    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses elsewhere find it too
    TITLE = "voxtui"

    def __init__(self, run: str | None = None, runs_root: str = "runs") -> None:
        super().__init__()
        self.run_path, self.runs_root = run, runs_root
        self.state = RunState()

    def on_mount(self) -> None:
        if self.run_path:
            self.push_screen(RunScreen(self.run_path))
        else:
            self.push_screen(RunPicker(self.runs_root))

    def on_run_picker_run_chosen(self, message: RunPicker.RunChosen) -> None:
        self.state = RunState()
        self.run_path = message.path
        self.push_screen(RunScreen(message.path))

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        if isinstance(screen, RunScreen):
            for name, action, help_text in (
                ("Preview now", screen.action_preview_now, "generate previews at the next step"),
                ("Save checkpoint", screen.action_save, "save at the next step"),
                ("Evaluate now", screen.action_eval_now, "validation loss at the next step"),
                ("Pause / resume", screen.action_pause, "pause or resume training"),
                ("Stop run", screen.action_stop, "save, then stop (asks first)"),
                ("Keys", screen.action_help, "show the keys"),
            ):
                yield SystemCommand(name, help_text, action)
