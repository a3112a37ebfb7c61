"""The config file and --bf16: an unreadable config is one line and exit 2; an absent --bf16 means bf16
where the hardware has it, preflight says what it chose and why, and the run's config.toml holds the choice."""

import json
import os
import re
import sys

import pytest

from conftest import train_args, voxtui, worker, write_jsonl


def rows(n):
    return [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(n)]


def one_line_usage_error(proc, *words):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxtui: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("tool", [("preflight",), ("run",)])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, tool):
    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'lr = 0.001\n# caf\xe9 au lait\n')
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('per_device_bsz = "four"\n')
    bad_bf16 = tmp_path / "bf16.toml"
    bad_bf16.write_text('bf16 = "yes"\n')
    bad_quant = tmp_path / "quant.toml"
    bad_quant.write_text('quant = "nf5"\n')
    cases = ((latin1, ("latin1.toml", "UTF-8")), (tmp_path, (str(tmp_path), "folder")),
             (wrong_type, ('wrong.toml: per_device_bsz = "four": expected int, got str',)),
             (bad_bf16, ('bf16.toml: bf16 = "yes": must be true, false or "auto"',)),
             (bad_quant, ("""quant.toml: quant = "nf5": invalid enum value 'nf5' (one of nf4, none, fp8)""",)))
    for config, words in cases:
        proc = voxtui(*tool, "--config", config, "--train_jsonl", train, "--output_dir", tmp_path / "run", cwd=tmp_path)
        one_line_usage_error(proc, *words)
    assert latin1.read_bytes() == b'lr = 0.001\n# caf\xe9 au lait\n'  # the input untouched
    assert not (tmp_path / "run").exists()


def test_the_worker_reads_a_bad_config_as_a_usage_error(tmp_path):
    import subprocess

    from conftest import ROOT

    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe lr = 1\n")
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--config", str(bad)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    one_line_usage_error(proc, "bad.toml", "UTF-8")


def expected_bf16() -> bool:
    """This machine's answer, found independently of engine.config: a CPU run (no CUDA) uses bf16 only
    when /proc/cpuinfo lists bf16 units."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU rule is tested on a machine without CUDA")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_bf16_auto_is_chosen_reported_and_saved(tmp_path, tiny_model):
    from engine.config import TrainConfig, resolve, to_toml
    from engine.train import build_parser

    want = expected_bf16()
    train = write_jsonl(tmp_path / "t.jsonl", rows(8))
    proc = voxtui("preflight", "--model_id", tiny_model, "--train_jsonl", train, "--quant", "none", "--json", "-",
                  cwd=tmp_path)
    report = json.loads(proc.stdout)
    check = next(c for c in report["checks"] if c["name"] == "bf16")
    assert check["auto"] is True and check["bf16"] is want
    assert check["message"].startswith(f"bf16: chose {'bf16' if want else 'fp32'} because ")
    assert ("bf16 units (" in check["message"]) if want else ("no bf16 units" in check["message"])
    assert f"bf16 = {'true' if want else 'false'}" in report["config"].splitlines()

    # an explicit flag or TOML value wins; "auto" in a TOML file means the same as no flag
    from engine.cli import build_parser as cli_parser
    from engine.preflight import preflight

    for flags, value in ((["--bf16"], True), (["--no-bf16"], False)):  # the same call in this process (quicker)
        args = cli_parser().parse_args(["preflight", "--model_id", str(tiny_model), "--train_jsonl", str(train),
                                        "--quant", "none", "--output_dir", str(tmp_path / "o"), *flags])
        check = next(c for c in preflight(resolve(args))["checks"] if c["name"] == "bf16")
        assert check["auto"] is False and check["bf16"] is value and "as set" in check["message"]
    toml = tmp_path / "run.toml"
    for text, value in (('bf16 = "auto"\n', want), ("bf16 = false\n", False), ("bf16 = true\n", True)):
        toml.write_text(text + f'train_jsonl = "{train}"\n')
        cfg = resolve(build_parser().parse_args(["--config", str(toml)]))
        assert cfg.bf16 is value and f"bf16 = {str(value).lower()}" in to_toml(cfg)
    assert TrainConfig().bf16 is want

    # the worker, with no flag: its config.toml holds the concrete choice
    args = train_args(tiny_model, tmp_path / "run", train, max_steps=1)
    args.remove("--no-bf16")
    run = worker(args)
    assert run.returncode == 0, run.stdout + run.stderr
    from engine.config import read_toml

    saved = read_toml(tmp_path / "run" / "config.toml")
    assert saved["bf16"] is want


def test_help_tells_the_bf16_default():
    for tool in (("run", "--help"), ("preflight", "--help")):
        text = " ".join(voxtui(*tool).stdout.split())
        assert "--bf16, --no-bf16 bf16 weights and compute. No flag (auto)" in text
        assert "(default: auto)" in text and "avx512_bf16" in text


def test_a_mistyped_local_model_is_said_at_once_and_a_hub_id_is_left_to_the_hub(tmp_path, monkeypatch):
    """A --model_id that names a folder here (a path from /, ~ or ., or one whose first part is a folder
    here, like runs/_models/tiny) and does not exist is preflight's model no-go at once, and its tokenizer a
    one-line error — not a minute of hub requests that cannot succeed; a hub id (org/name with no such folder
    here) is left to the hub."""
    from engine.formatting import resolve_tokenizer_file
    from engine.util import UsageError, looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "_models").mkdir(parents=True)
    for model_id in ("runs/nomodel", "./nomodel", str(tmp_path / "nomodel"), "~/no-such-model", "a/b/c", "x.json"):
        assert looks_local(model_id), model_id
        with pytest.raises(UsageError, match="no such tokenizer file or model folder"):
            resolve_tokenizer_file(model_id)
    assert not any(looks_local(m) for m in ("mistralai/Voxtral-Mini-3B-2507", "someorg/some-model"))
    train = write_jsonl(tmp_path / "t.jsonl", rows(2))
    proc = voxtui("preflight", "--model_id", "runs/nomodel", "--train_jsonl", train, "--json", "-", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    fails = [c for c in json.loads(proc.stdout)["checks"] if c["level"] == "fail"]
    assert any(c["area"] == "model" and "runs/nomodel: no such model folder" in c["message"] for c in fails), fails
    assert "huggingface.co" not in proc.stdout + proc.stderr


def test_fp8_products_all_without_quant_fp8_says_what_works():
    """--fp8_products all with the default --quant nf4 names the fix that works (--quant fp8), not one that is
    refused as well (backward with NF4)."""
    from engine.config import TrainConfig
    from engine.util import UsageError

    with pytest.raises(UsageError) as e:
        TrainConfig(train_jsonl="x", fp8_products="all").validate()
    assert "add --quant fp8" in str(e.value) and "backward" not in str(e.value)
    with pytest.raises(UsageError, match="add --quant fp8, or use --fp8_products backward"):
        TrainConfig(train_jsonl="x", quant="none", fp8_products="all").validate()


@pytest.mark.parametrize("tool", [("preflight",), ("run",)])
def test_a_bad_field_of_a_config_file_is_named_as_the_file_writes_it(tmp_path, tool):
    """A problem with a value from --config names the file and the field as written there (not a flag the
    user never typed); the same values given as flags are named as flags; a flag over the file's field
    is named as the flag. Always one line, exit 2, nothing made."""
    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    config = tmp_path / "run.toml"
    config.write_text(f'train_jsonl = "{train}"\nfp8_products = "all"\nlr = -1.0\nlora_targets = ["q_proj", "x"]\n')
    out = ("--output_dir", tmp_path / "run")
    proc = voxtui(*tool, "--config", config, *out, cwd=tmp_path)
    one_line_usage_error(proc, f'{config}: fp8_products = "all" needs quant = "fp8" (', 'got quant = "nf4"): add quant = "fp8"',
                         f"{config}: lr must be above 0 (got -1.0)", f"{config}: lora_targets must be among")
    assert "--" not in proc.stderr.split("error: ", 1)[1], proc.stderr
    proc = voxtui(*tool, "--train_jsonl", train, "--fp8_products", "all", "--lr", "-1", "--lora_targets", "q_proj,x", *out,
                  cwd=tmp_path)
    one_line_usage_error(proc, "--fp8_products all needs --quant fp8 (", "got --quant nf4): add --quant fp8",
                         "--lr must be above 0 (got -1.0)", "--lora_targets must be among")
    assert "run.toml" not in proc.stderr
    proc = voxtui(*tool, "--config", config, "--quant", "none", "--lr", "-2", "--lora_targets", "q_proj", *out,
                  cwd=tmp_path)
    one_line_usage_error(proc, f'{config}: fp8_products = "all" needs --quant fp8 (',
                         'got --quant none): add --quant fp8, or use fp8_products = "backward"',
                         "error: --lr must be above 0 (got -2.0); ")
    assert f"{config}: lr" not in proc.stderr and "lora_targets" not in proc.stderr
    # a flag's problem with another field a file set: that field as the file writes it, with the file's name
    plain = tmp_path / "plain.toml"
    plain.write_text(f'train_jsonl = "{train}"\nquant = "none"\n')
    proc = voxtui(*tool, "--config", plain, "--fp8_products", "all", *out, cwd=tmp_path)
    one_line_usage_error(proc, '--fp8_products all needs quant = "fp8" (',
                         f'got quant = "none" in {plain}): add quant = "fp8", or use --fp8_products backward')
    assert not (tmp_path / "run").exists()


def test_a_resumed_runs_saved_field_is_named_as_its_config_toml_writes_it(tmp_path):
    """`--resume RUN`: the fields its config.toml fills are named there; flags given again are flags."""
    from engine.cli import build_parser
    from engine.config import resolve
    from engine.runs import merge_saved_config
    from engine.util import UsageError

    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text(f'train_jsonl = "{train}"\nquant = "nf4"\nfp8_products = "backward"\n')
    for flags, says in (([], f'{run / "config.toml"}: fp8_products = "backward" needs quant = "none" or "fp8" ('),
                        (["--quant", "nf4"], f'{run / "config.toml"}: fp8_products = "backward" needs --quant none or fp8 ('),
                        (["--fp8_products", "backward"], '--fp8_products backward needs quant = "none" or "fp8" (')):
        args = build_parser().parse_args(["run", "--resume", str(run), *flags])
        merge_saved_config(args, run)
        with pytest.raises(UsageError) as e:
            resolve(args)
        assert str(e.value).startswith(says), (flags, str(e.value))


def test_the_launch_command_keeps_the_flags_given_beside_a_config_file(tmp_path):
    """`voxtui preflight --config FILE --max_steps 6 --lr 0.5`: the launch command is the file and the flags
    that override it (the file alone trained a full epoch at its own rate); a run's own config.toml, which
    will hold every value, alone; no file: every value not the default as a flag."""
    import shlex

    import msgspec

    from engine.config import TrainConfig
    from engine.preflight import launch_command

    path = tmp_path / "run.toml"
    path.write_text('train_jsonl = "t.jsonl"\nlr = 0.001\nquant = "none"\nbf16 = false\n')
    cfg = TrainConfig(train_jsonl="t.jsonl", lr=0.5, quant="none", bf16=False, max_steps=6, nproc=2)
    head = "torchrun --standalone --nproc_per_node 2 -m engine.train"
    assert launch_command(cfg, str(path)) == f"{head} --config {shlex.quote(str(path))} --max_steps 6 --lr 0.5"
    same = msgspec.structs.replace(cfg, lr=0.001, max_steps=0)
    assert launch_command(same, str(path)) == f"{head} --config {shlex.quote(str(path))}"
    assert launch_command(cfg, str(path), written=True) == f"{head} --config {shlex.quote(str(path))}"
    assert launch_command(cfg) == f"{head} --train_jsonl t.jsonl --max_steps 6 --lr 0.5 --no-bf16 --quant none"
    # a resume's: the run's folder (its config.toml holds the config, the flags given again merged in)
    run = msgspec.structs.replace(cfg, output_dir=str(tmp_path / "my run"))
    assert launch_command(run, str(path), written=True, resume=True) == f"{head} --resume {shlex.quote(run.output_dir)}"


def test_a_folder_given_as_a_data_file_is_said_to_be_one(tmp_path):
    """--train_jsonl DIR read "no such file" (the data tools say "a folder"): one line, exit 2."""
    from engine.config import TrainConfig
    from engine.util import UsageError

    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError) as e:
        TrainConfig(train_jsonl=str(tmp_path / "d"), val_jsonl=str(tmp_path / "none.jsonl")).validate()
    assert f"--train_jsonl {tmp_path / 'd'}: a folder, not a JSONL file" in str(e.value)
    assert f"--val_jsonl {tmp_path / 'none.jsonl'}: no such file" in str(e.value)


def test_a_resume_cannot_change_the_adapters_shape_the_base_model_or_the_folder(tmp_path):
    """--lora_r / --lora_targets / --model_id given again with --resume would make adapters the run's
    checkpoints cannot load into (the resume failed, and, saved into config.toml, every resume after it):
    refused in one line before anything is written; the same values given again, or other flags, resume."""
    from engine.cli import build_parser
    from engine.runs import merge_saved_config
    from engine.util import UsageError

    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    model = tmp_path / "model"
    model.mkdir()
    run = tmp_path / "r"
    run.mkdir()
    toml = f'model_id = "{model}"\ntrain_jsonl = "{train}"\nlora_r = 16\nlora_targets = ["q_proj", "v_proj"]\n'
    (run / "config.toml").write_text(toml)
    for flags, says in ((["--lora_r", "8"], "--lora_r 8: a resumed run keeps its lora_r (16)"),
                        (["--lora_targets", "q_proj"], "--lora_targets q_proj: a resumed run keeps its lora_targets "
                                                       "(q_proj,v_proj)"),
                        (["--model_id", str(train)], f"--model_id {train}: a resumed run keeps its model_id"),
                        (["--output_dir", str(tmp_path / "elsewhere")], "a resumed run stays in its folder")):
        args = build_parser().parse_args(["run", "--resume", str(run), *flags])
        with pytest.raises(UsageError, match=re.escape(says)):
            merge_saved_config(args, run)
    assert (run / "config.toml").read_text() == toml
    for flags in ([], ["--lora_r", "16", "--lora_targets", "v_proj,q_proj", "--lr", "0.001"],
                  ["--model_id", os.path.relpath(model)], ["--output_dir", str(run)]):
        args = build_parser().parse_args(["run", "--resume", str(run), *flags])
        merge_saved_config(args, run)
        assert args.lora_r == 16 and args.output_dir == str(run)


@pytest.mark.parametrize("flags,says", [
    (["--seed", "-1"], "--seed must be 0 or more (got -1)"),
    (["--epochs", "nan"], "--epochs must be a finite number (got nan)"),
    (["--epochs", "inf"], "--epochs must be a finite number (got inf)"),
    (["--lr", "nan"], "--lr must be above 0 (got nan)"),
    (["--lr", "inf"], "--lr must be above 0 (got inf)"),
    (["--min_lr_ratio", "2"], "--min_lr_ratio must be in [0, 1] (got 2.0)"),
    (["--weight_decay", "-1"], "--weight_decay must be 0 or more (got -1.0)"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be 0 or more (got -1.0)"),
    (["--peak_tflops", "-5"], "--peak_tflops must be 0 or more (got -5.0)"),
])
def test_out_of_range_numbers_are_one_line_not_a_traceback(tmp_path, flags, says):
    """Values that crashed later (a traceback: --seed -1, --epochs nan / inf, --lr nan in the worker) or
    passed silently (--min_lr_ratio 2, a negative weight decay, clip norm or peak): refused up front."""
    from engine.config import resolve
    from engine.train import build_parser
    from engine.util import UsageError

    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    with pytest.raises(UsageError, match=re.escape(says)):
        resolve(build_parser().parse_args(["--train_jsonl", str(train), *flags]))


def test_an_output_dir_under_a_file_is_said(tmp_path):
    from engine.config import TrainConfig
    from engine.util import UsageError

    afile = write_jsonl(tmp_path / "f.jsonl", rows(1))
    with pytest.raises(UsageError, match=re.escape(f"--output_dir {afile}/sub: {afile} is a file, not a folder")):
        TrainConfig(train_jsonl=str(afile), output_dir=str(afile / "sub")).validate()
    TrainConfig(train_jsonl=str(afile), output_dir=str(tmp_path / "new" / "run")).validate()


def test_preflight_fails_an_output_dir_that_holds_a_run(tmp_path):
    """`voxtui run` refuses a new run in a folder that holds one; preflight said go (and printed its launch
    command) for it. A resume's preflight (inside `voxtui run --resume`) is not concerned."""
    from engine.config import TrainConfig
    from engine.preflight import preflight

    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    run = tmp_path / "old"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    cfg = TrainConfig(model_id="missing-model", train_jsonl=str(train), output_dir=str(run))
    checks = {c["name"]: c for c in preflight(cfg)["checks"]}
    assert checks["output_dir"]["level"] == "fail" and f"voxtui run --resume {run}" in checks["output_dir"]["message"]
    assert "output_dir" not in {c["name"] for c in preflight(cfg, written=True)["checks"]}


def test_a_resumed_runs_saved_preview_length_past_todays_limit_says_the_flag_that_replaces_it(tmp_path):
    """A run saved when previews could be 4096 tokens long (the limit is 512 now): `--resume` names the file's
    value and the flag that replaces it; given, the flag wins."""
    from engine.cli import build_parser
    from engine.config import resolve
    from engine.runs import merge_saved_config
    from engine.util import UsageError

    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text(f'train_jsonl = "{train}"\nmax_new_tokens = 1000\n')
    args = build_parser().parse_args(["run", "--resume", str(run)])
    merge_saved_config(args, run)
    with pytest.raises(UsageError) as e:
        resolve(args)
    assert str(e.value) == (f"{run / 'config.toml'}: max_new_tokens must be in [1, 512] (got 1000); "
                            "--max_new_tokens given with the command replaces the file's value")
    args = build_parser().parse_args(["run", "--resume", str(run), "--max_new_tokens", "256"])
    merge_saved_config(args, run)
    assert resolve(args).max_new_tokens == 256
