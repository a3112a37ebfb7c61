"""q/k/v and gate/up as one product each, for training with LoRA.

Each Llama decoder layer reads its normed input five times for the base projections (q, k, v, gate, up)
and five more for their adapters' A. ``fuse_projections`` concatenates each group's frozen weights once
at load (the original weights become views into the new one: no memory is added) and gives the layer's
attention and MLP a forward that runs, per group, one base product, one product for all the adapters'
A (stacked), then each adapter's B on its slice — the arithmetic of PEFT's LoRA layers, in fewer and
larger products, under autograd (the frozen weights get no gradient). The attention itself, the
rotary embedding and the attention function are the installed transformers' own. A call with a KV
cache (generation), disabled or merged adapters, LoRA dropout or an adapter variant (DoRA) runs the
original forward.

What it bought, measured on an H200 (docs/benchmarks.md, 2026-11-29, run I): nothing. bf16 LoRA 28,707
tokens/s fused against 28,888 separate, 60.7 against 56.2 GiB (the concatenated outputs and their sums
are extra tensors); NF4 18,377 against 19,015. Separate products passed tests/gpu for NF4 too (run J), so
the worker fuses nothing unless asked (``VOXTUI_FUSION=nf4|all``, knobs.py).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

ADAPTER = "default"


def fuse_projections(layers) -> int:
    """Fuses q/k/v and gate/up of each decoder layer of ``layers`` where the layout allows; returns how many."""
    n = 0
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
        if attn is None or mlp is None or not all(hasattr(attn, x) for x in names[0]) \
                or not all(hasattr(mlp, x) for x in names[1]) or not hasattr(mlp, "act_fn"):
            continue
        groups = [[getattr(attn, x) for x in names[0]], [getattr(mlp, x) for x in names[1]]]
        if not all(_fusable(m) for g in groups for m in g) or len({_nf4(_base(m)) for g in groups for m in g}) > 1:
            continue
        for owner, mods, buffer in ((attn, groups[0], "_fused_qkv"), (mlp, groups[1], "_fused_gate_up")):
            _concat(owner, mods, buffer)
        attn._unfused_forward = attn.forward
        attn.forward = types.MethodType(_attention, attn)
        mlp._unfused_forward = mlp.forward
        mlp.forward = types.MethodType(_mlp, mlp)
        n += 1
    return n


def _base(m: nn.Module) -> nn.Module:
    return getattr(m, "base_layer", m)


def _is_lora(m: nn.Module) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "base_layer")


def _nf4(base: nn.Module) -> bool:
    """A 4-bit layer with voxtui's traceable forward (engine/worker/nf4.py)."""
    return hasattr(base, "_nf4_meta")


def _fusable(m: nn.Module) -> bool:
    """A plain bias-free nn.Linear or traceable 4-bit layer, or PEFT's LoRA layer over one, with one plain
    adapter, no dropout."""
    base = _base(m)
    if not (type(base) is nn.Linear or _nf4(base)) or base.bias is not None or hasattr(base, "_fp8_scale") \
            or hasattr(base, "_fp8_grad_weight"):
        return False
    if not _is_lora(m):
        return m is base
    return (type(m).__name__ in ("Linear", "Linear4bit") and list(m.lora_A.keys()) == [ADAPTER]
            and isinstance(m.lora_dropout[ADAPTER], nn.Identity) and not getattr(m, "lora_variant", {})
            and not getattr(m, "use_dora", {}).get(ADAPTER, False) and not m.lora_bias.get(ADAPTER, False))


def _concat(owner: nn.Module, mods: list[nn.Module], buffer: str) -> None:
    """One (sum of outs × in) weight; each projection's weight becomes a view into it. 4-bit layers keep
    their own weights (``fused_linear`` dequantises them into one when compiled)."""
    if _nf4(_base(mods[0])):
        owner.register_buffer(buffer, None, persistent=False)
        setattr(owner, buffer + "_sizes", tuple(_base(m)._nf4_meta[0][0] for m in mods))
        return
    weights = [_base(m).weight for m in mods]
    fused = torch.cat([w.detach() for w in weights])
    start = 0
    for w in weights:
        w.data = fused[start:start + w.shape[0]]
        start += w.shape[0]
    owner.register_buffer(buffer, fused, persistent=False)
    setattr(owner, buffer + "_sizes", tuple(w.shape[0] for w in weights))


def _active(mods) -> bool:
    """Whether the fused path computes what the modules would: adapters enabled, unmerged, the default one."""
    for m in mods:
        if _is_lora(m) and (m.disable_adapters or m.merged or list(m.active_adapters) != [ADAPTER]):
            return False
    return True


def fused_linear(x: torch.Tensor, weight: torch.Tensor | None, mods) -> torch.Tensor:
    """``cat([m(x) for m in mods], -1)`` for PEFT LoRA Linears (or plain ones) whose base weights are the
    rows of ``weight``: one base product, one product for every A, then each B. ``weight`` None: 4-bit
    layers, dequantised into one weight while compiled (Inductor writes them into one buffer), else each
    run by its own forward."""
    if weight is not None:
        y = torch.nn.functional.linear(x, weight)
    else:
        y = _nf4_base(x, [_base(m) for m in mods])
    lora = [m for m in mods if _is_lora(m)]
    if not lora:
        return y
    a = torch.cat([m.lora_A[ADAPTER].weight for m in lora])
    # as PEFT: the input in the adapters' dtype (under autocast the product casts to bf16 anyway)
    u = torch.nn.functional.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype), a)
    it = iter(u.split([m.lora_A[ADAPTER].weight.shape[0] for m in lora], dim=-1))
    parts = []
    for m in mods:
        if _is_lora(m):
            parts.append(torch.nn.functional.linear(next(it), m.lora_B[ADAPTER].weight) * m.scaling[ADAPTER])
        else:
            parts.append(u.new_zeros((*u.shape[:-1], _base(m).weight.shape[0])))
    return (y + torch.cat(parts, dim=-1)).to(y.dtype)


def _nf4_base(x: torch.Tensor, bases) -> torch.Tensor:
    from engine.worker.nf4 import NAMES, weight

    dtype = bases[0].compute_dtype or x.dtype
    if not torch.compiler.is_compiling():
        return torch.cat([b(x) for b in bases], dim=-1)
    w = torch.cat([weight(b, (*(getattr(b, n) for n in NAMES), b._nf4_meta), dtype) for b in bases])
    return torch.nn.functional.linear(x.to(dtype), w).to(x.dtype)


def _attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """transformers' LlamaAttention.forward with q/k/v as one fused product (see the module's text)."""
    caches = [kwargs.get(k) for k in ("cache", "past_key_values", "past_key_value")]
    mods = (self.q_proj, self.k_proj, self.v_proj)
    if any(c is not None for c in caches) or position_embeddings is None or not _active(mods):
        return self._unfused_forward(hidden_states, position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, **kwargs)
    for k in ("cache", "past_key_values", "past_key_value"):
        kwargs.pop(k, None)
    hf = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = fused_linear(hidden_states, self._fused_qkv, mods)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in qkv.split(self._fused_qkv_sizes, dim=-1))
    cos, sin = position_embeddings
    q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    functions = hf.ALL_ATTENTION_FUNCTIONS
    impl = self.config._attn_implementation
    if hasattr(functions, "get_interface"):
        attention = functions.get_interface(impl, hf.eager_attention_forward)
    else:
        attention = hf.eager_attention_forward if impl == "eager" else functions[impl]
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _mlp(self, x):
    """transformers' LlamaMLP.forward with gate/up as one fused product."""
    mods = (self.gate_proj, self.up_proj)
    if not _active(mods):
        return self._unfused_forward(x)
    gate, up = fused_linear(x, self._fused_gate_up, mods).split(self._fused_gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
