"""A resume reads the checkpoint it would continue from before anything starts: a damaged trainer_state.json is
refused in one line that names the file and what is wrong, the run folder untouched; the worker's own load of
a checkpoint names the file too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import digest, voxtui, write_jsonl
from engine.config import TrainConfig, write_config
from engine.util import UsageError

GOOD = {"step": 8, "epoch": 0, "micro": 16, "world_size": 1, "total_steps": 20, "best_step": 0, "bad_evals": 0,
        "best_loss": None, "schedule": {"total": 20}, "preview": {}}


def make_run(root: Path, state: bytes, earlier: bool = False, model: Path | None = None) -> Path:
    """A run stopped at step 8 (checkpoint-8's trainer_state.json: ``state``), with checkpoint-4 too if ``earlier``."""
    run = root / "runs" / "r"
    train = write_jsonl(root / "t.jsonl", [{"instruction": f"q {i}", "output": f"a {i}"} for i in range(16)])
    cfg = TrainConfig(model_id=str(model or root / "model"), train_jsonl=str(train), output_dir=str(run),
                      max_steps=20, nproc=1, quant="none", bf16=False, per_device_bsz=2, packing=False)
    run.mkdir(parents=True)
    write_config(cfg, run / "config.toml")
    for step in ([4] if earlier else []) + [8]:
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"not safetensors")
        (ckpt / "trainer_state.json").write_bytes(state if step == 8 else json.dumps({**GOOD, "step": 4}).encode())
    return run


def folder_digest(run: Path) -> dict:
    return {str(p.relative_to(run)): (digest(p) if p.is_file() else "dir", p.stat().st_mode)
            for p in sorted(run.rglob("*"))}


@pytest.mark.parametrize("state, said", [
    (b"\x9c\xd7\x00\x13\xfe garbage", "not UTF-8 text (byte 0x9c at offset 0)"),
    (b'{"step": 8,', "not JSON (Expecting property name enclosed in double quotes at line 1 column 12)"),
    (b"[1, 2]", "not a JSON object (a list)"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "epoch"}).encode(), "no 'epoch'"),
    (json.dumps({**GOOD, "step": "8"}).encode(), "'step' is \"8\", not a whole number of 0 or more"),
    (json.dumps({**GOOD, "micro": -1}).encode(), "'micro' is -1, not a whole number of 0 or more"),
    (json.dumps({**GOOD, "schedule": "cosine"}).encode(), "'schedule' is \"cosine\", not what a resume can use"),
])
def test_a_damaged_trainer_state_is_refused_before_anything_starts(tmp_path, state, said):
    from engine.runs import resume_steps
    from engine.worker.checkpoint import load_trainer_state

    run = make_run(tmp_path, state, earlier=True)
    path = run / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    line = f"{path}: {said}; the checkpoint is damaged: move checkpoint-8 out of {path.parent.parent} to resume " \
           "from checkpoint-4"
    with pytest.raises(UsageError) as e:
        resume_steps(run, TrainConfig(train_jsonl="x", max_steps=20), 1)
    assert str(e.value) == line
    with pytest.raises(UsageError) as e:  # the worker's own load says the same
        load_trainer_state(path.parent)
    assert str(e.value) == line


def test_voxtui_run_resume_with_a_corrupt_checkpoint_refuses_in_one_line(tmp_path, tiny_model):
    """(It used to start, say "runs detached", and the workers failed on a UnicodeDecodeError naming no file.)"""
    run = make_run(tmp_path, b"\x9c" + os.urandom(63), model=tiny_model)
    before = folder_digest(run)
    proc = voxtui("run", "--resume", run, "--skip_preflight")  # in the foreground: nothing is left running
    path = run / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"voxtui: error: {path}: not UTF-8 text (byte 0x") and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("the checkpoint is damaged: move checkpoint-8 out of "
                                        f"{path.parent.parent} to start the run over from step 0")
    assert folder_digest(run) == before  # nothing written, nothing started


def test_the_worker_names_a_checkpoint_file_it_cannot_load(tmp_path):
    """Saver.restore: a damaged adapter (or optimizer) file is named, not left to torch's or safetensors' words."""
    from engine.worker.saving import Saver

    run = make_run(tmp_path, json.dumps(GOOD).encode())
    saver = Saver(run, 2, SimpleNamespace(device="cpu", rank=0), out=None)
    with pytest.raises(UsageError) as e:
        saver.restore(None, None, None)
    path = run / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors"
    assert str(e.value).startswith(f"{path}: cannot be loaded (") and str(e.value).endswith(
        "the checkpoint is damaged: move checkpoint-8 out of " f"{path.parent.parent} to start the run over from step 0")
