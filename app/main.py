"""``voxtui attach [RUN]``."""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

RUN_FILES = ("config.toml", "events.jsonl", "engine.json")


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def attach(args) -> int:
    from app.app import VoxApp

    run = args.run
    if run and not Path(run).is_dir() and (Path(args.runs) / run).is_dir():
        run = str(Path(args.runs) / run)
    if run and not Path(run).is_dir():
        print(f"voxtui: error: {run}: no such run", file=sys.stderr)
        return 2
    if run and not is_run(Path(run)):
        print(f"voxtui: error: {run}: not a run folder (no {', '.join(RUN_FILES[:-1])} or {RUN_FILES[-1]})",
              file=sys.stderr)
        return 2
    app = VoxApp(run, args.runs)
    app.run()
    error = app._exception  # the first unhandled exception (Textual has printed its traceback above)
    if error is not None or (app.return_code or 0) != 0:
        where = ""
        if error is not None:
            path = Path(tempfile.gettempdir()) / f"voxtui-attach-{time.strftime('%Y%m%d-%H%M%S')}.log"
            try:
                path.write_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
                where = f"; traceback above and in {path}"
            except OSError:
                where = "; traceback above"
        what = f"{type(error).__name__}: {error}" if error is not None else f"exit code {app.return_code}"
        print(f"voxtui: error: the dashboard failed ({' '.join(what.split())[:300]}){where}. "
              "The run itself is not affected.", file=sys.stderr)
        return 1
    print("detached; the run keeps going. Come back with: voxtui attach" + (f" {run}" if run else ""),
          file=sys.stderr)
    return 0
