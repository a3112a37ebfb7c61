"""The run folder a standalone worker makes (``python -m engine.train … --output_dir RUN``): private (0700),
its config.toml with absolute paths, and never a second run started in a folder that holds one — the
README's command and the launch command preflight prints (``--config RUN/config.toml``) refuse it, the
folder untouched; a checkpoint that cannot be written names the path."""

import csv
import io
import os
import shutil
import stat

from conftest import ROOT, digest, read_events, train_args, voxtui, worker, write_jsonl


def rows(n):
    return [{"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(i % 5 + 1))} for i in range(n)]


def tree(run):
    return {p.relative_to(run): digest(p) for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_a_folder_that_holds_one_and_records_absolute_paths(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", rows(12))
    run = tmp_path / "runs" / "r"

    def rel(p):  # as the README gives them: relative to the folder the worker runs in (tests: ROOT)
        return os.path.relpath(p, ROOT)

    args = train_args(rel(tiny_model), rel(run), rel(train), max_steps=3, save_steps=2, cache_dir=rel(tmp_path / "c"))
    proc = worker(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stat.S_IMODE(run.stat().st_mode) == 0o700  # as the engine makes a run folder
    from engine.config import read_toml

    saved = read_toml(run / "config.toml")
    # absolute, as `voxtui run` saves them: infer and export work from any folder
    assert (saved["model_id"], saved["train_jsonl"], saved["cache_dir"], saved["output_dir"]) == (
        str(tiny_model), str(train), str(tmp_path / "c"), str(run))
    assert [e["path"] for e in read_events(run) if e["type"] == "checkpoint"][-1] == str(run / "checkpoints" / "checkpoint-3")

    # a CPU run records no device memory: export-metrics leaves those columns out, not 0.0 on every row
    proc = voxtui("export-metrics", run, "--csv", "-")
    assert proc.returncode == 0, proc.stderr
    header = next(csv.reader(io.StringIO(proc.stdout)))
    assert "train/loss" in header and not [c for c in header if c.startswith("mem/")], header

    before = tree(run)
    shown = rel(run)

    def refused(again, held, name=shown):
        proc = worker(again)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"voxtui: error: {name}: already holds a run ({held}); continue it with --resume {name}, "
            "or give another --output_dir"), proc.stderr
        assert tree(run) == before  # nothing written: no second series of steps, config.toml, checkpoints

    # the README's command again, and the launch command preflight prints for the run
    refused(args, "checkpoint-2, checkpoint-3")
    refused(["--config", str(run / "config.toml")], "checkpoint-2, checkpoint-3", name=str(run))
    # what a trained run leaves is enough, each alone: the final adapter, the step events
    shutil.move(run / "checkpoints", tmp_path / "aside")
    before = tree(run)
    refused(args, "lora_final")
    shutil.move(run / "lora_final", tmp_path / "aside-final")
    before = tree(run)
    refused(args, "events up to step 3")

    # --output_dir naming a file: one line, the file as it was
    file = tmp_path / "a-file"
    file.write_text("keep me\n")
    proc = worker(train_args(tiny_model, file, train, max_steps=1))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"voxtui: error: --output_dir {file}: {file} is a file, not a folder"), proc.stderr
    assert file.read_text() == "keep me\n"


def test_a_checkpoint_that_cannot_be_written_names_the_path(tmp_path, tiny_model):
    """The checkpoint_failed alert names the path the OSError names (it said "File exists" alone)."""
    train = write_jsonl(tmp_path / "t.jsonl", rows(8))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")  # a file where the checkpoints' folder goes: no save can be written
    proc = worker(train_args(tiny_model, run, train, max_steps=2, save_steps=1))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [e for e in read_events(run) if e["type"] == "alert" and e["kind"] == "checkpoint_failed"]
    assert failed and failed[0]["message"] == (
        f"checkpoint at step 1 not written: File exists: {run / 'checkpoints'}; no earlier checkpoint exists")


def test_the_worker_log_quotes_a_run_folder_name_escaped(tmp_path, tiny_model):
    """A run folder named with ESC, OSC and BEL (and Korean, an emoji): every line the worker prints about it
    (its checkpoints; every [voxtui] line goes through one reporter) has them escaped — `tail -f worker.log`
    retitles no terminal — and keeps the Korean and the emoji."""
    train = write_jsonl(tmp_path / "t.jsonl", rows(8))
    run = tmp_path / "e2[b]\x1b]0;PWN\x07한국🚀[INST]"
    first = worker(train_args(tiny_model, run, train, max_steps=1, save_steps=1, min_lr_ratio=0.1))
    assert first.returncode == 0, first.stdout + first.stderr
    assert not {c for c in first.stderr if ord(c) < 0x20 and c not in "\n\t"}, first.stderr
    assert "\x7f" not in first.stderr
    assert "checkpoint " in first.stderr and "e2[b]\\x1b]0;PWN\\x07한국🚀[INST]" in first.stderr


def test_a_save_that_failed_for_want_of_space_is_told_from_other_failures(tmp_path):
    """A full disk is said whichever error the writer raised: ENOSPC (also as the cause of another error), or
    torch's own for its short write ("[enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406",
    which named no disk) when less was free as it failed than a checkpoint takes; other failures are not."""
    import errno

    from engine.worker.saving import mount_of, no_space

    mount, device = mount_of(tmp_path)
    said = f"no space left on {mount} ({device + ', ' if device else ''}"
    assert no_space(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "checkpoints", 0).startswith(said)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("safetensors: write failed") from e
    except RuntimeError as e:
        assert no_space(e, tmp_path, 0).startswith(said)
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406")
    torch_says.free_bytes = 4096  # checkpoint.note_free_space: as the write failed
    found = no_space(torch_says, tmp_path / "checkpoints", 3 * 2**20)
    assert found.startswith(said) and found.endswith(" MiB free; a checkpoint takes about 3.0 MiB)"), found
    torch_says.free_bytes = 2**40  # room enough: some other failure
    assert no_space(torch_says, tmp_path, 3 * 2**20) == ""
    assert no_space(OSError(errno.EEXIST, "File exists"), tmp_path, 0) == ""
    assert no_space(RuntimeError("no free-space reading"), tmp_path, 0) == ""
