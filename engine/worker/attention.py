"""Attention for packed rows: variable-length (per example) causal attention, no mask tensor.

A packed micro-batch is one row of many examples laid end to end, described by ``cu_seq_lens_q``
(the cumulative example lengths, int32, the names transformers' flash-attention path uses) and
``max_length_q``. On a GPU this runs PyTorch's own FlashAttention varlen kernel
(``torch.nn.attention.varlen.varlen_attn``): no ``L × L`` mask is ever built, and padding costs
nothing. On the CPU it runs SDPA example by example (same result; used by the tests).

Long examples (``dense_min()`` tokens or more: 2,048 on a Hopper GPU, where it was measured; none elsewhere)
are laid at the end of their row by ``batching.collate``, which then also gives ``dense_bounds`` (their
bounds, a host tensor); the row then goes through ``voxtui::packed_attention``: the short examples before them
through the same varlen kernel, each long one through cuDNN's fused attention (SDPA's cuDNN kernel, one
call an example) — 1.7× FlashAttention 2's speed from 2,048 tokens on an H200 (docs/benchmarks.md, run AM).
cuDNN's own ragged (packed) path is not used: on torch 2.11 its gradients are wrong.

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
DENSE_MIN_HOPPER = 2048  # measured: cuDNN 1.7× FlashAttention 2 from here, 1.1× at 1,024 (run AM)


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
    bounds = kwargs.get("dense_bounds")
    if bounds is not None:  # long examples at the row's end, one cuDNN call each (batching.collate)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        out = torch.ops.voxtui.packed_attention(q, k, v, cu, bounds, max_len, float(scale))[0]
    elif query.device.type == "cuda":
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


# ---- long examples through cuDNN: voxtui::packed_attention


def dense_min(device, knob: int | None = None) -> int:
    """From how many tokens an example of a packed row gets its own cuDNN attention call on ``device``
    (0: never). ``knob``: VOXTUI_DENSE_ATTENTION (knobs.py) when set; otherwise 2,048 on a Hopper GPU whose
    torch has cuDNN attention (measured there), 0 elsewhere (unmeasured: FlashAttention for every example)."""
    if knob is not None:
        return knob
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return 0
    if torch.cuda.get_device_capability(device)[0] != 9:
        return 0
    return DENSE_MIN_HOPPER


def dense_choice(device, max_len: int, knob: int | None = None) -> str:
    """What packed rows' attention will be on ``device`` at ``--max_len`` (preflight's line): "" where every
    example goes through the one varlen call."""
    shortest = dense_min(device, knob)
    if not shortest or shortest > max_len:
        return ""
    kernel = "cuDNN's fused attention" if device.type == "cuda" else "SDPA's CPU kernel"
    return (f"examples of {shortest} tokens or more each through {kernel}, the others one varlen FlashAttention "
            "call (on an H200: long rows +8% at 2 × 8192, +24.5% at 1 × 32768; VOXTUI_DENSE_ATTENTION=0 turns "
            "it off)")


def _seg4(t):
    """(tokens, heads, dim) → SDPA's (1, heads, tokens, dim), a view."""
    return t.transpose(0, 1).unsqueeze(0)


def _expand(k, heads: int):
    groups = heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _fold(dk, kv_heads: int):
    """The gradient of repeated key/value heads summed back onto each shared head."""
    tokens, heads, dim = dk.shape
    return dk if heads == kv_heads else dk.view(tokens, kv_heads, heads // kv_heads, dim).sum(2)


_CUDNN_GQA: bool | None = None


def _cudnn_gqa(device) -> bool:
    """Whether this torch's cuDNN attention takes fewer key/value heads as they are (checked once, forward
    and backward, against repeated heads); otherwise they are repeated for it."""
    global _CUDNN_GQA
    if _CUDNN_GQA is None:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(48, h, 64, device=device, dtype=torch.bfloat16, generator=g) for h in (8, 2, 2, 8))
        try:
            a = _one_fwd(q, k, v, 0.125, native=True)
            b = _one_fwd(q, _expand(k, 8), _expand(v, 8), 0.125, native=True)
            ga = _one_bwd(do, q, k, v, a[0], a[1], 0.125, native=True)
            gb = _one_bwd(do, q, _expand(k, 8), _expand(v, 8), b[0], b[1], 0.125, native=True)
            _CUDNN_GQA = bool(torch.allclose(a[0].float(), b[0].float(), atol=1e-2)
                              and torch.allclose(ga[1].float(), _fold(gb[1], 2).float(), atol=5e-2))
        except (RuntimeError, ValueError):
            _CUDNN_GQA = False
    return _CUDNN_GQA


BUCKET_MIN = 256


def bucket(n: int) -> int:
    """The length one example's cuDNN call runs at: ``n`` rounded up to an eighth of its power of two (at
    least 256), so a run meets few shapes — cuDNN builds a plan for each new one (about 0.1–0.3 s; every
    example's own length made a 2 × 8192 run 2× slower than FlashAttention: docs/benchmarks.md, run AN).
    The rows past ``n`` are zeros at the end: causal, so the example's own rows never see them, and their
    output gradient is zero, so they add nothing to its gradients; at most 27% more attention work."""
    step = max(BUCKET_MIN, (1 << (max(n, 1).bit_length() - 1)) // 8)
    return -(-n // step) * step


def _pad(t, m: int):
    """``t`` (tokens first) with zero rows at the end up to ``m``."""
    extra = m - t.shape[0]
    return t if extra == 0 else F.pad(t, (0, 0) * (t.dim() - 1) + (0, extra))


def _one_fwd(q, k, v, scale: float, native: bool = False):
    """One example's causal attention: (output (tokens, heads, dim), log-sum-exp (heads, tokens) fp32), run at
    the example's ``bucket`` length."""
    n = q.shape[0]
    m = bucket(n)
    if m != n:
        o, lse = _one_fwd(_pad(q, m), _pad(k, m), _pad(v, m), scale, native)
        return o[:n], lse[:, :n]
    heads = q.shape[1]
    if q.device.type == "cuda":
        if not (native or _cudnn_gqa(q.device)):
            k, v = _expand(k, heads), _expand(v, heads)
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(_seg4(q), _seg4(k), _seg4(v), None, True, 0.0,
                                                                     True, False, scale=scale)[:2]
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _seg4(q), _seg4(_expand(k, heads)), _seg4(_expand(v, heads)), 0.0, True, scale=scale)
    return o[0].transpose(0, 1), lse.reshape(heads, q.shape[0])


def _one_bwd(do, q, k, v, o, lse, scale: float, native: bool = False):
    """The gradients of one example's attention, from its output and log-sum-exp (heads, tokens), run at the
    ``bucket`` length its forward ran at (the padded rows: zero inputs, zero output gradient, log-sum-exp 0)."""
    n = q.shape[0]
    m = bucket(n)
    if m != n:
        grads = _one_bwd(_pad(do, m), _pad(q, m), _pad(k, m), _pad(v, m), _pad(o, m), F.pad(lse, (0, m - n)), scale,
                         native)
        return tuple(g[:n] for g in grads)
    heads, kv_heads = q.shape[1], k.shape[1]
    lse = lse.contiguous()
    if q.device.type == "cuda":
        if not (native or _cudnn_gqa(q.device)):
            k, v = _expand(k, heads), _expand(v, heads)
        none = torch.zeros((), dtype=torch.long, device=q.device)  # dropout's seed and offset: no dropout
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _seg4(do), _seg4(q), _seg4(k), _seg4(v), _seg4(o), lse.view(1, heads, n, 1), none, none, None, None,
            None, n, n, 0.0, True, scale=scale)
    else:
        k, v = _expand(k, heads), _expand(v, heads)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _seg4(do), _seg4(q), _seg4(k), _seg4(v), _seg4(o), lse.view(1, heads, n), 0.0, True, scale=scale)
    return tuple(_fold(t[0].transpose(0, 1), kv_heads) if i else t[0].transpose(0, 1)
                 for i, t in enumerate((dq, dk, dv)))


def warm_plans(device, heads: int, kv_heads: int, dim: int, shortest: int, longest: int) -> int:
    """cuDNN's plans for every ``bucket`` length from ``shortest`` to ``longest`` made now (one forward and
    backward each on zeros), so that no training step waits for one; returns how many."""
    lengths = sorted({bucket(n) for n in range(shortest, longest + 1, BUCKET_MIN // 2)} | {bucket(longest)})
    for n in lengths:
        q = torch.zeros(n, heads, dim, device=device, dtype=torch.bfloat16)
        k = torch.zeros(n, kv_heads, dim, device=device, dtype=torch.bfloat16)
        o, lse = _one_fwd(q, k, k, dim ** -0.5)
        _one_bwd(q, q, k, k, o, lse, dim ** -0.5)
    return len(lengths)


def _split(cu, bounds):
    """(host bounds of the long examples, the segments before them: cu's first entries). A row without a
    long example has bounds [end, end] (never one entry: dynamo specialises a dimension of size 1)."""
    b = bounds.tolist()
    long_ = sum(e > a for a, e in zip(b, b[1:]))
    return b, cu[: cu.shape[0] - long_]


@torch.library.custom_op("voxtui::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, bounds: torch.Tensor,
                     max_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a packed row whose examples from ``bounds[0]`` on (a host tensor: their
    bounds) are long: those one cuDNN call each, the segments before them one varlen FlashAttention call
    (``cu``'s first entries). Returns the output and the log-sum-exp of every row (heads, tokens; fp32).
    On the CPU every example goes through SDPA's CPU flash kernel (the tests' path)."""
    b, cu_short = _split(cu, bounds)
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    s = b[0]
    if s > 0:
        if q.is_cuda:
            ks, vs = (t[:s] if _GQA_NATIVE is not False else _expand(t[:s], q.shape[1]) for t in (k, v))
            o, l_ = torch.ops.aten._flash_attention_forward(q[:s], ks, vs, cu_short, cu_short, max_len, max_len,
                                                            0.0, True, False, scale=scale)[:2]
            out[:s], lse[:, :s] = o, l_
        else:
            ends = cu_short.tolist()
            for a, e in zip(ends, ends[1:]):
                if e > a:
                    out[a:e], lse[:, a:e] = _one_fwd(q[a:e], k[a:e], v[a:e], scale)
    for a, e in zip(b, b[1:]):
        if e > a:
            out[a:e], lse[:, a:e] = _one_fwd(q[a:e], k[a:e], v[a:e], scale)
    return out, lse


@packed_attention.register_fake
def _packed_attention_fake(q, k, v, cu, bounds, max_len, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("voxtui::packed_attention_backward", mutates_args=())
def packed_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, cu: torch.Tensor, bounds: torch.Tensor, max_len: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, cu_short = _split(cu, bounds)
    do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    s = b[0]
    if s > 0:
        if q.is_cuda:
            rng = torch.zeros((2,), dtype=torch.uint64, device=q.device)  # no dropout
            unused = torch.empty(0, device=q.device)
            ks, vs = (t[:s] if _GQA_NATIVE is not False else _expand(t[:s], q.shape[1]) for t in (k, v))
            gq, gk, gv = torch.ops.aten._flash_attention_backward(
                do[:s], q[:s], ks, vs, out[:s], lse[:, :s].contiguous(), cu_short, cu_short, max_len, max_len,
                0.0, True, rng, unused, scale=scale)
            dq[:s], dk[:s], dv[:s] = gq, _fold(gk, k.shape[1]), _fold(gv, k.shape[1])
        else:
            ends = cu_short.tolist()
            for a, e in zip(ends, ends[1:]):
                if e > a:
                    dq[a:e], dk[a:e], dv[a:e] = _one_bwd(do[a:e], q[a:e], k[a:e], v[a:e], out[a:e], lse[:, a:e], scale)
    for a, e in zip(b, b[1:]):
        if e > a:
            dq[a:e], dk[a:e], dv[a:e] = _one_bwd(do[a:e], q[a:e], k[a:e], v[a:e], out[a:e], lse[:, a:e], scale)
    return dq, dk, dv


@packed_attention_backward.register_fake
def _packed_attention_backward_fake(do, q, k, v, out, lse, cu, bounds, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _packed_setup(ctx, inputs, output):
    q, k, v, cu, bounds, max_len, scale = inputs
    ctx.save_for_backward(q, k, v, cu, bounds, *output)
    ctx.max_len, ctx.scale = max_len, scale


def _packed_backward(ctx, d_out, _d_lse):
    q, k, v, cu, bounds, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.voxtui.packed_attention_backward(d_out, q, k, v, out, lse, cu, bounds, ctx.max_len,
                                                            ctx.scale)
    return dq, dk, dv, None, None, None, None


packed_attention.register_autograd(_packed_backward, setup_context=_packed_setup)
