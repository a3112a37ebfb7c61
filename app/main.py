"""``voxtui attach [RUN]``."""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

# what a run says (its folder's name, an error about it) printed safe; a path in a command quoted to paste
from engine.util import printable, shell_quote

RUN_FILES = ("config.toml", "events.jsonl", "engine.json")


def is_run(path: Path) -> bool:
    """A run folder holds at least one of config.toml, events.jsonl, engine.json."""
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def attach(args) -> int:
    from app.app import VoxApp

    run = args.run
    if run and not Path(run).is_dir() and (Path(args.runs) / run).is_dir():
        run = str(Path(args.runs) / run)
    if run and not Path(run).is_dir():
        print(printable(f"voxtui: error: {run}: no such run"), file=sys.stderr)
        return 2
    if run and not is_run(Path(run)):
        print(printable(f"voxtui: error: {run}: not a run folder (no {', '.join(RUN_FILES)})"), file=sys.stderr)
        return 2
    app = VoxApp(run, args.runs, notify=not getattr(args, "no_notify", False))
    code = run_dashboard(app)
    if code == 0:
        state = getattr(app, "state", None)
        if state is not None and (state.state in ("finished", "failed") or state.crashed):
            then = ""
            if state.shown_state in ("failed", "crashed") and run:
                from engine.runs import latest_checkpoint

                ckpt = latest_checkpoint(Path(run) / "checkpoints")
                then = (f"; voxtui run --resume {shell_quote(run)} continues from {ckpt.name}" if ckpt is not None
                        else f"; no checkpoint was saved: voxtui run --resume {shell_quote(run)} starts it over "
                        "from step 0")
            print(printable(f"left the dashboard; the run has ended ({state.shown_state}){then}"), file=sys.stderr)
        else:
            print(printable("detached; the run keeps going. Come back with: voxtui attach" + (f" {shell_quote(run)}" if run else "")),
                  file=sys.stderr)
    return code


def run_dashboard(app, headless: bool = False) -> int:
    """Run the app; 0 when it was quit, else 1 after one line on stderr that says what failed and where
    the traceback is (Textual prints it above as the app ends; a plain copy goes to a file)."""
    app.run(headless=headless)
    error = app._exception  # the first unhandled exception: App.run() returns after one, with return_code 1
    if error is None and not app.return_code:
        return 0
    where = ""
    if error is not None:
        path = Path(tempfile.gettempdir()) / f"voxtui-attach-{time.strftime('%Y%m%d-%H%M%S')}-{id(app):x}.log"
        try:
            path.write_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
            where = f"; traceback above and in {path}"
        except OSError:
            where = "; traceback above"
    what = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}" if error is not None else \
        f"exit code {app.return_code}"
    print(printable(f"voxtui: error: the dashboard failed ({what}){where}. The run itself is not affected."),
          file=sys.stderr)
    return 1
