"""The worker's command line: its flags (one per TrainConfig field, and ``--resume``), and the config and
run folder they name, for a new run or a resumed one."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from engine.config import TrainConfig, absolute_paths, add_flags, resolve
from engine.util import Parser, UsageError, first_on_its_node
from engine.worker.dist import Dist

SAID_FIRST_S = 2.0  # how long a quiet rank waits before it exits on a usage error: the first rank's line is said,
# not cut short by torchrun ending every rank once one has exited


class WorkerParser(Parser):
    """The worker's flags: a bad one is one line (as ``voxtui``'s), said once per node under torchrun (every
    rank parses the same flags), exit status 2."""

    def exit(self, status: int = 0, message: str | None = None):
        if status and not first_on_its_node():
            message = None
            time.sleep(SAID_FIRST_S)  # the first rank says it (torchrun ends the others once one has exited)
        super().exit(status, message)


def build_parser() -> argparse.ArgumentParser:
    p = WorkerParser(prog="torchrun --nproc_per_node N -m engine.train",
                                description="voxtui's training worker: LoRA / QLoRA on Voxtral's language model.")
    add_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN (a run folder or a name under runs/) from its "
                                                  "latest complete checkpoint")
    return p


def resolve_run(args: argparse.Namespace, d: Dist) -> tuple[TrainConfig, Path, bool]:
    """The config and run folder, for a new run or ``--resume RUN`` (its saved config, under the flags
    given again); and whether it resumes."""
    from engine.runs import find_run, merge_saved_config, new_run_dir

    if args.resume:
        run_dir = find_run(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UsageError(f"--resume {args.resume}: no run folder with a config.toml")
        merge_saved_config(args, run_dir)
        cfg = resolve(args)
        cfg.output_dir = os.path.abspath(run_dir)  # as `voxtui run --resume` saves it
        return cfg, run_dir, True
    cfg = resolve(args)
    absolute_paths(cfg)  # as `voxtui run` saves them: infer and export then work from any folder
    name, problem = None, ""
    if d.main:  # rank 0 names the folder (runs/<time> without --output_dir) and looks in it before anything is written
        run_dir = Path(cfg.output_dir or new_run_dir())
        name, problem = os.path.abspath(run_dir), new_run_problem(run_dir)
    name, problem = d.broadcast((name, problem))
    if problem:
        raise UsageError(problem)
    cfg.output_dir = name
    return cfg, Path(name), False


def new_run_problem(run_dir: Path) -> str:
    """Why a new run cannot start in ``run_dir`` ("" when it can): a run trained there (engine.runs.trained_in:
    started again without --resume it would append a second series of steps to the run's events and replace
    its checkpoints). A folder the engine has just made for this run passes."""
    from engine.runs import already_holds_run, trained_in

    what = trained_in(run_dir)
    return str(already_holds_run(run_dir, what)) if what else ""


def read_engine(path: str) -> dict:
    """``--engine``: the engine's engine.json (its endpoints)."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--engine {path}: {e}") from None
