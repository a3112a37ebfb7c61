"""``voxtui infer`` / ``score`` / ``export`` on a run the real worker trained."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import digest, read_events, train_args, voxtui, worker, write_jsonl

ROWS = [{"instruction": f"Which organ does condition {i} affect?", "output": f"Condition {i} affects organ {i % 5}."}
        for i in range(12)] + [{"instruction": f"증상 {i}번은 무엇인가요?", "output": f"증상 {i}번은 두통입니다."} for i in range(6)]


@pytest.fixture(scope="session")  # not module: the slowest-first order interleaves the modules,
# and a module fixture is built again each time its module comes back (5 trained runs instead of 1)
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
    # score reads what its --help names: generations.jsonl scores as infer did; per_row.jsonl holds no text
    assert "generations.jsonl" in voxtui("score", "--help").stdout
    scored = voxtui("score", out / "infer" / "a" / "generations.jsonl", "--json", "-")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["rougeL"] == pytest.approx(m["rougeL"])
    assert voxtui("score", out / "infer" / "a" / "per_row.jsonl").returncode == 2
    key = lambda rows: sorted((r["index"], r["prediction"]) for r in rows)  # noqa: E731
    # greedy again, three rows at a time, refilled as rows finish (continuous batching): each row's tokens the same
    c = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "c", "--batch_size", "3")
    assert c.returncode == 0, c.stderr
    assert key(generations(out / "infer" / "c" / "generations.jsonl")) == key(first)
    assert json.loads((out / "infer" / "c" / "params.json").read_text())["batch_size"] == 3
    assert json.loads((out / "infer" / "a" / "params.json").read_text())["batch_size"] == 8  # the CPU's default
    # interrupted: keep 3 rows and a torn line, then run again: it resumes, and the result is the same
    path = out / "infer" / "a" / "generations.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    again = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "a", "--json", "-")
    assert again.returncode == 0, again.stderr
    assert key(generations(path)) == key(first) and len(generations(path)) == 8
    assert json.loads(again.stdout)["rougeL"] == m["rougeL"]


def test_nproc_splits_the_rows_and_merges_one_result(run, tmp_path):
    """--nproc 2 (two CPU processes here, one GPU each on a GPU machine): the same greedy generations and
    metrics as one process, one generations.jsonl, no shard files left; a stopped sharded job's rows are
    folded in by the next run; a device that is one GPU is refused."""
    out, val = run
    key = lambda rows: sorted((r["index"], r["prediction"]) for r in rows)  # noqa: E731
    one = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "n1", "--json", tmp_path / "1.json")
    two = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "n2", "--nproc", "2",
                 "--json", tmp_path / "2.json")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    first = generations(out / "infer" / "n1" / "generations.jsonl")
    # the same file byte for byte: rows in the data file's order whatever --nproc
    assert (out / "infer" / "n2" / "generations.jsonl").read_bytes() == (out / "infer" / "n1" / "generations.jsonl").read_bytes()
    assert [r["index"] for r in first] == list(range(len(first)))
    assert not (out / "infer" / "n2" / "shards").exists()
    m1, m2 = (json.loads((tmp_path / f"{k}.json").read_text()) for k in (1, 2))
    assert m2["rougeL"] == m1["rougeL"] and m2["tokens"] == m1["tokens"]
    assert m2["perplexity"] == pytest.approx(m1["perplexity"], rel=1e-5)
    # stopped midway: two rows in generations.jsonl, three in a shard file (and a torn line): the next run
    # (any --nproc) folds them in and generates the rest
    job = out / "infer" / "n3"
    job.mkdir()
    shutil.copyfile(out / "infer" / "n2" / "params.json", job / "params.json")
    params = json.loads((job / "params.json").read_text())
    assert "nproc" not in params  # greedy: the same job whatever --nproc
    rows = generations(out / "infer" / "n2" / "generations.jsonl")
    (job / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (job / "shards").mkdir()
    (job / "shards" / "0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:5]) + '{"index": 7, "pre')
    again = voxtui("infer", "--run", out, "--data", val, "--max_new_tokens", "6", "--name", "n3")
    assert again.returncode == 0, again.stderr
    assert key(generations(job / "generations.jsonl")) == key(first) and not (job / "shards").exists()
    bad = voxtui("infer", "--run", out, "--data", val, "--nproc", "2", "--device", "cuda:0")
    assert bad.returncode == 2 and "--nproc 2" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_incomplete_checkpoints_are_never_used(run, tmp_path):
    from engine.eval.infer import pick_checkpoint

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
    seed = tmp_path / "seed"  # the seed's layout: checkpoint-N straight in --output_dir
    shutil.copytree(copy / "checkpoints" / "checkpoint-3", seed / "checkpoint-3")
    shutil.copytree(half, seed / "checkpoint-9")
    assert pick_checkpoint(seed, 3) == seed / "checkpoint-3" and pick_checkpoint(seed) == seed / "checkpoint-3"


def test_our_loader_equals_peft_and_perplexity_is_direct(run, tiny_model):
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    from engine.eval.infer import load_for_inference
    from engine.eval.metrics import perplexity
    from engine.formatting import load_format
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
    weights = {p.name: digest(p) for p in tiny_model.iterdir() if p.is_file()}
    proc = voxtui("export", "--run", out, "--merge", tmp_path / "merged", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    # the last line names the output folder (the base model is read, never written), stdout the folder alone
    assert proc.stdout == f"{tmp_path / 'merged'}\n"
    last = proc.stderr.splitlines()[-1]
    assert last == f"merged {out / 'lora_final'} onto {tiny_model} (fp32), written to {tmp_path / 'merged'}"
    assert {p.name: digest(p) for p in tiny_model.iterdir() if p.is_file()} == weights
    # a CPU export of a quant=none run says nothing of bitsandbytes' optional 4-bit kernels
    assert "gemm_4bit" not in proc.stderr and "kernels" not in proc.stderr, proc.stderr
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
    assert m["bad_rows"] == []


def test_score_reports_bad_rows_and_scores_the_rest(tmp_path):
    """Each bad row is named on stderr (line and why) and in the JSON; the good rows are scored."""
    rows = [{"prediction": "the cat", "output": "the cat"},      # 1
            {"prediction": "x"},                                  # 2 missing output
            b"{oops",                                             # 3 not JSON
            b"",                                                  # 4 blank: not a row
            [1, 2],                                               # 5 not an object
            {"prediction": 3, "output": "y"},                     # 6 prediction not a string
            b'{"prediction": "caf\xe9", "output": "x"}',         # 7 not UTF-8
            {"prediction": None, "output": "y"},                  # 8 null prediction
            b"[" * 5000 + b"]" * 5000,                            # 9 nested too deeply
            {"prediction": "a dog", "output": "the dog", "extra": {"k": [1]}}]  # 10
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    before = digest(f)
    proc = voxtui("score", f, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["rows"] == 2 and m["exact_match"] == 0.5
    assert [(b["line"], b["reason"]) for b in m["bad_rows"]] == [
        (2, "missing_field"), (3, "invalid_json"), (5, "not_object"), (6, "wrong_type"), (7, "bad_encoding"),
        (8, "missing_field"), (9, "invalid_json")]
    assert all(b["detail"] for b in m["bad_rows"])
    err = proc.stderr.splitlines()
    assert err[0] == f"{f}:2: missing_field: output (a string) is needed" and len(err) == 7
    assert f"{f}:6: wrong_type: prediction is a number, not a string" in err and "Traceback" not in proc.stderr
    text = voxtui("score", f)
    assert text.returncode == 0 and "skipped      7 bad rows (listed on stderr)" in text.stdout
    assert digest(f) == before


def test_score_without_a_scorable_row_exits_2(tmp_path):
    for name, raw in (("empty.jsonl", b""), ("blank.jsonl", b"\n \r\n"),
                      ("bad.jsonl", b'{"prediction": "x"}\nnope\n')):
        f = write_jsonl(tmp_path / name, [], raw=raw)
        proc = voxtui("score", f, "--json", tmp_path / "m.json")
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("voxtui: error: "), proc.stderr
        assert f.read_bytes() == raw and not (tmp_path / "m.json").exists()
    assert "2 bad rows; line 1: missing_field" in proc.stderr
    f = write_jsonl(tmp_path / "ok.jsonl", [{"prediction": "a", "output": "a"}])
    same = voxtui("score", f, "--json", f)
    assert same.returncode == 2 and "would overwrite the input" in same.stderr
    assert json.loads(f.read_text()) == {"prediction": "a", "output": "a"}



def test_score_of_one_empty_pair_says_one_row_and_a_perfect_match(tmp_path):
    """An empty prediction of an empty reference: exact match 1.0 and ROUGE-L 1.0 alike (it said 0.0), and the
    counts read "1 row", "1 bad row", "1 more bad row" (they said "1 rows")."""
    f = write_jsonl(tmp_path / "empty.jsonl", [{"prediction": "", "output": ""}, {"prediction": "x"}])
    m = json.loads(voxtui("score", f, "--json", "-", check=True).stdout)
    assert (m["rows"], m["exact_match"], m["rougeL"], m["length_ratio"]) == (1, 1.0, 1.0, 1.0)
    text = voxtui("score", f, check=True).stdout
    assert text.splitlines()[0] == "predictions: 1 row" and "skipped      1 bad row (listed on stderr)" in text
    assert "ROUGE-L      1.0000" in text and "exact match  1.0000" in text
    many = write_jsonl(tmp_path / "many.jsonl", [{"prediction": "a", "output": "a"}] + [{"x": 1}] * 21)
    proc = voxtui("score", many, check=True)
    assert proc.stderr.splitlines()[-1] == f"{many}: … and 1 more bad row (--json lists them all)", proc.stderr
    assert "skipped      21 bad rows" in proc.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])
    proc = voxtui("score", bad)
    assert proc.returncode == 2 and ": no row to score: 1 bad row; line 1: missing_field" in proc.stderr

CHECK = """
import contextlib, io, json, sys
from engine.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out.append([rc, err.getvalue()])
print(json.dumps({"results": out, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def test_infer_checks_every_argument_before_importing_torch(run, tmp_path):
    """A bad call of `voxtui infer` (or export) exits 2 with one line, before torch is ever imported."""
    import subprocess
    import sys

    from conftest import ROOT

    out, val = run
    broken = write_jsonl(tmp_path / "broken.jsonl", [ROWS[0], b"{oops", [1], ROWS[1]])
    empty = write_jsonl(tmp_path / "empty.jsonl", [], raw=b"\n\n")
    bad_cfg = tmp_path / "bad-config"
    shutil.copytree(out, bad_cfg)
    (bad_cfg / "config.toml").write_text("lr = [\n")
    r, v = str(out), str(val)
    cases = [
        ([], "name the run: --run RUN"),
        (["--run", str(tmp_path / "nope"), "--data", v], "no such run"),
        (["--output_dir", str(tmp_path / "nope"), "--data", v], "no such folder"),
        (["--run", r], "--data FILE is required"),
        (["--run", r, "--data", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--run", r, "--data", str(tmp_path)], "is a folder"),
        (["--run", r, "--data", str(broken)], f"{broken}:2: invalid_json"),
        (["--run", r, "--data", str(empty)], "no rows"),
        (["--run", r, "--data", v, "--checkpoint", "9"], "no complete checkpoint-9 (complete: 3, 6)"),
        (["--run", r, "--data", v, "--checkpoint", "-1"], "--checkpoint must be a step"),
        (["--run", r, "--data", v, "--checkpoint", "3", "--all-checkpoints"], "give one"),
        (["--run", r, "--data", v, "--temperature", "2.5"], "--temperature must be in [0, 2] (got 2.5)"),
        (["--run", r, "--data", v, "--temperature", "-0.1"], "--temperature must be in [0, 2]"),
        (["--run", r, "--data", v, "--temperature", "nan"], "--temperature must be in [0, 2]"),
        (["--run", r, "--data", v, "--top_p", "0"], "--top_p must be in (0, 1] (got 0.0)"),
        (["--run", r, "--data", v, "--top_p", "1.01"], "--top_p must be in (0, 1]"),
        (["--run", r, "--data", v, "--device", "gpu0"], "--device must be"),
        (["--run", r, "--data", v, "--name", "../elsewhere"], "--name must be a plain folder name"),
        (["--run", r, "--data", v, "--json", v], "would overwrite --data"),
        (["--run", str(bad_cfg), "--data", v], "config.toml"),
        (["--run", r, "--data", v, "--batch_size", "0"], "--batch_size: expected a number above 0"),
        (["--run", r, "--data", v, "--max_new_tokens", "-5"], "--max_new_tokens: expected a number above 0"),
        (["--run", r, "--data", v, "--batch_size", "abc"], "--batch_size: expected a whole number, got 'abc'"),
        (["--run", r, "--data", v, "--checkpoint", "latest"], "expected a step N or checkpoint-N, got 'latest'"),
        (["--run", r, "--data", v, "--checkpoint", "checkpoint-9"], "no complete checkpoint-9"),
        # an output that cannot be written is refused before the job, not after it
        (["--run", r, "--data", v, "--json", str(tmp_path)], "is a folder; name a file"),
        (["--run", r, "--data", v, "--json", f"{v}/x.json"], "is a file, not a folder"),
    ]
    export = [(["export", "--run", r, "--checkpoint", "9", "--merge", str(tmp_path / "m")], "no complete checkpoint-9"),
              (["export", "--run", r, "--merge", str(val)], "exists and is not an empty folder")]
    argv = [["infer", *a] for a, _ in cases] + [a for a, _ in export]
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(argv)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for (args, want), (rc, err) in zip(cases + export, got["results"]):
        assert rc == 2, (args, rc, err)
        assert want in err.splitlines()[-1], (args, err)
        assert err.count("\n") == 1, (args, err)  # one line, argparse's own errors too
    assert not got["torch"] and not got["transformers"]
    assert not (out / "infer" / "elsewhere").exists() and not (out.parent / "elsewhere").exists()
    # and through the real command line
    bare = voxtui("infer")
    assert bare.returncode == 2 and bare.stderr == "voxtui: error: name the run: --run RUN (or the seed's --output_dir DIR)\n"


def test_infer_started_by_the_engine_reports_a_bad_call(tmp_path):
    """With --events (the engine started it), a bad call also arrives as an inference event, state failed."""
    import zmq

    from engine.protocol import event_decoder

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    try:
        proc = voxtui("infer", "--run", tmp_path / "gone", "--data", tmp_path / "v.jsonl", "--events",
                      f"tcp://127.0.0.1:{port}")
        assert proc.returncode == 2 and "no such run" in proc.stderr
        assert pull.poll(10_000), "no event"
        ev = event_decoder.decode(pull.recv())
        assert ev.type == "inference" and ev.state == "failed" and "no such run" in ev.message
    finally:
        pull.close(linger=0)


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
    # the same job asked again while it runs (a second dashboard; i then a): refused, not started twice
    again = client.send(RunInference(checkpoint=2, data=str(val)))
    assert again.status == "error" and again.reason == (
        f"inference on checkpoint-2 with {val} is running already (pid {reply.reason.split('pid ')[1]}"), again
    # another checkpoint's job meanwhile (the dashboard's "Infer all" asks for each): it waits its turn, one model
    # copy at a time beside training (they all started at once)
    while not (r / "checkpoints" / "checkpoint-4").is_dir():
        assert time.time() < deadline
        time.sleep(0.2)
    queued = client.send(RunInference(checkpoint=4, data=str(val)))
    assert queued.status == "ok" and "inference on checkpoint-4 waits its turn" in queued.reason, queued
    twice = client.send(RunInference(checkpoint=4, data=str(val)))
    assert twice.status == "error" and "is waiting its turn already" in twice.reason, twice
    states = []
    for ev in client.events(timeout=120):
        if ev.type == "inference":
            states.append((ev.checkpoint, ev.state))
            if ev.checkpoint == "checkpoint-4" and ev.state in ("finished", "failed"):
                break
    two = [st for ck, st in states if ck == "checkpoint-2"]
    assert two[0] == "started" and two[-1] == "finished" and "progress" in two
    assert states.index(("checkpoint-4", "started")) > states.index(("checkpoint-2", "finished")), states
    assert states[-1] == ("checkpoint-4", "finished"), states
    done = next(e for e in read_events(r) if e["type"] == "inference" and e["state"] == "finished")
    assert set(done["metrics"]) >= {"rougeL", "bleu", "distinct_1", "distinct_2", "perplexity"}
    assert (r / "infer" / "checkpoint-2-val" / "metrics.json").is_file()
    assert client.send(Stop()).status == "ok"


def test_a_job_of_other_settings_is_never_replaced(tmp_path, capsys):
    """infer/<name> holding results of other settings is kept: the default name moves on to <name>-2, -3, …
    (a folder holding this very job is resumed, an empty one reused); a --name given is refused in one line
    that says what differs and names --name."""
    from engine.eval.infer import job_name
    from engine.util import UsageError

    infer_dir = tmp_path / "infer"
    params = {"checkpoint": "checkpoint-3", "data": "v.jsonl", "data_sha256": "a" * 64, "max_new_tokens": 128,
              "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 8}

    def job(name, results=True, **changes):
        d = infer_dir / name
        d.mkdir(parents=True)
        (d / "params.json").write_text(json.dumps({**params, **changes}))
        (d / "generations.jsonl").write_text('{"index": 0, "prediction": "x"}\n' if results else "")
        if results:
            (d / "metrics.json").write_text("{}")

    assert job_name(infer_dir, None, "checkpoint-3-v", params) == "checkpoint-3-v"  # nothing there
    job("checkpoint-3-v", max_new_tokens=16)
    assert job_name(infer_dir, None, "checkpoint-3-v", params) == "checkpoint-3-v-2"
    said = capsys.readouterr().err
    assert "checkpoint-3-v holds a job with other settings (max_new_tokens 16, not 128): kept" in said
    job("checkpoint-3-v-2")  # this very job, done before: resumed there, not a third folder
    assert job_name(infer_dir, None, "checkpoint-3-v", params) == "checkpoint-3-v-2"
    job("empty", results=False, seed=5)  # other settings but no results: nothing to lose
    assert job_name(infer_dir, "empty", "x", params) == "empty"
    with pytest.raises(UsageError) as e:
        job_name(infer_dir, "checkpoint-3-v", "x", params)
    assert "holds a job with other settings (max_new_tokens 16, not 128): give another --name" in str(e.value)
    job("changed", data_sha256="b" * 64)
    with pytest.raises(UsageError, match=r"\(the data file has changed since\)"):
        job_name(infer_dir, "changed", "x", params)


def test_the_dashboards_infer_keeps_an_earlier_cli_job(run, tmp_path):
    """`voxtui infer --checkpoint 3 --max_new_tokens 4` (CLI, the data file by a relative path), then the
    dashboard's *Infer selected* on checkpoint-3 (the command line it starts without an engine, no --name, the
    data's absolute path; the engine's has none either; --max_new_tokens 6 in place of its default 128, for
    time): both results stay, each in its folder, told apart by max_new_tokens alone (the data file is the same,
    however its path was written: it once read "other settings (data v.jsonl, not /…/v.jsonl)"); the CLI with
    --name naming the dashboard's folder is refused, exit 2, one line. Then the first job, interrupted, its
    record as an older voxtui wrote it (the path as given, relative to a folder it does not say), run again with
    the absolute path: the same job by the file's content (data_sha256), resumed in its folder."""
    from app.screens.run import RunScreen

    out, val = run
    shutil.rmtree(out / "infer", ignore_errors=True)
    cli = voxtui("infer", "--run", out, "--checkpoint", "3", "--data", val.name, "--max_new_tokens", "4",
                 cwd=val.parent)
    assert cli.returncode == 0, cli.stderr
    first = out / "infer" / f"checkpoint-3-{val.stem}"
    assert json.loads((first / "params.json").read_text())["data"] == str(val)  # recorded absolute
    kept = (first / "metrics.json").read_bytes()
    argv = RunScreen.infer_args(None, 3, str(val), str(out))  # what the dashboard runs without an engine
    assert "--name" not in argv
    dash = voxtui("infer", *argv, "--max_new_tokens", "6")
    assert dash.returncode == 0, dash.stderr
    assert "holds a job with other settings (max_new_tokens 4, not 6): kept" in dash.stderr
    second = out / "infer" / f"checkpoint-3-{val.stem}-2"
    assert (first / "metrics.json").read_bytes() == kept
    assert json.loads((first / "params.json").read_text())["max_new_tokens"] == 4
    assert json.loads((second / "metrics.json").read_text())["params"]["max_new_tokens"] == 6
    again = voxtui("infer", "--run", out, "--checkpoint", "3", "--data", val, "--max_new_tokens", "4",
                   "--name", second.name)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "give another --name" in again.stderr
    assert json.loads((second / "params.json").read_text())["max_new_tokens"] == 6
    rows = generations(first / "generations.jsonl")
    (first / "metrics.json").unlink()  # interrupted after 3 rows, recorded as an older voxtui did
    (first / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    old = json.loads((first / "params.json").read_text())
    (first / "params.json").write_text(json.dumps({**old, "data": val.name}))
    resumed = voxtui("infer", "--run", out, "--checkpoint", "3", "--data", val, "--max_new_tokens", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "other settings" not in resumed.stderr
    assert sorted(p.name for p in (out / "infer").iterdir()) == sorted([first.name, second.name])
    assert sorted(generations(first / "generations.jsonl"), key=lambda r: r["index"]) == \
        sorted(rows, key=lambda r: r["index"])
    assert json.loads((first / "params.json").read_text()) == old  # the record says the path as given now
    assert (first / "metrics.json").is_file()


def test_pruning_keeps_a_checkpoint_a_live_process_reads(tmp_path):
    """save_total_limit's pruning skips a checkpoint marked in use by a live process (an inference job) and
    keeps it until a later save finds it unmarked; a marker whose process has ended counts for nothing."""
    import subprocess
    import sys

    from engine.eval.infer import hold_checkpoint
    from engine.runs import checkpoint_users, complete_checkpoints, mark_in_use
    from engine.util import UsageError
    from engine.worker.checkpoint import prune

    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 50):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        for f in ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json"):
            (root / f"checkpoint-{step}" / f).write_text("{}")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        mark_in_use(root / "checkpoint-10", pid=live.pid)
        mark_in_use(root / "checkpoint-20", pid=dead.pid)
        assert checkpoint_users(root / "checkpoint-10") == [live.pid]
        held = prune(root, 2, best_step=30)
        assert held == [(root / "checkpoint-10", [live.pid])]
        assert [s for s, _ in complete_checkpoints(root)] == [10, 30, 40, 50]  # 20: its marker's process ended
        assert sorted(p.name for p in root.iterdir()) == [f"checkpoint-{s}" for s in (10, 30, 40, 50)]
        assert prune(root, 2, best_step=30) == held  # still read: kept at the next save too
    finally:
        live.kill()
        live.wait()
    assert prune(root, 2, best_step=30) == [] and [s for s, _ in complete_checkpoints(root)] == [30, 40, 50]
    # the job's own side: marked, then found; gone or without its adapter, one line that says so
    marker = hold_checkpoint(root / "checkpoint-40")
    assert marker == root / "checkpoint-40" / f".in-use-{os.getpid()}" and checkpoint_users(marker.parent)
    with pytest.raises(UsageError, match=r"checkpoint-20: gone \(pruned by the run's save_total_limit"):
        hold_checkpoint(root / "checkpoint-20")
    (root / "checkpoint-50" / "adapter_config.json").unlink()
    with pytest.raises(UsageError, match=r"checkpoint-50: incomplete \(adapter_config.json missing\)"):
        hold_checkpoint(root / "checkpoint-50")
    assert not [p for p in (root / "checkpoint-50").iterdir() if p.name.startswith(".in-use-")]


def test_a_failed_job_is_reported_under_its_own_name_and_checkpoint(run, tmp_path):
    """An engine's job (--events) whose checkpoint loses its adapter (pruned under it) fails with the job's
    name and checkpoint-N, as its started event said them: the dashboard's row of the job reads failed, and no
    nameless row appears. Its marker is gone once it has ended."""
    import zmq

    from engine.protocol import event_decoder

    out, val = run
    copy = tmp_path / "copy"
    # without the jobs other tests left in the shared run's infer/ (one of other settings on checkpoint-3 named
    # this job checkpoint-3-val-2 and said so in a second stderr line, in whichever order the tests ran)
    shutil.copytree(out, copy, ignore=lambda folder, names: ["infer"] if Path(folder) == out else [])
    ckpt = copy / "checkpoints" / "checkpoint-3"
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")

    def events_of(*flags):
        proc = voxtui("infer", "--run", copy, "--data", val, "--events", f"tcp://127.0.0.1:{port}", "--device",
                      "cpu", "--json", "-", *flags)
        evs = []
        while pull.poll(3000):
            ev = event_decoder.decode(pull.recv())
            evs.append(ev)
            if ev.state in ("failed", "finished"):
                break
        return proc, evs

    try:
        (ckpt / "adapter_config.json").unlink()  # gone before the job could mark it in use
        proc, evs = events_of("--checkpoint", "3")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "adapter_config.json missing" in proc.stderr
        assert [(e.state, e.name, e.checkpoint) for e in evs] == [("failed", "checkpoint-3-val", "checkpoint-3")]
        (ckpt / "adapter_config.json").write_text("{}")  # the error of the report: after the job has started
        proc, evs = events_of("--checkpoint", "3")
        assert proc.returncode == 2 and "cannot read r and lora_alpha" in proc.stderr, proc.stderr
        assert [(e.state, e.name, e.checkpoint) for e in evs] == [("started", "checkpoint-3-val", "checkpoint-3"),
                                                                   ("failed", "checkpoint-3-val", "checkpoint-3")]
        assert "cannot read r and lora_alpha" in evs[-1].message and evs[-1].total == evs[0].total == 8
        assert not [p for p in ckpt.iterdir() if p.name.startswith(".in-use-")]
        shutil.rmtree(ckpt)  # a failure before the job is named: named as infer names it all the same
        proc, evs = events_of("--checkpoint", "3")
        assert proc.returncode == 2 and "no complete checkpoint-3" in proc.stderr
        assert [(e.state, e.name, e.checkpoint) for e in evs] == [("failed", "checkpoint-3-val", "checkpoint-3")]
    finally:
        pull.close(linger=0)
