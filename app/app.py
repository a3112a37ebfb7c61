"""The Textual app: thin. It holds the run's state and routes between the picker and a run."""

from __future__ import annotations

from pathlib import Path

from textual.app import App, SystemCommand

from app.screens.picker import RunPicker
from app.screens.run import RunScreen
from app.state import RunState
from app.text import plain

NOTICES_KEPT = 20


class VoxApp(App):
    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses elsewhere find it too
    TITLE = "voxtui"

    def __init__(self, run: str | None = None, runs_root: str = "runs", notify: bool = True) -> None:
        """``notify``: a bell and a desktop-notification escape when a run ends or raises an error alert
        (off: ``voxtui attach --no-notify``)."""
        super().__init__()
        self.run_path, self.runs_root = run, runs_root
        self.state = RunState(folder=Path(run).name if run else "")
        self.terminal_notify = notify
        self.notices_sent: list[str] = []  # the escape sequences written, newest last (the last NOTICES_KEPT)

    def notify_terminal(self, title: str, body: str) -> None:
        """The terminal bell, then a desktop notification: OSC 9 (iTerm2, Windows Terminal, kitty, WezTerm)
        and OSC 777 (urxvt, foot, Ghostty, VTE terminals); a terminal that knows neither ignores them.
        ``title`` and ``body`` are a run's data: control characters and the separators are taken out."""
        if not self.terminal_notify:
            return

        def clean(text: str) -> str:
            return "".join(c for c in plain(text, limit=200) if c.isprintable() and c != ";")

        title, body = clean(title), clean(body)
        seq = f"\a\x1b]9;{title}: {body}\x07\x1b]777;notify;{title};{body}\x07"
        self.notices_sent = [*self.notices_sent[-(NOTICES_KEPT - 1):], seq]
        if self._driver is not None:  # the headless driver (tests) writes nothing
            self._driver.write(seq)
            self._driver.flush()

    def on_mount(self) -> None:
        if self.run_path:
            self.push_screen(RunScreen(self.run_path))
        else:
            self.push_screen(RunPicker(self.runs_root))

    def on_run_picker_run_chosen(self, message: RunPicker.RunChosen) -> None:
        self.state = RunState(folder=Path(message.path).name)
        self.run_path = message.path
        self.push_screen(RunScreen(message.path))

    def save_screen_here(self) -> None:
        """Textual's Screenshot command, into the current folder (the run screen has its own: the o key)."""
        import time

        name = f"voxtui-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        try:
            path = self.save_screenshot(filename=name, path=str(Path.cwd()))
        except OSError as e:
            self.notify(plain(f"could not save the screen in {Path.cwd()}: {e.strerror or e}", limit=400),
                        severity="error", markup=False)
            return
        self.notify(plain(f"saved the screen as {path}", limit=400), markup=False)

    def get_system_commands(self, screen):
        """Textual's commands, and on a run the dashboard's own: the engine's commands only while an engine
        can take them (as the footer shows their keys: ``RunScreen.check_action``), since choosing one here
        runs it without asking the footer. Textual's own: Quit says what becomes of a run; on a run, its
        Screenshot (into ~/Downloads, which a server may not have: "Failed to save screenshot") and Keys
        (beside the dashboard's) give way to the dashboard's; elsewhere the screenshot goes to this folder."""
        run = isinstance(screen, RunScreen)
        for cmd in super().get_system_commands(screen):
            if cmd.title == "Quit":
                cmd = cmd._replace(help="leave the dashboard; a run goes on (voxtui attach comes back to it)")
            elif cmd.title == "Screenshot":
                if run:
                    continue  # "Save screen as SVG": into the run folder
                cmd = cmd._replace(help="save an SVG of the screen into the current folder",
                                   callback=self.save_screen_here)
            elif cmd.title == "Keys" and run:
                continue  # the dashboard's "Keys" lists every key of the run screen
            yield cmd
        if run:
            for name, action, help_text in (
                ("Preview now", "preview_now", "generate previews at the next step"),
                ("Save checkpoint", "save", "save at the next step"),
                ("Evaluate now", "eval_now", "validation loss at the next step"),
                ("Pause / resume", "pause", "pause or resume training"),
                ("Stop run", "stop", "save, then stop (asks first)"),
                ("Save screen as SVG", "export_svg", "into the run folder (key o)"),
                ("Keys", "help", "show the keys"),
            ):
                if screen.check_action(action, ()):  # False: ended; None: the engine lost or not yet seen
                    yield SystemCommand(name, help_text, getattr(screen, f"action_{action}"))
