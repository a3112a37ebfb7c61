"""NF4 linear layers whose weights ``torch.compile`` dequantises inside the compiled layer.

bitsandbytes' 4-bit operators (``gemm_4bit``, ``dequantize_4bit``, ``dequantize_blockwise``) are kernels
registered from Python: called from a compiled layer, each one runs Python on the host (checks, buffers,
a ctypes call) between the GPU's kernels — three times per projection and step with checkpointing
(forward, recompute, backward), 630 calls a step for Voxtral's 30 layers. At QLoRA's small micro-batches
the GPU then waits for the host (docs/benchmarks.md). ``traceable`` gives each 4-bit layer a forward
whose dequantisation, while ``torch.compile`` traces, is plain tensor arithmetic (``dequantize_ops``,
bit for bit bitsandbytes' result): Inductor makes it one kernel inside the layer's graph, and no Python
runs per call. Uncompiled, the same layer calls bitsandbytes' operators as its own forward does. The
weights, their quantisation state and what a checkpoint saves are unchanged (the tensors are registered
again as non-persistent buffers: views, no copy).

In a decoder layer that is not checkpointed, Inductor's partition would keep each dequantised weight from the
forward for the backward's input gradient (a product must read it whole, so the partition does not recompute
it): the layer's linear weights in bf16, 0.2 GiB a layer at Voxtral-Mini's widths — without checkpointing,
NF4 took as much memory as bf16 weights (docs/benchmarks.md, runs AI–AK). There the dequantisation is its own
small checkpoint (``weight``): the backward dequantises again from the 4-bit weights, one elementwise kernel
per projection, and keeps nothing of the weight's size (``VOXTUI_NF4_KEEP_WEIGHTS=1``: as before).
"""

from __future__ import annotations

import types

import torch
from torch import nn

NAMES = ("_nf4_packed", "_nf4_absmax", "_nf4_absmax2", "_nf4_code2", "_nf4_offset", "_nf4_code")


def traceable(model: nn.Module) -> int:
    """Gives every bitsandbytes 4-bit linear layer of ``model`` the traceable forward; returns how many."""
    import bitsandbytes as bnb

    n = 0
    for mod in model.modules():
        # bitsandbytes' layer itself (PEFT's wrapper around it has the same class name)
        if not isinstance(mod, bnb.nn.Linear4bit) or not hasattr(getattr(mod, "weight", None), "quant_state"):
            continue
        qs = mod.weight.quant_state
        if qs is None or qs.quant_type not in ("nf4", "fp4") or len(qs.shape) != 2:
            continue
        if (qs.nested and qs.state2.blocksize != 256) or (qs.shape[0] * qs.shape[1]) % qs.blocksize:
            continue  # what bitsandbytes' fused kernel refuses, or a last block cut short: left to bitsandbytes
        packed = mod.weight.data.view(-1, 1)
        if qs.nested:
            tensors = (packed, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset.reshape(()), qs.code)
        else:
            tensors = (packed, qs.absmax, None, None, None, qs.code)
        for name, t in zip(NAMES, tensors):
            mod.register_buffer(name, t, persistent=False)
        mod._nf4_meta = (tuple(int(s) for s in qs.shape), int(qs.blocksize), qs.quant_type,
                         int(qs.state2.blocksize) if qs.nested else 0, qs.dtype)
        mod.forward = types.MethodType(_forward, mod)
        n += 1
    return n


def recompute_outside_checkpoints(layers, checkpointed) -> int:
    """Marks the 4-bit layers of the decoder ``layers`` that are not checkpointed (``checkpointed(layer)``
    false): their compiled forward dequantises the weight again in the backward instead of keeping it
    (``weight``). Returns how many layers."""
    from engine.worker.knobs import knobs

    keep = knobs().nf4_keep_weights
    n = 0
    for layer in layers:
        outside = not checkpointed(layer)
        for mod in layer.modules():
            if hasattr(mod, "_nf4_meta"):
                mod._nf4_recompute = outside and not keep
        n += outside and not keep
    return n


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    compute = self.compute_dtype if self.compute_dtype is not None else x.dtype
    state = (self._nf4_packed, self._nf4_absmax, self._nf4_absmax2, self._nf4_code2, self._nf4_offset,
             self._nf4_code, self._nf4_meta)
    if torch.compiler.is_compiling():
        # plain tensor operations, differentiated by autograd's own linear: the weight is a constant, so the
        # backward multiplies by it again — dequantised once more (``weight``'s checkpoint outside checkpointed
        # layers; inside one the whole layer is recomputed) or kept, as the partition decides. An
        # autograd.Function here would be traced as a higher-order operator, and with the checkpoint inside
        # the compiled layer (VOXTUI_CHECKPOINT=inside) torch 2.11's partition then kept every activation of
        # the layer (tests/test_grad_ckpt.py; docs/benchmarks.md, runs P and Q)
        y = torch.nn.functional.linear(x.to(compute), weight(self, state, _product_dtype(x, compute)))
    else:
        y = _NF4MatMul.apply(x.to(compute), *state)
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y.to(x.dtype)


def _product_dtype(x: torch.Tensor, compute: torch.dtype) -> torch.dtype:
    """The dtype the product takes the weight in: autocast's where it is on (the cast then belongs to the
    dequantisation, and is recomputed with it), else the layer's compute dtype."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else compute


def weight(mod: nn.Module, state: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit layer's weight in ``dtype``, while compiling; outside a checkpointed decoder layer
    (``_nf4_recompute``) as a checkpoint of its own, so the backward dequantises it again instead of keeping it."""
    if getattr(mod, "_nf4_recompute", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(dequantize_ops, *state, dtype, use_reentrant=False)
    return dequantize_ops(*state, dtype)


def dequantize(packed, absmax, absmax2, code2, offset, code, meta, dtype) -> torch.Tensor:
    """The layer's weight, ``(out, in)`` in ``dtype``, by bitsandbytes' operators (``dequantize_4bit``)."""
    shape, blocksize, quant_type, blocksize2, _ = meta
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, blocksize2,
                                                                     torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, list(shape), dtype)


def dequantize_ops(packed, absmax, absmax2, code2, offset, code, meta, dtype) -> torch.Tensor:
    """``dequantize`` in tensor operations, bit for bit what bitsandbytes' kernels compute: two 4-bit codes
    per byte (the first in the high half) looked up in the 16-value table ``code`` and scaled by their block's
    absmax in fp32; with double quantisation the absmax itself is an 8-bit code in ``code2`` scaled by its
    block of ``blocksize2`` and shifted by ``offset``."""
    shape, blocksize, _, blocksize2, _ = meta
    if absmax2 is not None:
        # each block of blocksize2 codes times its scale (the last block may be short: padded, then cut)
        scales = code2[absmax.long()]
        pad = absmax2.numel() * blocksize2 - scales.numel()
        scales = torch.nn.functional.pad(scales, (0, pad)).view(-1, blocksize2) * absmax2[:, None]
        absmax = scales.reshape(-1)[:absmax.numel()] + offset
    n = shape[0] * shape[1]
    p = packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 15], dim=-1).reshape(-1)[:n].long()
    w = code[idx].view(-1, blocksize) * absmax[:, None]  # traceable() takes whole blocks only
    return w.reshape(shape).to(dtype)


class _NF4MatMul(torch.autograd.Function):
    """``x @ W.T`` for a frozen 4-bit ``W``, run eagerly, nothing of the size of ``W`` kept between the passes:
    the forward is bitsandbytes' ``gemm_4bit`` (dequantise + cuBLAS for a training batch, its fused kernel for
    a few rows); the backward dequantises the weight again for the input's gradient, as ``MatMul4Bit`` does."""

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, code2, offset, code, meta):
        shape, blocksize, quant_type, _, _ = meta
        if absmax2 is not None:
            y = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, list(shape), absmax2, blocksize, quant_type,
                                                         None, absmax, code2, offset)
            ctx.save_for_backward(packed, absmax, code, absmax2, code2, offset)
        else:
            y = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, list(shape), absmax, blocksize, quant_type)
            ctx.save_for_backward(packed, absmax, code)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        packed, absmax, code = saved[:3]
        absmax2, code2, offset = saved[3:] if len(saved) == 6 else (None, None, None)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize(packed, absmax, absmax2, code2, offset, code, ctx.meta, ctx.meta[4])  # as MatMul4Bit does
            grad_x = grad @ w.to(grad.dtype)
        return grad_x, None, None, None, None, None, None, None
