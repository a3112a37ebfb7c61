"""The batch plan: preflight and the worker compute it with one function (``engine.worker.batching.plan_run``),
so a run that cannot make one optimizer step is a no-go with the change that fixes it, and a file too
small for the packing budget gets a smaller budget instead of a refusal."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import read_events, train_args, voxtui, worker, write_jsonl
from engine.config import TrainConfig
from engine.worker.batching import Tokenized, plan_run


def rows(n):
    return [{"instruction": f"Say the code word {i}.", "output": f"The code word {i} is {i * 7}."} for i in range(n)]


def preflight(tmp_path, model, train, *flags, cli=False):
    """`voxtui preflight … --json -` through the command line (``cli``), else the same call in this
    process (the parser, the config and preflight itself; quicker)."""
    argv = ["preflight", "--model_id", str(model), "--train_jsonl", str(train), "--quant", "none", "--no-bf16",
            *map(str, flags)]
    if cli:
        proc = voxtui(*argv, "--json", "-", cwd=tmp_path)
        report = json.loads(proc.stdout)
    else:
        import os
        import subprocess

        from engine.cli import build_parser
        from engine.config import resolve
        from engine.preflight import preflight as run_preflight

        old = os.getcwd()
        os.chdir(tmp_path)
        try:
            report = run_preflight(resolve(build_parser().parse_args(argv)))
        finally:
            os.chdir(old)
        proc = subprocess.CompletedProcess(argv, 1 if report["verdict"] == "no-go" else 0)
    plan = next(c for c in report["checks"] if c["name"] == "plan")
    return proc, report, plan


def test_no_step_can_run_is_no_go_with_the_fix_that_works(tmp_path, tiny_model):
    # an empty file
    empty = write_jsonl(tmp_path / "empty.jsonl", [], raw=b"")
    proc, report, plan = preflight(tmp_path, tiny_model, empty, cli=True)
    assert proc.returncode == 1 and report["verdict"] == "no-go"
    assert plan["level"] == "fail" and "the file is empty" in plan["message"]

    # every row over --max_len: the message names the --max_len that keeps a row, and that one plans
    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    proc, report, plan = preflight(tmp_path, tiny_model, train, "--max_len", "5")
    assert report["verdict"] == "no-go" and "every row (40) is longer than --max_len 5" in plan["message"]
    need = int(re.search(r"raise --max_len to at least (\d+)", plan["message"]).group(1))
    assert need > 5
    _, _, low = preflight(tmp_path, tiny_model, train, "--max_len", need - 1)
    _, report, ok = preflight(tmp_path, tiny_model, train, "--max_len", need)
    assert low["level"] == "fail" and ok["level"] == "ok" and ok["plan"]["rows"] >= 1, (low, ok)
    assert ok["plan"]["truncated"] >= 1  # --long truncate keeps it with a cut target

    # more ranks × grad_accum than the rows can feed: the fix it names makes a plan
    few = write_jsonl(tmp_path / "few.jsonl", rows(6))
    proc, report, plan = preflight(tmp_path, tiny_model, few, "--nproc", 8, "--grad_accum", 4)
    assert proc.returncode == 1 and report["verdict"] == "no-go"
    assert "lower --per_device_bsz" not in plan["message"]
    k = re.search(r"--nproc ≤ (\d+)", plan["message"])
    m = re.search(r"--grad_accum ≤ (\d+)", plan["message"])
    assert k or m, plan["message"]
    for nproc, accum in ((k and k.group(1), 4), (8, m and m.group(1))):
        if nproc and accum:
            _, _, fixed = preflight(tmp_path, tiny_model, few, "--nproc", nproc, "--grad_accum", accum)
            assert fixed["level"] == "ok", fixed
    # the worker (one rank here) stops before loading the model, with preflight's words
    _, _, one = preflight(tmp_path, tiny_model, few, "--grad_accum", 8)
    assert one["level"] == "fail"
    run = worker(train_args(tiny_model, tmp_path / "run", few, grad_accum=8, packing=True, per_device_bsz=4,
                            max_len=1024, cache_dir=tmp_path / "c"))
    assert run.returncode == 2
    assert f"voxtui: error: {one['message']}" in run.stdout + run.stderr
    assert "model loaded" not in run.stderr
    assert read_events(tmp_path / "run")[-1]["state"] == "failed"


def test_a_small_file_packs_smaller_rows_and_trains(tmp_path, tiny_model, fmt):
    """48 short rows, default packing (4 × 1024 tokens) and two ranks: one packed row would leave a rank
    without work, so the budget shrinks (preflight and the worker say so, with the same number). The
    step's loss is the mean over every target token of both ranks' rows, and its rows are padded to the
    shrunk budget, not to 4 × 1024."""
    import torch
    from transformers import VoxtralForConditionalGeneration

    from engine.formatting import load_format
    from engine.worker.batching import tokenize

    train = write_jsonl(tmp_path / "t48.jsonl", rows(48))
    _, report, plan = preflight(tmp_path, tiny_model, train, "--nproc", 2)
    assert report["verdict"] in ("go", "warn") and plan["level"] == "ok"
    p = plan["plan"]
    assert p["shrunk"] and p["budget"] < p["asked_budget"] == 4 * 1024 and p["micro_batches_per_rank"] >= 1
    assert f"shrunk from 4096 to {p['budget']} tokens" in plan["message"]

    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, train, packing=True, per_device_bsz=4, max_len=1024, max_steps=2,
                             cache_dir=tmp_path / "c"), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"packed rows of {p['budget']} tokens" in proc.stderr
    events = read_events(out)
    assert any(e["type"] == "log" and f"shrunk from 4096 to {p['budget']}" in e["message"] for e in events)
    info = next(e for e in events if e["type"] == "run_info")
    assert info["steps_per_epoch"] == p["steps_per_epoch"] and info["total_steps"] == 2
    step1 = next(e for e in events if e["type"] == "step" and e["step"] == 1)

    # what step 1 trained on: the same plan, recomputed here; the adapters start at zero, so the loss is
    # the base model's mean cross-entropy over those rows' target tokens
    tok = tokenize(str(train), load_format(tiny_model), 1024, "truncate", None)
    cfg = TrainConfig(train_jsonl=str(train), packing=True, per_device_bsz=4, max_len=1024, seed=1, max_steps=2)
    plans = plan_run(tok, cfg, 2).plans
    examples = [x for rank in plans for row in rank[0] for x in row]
    model = VoxtralForConditionalGeneration.from_pretrained(tiny_model).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x in examples:
            ids, prompt = tok.example(x)
            ids = torch.tensor(ids, dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0].double()
            targets = ids[0, prompt:]
            total += float(torch.nn.functional.cross_entropy(logits[prompt - 1:-1], targets, reduction="sum"))
            count += len(targets)
    assert step1["loss"] == pytest.approx(total / count, rel=1e-5)
    real = sum(int(tok.lengths[x]) for x in examples)
    assert step1["tokens"] == real
    assert step1["pad_frac"] == pytest.approx(1 - real / (2 * p["budget"]))  # rows of the shrunk budget


def test_sample_data_and_the_demo_config_plan(tmp_path, tiny_model):
    from engine.samples import TRAIN, VAL

    proc = voxtui("preflight", "--model_id", tiny_model, "--train_jsonl", TRAIN, "--val_jsonl", VAL, "--quant", "none",
                  "--json", "-", cwd=tmp_path)  # defaults otherwise, bf16 auto included
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["verdict"] in ("go", "warn"), report
    # make demo's config (engine/commands.py: two ranks, batch 2, --max_len 256, packing, 3 epochs)
    _, report, plan = preflight(tmp_path, tiny_model, TRAIN, "--val_jsonl", VAL, "--nproc", 2, "--per_device_bsz", 2,
                                "--max_len", 256, "--epochs", 3)
    assert report["verdict"] in ("go", "warn") and plan["level"] == "ok"
    p = plan["plan"]
    assert p["rows"] == 432 and not p["shrunk"] and p["total_steps"] == 3 * p["steps_per_epoch"] > 10


def fake_tokens(lengths: list[int]) -> Tokenized:
    lengths = np.asarray(lengths, np.int64)
    return Tokenized(ids=np.zeros(int(lengths.sum()), np.int32), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                     prompt_lens=np.ones(len(lengths), np.int32))


def apply(fix: str, base: dict) -> list[dict]:
    """Configs a suggested fix describes: each '≤ K' tried at K and at 1."""
    trials = []
    nums = {flag: int(n) for flag, n in re.findall(r"(--\w+) ≤ (\d+)", fix)}
    exact = {flag: int(n) for flag, n in re.findall(r"(--\w+) (\d+)", fix)}
    for pick in ({k: v for k, v in nums.items()}, {k: 1 for k in nums}):
        c = dict(base, **{k[2:]: v for k, v in {**exact, **pick}.items()})
        if "--no-packing" in fix:
            c["packing"] = False
        trials.append(c)
    return trials


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(2, 64), min_size=1, max_size=60), world=st.integers(1, 8),
       acc=st.integers(1, 8), bsz=st.integers(1, 6), max_len=st.sampled_from([64, 300, 1024]),
       packing=st.booleans(), group=st.booleans())
def test_every_fix_the_plan_suggests_makes_a_plan(lengths, world, acc, bsz, max_len, packing, group):
    tok = fake_tokens(lengths)
    base = dict(train_jsonl="x", nproc=world, grad_accum=acc, per_device_bsz=bsz, max_len=max_len, packing=packing,
                group_by_length=group, bf16=False)
    plan = plan_run(tok, TrainConfig(**base), world)
    if not plan.problem:
        assert plan.micro_per_rank >= acc and plan.steps_per_epoch >= 1 and plan.total_steps >= 1
        assert len(plan.plans) == world and all(len(p) == plan.micro_per_rank for p in plan.plans)
        if packing:  # every example fits its row, and the rows are no wider than asked
            assert max(lengths) <= plan.budget <= bsz * max_len
        return
    assert "no optimizer step can run: use " in plan.problem
    fixes = plan.problem.split(": use ", 1)[1].split(", or ")
    assert fixes
    for fix in fixes:
        for c in apply(fix, base):
            again = plan_run(tok, TrainConfig(**c), c["nproc"])
            assert not again.problem, (fix, c, again.problem)
