"""A preview whose score cannot be computed (rouge-score missing on a GPU image, say) never stops the run."""

from conftest import read_events, train_args, worker, write_jsonl


def test_previews_without_rouge_score_keep_training(tmp_path, tiny_model):
    broken = tmp_path / "site" / "rouge_score"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('rouge_score is not installed here')\n")
    rows = [{"instruction": f"Name {i}?", "output": f"Name {i} is fine."} for i in range(16)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    proc = worker(train_args(tiny_model, tmp_path / "run", train, max_steps=4, preview_steps=2, preview_file=train,
                             preview_count=2, max_new_tokens=3),
                  env={"PYTHONPATH": f"{tmp_path / 'site'}:{__import__('conftest').ROOT}"})
    assert proc.returncode == 0, proc.stderr
    events = read_events(tmp_path / "run")
    previews = [e for e in events if e["type"] == "preview"]
    assert previews and all(e["rougeL"] is None for e in previews)
    assert sum(e["type"] == "log" and "without ROUGE-L" in e["message"] for e in events) == 1
    assert events[-1]["state"] == "finished" and max(e["step"] for e in events if e["type"] == "step") == 4
