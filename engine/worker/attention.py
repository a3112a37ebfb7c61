"""Attention for packed rows: variable-length (per example) causal attention, no mask tensor.

A packed micro-batch is one row of many examples laid end to end, described by ``cu_seq_lens_q``
(the cumulative example lengths, int32, the names transformers' flash-attention path uses) and
``max_length_q``. On a GPU this runs PyTorch's own FlashAttention varlen kernel
(``torch.nn.attention.varlen.varlen_attn``): no ``L × L`` mask is ever built, and padding costs
nothing. On the CPU it runs SDPA example by example (same result; used by the tests).

Registered in transformers as the ``voxtui`` attention implementation. Calls without
``cu_seq_lens_q`` (padded evaluation batches, generation) take the ordinary SDPA path with the mask
transformers builds for them.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "voxtui"
_registered = False


def register(device: torch.device | None = None) -> str:
    """Make ``attn_implementation="voxtui"`` known to transformers (idempotent); returns the name.
    On a GPU, also settles once (eagerly, never inside a compiled region) how the varlen kernel takes
    grouped key/value heads."""
    global _registered
    if device is not None and device.type == "cuda" and varlen_available():
        prepare_cuda(device)
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        def mask(*args, **kwargs):
            # no 2-D mask: a packed row (varlen attention needs no mask) or one unpadded sequence
            # (plain causal SDPA); otherwise SDPA's padding mask
            if kwargs.get("attention_mask") is None:
                return None
            return sdpa_mask(*args, **kwargs)

        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, mask)
        _registered = True
    return NAME


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one row per micro-batch")
    max_len = int(kwargs.get("max_length_q") or query.shape[2])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if query.device.type == "cuda":
        out = _varlen_cuda(q, k, v, cu, max_len, scaling)
    else:
        out = _varlen_reference(q, k, v, cu, scaling)
    return out[None], None


_VARLEN_PARAMS: set[str] | None = None


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_cuda(device) -> None:
    global _VARLEN_PARAMS
    from torch.nn.attention.varlen import varlen_attn

    if _VARLEN_PARAMS is None:
        _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
        _gqa_native(device)


def gqa_mode() -> str:
    """How grouped-query attention reaches the kernel (for the log)."""
    if _VARLEN_PARAMS is None:
        return "n/a"
    if "enable_gqa" in _VARLEN_PARAMS:
        return "enable_gqa"
    return "native" if _GQA_NATIVE else "repeated key/value heads"


def _varlen_cuda(q, k, v, cu, max_len: int, scaling):
    from torch.nn.attention.varlen import varlen_attn

    if _VARLEN_PARAMS is None:
        prepare_cuda(q.device)
    extra = _causal()
    if "scale" in _VARLEN_PARAMS and scaling is not None:
        extra["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            extra["enable_gqa"] = True
        elif not _GQA_NATIVE:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


_GQA_NATIVE: bool | None = None


def _causal() -> dict:
    """Causal masking in this torch's varlen signature: ``is_causal`` (2.10) or a window (2.11+)."""
    return {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}


def _gqa_native(device) -> bool:
    """Whether this torch's varlen kernel takes fewer key/value heads than query heads as they are
    (FlashAttention supports it; older wrappers may refuse). Checked once against repeated heads."""
    global _GQA_NATIVE
    if _GQA_NATIVE is None:
        from torch.nn.attention.varlen import varlen_attn

        extra = _causal()
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(40, 8, 64, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(40, 2, 64, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn(40, 2, 64, device=device, dtype=torch.bfloat16, generator=g)
        cu = torch.tensor([0, 17, 40], dtype=torch.int32, device=device)
        try:
            a = varlen_attn(q, k, v, cu, cu, 23, 23, **extra)
            b = varlen_attn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), cu, cu, 23, 23, **extra)
            _GQA_NATIVE = bool(torch.allclose(a.float(), b.float(), atol=1e-2))
        except (RuntimeError, ValueError):
            _GQA_NATIVE = False
    return _GQA_NATIVE


@torch.compiler.disable
def _varlen_reference(q, k, v, cu, scaling):
    """Example-by-example causal SDPA: what the varlen kernel computes, for the CPU. Each example goes in
    with a batch dimension: given 3-D tensors, SDPA takes its math path on the CPU, which keeps every
    example's ``heads × L × L`` probabilities for the backward (16 KB a token per layer for the tiny model
    at 1,000-token examples, 128 KB for Voxtral-Mini); 4-D, it takes the CPU flash kernel, which keeps a
    log-sum-exp per row and gives the same outputs and gradients (tests/test_batching.py)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=0)
            vs = vs.repeat_interleave(groups, dim=0)
        out[a:b] = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True,
                                                  scale=scaling)[0].transpose(0, 1)
    return out
