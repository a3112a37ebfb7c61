"""``voxtui export``: a run's adapter merged into the base weights, for serving."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from engine.util import UsageError, quiet_libraries


def cmd_export(args) -> int:
    from engine.eval.infer import pick_checkpoint, run_config, run_dir_of

    run_dir = run_dir_of(args)  # every argument is checked before torch is imported
    ckpt = pick_checkpoint(run_dir, args.checkpoint)
    cfg = run_config(run_dir)
    out = Path(args.merge)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder")
    quiet_libraries()  # before peft imports bitsandbytes: not its note about a CPU kernels package export never uses
    import torch
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    from engine.formatting import resolve_tokenizer_file

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = VoxtralForConditionalGeneration.from_pretrained(cfg.model_id, dtype=dtype)  # full model, audio included
    merged = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    shutil.copyfile(resolve_tokenizer_file(cfg.model_id), tmp / "tekken.json")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(out)
    print(f"merged {ckpt} onto {cfg.model_id} ({args.dtype}), written to {out}", file=sys.stderr)
    return 0
