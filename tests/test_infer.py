"""``voxtui infer`` / ``score`` / ``export`` on a run the real worker trained."""

import json
import math
import shutil

import pytest
import torch

from conftest import read_events, train_args, voxtui, worker, write_jsonl

ROWS = [{"instruction": f"Which organ does condition {i} affect?", "output": f"Condition {i} affects organ {i % 5}."}
        for i in range(12)] + [{"instruction": f"증상 {i}번은 무엇인가요?", "output": f"증상 {i}번은 두통입니다."} for i in range(6)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("infer")
    train = write_jsonl(d / "train.jsonl", ROWS)
    out = d / "runs" / "trained"
    proc = worker(train_args(tiny_model, out, train, max_steps=6, save_steps=3, lr=1e-2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, write_jsonl(d / "val.jsonl", ROWS[:5] + ROWS[-3:])


def generations(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_greedy_is_deterministic_and_resumes(run, tmp_path):
    out, val = run
    a = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "a", "--json", tmp_path / "a.json")
    assert a.returncode == 0, a.stderr
    m = json.loads((tmp_path / "a.json").read_text())
    assert m["checkpoint"] == "lora_final" and m["rows"] == 8
    for k in ("rougeL", "distinct_1", "distinct_2", "bleu", "perplexity", "exact_match", "length_ratio"):
        assert isinstance(m[k], float) and not math.isnan(m[k])
    assert m["params"]["data_sha256"] and m["params"]["temperature"] == 0.0
    assert json.loads((out / "infer" / "a" / "metrics.json").read_text())["rougeL"] == m["rougeL"]
    first = generations(out / "infer" / "a" / "generations.jsonl")
    per_row = generations(out / "infer" / "a" / "per_row.jsonl")
    assert len(per_row) == 8 and {"rougeL", "distinct_1", "distinct_2", "exact_match", "length_ratio"} <= set(per_row[0])
    assert sum(r["rougeL"] for r in per_row) / 8 == pytest.approx(m["rougeL"])
    assert sorted(r["index"] for r in first) == list(range(8))
    # greedy again: identical generations
    assert voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "b").returncode == 0
    key = lambda rows: sorted((r["index"], r["prediction"]) for r in rows)  # noqa: E731
    assert key(generations(out / "infer" / "b" / "generations.jsonl")) == key(first)
    # interrupted: keep 3 rows and a torn line, then run again: it resumes, and the result is the same
    path = out / "infer" / "a" / "generations.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    again = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "a", "--json", "-")
    assert again.returncode == 0, again.stderr
    assert key(generations(path)) == key(first) and len(generations(path)) == 8
    assert json.loads(again.stdout)["rougeL"] == m["rougeL"]


def test_incomplete_checkpoints_are_never_used(run, tmp_path):
    from engine.infer import pick_checkpoint

    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "lora_final")
    assert pick_checkpoint(copy).name == "checkpoint-6"
    half = copy / "checkpoints" / "checkpoint-9"
    shutil.copytree(copy / "checkpoints" / "checkpoint-6", half)
    (half / "trainer_state.json").unlink()  # a save that died before its last file
    (copy / "checkpoints" / ".tmp-checkpoint-12-77").mkdir()
    assert pick_checkpoint(copy).name == "checkpoint-6"
    assert pick_checkpoint(copy, 3).name == "checkpoint-3"
    bad = voxtui("infer", "--run", copy, "--data", run[1], "--checkpoint", "9")
    assert bad.returncode == 2 and "no complete checkpoint-9" in bad.stderr


def test_our_loader_equals_peft_and_perplexity_is_direct(run, tiny_model):
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    from engine.formatting import load_format
    from engine.infer import load_for_inference
    from engine.metrics import perplexity
    from engine.rows import read_examples

    out, val = run
    ours, _ = load_for_inference(out, out / "lora_final", torch.device("cpu"))
    theirs = PeftModel.from_pretrained(VoxtralForConditionalGeneration.from_pretrained(tiny_model), out / "lora_final").eval()
    ids = torch.tensor([[1, 3, 1500, 2500, 3500, 4]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    fmt = load_format(tiny_model)
    examples = [ex for _, ex in read_examples(val)]
    got = perplexity(ours, fmt, examples, torch.device("cpu"), batch_size=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for (p, t) in fmt.encode(examples):
            x = torch.tensor([p + t])
            logits = theirs(input_ids=x).logits[0, len(p) - 1:-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, len(p):], reduction="sum").item()
            n += len(t)
    assert got["tokens"] == n and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_export_merged_matches_base_plus_adapter(run, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    out, _ = run
    proc = voxtui("export", "--run", out, "--merge", tmp_path / "merged", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    merged = VoxtralForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "tekken.json").is_file() and hasattr(merged.model, "audio_tower")
    ref = PeftModel.from_pretrained(VoxtralForConditionalGeneration.from_pretrained(tiny_model), out / "lora_final").eval()
    ids = torch.tensor([[1, 3, 1500, 2500, 3500, 4, 7000]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_score_command(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prediction": "고혈압 위험", "output": "고혈압은 위험"},
                                           {"prediction": "the cat", "output": "the cat"}])
    proc = voxtui("score", f, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["rougeL"] == pytest.approx((10 / 11 + 1.0) / 2) and m["exact_match"] == 0.5 and "perplexity" not in m
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prediction": "x", "output": "y"}, {"prediction": "x"}])
    proc = voxtui("score", bad)
    assert proc.returncode == 2 and ":2: missing_field: output" in proc.stderr


def test_run_inference_from_the_engine(tmp_path, tiny_model, run):
    import time

    from conftest import start_detached
    from engine.client import EngineClient
    from engine.protocol import RunInference, Stop

    _, val = run
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    r = start_detached(tiny_model, tmp_path / "runs", "with-infer", train, nproc=1, max_steps=100000, save_steps=2,
                       save_total_limit=1000)
    deadline = time.time() + 120
    while not (r / "checkpoints" / "checkpoint-2").is_dir():
        assert time.time() < deadline
        time.sleep(0.2)
    client = EngineClient(r)
    client.history()
    assert client.send(RunInference(checkpoint=99, data=str(val))).status == "error"
    reply = client.send(RunInference(checkpoint=2, data=str(val)))
    assert reply.status == "ok", reply.reason
    states = []
    for ev in client.events(timeout=120):
        if ev.type == "inference":
            states.append(ev.state)
            if ev.state in ("finished", "failed"):
                break
    assert states[0] == "started" and states[-1] == "finished" and "progress" in states
    done = next(e for e in read_events(r) if e["type"] == "inference" and e["state"] == "finished")
    assert set(done["metrics"]) >= {"rougeL", "bleu", "distinct_1", "distinct_2", "perplexity"}
    assert (r / "infer" / "checkpoint-2-val" / "metrics.json").is_file()
    assert client.send(Stop()).status == "ok"
