"""Atomic checkpoints: a standard PEFT adapter plus everything exact resume needs.

``checkpoints/checkpoint-<step>/`` holds ``adapter_config.json`` + ``adapter_model.safetensors``,
``optimizer.pt`` (optimizer and scheduler), ``rng/rank-<r>.pt`` (python, numpy, torch CPU / CUDA RNG
of every rank) and ``trainer_state.json`` (step, epoch, data position, best, config). It is written
under ``.tmp-checkpoint-<step>-<pid>``, every file fsynced, then renamed; a folder named
``checkpoint-<step>`` therefore is complete, and a crash mid-save leaves only a temp folder that
the next start removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from engine.runs import CKPT_RE, complete_checkpoints, latest_checkpoint  # noqa: F401 (re-exported)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt_root: Path, step: int, peft_model, optimizer, scheduler, rng_states: list[dict],
                    state: dict, slow_hook=None) -> Path:
    """Write checkpoint-<step> atomically (rank 0 only); returns its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"checkpoint-{step}"
    tmp = ckpt_root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "rng").mkdir()
        for r, s in enumerate(rng_states):
            torch.save(s, tmp / "rng" / f"rank-{r}.pt")
        if slow_hook:
            slow_hook()
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(ckpt_root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        note_free_space(e, ckpt_root)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def note_free_space(e: BaseException, folder: Path) -> None:
    """The bytes free on ``folder``'s filesystem as the write failed, kept on the exception (``free_bytes``),
    before the temp folder is removed: torch's error for a short write on a full disk ("[enforce fail at
    inline_container.cc] … unexpected pos") names no ENOSPC, and once the partial checkpoint is removed the
    disk no longer looks full (saving.no_space reads it)."""
    try:
        e.free_bytes = shutil.disk_usage(folder).free
    except (OSError, AttributeError, TypeError):
        pass


def folder_bytes(path: Path) -> int:
    """The size of the files under ``path`` (0 where it cannot be read)."""
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def remove_partial(ckpt_root: Path) -> list[Path]:
    """Delete temp folders that a crash during a save left behind."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(ckpt_root: Path, keep: int, best_step: int | None) -> list[tuple[Path, list[int]]]:
    """Keep the last ``keep`` complete checkpoints and the best one, and any other that a live process has
    marked in use (``engine.runs.mark_in_use``: an inference job reading it) until a later save finds it
    unmarked. Returns those kept for that reason, with the pids that hold them.

    An unmarked one is first renamed to a temp name (a crash leaves it to ``remove_partial``) and looked at
    again there: a job that marked it in between gets it back under its own name, and sees it missing only
    for that moment."""
    from engine.runs import checkpoint_users

    held: list[tuple[Path, list[int]]] = []
    if keep <= 0:
        return held
    done = complete_checkpoints(ckpt_root)
    for step, path in done[:-keep]:
        if step == best_step:
            continue
        users = checkpoint_users(path)
        if not users:
            gone = ckpt_root / f".tmp-checkpoint-pruned-{step}-{os.getpid()}"
            shutil.rmtree(gone, ignore_errors=True)
            try:
                os.replace(path, gone)
            except OSError:
                continue  # gone already, or cannot be moved: the next save tries again
            users = checkpoint_users(gone)
            if not users:
                shutil.rmtree(gone, ignore_errors=True)
                continue
            os.replace(gone, path)
        held.append((path, users))
    return held


def load_trainer_state(path: Path) -> dict:
    """The checkpoint's trainer_state.json; a damaged one is a one-line error that names it (engine.runs)."""
    from engine.runs import read_trainer_state

    return read_trainer_state(path)


def load_rng(path: Path, rank: int) -> dict | None:
    f = path / "rng" / f"rank-{rank}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None


def save_adapter_atomically(peft_model, dest: Path) -> None:
    """``lora_final/``: the adapter alone, written to a temp name then renamed."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        _fsync_tree(tmp)
    except BaseException as e:
        note_free_space(e, dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
