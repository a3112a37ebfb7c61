"""Write a full-size Voxtral with random bf16 weights, made on the GPU, plus the bundled Tekken tokenizer, so
it loads "the normal way" with from_pretrained.

    python bench/random_voxtral.py /tmp/voxtral-random                          # Voxtral-Mini-3B's shape
    python bench/random_voxtral.py /tmp/voxtral-small-random --shape small24b  # Voxtral-Small-24B's shape

The 24B shape is Voxtral-Small-24B-2507's language model (Mistral Small 3.1: 40 layers, hidden 5120, MLP
32768, 32 query / 8 key-value heads of 128, vocabulary 131072) behind the same audio encoder; in bf16 it is
about 48 GB, made once on the GPU and written once (no second copy on the host or the disk).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ("mini", "small24b")


def config(shape: str = "mini"):
    """The ``VoxtralConfig`` of a shape: ``mini`` is transformers' default (Voxtral-Mini-3B-2507)."""
    from transformers import VoxtralConfig

    if shape == "mini":
        return VoxtralConfig()
    if shape == "small24b":
        return VoxtralConfig(
            text_config={"model_type": "llama", "hidden_size": 5120, "intermediate_size": 32768,
                         "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "head_dim": 128, "vocab_size": 131072, "max_position_embeddings": 131072,
                         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                         "pad_token_id": 11, "rope_parameters": {"rope_theta": 100_000_000.0, "rope_type": "default"}},
            hidden_size=5120)
    raise ValueError(f"shape must be one of {', '.join(SHAPES)} (got {shape!r})")


def main(out: str, shape: str = "mini") -> None:
    import torch
    from transformers import VoxtralForConditionalGeneration

    from engine.formatting import bundled_tekken_path

    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = VoxtralForConditionalGeneration(config(shape))
    torch.set_default_dtype(torch.float32)
    model.config.text_config.pad_token_id = 11
    model.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(bundled_tekken_path(), Path(out) / "tekken.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"random Voxtral ({shape}): {n / 1e9:.2f} B parameters written to {out} in {time.perf_counter() - t:.0f}s",
          flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=SHAPES, default="mini")
    a = ap.parse_args()
    main(a.out, a.shape)
