"""Write a full-size Voxtral (``VoxtralConfig()``, Voxtral-Mini-3B's shape) with random bf16 weights,
made on the GPU, plus the bundled Tekken tokenizer, so it loads "the normal way" with from_pretrained.

    python bench/random_voxtral.py /tmp/voxtral-random
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(out: str) -> None:
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    from engine.formatting import bundled_tekken_path

    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = VoxtralForConditionalGeneration(VoxtralConfig())
    torch.set_default_dtype(torch.float32)
    model.config.text_config.pad_token_id = 11
    model.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(bundled_tekken_path(), Path(out) / "tekken.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"random Voxtral: {n / 1e9:.2f} B parameters written to {out} in {time.perf_counter() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
