"""A resume whose training file was edited since its checkpoint says so (an alert), as a change of ranks is
said: the data position continues in the new rows' plan, which is not an exact resume."""

import json

from conftest import read_events, train_args, worker, write_jsonl


def rows(n):
    return [{"instruction": f"question {i}?", "output": f"answer number {i}"} for i in range(n)]


def test_a_resume_after_the_training_rows_changed_raises_an_alert(tmp_path, tiny_model):
    from engine.worker.batching import tokenize
    from engine.worker.trainer import rows_fingerprint

    train = write_jsonl(tmp_path / "t.jsonl", rows(24))
    out = tmp_path / "run"
    # --min_lr_ratio above 0: a finished run extended trains on at that floor (at 0 its resume is refused)
    proc = worker(train_args(tiny_model, out, train, max_steps=3, save_steps=3, min_lr_ratio=0.1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    saved, cfg = state["train_rows"], state["config"]
    assert saved["rows"] == 24 and saved["tokens"] > 0 and len(saved["digest"]) == 32
    from engine.formatting import load_format

    fmt = load_format(str(tiny_model))
    again = rows_fingerprint(tokenize(str(train), fmt, cfg["max_len"], cfg["long"], None))
    assert again == saved  # the same rows, tokenised again: the same fingerprint (a plain resume says nothing)
    write_jsonl(train, rows(10))  # cut while the run was stopped
    proc = worker(["--resume", str(out), "--max_steps", "5"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = [e for e in read_events(out) if e["type"] == "alert" and e["kind"] == "data_changed"]
    assert len(alerts) == 1 and alerts[0]["level"] == "warning", alerts
    said = alerts[0]["message"]
    assert "differ from those checkpoint-3 was trained on (24 rows" in said and "10 rows" in said, said
    assert "not an exact resume" in said
