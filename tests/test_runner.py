"""`voxtui run` around preflight: a refused run leaves nothing behind; an existing folder keeps its mode."""

import json
import os
import stat

from conftest import read_events, start_detached, train_args, voxtui, wait_for, write_jsonl


def rows(n):
    return [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(n)]


def test_a_no_go_creates_no_run_folder_and_leaves_an_existing_one_as_it_was(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", rows(16))
    fresh = tmp_path / "runs" / "refused"
    args = train_args(tmp_path / "no-such-model", fresh, train) + ["--detach"]
    proc = voxtui("run", *args)
    assert proc.returncode == 1 and "no-go" in proc.stderr
    assert "launch:" not in proc.stderr  # no command naming a config.toml that was not made
    assert not fresh.exists()  # nothing to list as "new"
    assert not (tmp_path / "runs").exists()  # not even the folder above it (so `--runs` it would be refused)
    assert "no runs" in voxtui("engine", "list", cwd=tmp_path, check=True).stdout  # the default runs/: none
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    (mine / "notes.txt").write_text("keep me")
    proc = voxtui("run", *train_args(tmp_path / "no-such-model", mine, train), "--detach")
    assert proc.returncode == 1
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755 and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_go_into_an_existing_folder_keeps_its_mode_and_says_so(tmp_path, tiny_model):
    """(A folder voxtui makes is 0700: tests/test_engine.py checks it.)"""
    train = write_jsonl(tmp_path / "t.jsonl", rows(16))
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    proc = voxtui("run", *train_args(tiny_model, mine, train, max_steps=1, nproc=1))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755 and "open to other users" in proc.stderr
    assert stat.S_IMODE((mine / "engine.json").stat().st_mode) == 0o600
    status = json.loads(voxtui("engine", "status", mine, "--json", "-", check=True).stdout)
    assert status["state"] == "finished" and status["outcome"] == "completed"


def test_stop_is_stopped_the_engine_leaves_at_once_and_resume_follows(tmp_path, tiny_model):
    """A graceful stop is listed as stopped (not finished); the engine leaves within seconds of the run's
    end, and a resume right after is accepted (it waits for an engine that is only finishing)."""
    train = write_jsonl(tmp_path / "t.jsonl", rows(32))
    run = start_detached(tiny_model, tmp_path / "runs", "s", train, nproc=1, max_steps=100000, save_steps=0)
    wait_for(lambda: any(e["type"] == "step" for e in read_events(run)))
    assert voxtui("engine", "stop", run).returncode == 0
    status = json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)
    assert status["state"] == "stopped" and status["outcome"] == "stopped"
    step = status["step"]
    # engine.log: what the engine printed, detached as in the foreground (the last line just after the event)
    stopped = f"[stopped] saved at step {step} (stopped on request)"
    log = wait_for(lambda: (lines := (run / "engine.log").read_text().splitlines()) and lines[-1] == stopped and lines)
    assert log[0].startswith("[starting] engine ")
    # --max_steps at the steps done leaves nothing to train: refused, saying so (its schedule had not run out)
    refused = voxtui("run", "--resume", run, "--max_steps", str(step), "--detach")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"voxtui: error: {run} has trained {step} of its 100000 steps (stopped), and --max_steps {step} leaves no "
        f"step to train beyond those; nothing to resume — give it more steps: voxtui run --resume {run} "
        f"--max_steps N (N above {step}), or leave out --max_steps to train on to its 100000"), refused.stderr
    assert "decayed" not in refused.stderr
    proc = voxtui("run", "--resume", run, "--max_steps", str(step + 2), "--detach")
    assert proc.returncode == 0, proc.stderr
    # the resume's preflight report launches the resume (the worker refuses the new run's --config there)
    assert json.loads((run / "preflight.json").read_text())["command"] == (
        f"torchrun --standalone --nproc_per_node 1 -m engine.train --resume {run}")
    wait_for(lambda: read_events(run)[-1].get("outcome") == "completed", timeout=120)
    # at once; a completed run's rate has decayed to 0 (--min_lr_ratio 0): it trains on given a floor above 0
    proc = voxtui("run", "--resume", run, "--max_steps", str(step + 3), "--min_lr_ratio", "0.1", "--detach",
                  "--skip_preflight")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: read_events(run)[-1].get("outcome") == "completed"
             and max(e["step"] for e in read_events(run) if e["type"] == "step") == step + 3, timeout=120)
    wait_for(lambda: "stopped" in json.loads((run / "engine.json").read_text()), timeout=30)
    end = read_events(run)[-1]["time"]
    assert json.loads((run / "engine.json").read_text())["stopped"] - end < 5.0  # no lingering


def test_a_worker_that_refuses_its_plan_is_failed_with_its_reason_and_no_rank_death(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", rows(6))
    run = tmp_path / "runs" / "refused"
    proc = voxtui("run", *train_args(tiny_model, run, train, grad_accum=64), "--nproc", "2", "--skip_preflight",
                  "--detach")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: (run / "events.jsonl").exists() and read_events(run)[-1].get("state") == "failed", timeout=120)
    wait_for(lambda: "stopped" in json.loads((run / "engine.json").read_text()), timeout=30)
    events = read_events(run)
    assert not [e for e in events if e["type"] == "alert" and e["kind"] == "rank_died"]
    assert "--grad_accum" in events[-1]["message"] or any("--grad_accum" in e.get("message", "") for e in events)


def test_a_new_runs_config_names_its_files_by_absolute_path(tmp_path, monkeypatch, tiny_model):
    """config.toml holds the data files, the cache and a local model folder as absolute paths, so
    `voxtui infer` and `--resume` work from any folder; a hub id stays as it is."""
    from engine.config import TrainConfig
    from engine.daemon.launch import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    local = os.path.relpath(tiny_model, tmp_path)
    cfg = TrainConfig(model_id=local, train_jsonl="data/t.jsonl", val_jsonl="data/t.jsonl", cache_dir="c")
    absolute_paths(cfg)
    assert cfg.model_id == str(tiny_model) and cfg.train_jsonl == str(tmp_path / "data" / "t.jsonl")
    assert cfg.val_jsonl == cfg.train_jsonl and cfg.cache_dir == str(tmp_path / "c") and cfg.preview_file == ""
    hub = TrainConfig(model_id="mistralai/Voxtral-Mini-3B-2507", train_jsonl="data/t.jsonl")
    absolute_paths(hub)
    assert hub.model_id == "mistralai/Voxtral-Mini-3B-2507"
