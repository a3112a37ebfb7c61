"""The learning-rate schedule across a resume that changes the total (a larger --max_steps): the rate in
force at the checkpoint decays by a cosine to the floor at the new total, with no jump back up."""

import json
import math
import shutil

import pytest
import torch

from conftest import read_events, train_args, worker, write_jsonl

LR, FLOOR = 5e-3, 0.1


def lrs(run) -> dict[int, float]:
    """The last logged lr of each step (a resumed run logs some steps twice)."""
    return {e["step"]: e["lr"] for e in read_events(run) if e["type"] == "step"}


def final_lr(run, step: int) -> float:
    """The rate in force after the last step (what the next step would use), from the final checkpoint."""
    opt = torch.load(run / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt", weights_only=False)
    return opt["optimizer"]["param_groups"][0]["lr"]


def test_resume_with_a_larger_max_steps_continues_the_learning_rate(tmp_path, tiny_model):
    rows = [{"instruction": f"Say {i}.", "output": f"It is {i * 3}."} for i in range(16)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    common = {"lr": LR, "min_lr_ratio": FLOOR, "warmup_steps": 2, "save_steps": 3, "cache_dir": tmp_path / "c"}
    first = tmp_path / "first"
    proc = worker(train_args(tiny_model, first, train, max_steps=6, **common))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = lrs(first)
    assert sorted(before) == list(range(1, 7)) and final_lr(first, 6) == pytest.approx(FLOOR * LR)

    # a finished run of N steps, resumed to 2N: it stays at the floor (it was there already)
    done = tmp_path / "done"
    shutil.copytree(first, done)
    proc = worker(["--resume", str(done), "--max_steps", "12"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    running = [e for e in read_events(done) if e["type"] == "status" and e["state"] == "running"]
    # the console and the dashboard say where it goes on from (it was said in worker.log alone)
    assert running[-1]["message"] == f"resumed from checkpoint-6 at step 6, learning rate {FLOOR * LR:.3g}"
    assert not [e for e in read_events(done) if e["type"] == "alert" and e["kind"] == "learning_rate"]
    after = lrs(done)
    assert sorted(after) == list(range(1, 13))
    assert all(after[s] == pytest.approx(FLOOR * LR, rel=1e-9) for s in range(7, 13)), after
    assert final_lr(done, 12) == pytest.approx(FLOOR * LR)

    # resumed from the middle (checkpoint-3, as after a crash) to 12 steps: step 4 uses the rate the
    # first run used, then it only goes down, reaching the floor at step 12
    mid = tmp_path / "mid"
    shutil.copytree(first, mid)
    shutil.rmtree(mid / "checkpoints" / "checkpoint-6")
    proc = worker(["--resume", str(mid), "--max_steps", "12"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = lrs(mid)
    assert after[4] == pytest.approx(before[4], rel=1e-12)
    seq = [after[s] for s in range(3, 13)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(seq, seq[1:])), seq  # never up after the resume point
    assert after[5] > before[5]  # the longer run decays more slowly than the 6-step one did
    assert after[12] > FLOOR * LR and final_lr(mid, 12) == pytest.approx(FLOOR * LR)
    assert f"learning rate goes on from {before[4]:.3g}" in proc.stderr
    logs = [e["message"] for e in read_events(mid) if e["type"] == "log"]
    assert any("6 steps before, 12 now" in m and "decays by a cosine" in m for m in logs), logs
    # the schedule is the cosine it describes: from the rate at step 3 to the floor at step 12
    r3 = before[4] / LR
    for s in range(4, 13):
        want = FLOOR + (r3 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (s - 1 - 3) / 9))
        assert after[s] == pytest.approx(want * LR, rel=1e-9)

    # --lr given again on a resume (from checkpoint-3, the same 6 steps): the schedule's shape at the new peak
    # from the first resumed step on, as the run's config.toml now says (the restored optimizer held the old)
    faster = tmp_path / "faster"
    shutil.copytree(first, faster)
    shutil.rmtree(faster / "checkpoints" / "checkpoint-6")
    proc = worker(["--resume", str(faster), "--lr", str(2 * LR), "--weight_decay", "0.5"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = lrs(faster)
    assert all(after[s] == pytest.approx(2 * before[s], rel=1e-12) for s in range(4, 7)), (before, after)
    assert f"resume: --lr {2 * LR:g} (was {LR:g}" in proc.stderr and "--weight_decay 0.5 (was 0)" in proc.stderr

    # resumed again with the same total: the run's own (continued) schedule, not a new one
    state = json.loads((mid / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["schedule"] == {"total": 12, "start": 3, "start_ratio": pytest.approx(r3)}


def test_a_finished_run_extended_from_a_learning_rate_of_0_is_refused(tmp_path, tiny_model):
    """--min_lr_ratio 0 (the default): a completed run's rate has decayed to 0, and an extended run would go
    on from there, every step at 0 (the README's example once did). The worker alone refuses it as `voxtui run
    --resume` does, before anything is written (also when its new total, by epochs, needs the data planned); with --min_lr_ratio above 0 given too it trains, the rate
    rising from 0 to that floor."""
    from conftest import digest, voxtui

    rows = [{"instruction": f"Say {i}.", "output": f"It is {i * 3}."} for i in range(8)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    run = tmp_path / "run"
    proc = worker(train_args(tiny_model, run, train, max_steps=3, warmup_steps=1, cache_dir=tmp_path / "c"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p for p in run.rglob("*") if p.is_file())
    before = [digest(p) for p in files]
    said = (f"{run} finished all its 3 steps (completed); nothing to resume — its learning rate has decayed to 0 "
            "(--min_lr_ratio 0), so the 2 more steps of --max_steps 5 would change nothing: start a new run (or give "
            "--min_lr_ratio above 0 too)")
    proc = worker(["--resume", str(run), "--max_steps", "5"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"voxtui: error: {said}", proc.stderr
    proc = voxtui("run", "--resume", run, "--max_steps", "5", "--skip_preflight")
    assert proc.returncode == 2 and proc.stderr.strip() == f"voxtui: error: {said}", proc.stderr
    # extended by epochs: how many steps that gives needs the data planned, but every one of them would be at 0
    proc = worker(["--resume", str(run), "--max_steps", "0", "--epochs", "4"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"voxtui: error: {run} finished all its 3 steps (completed); nothing to resume — its learning rate has "
        "decayed to 0 (--min_lr_ratio 0), so more steps would change nothing: start a new run (or give it more "
        "steps and --min_lr_ratio above 0)"), proc.stderr
    assert sorted(p for p in run.rglob("*") if p.is_file()) == files and [digest(p) for p in files] == before

    proc = worker(["--resume", str(run), "--max_steps", "5", "--min_lr_ratio", "0.5"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = read_events(run)
    assert not [e for e in events if e["type"] == "alert" and e["kind"] == "learning_rate"]
    assert "the learning rate goes on from 0 (in force at step 3) and rises by a cosine to 0.0025 at step 5" in proc.stderr
    assert [e for e in events if e["type"] == "status" and e["state"] == "running"][-1]["message"] == (
        "resumed from checkpoint-3 at step 3, learning rate 0")
    assert lrs(run)[4] == 0.0 and 0 < lrs(run)[5] < 0.5 * LR and final_lr(run, 5) == pytest.approx(0.5 * LR)
