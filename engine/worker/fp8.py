"""FP8 products for the frozen projections of the language model: ``--quant fp8`` (the base weights in
float8 e4m3 with one scale per weight row, the adapters as they are: fp32 weights, bf16 products under
autocast) and ``--fp8_products`` (which products are FP8 ones: ``products``).

- ``all`` (``linear``, --quant fp8 only): every product is ``torch._scaled_mm`` with row-wise scales: forward,
  the input's rows are quantised (one scale per row, amax / 448) against the weight's rows; backward, the
  input's gradient is the output's gradient times the weight's scales, quantised by rows, against the weight
  transposed (FP8 products take the second operand column-major: the weight's transpose is made for the
  product and dropped). On an H200 (docs/benchmarks.md, runs J, R): 1.24× bf16 LoRA's tokens/s, the loss
  within 0.4% of bf16's over 205 steps; but its adapters' gradients are further from exact than the GPU
  tests allow: cosine 0.990 against HF + PEFT on the same rounded weights (bf16, NF4: ≥ 0.9998; the bound
  0.995). The 8-bit activations of the forward cost it: on the CPU, a bf16 backward lifted it only to 0.992,
  scales per 128 columns (emulated) to 0.9925.
- ``backward`` (``grad_linear``; ``auto``'s choice on a Hopper GPU): the forward's products are bf16 ones on
  the weights as they are (--quant none: an e4m3 copy beside them serves the backward, ``attach_grad``) or
  dequantised (--quant fp8), so the activations are never rounded; only the input's gradient is an FP8
  product (the output's gradient rounded by rows). On an H200 (runs T, U): bf16 weights 1.11× the tokens/s
  of bf16 products, the loss within 0.54% of theirs over 205 steps, adapter gradients cosine 0.9975 against
  exact (FP8 weights: 0.9987 against the rounded ones) — within the GPU tests' 0.995.
- ``mlp`` (--quant fp8 only): the MLP's three projections as with ``all`` (70% of the frozen weights, and
  of their products), the attention's four as with ``backward``: the activations that feed attention's
  scores are never rounded to 8 bits. On the CPU at Voxtral-Mini's widths (2 layers, a smaller vocabulary)
  its adapters' gradients are at cosine 0.9968 against exact on the rounded weights — ``all`` 0.9900 there
  (as on an H200), FP8 weights with ``backward`` 0.9987. On an H200 (runs AE, AF): the GPU tests' cosine
  0.9968, within the bound; 1.20× bf16 products' tokens/s, 1.10× ``backward`` on FP8 weights (35,251–35,905
  tokens/s at 16 × 1024; within 16 GiB 28,674 against 25,860). Its loss curve leaves bf16's by 1.6–2.2% in
  the curve's steep part (steps 75–145 of 205) at each of three seeds (42, 7, 11; above at one, below at
  two; ``backward`` within 0.44–0.54%, runs AE–AG): outside the 1% a default is held to, so opt-in.
- ``none``: no FP8 products (--quant fp8: every product on the weight dequantised).

Under ``torch.compile`` the quantisations are elementwise work Inductor fuses with the kernels around them;
each FP8 product is a ``torch.library`` custom operator with its own backward (no ``autograd.Function``
inside a compiled layer: tests/test_grad_ckpt.py says why). FP8 products take dimensions that are multiples
of 16: rows are padded to one (a padded batch of any length, a preview's few rows), and a weight whose own
dimensions are not is multiplied dequantised instead. ``round_trip`` gives a bf16 model the weights every
product multiplies by, for inference. One scale per operand instead of per row measured 2% slower (run K).
"""

from __future__ import annotations

import types

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def available(device: torch.device) -> str:
    """Why FP8 products cannot run on ``device`` ("" when they can)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"FP8 products need a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is {major}.{minor}"
    return ""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows × k) as e4m3 and its per-row fp32 scales (rows × 1): ``x ≈ q · s``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")  # --fp8_products mlp: their forward's products FP8 ones too


def auto_mode(quant: str, hopper: bool) -> str:
    """What ``--fp8_products auto`` means with ``--quant quant``: FP8 input gradients on a Hopper GPU (where
    they were measured) for bf16 and FP8 weights, no FP8 products otherwise (preflight weighs settings by it)."""
    return "backward" if hopper and quant in ("none", "fp8") else "none"


def products(quant: str, asked: str, device: torch.device) -> tuple[str, str]:
    """What ``--fp8_products`` (``asked``) means with ``--quant quant`` on ``device``: "none", "backward" or
    "all", and why (a phrase for the log and preflight)."""
    if asked != "auto":
        emulated = "; the CPU's FP8 products are emulated, slower than its bf16 ones" \
            if device.type != "cuda" and asked != "none" else ""
        return asked, f"--fp8_products {asked}{emulated}"
    if quant == "nf4":
        return "none", "auto: NF4's products are bf16 ones"
    if device.type != "cuda":
        return "none", "auto: the CPU's FP8 products are emulated, slower than its bf16 ones"
    why = available(device)
    if why:
        return "none", f"auto: {why}"
    if torch.cuda.get_device_capability(device) < (9, 0):  # Ada takes them too, but was never measured
        return "none", "auto: FP8 input gradients are measured on Hopper GPUs only (ask: --fp8_products backward)"
    return auto_mode(quant, hopper=True), "auto: a Hopper GPU, where FP8 input gradients were measured"


def describe(quant: str, mode: str) -> str:
    """One phrase for the log: which products are FP8 ones."""
    if mode == "all":
        return "every product of the frozen projections is an FP8 one (forward and the input's gradients)"
    if mode == "mlp":
        return ("the MLP's forward products and every input's gradient are FP8 ones, the attention projections' "
                "forward products bf16 ones on their weights dequantised")
    if mode == "backward":
        return ("the input's gradients are FP8 products, the forward's are bf16 ones"
                + (" (on the weights dequantised)" if quant == "fp8" else " (an e4m3 copy of the weights for them)"))
    return "no FP8 products" + (" (the FP8 weights dequantised for each product)" if quant == "fp8" else "")


def quantize(layers, mode: str = "all") -> int:
    """The 7 projections of each decoder layer of ``layers`` (PEFT's base layer where an adapter wraps
    one): weight → e4m3 with one fp32 scale per row (a non-persistent buffer). ``mode`` (``products``):
    "all", every product an FP8 one (``linear``); "backward", the forward multiplies by the weight
    dequantised (the activations as they are) and the input's gradient is an FP8 product (``grad_linear``),
    the e4m3 weight kept column-major, the layout that product takes; "none", every product on the weight
    dequantised; "mlp", the MLP's projections as with "all", the attention's as with "backward". Only plain
    bias-free ``nn.Linear`` layers are taken. Returns how many."""
    forwards = {"all": _forward, "backward": _forward_dequantized, "none": _forward_plain}
    n = 0
    for proj, mod in _named_projections(layers):
        if mod.weight.dtype != E4M3:
            how = ("all" if proj in MLP else "backward") if mode == "mlp" else mode
            q, scale = quantize_rows(mod.weight.data)
            mod.weight = nn.Parameter(_column_major(q) if how == "backward" else q, requires_grad=False)
            mod.register_buffer("_fp8_scale", scale[:, 0].contiguous(), persistent=False)
            mod.forward = types.MethodType(forwards[how], mod)
            n += 1
    return n


def attach_grad(layers) -> int:
    """The 7 projections of each decoder layer keep their weights and forward products as they are; the
    input's gradient becomes an FP8 product against an e4m3 copy of the weight (column-major, one scale
    per row: one more byte per weight). Returns how many."""
    n = 0
    for mod in _projections(layers):
        if not hasattr(mod, "_fp8_grad_weight"):
            q, scale = quantize_rows(mod.weight.data)
            mod.register_buffer("_fp8_grad_weight", _column_major(q), persistent=False)
            mod.register_buffer("_fp8_grad_scale", scale[:, 0].contiguous(), persistent=False)
            mod.forward = types.MethodType(_forward_grad8, mod)
            n += 1
    return n


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (n × k) laid out column by column: its transpose is a row-major k × n."""
    return t.t().contiguous().t()


def _projections(layers):
    """The plain bias-free ``nn.Linear`` of each projection (PEFT's base layer where an adapter wraps it)."""
    for _, mod in _named_projections(layers):
        yield mod


def _named_projections(layers):
    """(projection name, its plain bias-free ``nn.Linear``) for each projection of each layer."""
    for layer in layers:
        for name, mod in layer.named_modules():
            parts = name.split(".")
            proj = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
            if proj in PROJECTIONS and type(mod) is nn.Linear and mod.bias is None:
                yield proj, mod


def round_trip(layers) -> int:
    """For inference on a run trained with ``--quant fp8``: each projection's weight replaced by the values
    the run's FP8 products multiplied by (quantised by rows, then back in the weight's dtype), in place, as
    plain weights the fast decoder takes. Returns how many."""
    n = 0
    for mod in _projections(layers):
        q, scale = quantize_rows(mod.weight.data)
        mod.weight.data = _weight(q, scale[:, 0], mod.weight.dtype)
        n += 1
    return n


def _weight(wq: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight e4m3 rows ``wq`` with their scales ``ws`` stand for, in ``dtype``."""
    return (wq.float() * ws[:, None]).to(dtype)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self._fp8_scale)


def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
    dtype = _out_dtype(x)
    return torch.nn.functional.linear(x.to(dtype), _weight(self.weight, self._fp8_scale, dtype))


def _forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
    return grad_linear(x, None, self.weight, self._fp8_scale)


def _forward_grad8(self, x: torch.Tensor) -> torch.Tensor:
    return grad_linear(x, self.weight, self._fp8_grad_weight, self._fp8_grad_scale)


def _fits(*dims: int) -> bool:
    return all(d % 16 == 0 for d in dims)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    low = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(x.device.type)
    return torch.bfloat16 if low else torch.float32


def linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``x @ (W_q · s).T`` for a frozen e4m3 ``W_q`` with row scales ``s``, differentiable in ``x``.

    The input's rows are quantised by plain tensor operations (under ``torch.compile``, elementwise work
    fused with the kernels before it); the product is ``fp8_mm``, an operator of its own whose backward
    (``_fp8_mm_backward``) is the input's gradient as an FP8 product. No ``autograd.Function``: traced as a
    higher-order operator inside a checkpointed compiled layer (``VOXTUI_CHECKPOINT=inside``), one made
    torch 2.11's partition keep every activation of the layer (tests/test_grad_ckpt.py). The rows are
    padded with zeros to a multiple of 16 for the product (inside the quantisation's kernel when compiled);
    a weight whose dimensions FP8 products do not take is multiplied dequantised to bf16, through autograd's
    own linear."""
    out_dtype = _out_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])
    n, k = wq.shape
    if not _fits(k, n):
        return torch.nn.functional.linear(x2.to(out_dtype), _weight(wq, ws, out_dtype)).reshape(*x.shape[:-1], n)
    rows = x2.shape[0]
    pad = -rows % 16
    with torch.no_grad():
        xq, xs = quantize_rows(torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2)
    y = fp8_mm(x2, xq, xs, wq, ws, out_dtype)
    return (y[:rows] if pad else y).reshape(*x.shape[:-1], n)


@torch.library.custom_op("voxtui::fp8_mm", mutates_args=())
def fp8_mm(x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq · xs) @ (W_q · s).T`` as one FP8 product. ``x`` (the rows ``xq`` quantises, before their padding)
    is not read: it is where the backward's gradient goes."""
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :].float(), out_dtype=out_dtype)


@fp8_mm.register_fake
def _(x, xq, xs, wq, ws, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


def _fp8_mm_context(ctx, inputs, output):
    _, _, _, wq, ws, _ = inputs
    ctx.save_for_backward(wq, ws)
    ctx.x_dtype, ctx.rows = inputs[0].dtype, inputs[0].shape[0]


def _fp8_mm_backward(ctx, grad):
    wq, ws = ctx.saved_tensors
    return _grad_input(grad, wq, ws)[:ctx.rows].to(ctx.x_dtype), None, None, None, None, None


def _grad_input(grad: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The input's gradient ``g @ (W_q · s)`` as one FP8 product: ``(g · s) @ W_q``, the weight's row scales
    moved onto the gradient's columns, which are then quantised by rows (padded with zeros to a multiple of
    16 for the product, and cut back). ``wq`` is taken column-major as it is, or laid out so for the product."""
    rows, k = grad.shape[0], wq.shape[1]
    pad = -rows % 16
    g = grad.float() * ws[None, :]
    gq, gs = quantize_rows(torch.nn.functional.pad(g, (0, 0, 0, pad)) if pad else g)
    ones = torch.ones((1, k), dtype=torch.float32, device=grad.device)
    b = wq if wq.stride(0) == 1 else _column_major(wq)
    grad_x = torch._scaled_mm(gq, b, scale_a=gs, scale_b=ones, out_dtype=grad.dtype)
    return grad_x[:rows] if pad else grad_x


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_context)


def grad_linear(x: torch.Tensor, w: torch.Tensor | None, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in the input's precision (bf16 under autocast), differentiable in ``x``, whose gradient
    is an FP8 product with the e4m3 ``wq`` (column-major) and its row scales ``ws``. ``w``: the weight the
    forward multiplies by (``None``: ``wq · ws`` dequantised, by tensor operations the compiled layer
    fuses). The forward's activations are never rounded to 8 bits, which is what costs ``linear``'s
    gradients their accuracy (docs/training.md); only the output's gradient is, by rows."""
    out_dtype = _out_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])
    n, k = wq.shape
    if w is None:
        w = _weight(wq, ws, out_dtype)
    if not _fits(k, n):
        return torch.nn.functional.linear(x2.to(out_dtype), w.to(out_dtype)).reshape(*x.shape[:-1], n)
    return mm_fp8_grad(x2.to(out_dtype), w.to(out_dtype), wq, ws).reshape(*x.shape[:-1], n)


@torch.library.custom_op("voxtui::mm_fp8_grad", mutates_args=())
def mm_fp8_grad(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``x @ w.T``; its backward (``_mm_fp8_grad_backward``) gives ``x`` the gradient ``g @ (W_q · s)`` as an
    FP8 product."""
    return x @ w.t()


@mm_fp8_grad.register_fake
def _(x, w, wq, ws):
    return x.new_empty((x.shape[0], w.shape[0]))


def _mm_fp8_grad_context(ctx, inputs, output):
    _, _, wq, ws = inputs
    ctx.save_for_backward(wq, ws)


def _mm_fp8_grad_backward(ctx, grad):
    wq, ws = ctx.saved_tensors
    return _grad_input(grad, wq, ws), None, None, None


mm_fp8_grad.register_autograd(_mm_fp8_grad_backward, setup_context=_mm_fp8_grad_context)
