"""``voxtui model tiny OUT``: a small random-weight Voxtral with the real Tekken tokenizer.

The model is a real ``VoxtralForConditionalGeneration`` built from a real ``VoxtralConfig``: a
two-layer Llama-style language model (hidden 64) with the full 131072-token vocabulary, and a
one-layer audio tower. Weights are seeded, so the same command writes the same files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.formatting import bundled_tekken_path
from engine.util import UsageError


def tiny_config():
    from transformers import VoxtralConfig

    return VoxtralConfig(
        audio_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_mel_bins": 128, "max_source_positions": 1500,
        },
        text_config={
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 131072,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "initializer_range": 0.1,  # wide enough that a small adapter can visibly fit data
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
            "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"},
        },
        hidden_size=64,
    )


def write_tiny_model(out: str | os.PathLike, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny model and its tokenizer to ``out`` (atomically: built in a temp folder, renamed)."""
    import torch
    from transformers import VoxtralForConditionalGeneration

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.manual_seed(seed)
        model = VoxtralForConditionalGeneration(tiny_config())
        model.generation_config.pad_token_id = 11
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(bundled_tekken_path(), tmp / "tekken.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
