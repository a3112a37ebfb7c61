"""The worker's command line: its flags (one per TrainConfig field, and ``--resume``), and the config and
run folder they name, for a new run or a resumed one."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.config import TrainConfig, add_flags, resolve
from engine.util import UsageError
from engine.worker.dist import Dist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m engine.train",
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
        return resolve(args), run_dir, True
    cfg = resolve(args)
    name = cfg.output_dir or str(new_run_dir())
    run_dir = Path(d.broadcast(name))
    cfg.output_dir = str(run_dir)
    return cfg, run_dir, False


def read_engine(path: str) -> dict:
    """``--engine``: the engine's engine.json (its endpoints)."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--engine {path}: {e}") from None
