"""The training worker on the CPU: the tiny model, real torchrun (gloo), real files."""

import json
import math

import pytest
import torch

from conftest import digest, read_events, train_args, voxtui, worker, write_jsonl


def memorable_rows(n=8):
    return [{"instruction": f"Say the code word {i}.", "output": f"The code word {i} is {'가나다라마바사아'[i % 8]}{i * 7}."}
            for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", memorable_rows()), write_jsonl(d / "val.jsonl", memorable_rows(4))


def steps(events):
    """The last logged loss of each step (a resumed run logs some steps twice)."""
    out = {}
    for e in events:
        if e["type"] == "step":
            out[e["step"]] = e["loss"]
    return out


def test_previews_stay_within_their_time_budget(tmp_path, tiny_model, data):
    """A preview due every step is postponed while the training since the last one is too short to
    pay for it within --preview_budget; the first one always runs, and the log says why."""
    train, val = data
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, train, val, max_steps=6, preview_steps=1, preview_count=2,
                             max_new_tokens=3, preview_budget=0.01))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    previews = [e for e in read_events(out) if e["type"] == "preview"]
    assert {e["step"] for e in previews} == {1}
    assert "previews take" in proc.stderr and "--preview_budget 0.01" in proc.stderr
    assert any(e["type"] == "log" and "previews take" in e["message"] for e in read_events(out))  # the TUI sees it


def test_single_rank_learns_and_writes_the_run_folder(tmp_path, tiny_model, data):
    train, val = data
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, train, val, max_steps=30, lr=1e-2, eval_steps=15, save_steps=10,
                             preview_steps=15, preview_count=2, max_new_tokens=6, cache_dir=tmp_path / "cache",
                             peak_tflops=1.0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = read_events(out)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    losses = steps(events)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) / 5 < 0.7 * sum(list(losses.values())[:5]) / 5  # it learns
    types = {e["type"] for e in events}
    assert {"status", "param_table", "run_info", "step", "eval", "preview", "checkpoint", "telemetry"} <= types
    assert events[-1]["type"] == "status" and events[-1]["state"] == "finished"
    table = next(e for e in events if e["type"] == "param_table")
    trainable_rows = [r for r in table["rows"] if r[1] > 0]
    assert [r[0] for r in trainable_rows] == ["language_model.layers (lora)"]
    assert any(r[0].startswith("audio_tower") and r[2] > 0 for r in table["rows"])
    tel = next(e for e in events if e["type"] == "telemetry")
    assert tel["rss"] > 0 and tel["gpus"] == []
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [15, 30] and all(math.isclose(e["ppl"], math.exp(e["loss"])) for e in evals)
    assert (out / "config.toml").is_file() and "quant = \"none\"" in (out / "config.toml").read_text()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-15", "checkpoint-20", "checkpoint-30"]  # the last 3 (30 is also the best)
    assert (out / "lora_final" / "adapter_model.safetensors").is_file()

    # TensorBoard's own reader sees the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "eval/loss", "eval/ppl", "perf/mfu",
            "perf/mfu_attn"} <= tags
    # the two MFU figures (a peak given: 1 TFLOP/s): the one counting attention is the larger
    assert all(0 < e["mfu"] < e["mfu_attn"] for e in events if e["type"] == "step")
    assert len(acc.Scalars("train/loss")) == 30

    # the adapter is a standard PEFT adapter on the language model only, and it changes the logits
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import VoxtralForConditionalGeneration

    keys = load_file(str(out / "lora_final" / "adapter_model.safetensors")).keys()
    assert keys and all("language_model" in k and "lora_" in k for k in keys)
    assert not any("audio_tower" in k for k in keys)
    base = VoxtralForConditionalGeneration.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[1, 3, 5000, 6000, 4]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out / "lora_final").eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)

    # a second start with the same data hits the tokenized cache
    again = worker(train_args(tiny_model, tmp_path / "run2", train, max_steps=1, cache_dir=tmp_path / "cache"))
    assert again.returncode == 0, again.stdout + again.stderr
    info = next(e for e in read_events(tmp_path / "run2") if e["type"] == "run_info")
    assert info["cache_hit"] is True
    first = next(e for e in events if e["type"] == "run_info")
    assert first["cache_hit"] is False


def test_nan_policy(tmp_path, tiny_model, data):
    train, _ = data
    skip = worker(train_args(tiny_model, tmp_path / "skip", train, max_steps=4), env={"VOXTUI_FAULT_NAN_STEP": "3"})
    assert skip.returncode == 0, skip.stdout + skip.stderr
    events = read_events(tmp_path / "skip")
    step3 = [e for e in events if e["type"] == "step" and e["step"] == 3][0]
    assert step3["loss"] is None and step3["skipped"] and step3["nonfinite"] == "loss"
    assert any(e["type"] == "alert" and e["kind"] == "nan_loss" and e["step"] == 3 for e in events)
    assert all(e["loss"] is not None for e in events if e["type"] == "step" and e["step"] != 3)

    stop = worker(train_args(tiny_model, tmp_path / "stop", train, max_steps=6, on_nan="stop"),
                  env={"VOXTUI_FAULT_NAN_STEP": "3"})
    assert stop.returncode == 1
    events = read_events(tmp_path / "stop")
    assert events[-1]["type"] == "status" and events[-1]["state"] == "failed"
    ckpt = [e for e in events if e["type"] == "checkpoint"]
    assert [c["step"] for c in ckpt] == [2]  # the last good state
    state = json.loads((tmp_path / "stop" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["reason"] == "nan"


def test_qlora_nf4_on_cpu(tmp_path, tiny_model, data):
    train, _ = data
    proc = worker(train_args(tiny_model, tmp_path / "q", train, max_steps=3, quant="nf4", grad_ckpt=True))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = read_events(tmp_path / "q")
    table = next(e for e in events if e["type"] == "param_table")
    quantized = {r[0]: r[3] for r in table["rows"]}
    assert quantized["language_model.layers (base)"] > 0
    assert all(math.isfinite(e["loss"]) for e in events if e["type"] == "step")
    assert (tmp_path / "q" / "lora_final" / "adapter_config.json").is_file()
    log = proc.stdout + proc.stderr  # the checkpoint inside each layer, as for bf16 (docs/training.md)
    assert "gradient checkpointing: 2 of 2 decoder layers recompute their activations (the checkpoint inside " \
           "each layer's forward)" in log, log[-2000:]


@pytest.mark.slow
def test_two_ranks_kill_during_save_then_exact_resume(tmp_path, tiny_model, data):
    """2 real ranks. An uninterrupted run gives the reference losses. A second run is killed (-9, the
    whole process group) while writing checkpoint-4; checkpoint-2 stays the latest complete one; the
    resumed run then logs exactly the reference losses."""
    import os
    import signal
    import time

    train, _ = data
    rows = write_jsonl(tmp_path / "more.jsonl", memorable_rows(16))
    common = {"max_steps": 8, "save_steps": 2, "per_device_bsz": 2, "lora_dropout": 0.1, "cache_dir": tmp_path / "c",
              "preview_steps": 3, "preview_file": rows, "preview_count": 3, "max_new_tokens": 4}
    ref = worker(train_args(tiny_model, tmp_path / "ref", rows, **common), nproc=2)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    reference = steps(read_events(tmp_path / "ref"))
    assert sorted(reference) == list(range(1, 9))
    assert next(e for e in read_events(tmp_path / "ref") if e["type"] == "run_info")["world_size"] == 2
    previews = [e for e in read_events(tmp_path / "ref") if e["type"] == "preview"]
    assert {(e["step"], e["index"], e["rank"]) for e in previews} == {(s, i, i % 2) for s in (3, 6) for i in range(3)}
    assert all(0.0 <= e["rougeL"] <= 1.0 and e["reference"] for e in previews)

    run = tmp_path / "crash"
    proc = worker(train_args(tiny_model, run, rows, **common), nproc=2, wait=False,
                  env={"VOXTUI_FAULT_SLOW_SAVE": "3"})
    deadline = time.time() + 240
    ckpts = run / "checkpoints"
    while time.time() < deadline:
        if ckpts.is_dir() and any(p.name.startswith(".tmp-checkpoint-4-") for p in ckpts.iterdir()):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    else:
        pytest.fail("never reached the save of checkpoint-4")
    # torchrun starts each worker in a session of its own: kill -9 every process of the run
    import psutil

    group = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in group:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in group if psutil.pid_exists(p)], timeout=10)
    from engine.worker.checkpoint import latest_checkpoint

    assert latest_checkpoint(ckpts).name == "checkpoint-2"

    resumed = worker(["--resume", str(run)], nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    got = steps(read_events(run))
    assert got == reference  # same data order, same dropout masks: the same losses, bit for bit
    events = read_events(run)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_packed_two_ranks_stop_then_exact_resume(tmp_path, tiny_model):
    """The default batching (packed rows, varlen attention): two ranks, a graceful stop (SIGTERM) after a
    checkpoint, then --resume logs the uninterrupted run's losses bit for bit."""
    import signal
    import time

    rows = write_jsonl(tmp_path / "d.jsonl", memorable_rows(80))
    common = {"max_steps": 8, "save_steps": 2, "per_device_bsz": 2, "max_len": 40, "packing": True,
              "lora_dropout": 0.1, "cache_dir": tmp_path / "c"}
    ref = worker(train_args(tiny_model, tmp_path / "ref", rows, **common), nproc=2)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    reference = steps(read_events(tmp_path / "ref"))
    assert sorted(reference) == list(range(1, 9))
    assert "packed rows of 80 tokens" in ref.stderr
    first = next(e for e in read_events(tmp_path / "ref") if e["type"] == "step")
    assert first["pad_frac"] < 0.25 and first["tokens"] > 2 * 40  # rows hold several examples

    run = tmp_path / "stopped"
    proc = worker(train_args(tiny_model, run, rows, **common), nproc=2, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-2").is_dir():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on; the workers save at the next boundary
    proc.wait(timeout=120)
    from engine.worker.checkpoint import latest_checkpoint

    saved = int(latest_checkpoint(run / "checkpoints").name.split("-")[1])
    assert saved < 8, "the run ended before the stop could interrupt it"
    resumed = worker(["--resume", str(run)], nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert steps(read_events(run)) == reference


def test_long_examples_own_attention_calls_train_as_one_varlen_call(tmp_path, tiny_model):
    """VOXTUI_DENSE_ATTENTION=N (the default on a Hopper GPU: 2048): examples of N tokens or more laid at their
    row's end, each its own attention call (attention.packed_attention, here SDPA's CPU kernel): the same
    losses as every example in one call, through the worker's whole path (collate, feed, the step)."""
    rows = write_jsonl(tmp_path / "d.jsonl", memorable_rows(48))
    common = {"max_steps": 4, "per_device_bsz": 2, "max_len": 40, "packing": True, "lora_dropout": 0.0,
              "cache_dir": tmp_path / "c"}
    got = {}
    for name, env in (("one", {}), ("own", {"VOXTUI_DENSE_ATTENTION": "20"}), ("over", {"VOXTUI_DENSE_ATTENTION": "41"})):
        proc = worker(train_args(tiny_model, tmp_path / name, rows, **common), env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got[name] = steps(read_events(tmp_path / name))
        assert ("examples of 20 tokens or more: SDPA, one call each" in proc.stderr) == (name == "own")
        assert ("one call each" in proc.stderr) == (name == "own")  # over --max_len 40: as without it
    assert sorted(got["own"]) == [1, 2, 3, 4]
    assert got["own"] == pytest.approx(got["one"], rel=1e-5) and got["own"] != got["one"]  # reordered sums
    assert got["over"] == got["one"]


def test_two_ranks_flat_gradient_sync_trains_as_ddp(tmp_path, tiny_model):
    """The default two-rank gradient sync (one all-reduce of a flat buffer per step, no DDP wrapper) logs
    the same losses and saves the same adapter as torch's DistributedDataParallel, with gradient
    accumulation (the all-reduce waits for the step's last micro-batch)."""
    from safetensors.torch import load_file

    rows = write_jsonl(tmp_path / "d.jsonl", memorable_rows(64))
    common = {"max_steps": 4, "per_device_bsz": 2, "max_len": 40, "packing": True, "grad_accum": 2,
              "lora_dropout": 0.1, "cache_dir": tmp_path / "c"}
    runs, logs = {}, {}
    for mode in ("flat", "ddp"):
        proc = worker(train_args(tiny_model, tmp_path / mode, rows, grad_sync=mode, **common), nproc=2)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[mode], logs[mode] = steps(read_events(tmp_path / mode)), proc.stderr
    assert "2 ranks: one all-reduce of" in logs["flat"] and "all-reduce" not in logs["ddp"]
    assert sorted(runs["flat"]) == [1, 2, 3, 4]
    assert runs["flat"] == pytest.approx(runs["ddp"], rel=1e-6)
    assert runs["flat"][4] < runs["flat"][1]
    a, b = (load_file(str(tmp_path / m / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
            for m in ("flat", "ddp"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_early_stopping(tmp_path, tiny_model, data):
    train, val = data
    out = tmp_path / "es"
    # min_delta so large that no evaluation after the first counts as an improvement
    proc = worker(train_args(tiny_model, out, train, val, max_steps=50, eval_steps=2, save_steps=2,
                             early_stopping_patience=2, early_stopping_min_delta=100.0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = read_events(out)
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6] and [e["improved"] for e in evals] == [True, False, False]
    assert evals[-1]["patience_left"] == 0 and evals[0]["best_step"] == 2
    assert events[-1]["state"] == "finished" and events[-1]["message"] == "early stopping"
    from engine.worker.checkpoint import complete_checkpoints

    assert 2 in [s for s, _ in complete_checkpoints(out / "checkpoints")]  # the best is kept

    # resumed as it is, it would train one more evaluation period and stop again: refused up front, by the worker
    # alone and by `voxtui run --resume` alike, nothing written; with more patience it trains on
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = [digest(p) for p in files]
    said = (f"voxtui: error: {out} stopped early at step 6 (2 evaluations without an improvement, "
            "--early_stopping_patience 2); nothing to resume — it would stop again at its next evaluation: give it "
            f"more patience (voxtui run --resume {out} --early_stopping_patience N, N above 2; 0 turns early stopping "
            "off), or start a new run")
    proc = worker(["--resume", str(out)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == said, proc.stderr
    proc = voxtui("run", "--resume", out, "--skip_preflight")
    assert proc.returncode == 2 and proc.stderr.strip() == said, proc.stderr
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files and [digest(p) for p in files] == before
    proc = worker(["--resume", str(out), "--early_stopping_patience", "3"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evals = [e for e in read_events(out) if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6, 8] and read_events(out)[-1]["message"] == "early stopping"


def test_lora_targets_only_the_language_model_in_both_layouts():
    import re

    from engine.worker.modeling import lora_target_regex

    rx = re.compile(lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert rx.fullmatch("model.language_model.layers.3.self_attn.q_proj")  # transformers 5.x
    assert rx.fullmatch("language_model.model.layers.3.mlp.down_proj")  # transformers 4.5x
    assert not rx.fullmatch("model.audio_tower.layers.3.self_attn.q_proj")
    assert not rx.fullmatch("model.multi_modal_projector.linear_1")
    assert not rx.fullmatch("lm_head")


def test_disk_full_during_a_checkpoint(tmp_path, tiny_model, data):
    """Checkpoints on a 1 MB tmpfs: the save that no longer fits is reported as a full disk (whether torch says
    ENOSPC or only "unexpected pos"), the previous checkpoint stays complete and loadable, no half-written folder
    is left, and the run (a worker alone: nobody to resume a pause) ends failed there, saying why (exit 1)."""
    import subprocess

    train, _ = data
    out = tmp_path / "full"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ckpts)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        proc = worker(train_args(tiny_model, out, train, max_steps=8, save_steps=1, save_total_limit=10))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        events = read_events(out)
        failed = [e for e in events if e["type"] == "alert" and e["kind"] == "checkpoint_failed"]
        assert failed and failed[0]["message"].startswith(
            f"checkpoint-{failed[0]['step']} not written: no space left on {ckpts} (tmpfs, "), failed[0]
        assert max(e["step"] for e in events if e["type"] == "step") == failed[0]["step"]  # not trained on
        saved = [e["step"] for e in events if e["type"] == "checkpoint"]
        assert saved and saved == list(range(1, len(saved) + 1)) and failed[0]["step"] == saved[-1] + 1
        assert events[-1]["state"] == "failed" and events[-1]["message"] == failed[0]["message"]
        from engine.worker.checkpoint import latest_checkpoint

        assert latest_checkpoint(ckpts).name == f"checkpoint-{saved[-1]}"
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
        from peft import PeftModel
        from transformers import VoxtralForConditionalGeneration

        PeftModel.from_pretrained(VoxtralForConditionalGeneration.from_pretrained(tiny_model), latest_checkpoint(ckpts))
    finally:
        subprocess.run(["umount", str(ckpts)], capture_output=True)


def test_a_full_disk_stops_a_worker_alone_at_the_checkpoint_it_could_not_write(tmp_path, tiny_model, data):
    """Without an engine nobody can resume a pause: a checkpoint that a full disk refuses (ENOSPC, injected) ends the
    run there, failed, saying why — not 60 steps more trained and lost, then "the last checkpoint could not be
    written"."""
    from engine.worker.saving import mount_of

    train, _ = data
    out = tmp_path / "run"
    full = tmp_path / "disk-full"
    full.write_text("")
    proc = worker(train_args(tiny_model, out, train, max_steps=8, save_steps=2),
                  env={"VOXTUI_FAULT_DISK_FULL": str(full)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    events = read_events(out)
    mount, device = mount_of(out)
    said = f"checkpoint-2 not written: no space left on {mount} ({device + ', ' if device else ''}"
    failed = [e for e in events if e["type"] == "alert" and e["kind"] == "checkpoint_failed"]
    assert len(failed) == 1 and failed[0]["message"].startswith(said), failed
    assert max(e["step"] for e in events if e["type"] == "step") == 2
    assert events[-1]["state"] == "failed" and events[-1]["message"] == failed[0]["message"]


def test_the_parameter_table_keeps_its_columns_apart_at_any_size():
    from engine.worker.modeling import render_param_table

    rows = [("language_model.layers (base)", 0, 22_230_220_800, 0), ("language_model.layers (lora)", 92_405_760, 0, 0)]
    text = render_param_table(rows, 92_405_760, 22_322_626_560)
    base = text.splitlines()[1].split()
    assert base[-3:] == ["0", "22,230,220,800", "0"]  # "022,230,220,800" before: the columns ran together
    assert len({len(line) for line in text.splitlines()[:3]}) == 1
