"""NF4 linear layers that ``torch.compile`` sees through.

bitsandbytes' ``Linear4bit.forward`` runs Python that dynamo cannot trace (its ``Params4bit`` weight, the
``QuantState`` object, ``MatMul4Bit``): every one of a decoder layer's seven projections breaks the
compiled layer into pieces, each run from Python. On an H200 a QLoRA step at 6 × 1024 tokens then spent
about a third of its time with the GPU waiting for the host (docs/benchmarks.md). ``traceable`` gives each
4-bit layer a forward over plain tensors and bitsandbytes' own registered operators — the same
``gemm_4bit`` in the forward and the same dequantisation + product in the backward as ``MatMul4Bit`` —
so a compiled layer is one graph. The weights, their quantisation state and what a checkpoint saves
are unchanged (the tensors are registered again as non-persistent buffers: views, no copy).
"""

from __future__ import annotations

import types

import torch
from torch import nn

NAMES = ("_nf4_packed", "_nf4_absmax", "_nf4_absmax2", "_nf4_code2", "_nf4_offset")


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
        if qs.nested and qs.state2.blocksize != 256:
            continue  # what bitsandbytes' own kernel refuses: leave it to bitsandbytes
        packed = mod.weight.data.view(-1, 1)
        if qs.nested:
            tensors = (packed, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset.reshape(()))
        else:
            tensors = (packed, qs.absmax, None, None, None)
        for name, t in zip(NAMES, tensors):
            mod.register_buffer(name, t, persistent=False)
        mod._nf4_meta = (tuple(int(s) for s in qs.shape), int(qs.blocksize), qs.quant_type,
                         int(qs.state2.blocksize) if qs.nested else 0, qs.dtype)
        mod.forward = types.MethodType(_forward, mod)
        n += 1
    return n


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    compute = self.compute_dtype if self.compute_dtype is not None else x.dtype
    y = _NF4MatMul.apply(x.to(compute), self._nf4_packed, self._nf4_absmax, self._nf4_absmax2, self._nf4_code2,
                         self._nf4_offset, self._nf4_meta)
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y.to(x.dtype)


def dequantize(packed, absmax, absmax2, code2, offset, meta, dtype) -> torch.Tensor:
    """The layer's weight, ``(out, in)`` in ``dtype`` (what ``bitsandbytes.functional.dequantize_4bit`` makes)."""
    shape, blocksize, quant_type, blocksize2, _ = meta
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, blocksize2,
                                                                     torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, list(shape), dtype)


class _NF4MatMul(torch.autograd.Function):
    """``x @ W.T`` for a frozen 4-bit ``W``: bitsandbytes' ``gemm_4bit`` forward (dequantise + cuBLAS for a
    training batch, its fused kernel for a few rows), the weight dequantised again for the input's gradient
    (nothing of the size of ``W`` is kept between the passes)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, code2, offset, meta):
        shape, blocksize, quant_type, _, _ = meta
        if absmax2 is not None:
            y = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, list(shape), absmax2, blocksize, quant_type,
                                                         None, absmax, code2, offset)
        else:
            y = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, list(shape), absmax, blocksize, quant_type)
        if absmax2 is not None:
            ctx.save_for_backward(packed, absmax, absmax2, code2, offset)
        else:
            ctx.save_for_backward(packed, absmax)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        packed, absmax = saved[0], saved[1]
        absmax2, code2, offset = saved[2:] if len(saved) == 5 else (None, None, None)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize(packed, absmax, absmax2, code2, offset, ctx.meta, ctx.meta[4])  # as MatMul4Bit does
            grad_x = grad @ w.to(grad.dtype)
        return grad_x, None, None, None, None, None, None
