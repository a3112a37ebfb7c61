"""Loading a run's model for inference (torch is imported inside the functions).

``voxtui infer`` decodes with a **merged** model: the base loaded once, text only (the audio tower is
dropped as it loads), a 4-bit NF4 base expanded once to its compute dtype (the very weights the run
trained against: bitsandbytes dequantises them the same way in every forward), an FP8 run's projections
rounded through FP8 by rows as its products saw them (engine/worker/fp8.py), and the checkpoint's
LoRA product ``scale · B @ A`` added to each targeted weight in fp32, then stored in the model's dtype.
The adapter on disk is never touched. Over several checkpoints the targeted weights as loaded are kept
(on the GPU when it has room, else in host memory) and put back before the next adapter is merged, so
the base is read from disk once.

(engine/eval/infer.py's ``load_for_inference`` is the PEFT-wrapped model as ``PeftModel.from_pretrained``
makes it: the reference the tests and bench/infer_speed.py compare with.)
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.util import UsageError, quiet_libraries

ADAPTER_PREFIX = "base_model.model."


def load_base(cfg, device, quant: str | None = None, dtype=None):
    """The base model as the run trained it (text only: the audio tower is not kept)."""
    quiet_libraries()
    import torch
    from transformers import VoxtralForConditionalGeneration

    from engine.worker.modeling import _drop_audio_tower, nf4_config

    quant = cfg.quant if quant is None else quant
    dtype = dtype or (torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32)
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    model = VoxtralForConditionalGeneration.from_pretrained(cfg.model_id, **kwargs)
    _drop_audio_tower(model)
    if quant == "fp8":  # the weights the run's FP8 products multiplied by, as plain weights
        from engine.worker.fp8 import round_trip
        from engine.worker.modeling import language_model

        round_trip(language_model(model).layers)
    return model.eval()


class MergedModel:
    """The run's base loaded once; ``use(checkpoint)`` merges that checkpoint's adapter into it (with
    ``swappable``, again and again: the weights a previous ``use`` changed are put back first). ``model`` is a plain
    ``VoxtralForConditionalGeneration``: generation, perplexity and export all take it as it is."""

    def __init__(self, cfg, device, dtype=None, swappable: bool = False) -> None:
        self.model = load_base(cfg, device, dtype=dtype)
        self.dequantized = dequantize_4bit(self.model)
        self.device = device
        self.swappable = swappable  # keep the targeted weights as loaded, for the next checkpoint
        self.checkpoint: Path | None = None
        self._original: dict[str, object] = {}  # module name → its weight as loaded

    def use(self, ckpt: Path) -> MergedModel:
        import torch

        if self.checkpoint is not None and Path(ckpt) == self.checkpoint:
            return self
        if self.checkpoint is not None and not self.swappable:
            raise RuntimeError("MergedModel(swappable=False) holds one checkpoint")
        scale, pairs = read_adapter(ckpt)
        modules = dict(self.model.named_modules())
        missing = [name for name in pairs if name not in modules or not hasattr(modules[name], "weight")]
        if missing:
            raise UsageError(f"{ckpt}: the adapter targets {missing[0]!r}, which the base model does not have "
                             f"({len(missing)} such modules)")
        with torch.no_grad():
            if self.checkpoint is not None:  # a second checkpoint: back to the weights as loaded first
                for name, w in self._original.items():
                    modules[name].weight.copy_(w)
            for name, (a, b) in pairs.items():
                w = modules[name].weight
                if self.swappable and name not in self._original:
                    self._original[name] = w.detach().to(self._keep_on(w), copy=True)
                delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
                w.copy_((w.float() + scale * delta).to(w.dtype))
        self.checkpoint = Path(ckpt)
        return self

    def _keep_on(self, w):
        """Where the loaded weights wait for the next checkpoint: the GPU when it has room to spare."""
        import torch

        if w.device.type != "cuda":
            return w.device
        free, _ = torch.cuda.mem_get_info(w.device)
        return w.device if free > 4 * w.numel() * w.element_size() + (4 << 30) else torch.device("cpu")


def read_adapter(ckpt: Path) -> tuple[float, dict]:
    """(scale, {module name: (A, B)}) of a PEFT LoRA checkpoint (adapter_config.json and
    adapter_model.safetensors), the names as they are in the unwrapped model."""
    import math

    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    try:
        conf = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
        r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{ckpt / 'adapter_config.json'}: cannot read r and lora_alpha ({e})") from None
    if conf.get("use_dora"):
        raise UsageError(f"{ckpt}: DoRA adapters are not supported")
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    try:
        tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001 (a file from outside: any failure to read it, SafetensorError included)
        raise UsageError(f"{ckpt / 'adapter_model.safetensors'}: cannot read it ({e})") from None
    pairs: dict[str, list] = {}
    for key, t in tensors.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        for part, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                pairs.setdefault(name[:-len(part)], [None, None])[i] = t
                break
        else:
            raise UsageError(f"{ckpt}: unexpected tensor {key!r} in the adapter (only LoRA A/B weights are merged)")
    incomplete = [n for n, (a, b) in pairs.items() if a is None or b is None]
    if incomplete:
        raise UsageError(f"{ckpt}: {incomplete[0]} has only one of lora_A / lora_B")
    return scale, {n: (a, b) for n, (a, b) in pairs.items()}


def dequantize_4bit(model) -> int:
    """Replace every bitsandbytes 4-bit linear layer by a plain one holding its dequantised weight (in
    the layer's compute dtype): the values every 4-bit forward multiplies by. Returns how many."""
    import torch
    from torch import nn

    done = 0
    for name, mod in list(model.named_modules()):
        if mod.__class__.__name__ != "Linear4bit":
            continue
        import bitsandbytes.functional as bnbf

        dtype = getattr(mod, "compute_dtype", None) or torch.bfloat16
        data, state = mod.weight.data, mod.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes repacked it for its CPU kernel
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        w = bnbf.dequantize_4bit(data, state).to(dtype)
        new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if mod.bias is not None:
                new.bias.copy_(mod.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done += 1
    return done
