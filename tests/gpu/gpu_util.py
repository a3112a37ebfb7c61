"""Helpers of the GPU tests (``make test-gpu`` on a CUDA machine; tests/conftest.py marks everything under
tests/gpu ``gpu`` and skips it without CUDA). They check the fast paths CI cannot (CUDA graphs, bf16
kernels, varlen attention) on a model with Voxtral-Mini-3B's real widths (3072 hidden, 32 query / 8
key-value heads of 128, 8192 MLP, vocabulary 131072) and a few layers, random weights made on the GPU."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def real_width_config(layers: int = 2):
    from transformers import VoxtralConfig

    return VoxtralConfig(
        audio_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "num_mel_bins": 128, "max_source_positions": 1500},
        text_config={"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
                     "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "vocab_size": 131072, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
                     "rope_parameters": {"rope_theta": 100_000_000.0, "rope_type": "default"}},
        hidden_size=3072)


def with_adapter(model, scale: float = 0.02, seed: int = 0):
    """``model`` with LoRA r16/α32 on the 7 projections, B random (a trained adapter's effect)."""
    from peft import LoraConfig, get_peft_model

    from engine.worker.modeling import lora_target_regex

    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex(TARGETS)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * scale)
    return peft.eval()


def agreement(reference: list[list[int]], other: list[list[int]]) -> list[int]:
    """Per row, how many leading tokens ``other`` shares with ``reference``."""
    return [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            for a, b in zip(reference, other)]


def prompts(n: int, longest: int = 200, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [longest] + torch.randint(8, longest, (n - 1,), generator=g).tolist()
    return [torch.randint(1000, 131000, (k,), generator=g).tolist() for k in lengths]


def save_real_width(tmp_path_factory):
    """The few-layer, real-width Voxtral saved (random weights made on the GPU, bf16): its folder."""
    from gpu_util import real_width_config
    from transformers import VoxtralForConditionalGeneration

    out = tmp_path_factory.mktemp("real-width") / "model"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VoxtralForConditionalGeneration(real_width_config()).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out
