"""``voxtui model tiny``: a real Voxtral that ``from_pretrained`` loads, seeded and deterministic."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import VoxtralConfig, VoxtralForConditionalGeneration

from conftest import digest, voxtui
from engine.formatting import load_format
from engine.tiny import _AUDIO, _TEXT, MARKER, TINY_FILES, replaceable


def test_tiny_model_loads_and_runs(tiny_model):
    assert (tiny_model / "tekken.json").is_file() and (tiny_model / "model.safetensors").is_file()
    config = VoxtralConfig.from_pretrained(tiny_model)
    assert config.text_config.vocab_size == 131072
    model = VoxtralForConditionalGeneration.from_pretrained(tiny_model)
    fmt = load_format(tiny_model)
    ids = torch.tensor([fmt.encode_texts(["두통이 있어요"])[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 131072) and torch.isfinite(logits).all()
    size = sum(p.numel() for p in model.parameters())
    assert size < 20_000_000  # small: mostly the 131072-token embedding and head


def test_tiny_model_is_deterministic(tmp_path, tiny_model):
    proc = voxtui("model", "tiny", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr
    assert digest(tmp_path / "again" / "model.safetensors") == digest(tiny_model / "model.safetensors")
    refused = voxtui("model", "tiny", tmp_path / "again")
    assert refused.returncode == 2 and "not empty" in refused.stderr


# ------------------------------------------------------------------- --force replaces only a tiny model


def _tree(folder):
    """Every path under ``folder`` with its bytes' digest (folders: None): to show nothing was touched."""
    return {str(p.relative_to(folder)): (digest(p) if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_force_refuses_a_folder_that_holds_anything_else(tmp_path, tiny_model):
    """`voxtui model tiny runs --force` deleted every run (D1): a folder with runs, .git or other files is
    refused in one line naming it and what it holds, exit 2, nothing touched; so is `.`, and a file."""
    runs = tmp_path / "runs"
    (runs / "r1" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (runs / "r1" / "events.jsonl").write_text('{"seq": 1}\n')
    (runs / "_models").mkdir()
    shutil.copytree(tiny_model, runs / "_models" / "tiny")
    (runs / "config.json").write_text((tiny_model / "config.json").read_text())  # looks like a model, partly
    before = _tree(runs)
    proc = voxtui("model", "tiny", runs, "--force")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{runs}: holds _models/, r1/" in proc.stderr and "nothing was changed" in proc.stderr
    assert _tree(runs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "tekken.json").write_text("{}")
    proc = voxtui("model", "tiny", ".", "--force", cwd=repo)
    assert proc.returncode == 2 and f"{repo}: holds .git/" in proc.stderr
    assert sorted(p.name for p in repo.iterdir()) == [".git", "tekken.json"]

    data = tmp_path / "good.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    for force in ([], ["--force"]):
        proc = voxtui("model", "tiny", data, *force)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "a file, not a folder" in proc.stderr
        assert data.read_text() == '{"instruction": "q", "output": "a"}\n'


def test_force_replaces_a_tiny_model_and_a_failure_keeps_the_old_one(tmp_path, tiny_model, monkeypatch):
    """A tiny model written before the marker (its config.json is the tiny model's) is replaced, through a
    temp folder beside it that is gone afterwards; a failure while the new one is built leaves the old one."""
    from transformers import PreTrainedModel

    from engine.tiny import write_tiny_model

    old = tmp_path / "tiny"
    shutil.copytree(tiny_model, old)
    (old / MARKER).unlink()
    (old / "model.safetensors").write_bytes(b"stale")
    proc = voxtui("model", "tiny", old, "--force")
    assert proc.returncode == 0, proc.stderr
    assert digest(old / "model.safetensors") == digest(tiny_model / "model.safetensors") and (old / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]

    before = _tree(old)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_tiny_model(old, force=True)
    assert _tree(old) == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


names = st.sets(st.sampled_from(sorted(TINY_FILES) + ["r1/", ".git/", "notes.txt", "events.jsonl", "tekken.json/",
                                                    "model-00001-of-00002.safetensors"]), max_size=6).filter(
    lambda s: not {"tekken.json", "tekken.json/"} <= s)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=names, tiny_config=st.booleans())
def test_only_a_folder_of_the_tiny_model_s_files_is_replaceable(tmp_path, names, tiny_config):
    """Generated folder contents: ``--force`` may replace one only when every entry is one of the files the
    command writes (a folder of that name does not count), and it holds the marker or the tiny config."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        folder = Path(d)
        for name in names:
            if name.endswith("/"):
                (folder / name).mkdir()
            elif name == "config.json":
                (folder / name).write_text(json.dumps(
                    {"model_type": "voxtral", "text_config": {**_TEXT, "hidden_size": 64 if tiny_config else 3072},
                     "audio_config": _AUDIO}))
            else:
                (folder / name).write_bytes(b"x")
        why = replaceable(folder)
        files_only = all(n in TINY_FILES for n in names)
        vouched = not names or MARKER in names or ("config.json" in names and tiny_config)
        assert (why is None) == (files_only and vouched), (names, why)
        if why:
            assert "nothing was changed" in why
        assert sorted(n.rstrip("/") for n in names) == sorted(os.listdir(folder))
