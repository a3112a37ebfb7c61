"""Checkpoints at step boundaries, and a resumed run's start from the latest complete one.

checkpoint.py writes and reads the files (atomically); here: a save is rank 0's while the others wait,
every rank's RNG goes with it, and one that fails is reported and leaves the previous checkpoint as it was.
One that failed for want of space says so plainly (``no_space``: the filesystem, what is free) on every rank
(``Saver.full``), and the trainer pauses the run until space is freed (trainer.py, ``_wait_for_space``). The trainer decides what its trainer_state.json holds
and takes its own state back from it (trainer.py: ``_trainer_state``, ``_restore``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from pathlib import Path

from engine.protocol import Alert, Checkpoint
from engine.worker.dist import Dist
from engine.worker.report import Report


@contextlib.contextmanager
def damaged_file(path: Path):
    """Loading a checkpoint's file: a failure names it (torch's and safetensors' errors do not, or not
    plainly), in one line that says what to do."""
    from engine.runs import damaged_checkpoint
    from engine.util import UsageError

    try:
        yield path
    except UsageError:
        raise
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise damaged_checkpoint(path, f"cannot be loaded ({why})") from e


def os_error_text(e: OSError) -> str:
    """An OSError in words with the path or paths it names ("No such file or directory: …/x"): its strerror
    alone did not say which file of the checkpoint went missing."""
    text = e.strerror or f"{type(e).__name__}: {e}"
    paths = [os.fsdecode(p) if isinstance(p, (str, bytes)) else str(p) for p in (e.filename, e.filename2)
             if p is not None]
    return f"{text}: {' -> '.join(paths)}" if paths and e.strerror else text


MIB = 2**20


def mount_of(path: Path) -> tuple[str, str]:
    """The mount point that holds ``path`` (an existing folder) and its device ("tmpfs", "/dev/nvme0n1p2"; ""
    where /proc/self/mounts does not say)."""
    here = Path(os.path.abspath(path))
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    device = ""
    with contextlib.suppress(OSError):
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1].replace("\\040", " ") == str(here):
                    device = fields[0]  # the last mount on that point is the one in force
    return str(here), device


def no_space(e: BaseException, folder: Path, need: int) -> str:
    """Why a checkpoint could not be written, when it is a full disk: "no space left on /mnt (tmpfs, 0.2 MiB
    free; a checkpoint takes about 1.3 MiB)"; "" for another failure. A full disk is an ENOSPC (or EDQUOT)
    anywhere in the exception's chain, or an error that is no OSError (torch's "[enforce fail at
    inline_container.cc] … unexpected pos" for its short write, safetensors' own) raised with less free on the
    filesystem than a checkpoint takes (``need``: the latest one's size, at least 1 MiB), as
    ``checkpoint.note_free_space`` read it when the write failed."""
    chain, seen = e, set()
    full = False
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            full = True
            break
        chain = chain.__cause__ or chain.__context__
    at_failure = getattr(e, "free_bytes", None)
    if not full and (isinstance(e, OSError) or at_failure is None or at_failure >= max(need, MIB)):
        return ""
    where = folder
    while not where.is_dir() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = at_failure or 0
    mount, device = mount_of(where)
    size = f"; a checkpoint takes about {need / MIB:.1f} MiB" if need else ""
    return f"no space left on {mount} ({f'{device}, ' if device else ''}{free / MIB:.1f} MiB free{size})"


class Saver:
    def __init__(self, run_dir: Path, keep: int, d: Dist, out: Report, slow_save: float = 0.0,
                 disk_full: str = "") -> None:
        self.run_dir, self.root, self.keep = run_dir, run_dir / "checkpoints", keep
        self.d, self.out = d, out
        self.slow_save = slow_save  # knobs.py: the tests kill a run while it saves
        self.disk_full = disk_full  # knobs.py: while this file exists, a write fails as on a full disk
        self.full = ""  # the last save failed for want of space: why, in words (every rank); "" otherwise

    def _midway(self):
        """What a write does midway, for the tests (knobs.py): sleep, or fail as on a full disk."""
        slow, fault = self.slow_save, self.disk_full
        if not slow and not fault:
            return None

        def hook():
            if slow:
                time.sleep(slow)
            if fault and os.path.exists(fault):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root))

        return hook

    def save(self, model, optimizer, scheduler, state: dict | None, final: bool = False) -> bool:
        """``checkpoint-<step>`` with ``state`` as its trainer_state.json (rank 0's; None on the others),
        and with ``final`` the adapter in lora_final/ too. Every rank returns whether it was written."""
        from engine.worker import checkpoint

        d = self.d
        states = d.gather(checkpoint.rng_state())
        ok, full = True, ""
        if d.main:
            step, path = state["step"], None
            try:
                path = checkpoint.save_checkpoint(self.root, step, model, optimizer, scheduler, states, state,
                                                  slow_hook=self._midway())
                held = checkpoint.prune(self.root, self.keep, state["best_step"] or None)
                if final:
                    checkpoint.save_adapter_atomically(model, self.run_dir / "lora_final")
            except Exception as e:  # OSError, or torch's or safetensors' own error for the same full disk
                ok = False
                previous = checkpoint.latest_checkpoint(self.root)
                need = checkpoint.folder_bytes(previous) if previous else 0
                full = no_space(e, self.root, need)
                reason_text = os_error_text(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
                if full:
                    what = f"checkpoint-{step}" if path is None else "lora_final"  # (the checkpoint was written)
                    msg = f"{what} not written: {full}; " + (f"{previous.name} is intact" if previous
                                                             else "no earlier checkpoint exists")
                    full = msg
                else:
                    msg = (f"checkpoint at step {step} not written: {reason_text}; "
                           + (f"{previous} is intact" if previous else "no earlier checkpoint exists"))
                self.out.emit(Alert(level="error", kind="checkpoint_failed", step=step, message=msg))
                self.out.log(msg if not full else f"{msg} ({reason_text})")
            if ok:
                best = state["best_step"] == step and state["best_loss"] is not None
                self.out.emit(Checkpoint(step=step, path=str(path), best=best,
                                         val_loss=state["best_loss"] if best else None, final=final))
                self.out.log(f"checkpoint {path} ({state['reason']})")
                for kept, pids in held:
                    self.out.log(f"{kept.name} kept past save_total_limit {self.keep}: in use by pid "
                                 f"{', '.join(map(str, pids))} (inference); a later save prunes it once unmarked")
            self.out.board.flush()
        d.barrier()
        ok, self.full = d.broadcast((ok, full))
        return bool(ok)

    def restore(self, model, optimizer, scheduler) -> tuple[Path, dict] | None:
        """The latest complete checkpoint's adapter, optimizer, scheduler and this rank's RNG, loaded; its
        path and trainer state, for the trainer to take its own back (None: no checkpoint yet)."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from engine.worker import checkpoint

        path = checkpoint.latest_checkpoint(self.root)
        if path is None:
            self.out.log("resume: no complete checkpoint yet, starting from step 0")
            return None
        state = checkpoint.load_trainer_state(path)
        device = self.d.device
        with damaged_file(path / "adapter_model.safetensors") as file:
            weights = load_file(str(file), device=str(device))
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {path} does not fit this model: {result.unexpected_keys[:3]}")
        with damaged_file(path / "optimizer.pt") as file:
            opt = torch.load(file, map_location=device, weights_only=False)
            optimizer.load_state_dict(opt["optimizer"])
            scheduler.load_state_dict(opt["scheduler"])
        with damaged_file(path / "rng" / f"rank-{self.d.rank}.pt"):
            rng = checkpoint.load_rng(path, self.d.rank)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        return path, state
