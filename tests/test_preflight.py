"""``voxtui preflight``: every problem collected, a verdict, and the launch command."""

import json
from pathlib import Path

import msgspec
import pytest

from conftest import voxtui, write_jsonl


def test_go_on_the_tiny_model(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "other", "output": "x"}])
    proc = voxtui("preflight", "--model_id", tiny_model, "--train_jsonl", train, "--val_jsonl", val, "--quant", "none",
                  "--no-bf16", "--nproc", "2", "--json", tmp_path / "p.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["verdict"] in ("go", "warn")  # warn: no GPU on this machine
    areas = {c["area"] for c in report["checks"]}
    assert areas == {"system", "data", "plan", "model", "memory"}
    plan = next(c for c in report["checks"] if c["name"] == "plan")["plan"]
    # 20 short rows packed into one row of 4 × 1024 tokens would be one micro-batch for two ranks: shrunk
    assert plan["rows"] == 20 and plan["world"] == 2 and plan["shrunk"] and plan["micro_batches_per_rank"] >= 1
    assert plan["total_steps"] == plan["steps_per_epoch"] >= 1 and not plan["problem"]
    # the default 10 warm-up steps outlast this short run: said, with the fix
    warmup = next(c for c in report["checks"] if c["name"] == "warmup")
    assert warmup["level"] == "warn" and f"the run's {plan['total_steps']} step(s)" in warmup["message"]
    assert not [c for c in report["checks"] if c["level"] == "fail"]
    assert report["command"].startswith("torchrun --standalone --nproc_per_node 2 -m engine.train")
    assert f"--model_id {tiny_model}" in report["command"]
    mem = next(c for c in report["checks"] if c["area"] == "memory")
    assert mem["estimate"]["total"] > 0
    assert "verdict:" in voxtui("preflight", "--model_id", tiny_model, "--train_jsonl", train, cwd=tmp_path).stdout


def test_no_go_collects_every_problem(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a"}, b"{broken", {"instruction": "x"}])
    proc = voxtui("preflight", "--model_id", tmp_path / "no-model", "--train_jsonl", train, "--json", "-", cwd=tmp_path)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["verdict"] == "no-go"
    fails = [c for c in report["checks"] if c["level"] == "fail"]
    assert {c["area"] for c in fails} == {"data", "model"}
    data = next(c for c in fails if c["area"] == "data")
    assert "line 2 invalid_json" in data["message"] and "line 3 missing_field" in data["message"]
    bad = voxtui("preflight", "--train_jsonl", tmp_path / "missing.jsonl", "--lr", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--lr" in bad.stderr and "missing.jsonl" in bad.stderr


def test_broken_rows_are_counted_once_each(tmp_path):
    """A row with two problems is one broken row, listed once with both: 10 lines, 7 broken, as
    `voxtui data analyze` counts them."""
    good = {"instruction": "q", "output": "a"}
    rows = [good, b"{broken", good, {"input": "only"}, {"instruction": "q", "output": ["a"]}, {"instruction": " ",
            "output": " "}, {"input": "x"}, good, {"instruction": 1, "output": 2}, b"[1"]
    val = write_jsonl(tmp_path / "bad.jsonl", rows)
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    proc = voxtui("preflight", "--model_id", tmp_path / "no-model", "--train_jsonl", train, "--val_jsonl", val,
                  "--json", "-", cwd=tmp_path)
    assert proc.returncode == 1
    data = next(c for c in json.loads(proc.stdout)["checks"] if c["area"] == "data" and c["name"] == "val")
    assert data["level"] == "fail" and data["rows"] == 7
    assert data["message"].startswith(f"{val}: 7 broken row(s) (line 2 invalid_json, line 4 missing_field "
                                      f"(instruction, output), line 5 wrong_type, line 6 empty_field "
                                      f"(instruction, output), line 7 missing_field (instruction, output), …)")
    assert "3 usable, 7 broken" in voxtui("data", "analyze", val).stdout


def test_probe_rescales_the_batch(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(20)])
    proc = voxtui("preflight", "--model_id", tiny_model, "--train_jsonl", train, "--quant", "none", "--no-bf16",
                  "--per_device_bsz", "2", "--grad_accum", "3", "--max_len", "64", "--probe", "--json", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    probe = next(c for c in report["checks"] if c["name"] == "probe")
    result = probe["probe"]
    assert [r["batch"] for r in result["modes"]["none"]] == [1, 2, 4]  # CPU: up to the effective batch 6
    assert all(r["tokens_per_s"] > 0 for r in result["modes"]["none"])
    rec = result["recommended"]
    assert rec["per_device_bsz"] * rec["grad_accum"] == 6  # the effective batch is kept
    assert f"--per_device_bsz {rec['per_device_bsz']} --grad_accum {rec['grad_accum']}" in report["command"]


def test_memory_estimate_matches_h200_measurements_and_picks_the_fastest_fit(monkeypatch):
    """Voxtral-Mini-3B's numbers: the estimate brackets what was measured on an H200 (docs/benchmarks.md:
    bf16 16 × 1024 packed, no checkpointing: 56.9 GiB; NF4 6 × 1024 with checkpointing: 6.2 GiB), and
    the recommendation is bf16 without checkpointing on an H200 (FP8 where the GPU takes it), else the mode and
    the fewest checkpointed layers that fit whose measured cost per token is least, NF4 on 10 GiB."""
    from engine.config import TrainConfig
    from engine.preflight import estimate_memory, fastest_fit
    from engine.preflight.memory import _candidates, fp8_mode, step_cost

    m = {"llm_linear": 3_208_826_880, "embed_head": 805_306_368, "lora": 27_033_600, "hidden": 3072,
         "intermediate": 8192, "layers": 30, "vocab": 131072}
    bf16 = TrainConfig(train_jsonl="x", quant="none", grad_ckpt=False, packing=True, per_device_bsz=16, max_len=1024)
    nf4 = TrainConfig(train_jsonl="x", quant="nf4", grad_ckpt=True, packing=True, per_device_bsz=6, max_len=1024)
    ckpt = TrainConfig(train_jsonl="x", quant="none", grad_ckpt=True, packing=True, per_device_bsz=8, max_len=1024)
    ckpt25 = TrainConfig(train_jsonl="x", quant="none", grad_ckpt=True, grad_ckpt_layers=25, packing=True,
                         per_device_bsz=8, max_len=1024)
    # H200, 2026-11-29: 8 × 1024 with all 30 layers checkpointed 10.78 GiB, with 25 of them 13.73 GiB
    for cfg, measured in ((bf16, 56.9), (nf4, 6.2), (ckpt, 10.78), (ckpt25, 13.73)):
        est = estimate_memory(cfg, m)
        assert measured <= est["total"] <= 1.35 * measured, (est, measured)
    # H200, 2026-11-30 (runs AR–AS): a compiled NF4 layer that is not checkpointed dequantises its weights again
    # in the backward; at 6 × 1024 with 20 / 10 / 5 / 0 layers checkpointed, and without checkpointing at 3 and
    # 12 × 1024. With VOXTUI_NF4_KEEP_WEIGHTS=1 it keeps them dequantised (runs AI–AK: where bf16 weights took
    # 17.33 and 44.16 GiB without checkpointing, NF4 saved nothing), and the estimate counts them
    for keep, points in (("", ((6, 20, 10.23), (6, 10, 15.31), (6, 5, 17.84), (6, 0, 20.38), (3, 0, 12.18),
                               (12, 0, 36.95))),
                         ("1", ((6, 20, 12.22), (6, 10, 19.29), (6, 5, 22.82), (6, 0, 26.36), (3, 0, 18.15),
                                (12, 0, 42.89)))):
        monkeypatch.setenv("VOXTUI_NF4_KEEP_WEIGHTS", keep)
        for bsz, layers, measured in points:
            cfg = msgspec.structs.replace(nf4, per_device_bsz=bsz, grad_ckpt=layers > 0, grad_ckpt_layers=layers or -1)
            est = estimate_memory(cfg, m)
            assert measured <= est["total"] <= 1.35 * measured, (keep, bsz, layers, est, measured)
    monkeypatch.delenv("VOXTUI_NF4_KEEP_WEIGHTS")
    for bsz, layers, measured in ((6, 30, 10.31), (6, 15, 17.94), (6, 0, 26.22), (3, 0, 17.33), (12, 0, 44.16)):
        cfg = msgspec.structs.replace(bf16, per_device_bsz=bsz, grad_ckpt=layers > 0, grad_ckpt_layers=layers or -1)
        est = estimate_memory(cfg, m)
        assert measured <= est["total"] <= 1.35 * measured, (bsz, layers, est, measured)
    assert fastest_fit(bf16, m, 139.0)[0] == {"quant": "none", "grad_ckpt": False, "grad_ckpt_layers": -1}
    # on a Hopper GPU auto gives FP8 input gradients: bf16 weights with them are the fastest (1.11×), and their
    # e4m3 copy is counted (1 byte per weight: 3.0 GiB here)
    assert fastest_fit(bf16, m, 139.0, fp8=True, fp8_auto=True)[0] == {"quant": "none", "grad_ckpt": False,
                                                                       "grad_ckpt_layers": -1}
    with_copy = estimate_memory(bf16, m, fp8_auto=True)["weights"] - estimate_memory(bf16, m)["weights"]
    assert with_copy == pytest.approx(m["llm_linear"] / 2**30, abs=0.02)
    # every product FP8 only where asked for (its gradients miss the GPU tests' bound)
    asked = msgspec.structs.replace(bf16, quant="fp8", fp8_products="all")
    assert fastest_fit(asked, m, 139.0, fp8=True, fp8_auto=True)[0] == {"quant": "fp8", "grad_ckpt": False,
                                                                        "grad_ckpt_layers": -1}
    # a GPU that takes FP8 products where auto does not give them (Ada): FP8 weights only where asked for
    assert fastest_fit(ckpt, m, 16.0, fp8=True)[0]["quant"] != "fp8"
    # as few layers checkpointed as fit: the more memory, the fewer
    fit24, fit16 = fastest_fit(ckpt, m, 24.0)[0], fastest_fit(ckpt, m, 16.0)[0]
    assert fit24["grad_ckpt"] and 0 < fit24["grad_ckpt_layers"] < 30
    assert fit16["grad_ckpt"] and fit24["quant"] == fit16["quant"]
    assert fit24["grad_ckpt_layers"] < fit16["grad_ckpt_layers"] <= 30
    assert estimate_memory(msgspec.structs.replace(ckpt, **fit16), m)["total"] <= 0.9 * 16.0
    # among the modes, the one whose fewest checkpointed layers that fit cost least by the measured speeds
    for cfg, free, fp8 in ((ckpt, 16.0, False), (ckpt, 16.0, True), (nf4, 24.0, True), (bf16, 24.0, False),
                           (asked, 16.0, True)):
        fields, _ = fastest_fit(cfg, m, free, fp8=fp8, fp8_auto=fp8)
        chosen = msgspec.structs.replace(cfg, **fields)
        n_ckpt = (30 if fields["grad_ckpt_layers"] < 0 else fields["grad_ckpt_layers"]) if fields["grad_ckpt"] else 0
        cost = step_cost(fields["quant"], n_ckpt, 30, fp8_mode(chosen.quant, chosen.fp8_products, fp8))
        for quant, products in _candidates(cfg, fp8, fp8):
            fewest = next((k for k in range(31) if estimate_memory(msgspec.structs.replace(
                cfg, quant=quant, fp8_products=products, grad_ckpt=k > 0, grad_ckpt_layers=-1 if k in (0, 30) else k),
                m, fp8_auto=fp8)["total"] <= 0.9 * free), None)
            assert fewest is None or cost <= step_cost(quant, fewest, 30, fp8_mode(quant, products, fp8))
    # 16 GiB on a Hopper GPU: FP8 weights with FP8 input gradients (1 byte a weight: more layers keep theirs)
    assert fastest_fit(ckpt, m, 16.0, fp8=True, fp8_auto=True)[0]["quant"] == "fp8"
    assert fastest_fit(nf4, m, 10.0)[0]["quant"] == "nf4"
    # the MLP's forward FP8 too: weighed where asked for (kept as asked), never put in unasked
    mlp = msgspec.structs.replace(bf16, quant="fp8", fp8_products="mlp")
    assert ("fp8", "mlp") in _candidates(mlp, True, True) and ("none", "auto") in _candidates(mlp, True, True)
    assert all(products != "mlp" for _, products in _candidates(bf16, True, True))
    assert fastest_fit(mlp, m, 139.0, fp8=True, fp8_auto=True)[0]["quant"] == "fp8"
    assert (step_cost("fp8", 0, 30, "all") < step_cost("fp8", 0, 30, "mlp") < step_cost("none", 0, 30, "backward")
            < step_cost("fp8", 0, 30, "backward")
            < step_cost("none", 0, 30) < step_cost("nf4", 0, 30) < step_cost("none", 30, 30))
    assert fastest_fit(bf16, m, 4.0) is None


def test_system_check_says_what_fp8_does_here():
    """Without a GPU, --quant fp8 is noted as runnable but slow (no recommendation of FP8: no GPU to take it)."""
    import torch

    from engine.config import TrainConfig
    from engine.preflight import Report
    from engine.preflight.system import check_system

    if torch.cuda.is_available():
        pytest.skip("the CPU case")
    r = Report()
    info = check_system(TrainConfig(train_jsonl="x", quant="fp8"), r)
    assert "fp8" not in info and info["gpus"] == []
    lines = {c["name"]: c for c in r.checks}
    assert lines["fp8-cpu"]["level"] == "info" and "slow" in lines["fp8-cpu"]["message"]
    # what --fp8_products auto chose here, and why (the worker's log says the same)
    assert lines["fp8"]["message"].startswith("FP8 products: none — no FP8 products (the FP8 weights dequantised")
    assert "auto: the CPU's FP8 products are emulated" in lines["fp8"]["message"]


def test_disk_check_measures_where_a_new_run_folder_will_be_made(tmp_path, monkeypatch):
    """An --output_dir not made yet is measured at the nearest folder above it that exists (the filesystem
    it will be made on), and the line says so; it measured the current folder once, another filesystem as
    often as not (/dev/shm/newrun said the disk's free space, not the tmpfs's)."""
    import shutil

    from engine.config import TrainConfig
    from engine.preflight import Report, system

    measured = []
    usage = shutil.disk_usage
    monkeypatch.setattr(system.shutil, "disk_usage", lambda p: measured.append(Path(p)) or usage(p))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = tmp_path / "base"
    base.mkdir()
    for out, at in ((base / "new" / "run", base), (base, base), (Path("runs/x"), elsewhere)):
        measured.clear()
        r = Report()
        system.check_system(TrainConfig(train_jsonl="x", output_dir=str(out)), r)
        line = next(c["message"] for c in r.checks if c["name"] == "disk")
        assert measured[0] == at, (out, measured)
        where = "" if at == base and out == base else f" (measured at {at}, the nearest folder of it that exists)"
        assert line.endswith(f"GiB free for checkpoints under {out}{where}"), line


def test_memory_check_recommends_every_product_fp8_only_where_asked_for():
    """On a Hopper GPU (auto gives FP8 input gradients, within the GPU tests' bounds) the recommendation
    weighs bf16, NF4 and FP8 weights, each with FP8 input gradients where they take them; every product FP8
    (--fp8_products all: its adapters' gradients miss tests/gpu's bound, docs/benchmarks.md) only where
    asked for — an info line says what it would give. Asked for, the recommendation keeps it."""
    from engine.config import TrainConfig
    from engine.preflight import Report
    from engine.preflight.memory import check_memory

    m = {"llm_linear": 3_019_898_880, "embed_head": 805_306_368, "lora": 27_033_600, "hidden": 3072,
         "intermediate": 8192, "layers": 30, "vocab": 131072}
    system = {"gpus": [{"free_gib": 16.0}], "fp8": True, "fp8_auto": True}
    lines = {}
    for quant, products in (("none", "auto"), ("fp8", "all")):
        r = Report()
        cfg = TrainConfig(train_jsonl="x", quant=quant, fp8_products=products, packing=True, per_device_bsz=8,
                          max_len=1024, grad_ckpt=True)
        check_memory(cfg, r, m, system, {})
        lines[quant] = {c["name"]: c for c in r.checks}
    rec = lines["none"]["recommend"]
    assert rec["recommend"]["quant"] == "fp8" and "fp8_products" not in rec["recommend"]  # auto: input gradients
    assert "--quant fp8 --grad_ckpt --grad_ckpt_layers" in rec["message"]
    info = lines["none"]["fp8"]["message"]
    assert "--fp8_products all" in info and "not recommended unasked" in info
    assert "fp8" not in lines["fp8"]
    assert lines["fp8"]["recommend"]["recommend"]["quant"] == "fp8"
    assert "fp8_products" not in lines["fp8"]["recommend"]["recommend"]  # kept: all


@pytest.mark.parametrize("capability,quant,products,says", [
    ((9, 0), "none", "auto", "FP8 products: backward — the input's gradients are FP8 products"),
    ((9, 0), "fp8", "all", "FP8 products: all — every product"),
    ((9, 0), "none", "none", "FP8 products: none — no FP8 products (--fp8_products none; --fp8_products backward"),
    ((8, 9), "none", "auto", "FP8 products: none — no FP8 products (auto: FP8 input gradients are measured on Hopper"),
    ((8, 0), "none", "auto", "FP8 products: none — no FP8 products (auto: FP8 products need a GPU of compute "
                             "capability 8.9 or newer (Ada, Hopper); this one is 8.0)"),
    ((8, 0), "none", "backward", "--fp8_products backward: FP8 products need"),
])
def test_system_check_says_which_products_are_fp8_on_a_gpu(monkeypatch, capability, quant, products, says):
    """The CUDA branch of the system check, on a GPU stood in for by torch's own queries (this machine has
    none; run V ran the real one on an H200): what auto chooses there and why, on Hopper, Ada and Ampere,
    and the memory check's inputs (``fp8``: the GPU takes FP8 products; ``fp8_auto``: auto gives FP8 input
    gradients)."""
    import sys

    import torch

    from engine.config import TrainConfig, bf16_auto
    from engine.preflight import Report
    from engine.preflight.system import check_system

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (130 * 2**30, 139 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "a stand-in GPU")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: torch's queries answer
    bf16_auto.cache_clear()
    try:
        r = Report()
        info = check_system(TrainConfig(train_jsonl="x", quant=quant, fp8_products=products), r)
    finally:
        bf16_auto.cache_clear()
    lines = {c["name"]: c for c in r.checks}
    assert info["fp8"] == (capability >= (8, 9)) and info["fp8_auto"] == (capability >= (9, 0))
    assert says in lines["fp8"]["message"], lines["fp8"]["message"]
    assert lines["fp8"]["level"] == ("fail" if products == "backward" and capability < (8, 9) else "ok")
    assert lines["gpus"]["level"] == "ok" and "a stand-in GPU" in lines["gpus"]["message"]


def test_more_checkpointed_layers_than_the_model_has_is_said(tiny_model):
    """--grad_ckpt_layers above the model's decoder layers checkpoints them all: preflight says so (it was
    clamped silently), and so does the worker's log."""
    from engine.config import TrainConfig
    from engine.preflight import Report
    from engine.preflight.memory import check_model

    r = Report()
    check_model(TrainConfig(model_id=str(tiny_model), train_jsonl="x", grad_ckpt=True, grad_ckpt_layers=40), r)
    line = next(c for c in r.checks if c["name"] == "grad_ckpt_layers")
    assert line["level"] == "info" and "the model has 2 decoder layers; all 2 are checkpointed" in line["message"]
    r = Report()
    check_model(TrainConfig(model_id=str(tiny_model), train_jsonl="x", grad_ckpt=True, grad_ckpt_layers=2), r)
    assert not [c for c in r.checks if c["name"] == "grad_ckpt_layers"]


def test_the_host_memory_estimate_brackets_what_cpu_runs_took(tiny_model):
    """A CPU run's estimate counts what its process keeps (about twice every layer's activations, in fp32):
    packed rows of 8, 32 and 96 × 1,024 tokens of the tiny model peaked at 1.68, 2.05 and 2.92 GiB of RSS
    (measured 2026-11-30 on the 2-core CI machine); --per_device_bsz 2000 was OOM-killed at 24 GiB."""
    from engine.config import TrainConfig
    from engine.preflight import Report, estimate_memory
    from engine.preflight.memory import check_model

    m = check_model(TrainConfig(model_id=str(tiny_model), train_jsonl="x"), Report())
    for bsz, measured in ((8, 1.68), (32, 2.05), (96, 2.92)):
        cfg = TrainConfig(train_jsonl="x", quant="none", bf16=False, packing=True, per_device_bsz=bsz, max_len=1024)
        est = estimate_memory(cfg, m, host=True)["total"]
        assert measured <= est <= 1.35 * measured, (bsz, est, measured)
    huge = TrainConfig(train_jsonl="x", quant="none", bf16=False, packing=True, per_device_bsz=2000, max_len=1024)
    assert estimate_memory(huge, m, host=True)["total"] > 24


def test_contradictions_and_an_empty_val_are_warned(tmp_path, tiny_model):
    """An empty --val_jsonl warns as no --val_jsonl does (it was "ok ... 0 rows"), and louder with
    --early_stopping_patience; --grad_ckpt_layers under --no-grad_ckpt and a --max_len beyond the model's
    positions are said too (both were accepted silently)."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    empty = tmp_path / "v.jsonl"
    empty.write_bytes(b"")
    proc = voxtui("preflight", "--model_id", tiny_model, "--train_jsonl", train, "--val_jsonl", empty, "--quant", "none",
                  "--no-bf16", "--early_stopping_patience", "3", "--no-grad_ckpt", "--grad_ckpt_layers", "5",
                  "--max_len", "100000", "--no-packing", "--json", tmp_path / "p.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    checks = {c["name"]: c for c in json.loads((tmp_path / "p.json").read_text())["checks"]}
    assert checks["val"]["level"] == "warn"
    assert checks["val"]["message"] == f"{empty}: 0 rows: no evaluation, early stopping or best checkpoint"
    stop = checks["early_stopping"]
    assert stop["level"] == "warn" and stop["message"].startswith(
        f"--early_stopping_patience 3 asks for early stopping, but {empty} has no rows: ")
    assert "cannot stop early" in stop["message"]
    ckpt = checks["grad_ckpt_layers"]
    assert ckpt["level"] == "warn" and ckpt["message"].startswith("--grad_ckpt_layers 5 with --no-grad_ckpt: no layer")
    long = checks["max_len"]
    assert long["level"] == "warn" and "--max_len 100000 is above the model's 4,096 positions" in long["message"]


def test_early_stopping_without_val_rows_is_said_only_when_asked_for(tmp_path, tiny_model):
    """Early stopping asked for where it cannot happen — no validation rows, or --eval_steps 0 — is a warning;
    not asked for, nothing is said."""
    from engine.config import TrainConfig
    from engine.preflight import Report, check_data
    from engine.preflight.memory import check_model

    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "other", "output": "x"}])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for val_jsonl, patience, every, said in (
            ("", 2, 100, "there is no --val_jsonl"), (str(blank), 2, 100, f"{blank} has no rows"),
            ("", 0, 100, None), (str(blank), 0, 100, None), (str(val), 2, 100, None),
            (str(val), 2, 0, "--eval_steps 0 evaluates only after the last step"), (str(val), 0, 0, None)):
        r = Report()
        cfg = TrainConfig(model_id=str(tiny_model), train_jsonl=str(train), val_jsonl=val_jsonl, max_len=64,
                          early_stopping_patience=patience, eval_steps=every, output_dir=str(tmp_path / "runs" / "r"))
        check_data(cfg, r)
        lines = [c["message"] for c in r.checks if c["name"] == "early_stopping"]
        assert lines == ([] if said is None else [lines[0]]) and (said is None or f"but {said}: " in lines[0])
        val_line = next(c for c in r.checks if c["name"] == "val")
        assert val_line["level"] == ("ok" if val_jsonl == str(val) else "warn")
        if val_jsonl == str(val):
            assert val_line["message"] == f"{val}: 1 row"
    for grad_ckpt, layers, warned in ((False, 5, True), (False, 0, False), (False, -1, False), (True, 1, False)):
        r = Report()
        check_model(TrainConfig(model_id=str(tiny_model), train_jsonl="x", grad_ckpt=grad_ckpt, grad_ckpt_layers=layers,
                                max_len=4096), r)
        assert [c["level"] for c in r.checks if c["name"] == "grad_ckpt_layers"] == (["warn"] if warned else [])
        assert not [c for c in r.checks if c["name"] == "max_len"]  # 4096: the model's positions exactly
