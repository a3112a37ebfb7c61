"""Preflight tokenises each data file once, with the run's own tokenizer, into the token cache the worker
then reads; its length check counts the rows over --max_len as the worker does."""

import json
import shutil

from conftest import read_events, train_args, worker, write_jsonl
from engine.formatting import ChatFormat, load_format


def rows(n, start=0):
    return [{"instruction": f"Name the code word {i}.", "output": "It is " + "very " * (i % 7) + f"{i * 3}."}
            for i in range(start, start + n)]


def test_preflight_tokenises_once_with_the_models_tokenizer_into_the_workers_cache(tmp_path, tiny_model, monkeypatch):
    from engine.cli import build_parser
    from engine.config import resolve
    from engine.preflight import preflight
    from engine.worker.batching import cache_key

    # the model's own tokenizer file: the same tokens as the bundled Tekken, but another file (so another
    # cache key: tokenising with the bundled one instead would be seen)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tekken = json.loads((model / "tekken.json").read_text())
    (model / "tekken.json").write_text(json.dumps(tekken, indent=1))
    assert load_format(model).fingerprint != load_format().fingerprint

    long_prompt = {"instruction": "Repeat: " + "word " * 30, "output": "No."}  # dropped even under truncate
    train = write_jsonl(tmp_path / "train.jsonl", rows(30) + [long_prompt])
    val = write_jsonl(tmp_path / "val.jsonl", rows(6, 100))
    cache = tmp_path / "cache"
    encoded, measured = [], []
    encode, lengths = ChatFormat.encode, ChatFormat.lengths
    monkeypatch.setattr(ChatFormat, "encode", lambda self, exs: encoded.append((self.path, len(exs))) or encode(self, exs))
    monkeypatch.setattr(ChatFormat, "lengths", lambda self, exs: measured.append(len(exs)) or lengths(self, exs))
    argv = ["preflight", "--model_id", str(model), "--train_jsonl", str(train), "--val_jsonl", str(val),
            "--quant", "none", "--no-bf16", "--max_len", "20", "--cache_dir", str(cache)]
    report = preflight(resolve(build_parser().parse_args(argv)))
    monkeypatch.undo()

    assert report["verdict"] in ("go", "warn"), report
    assert sum(n for _, n in encoded) == 37 and not measured  # every row once, and no second measuring pass
    assert {p for p, _ in encoded} == {model / "tekken.json"}
    fmt = load_format(model)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{cache_key(str(f), fmt, 20, 'truncate')}.npz" for f in (train, val))
    # the length line counts what the worker truncates and drops; the plan is the worker's
    length = next(c for c in report["checks"] if c["name"] == "train-length")
    plan = next(c for c in report["checks"] if c["name"] == "plan")["plan"]
    over = int(length["message"].split(" row(s) over")[0].rsplit(" ", 1)[1])
    assert over == plan["truncated"] + plan["dropped"] and plan["truncated"] > 0 and plan["dropped"] == 1

    proc = worker(train_args(model, tmp_path / "run", train, val, max_len=20, max_steps=1, cache_dir=cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = next(e for e in read_events(tmp_path / "run") if e["type"] == "run_info")
    assert info["cache_hit"] and info["truncated_long"] == plan["truncated"] and info["dropped_long"] == plan["dropped"]
    assert len(list(cache.glob("*.npz"))) == 2  # the worker wrote no other
