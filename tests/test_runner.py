"""`voxtui run` around preflight: a refused run leaves nothing behind; an existing folder keeps its mode."""

import json
import os
import stat

from conftest import train_args, voxtui, write_jsonl


def rows(n):
    return [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(n)]


def test_a_no_go_creates_no_run_folder_and_leaves_an_existing_one_as_it_was(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", rows(16))
    fresh = tmp_path / "runs" / "refused"
    args = train_args(tmp_path / "no-such-model", fresh, train) + ["--detach"]
    proc = voxtui("run", *args)
    assert proc.returncode == 1 and "no-go" in proc.stderr
    assert not fresh.exists()  # nothing to list as "new"
    assert "no runs" in voxtui("engine", "list", "--runs", tmp_path / "runs", check=True).stdout
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
