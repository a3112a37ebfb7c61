"""``voxtui attach [RUN]``."""

from __future__ import annotations

import sys
from pathlib import Path


def attach(args) -> int:
    from app.app import VoxApp

    run = args.run
    if run and not Path(run).is_dir() and (Path(args.runs) / run).is_dir():
        run = str(Path(args.runs) / run)
    if run and not Path(run).is_dir():
        print(f"voxtui: error: {run}: no such run", file=sys.stderr)
        return 2
    VoxApp(run, args.runs).run()
    print("detached; the run keeps going. Come back with: voxtui attach" + (f" {run}" if run else ""),
              file=sys.stderr)
    return 0
