"""``voxtui model tiny``: a real Voxtral that ``from_pretrained`` loads, seeded and deterministic."""

import torch
from transformers import VoxtralConfig, VoxtralForConditionalGeneration

from conftest import digest, voxtui
from engine.formatting import load_format


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
