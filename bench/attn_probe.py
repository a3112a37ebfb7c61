"""Attention probe for issue 15: packed-row causal attention (example by example, no mask) on this GPU,
PyTorch's FlashAttention-2 varlen kernel (what the worker runs) against cuDNN's fused attention on the same
ragged rows (``aten._cudnn_attention_forward`` with cumulative lengths), forward and forward + backward,
at Voxtral's heads (32 query / 8 key-value heads of 128) and the lengths the benchmarks train on.

    python3 bench/attn_probe.py [--out DIR] [--ragged] [--single 1024,8192,...]   # one JSON line per case and kernel

``--ragged`` adds cuDNN's ragged (packed) path, which on torch 2.11 computes wrong gradients and can leave
the CUDA context broken (illegal memory access) for every case after it: run it last, or alone.
``--single`` measures rows of one example of each length: FlashAttention's varlen kernel against SDPA's
dense cuDNN and flash kernels (grouped heads passed as they are).

Each cuDNN figure comes with its largest difference from FlashAttention's output and gradients (bf16
kernels both; cosine of the flattened tensors): a faster kernel that computes something else is no lever.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.fp8_probe import timed

HEADS, KV_HEADS, DIM = 32, 8, 128


def lengths(total: int, median: float, sigma: float, cap: int, seed: int) -> list[int]:
    """Log-normal example lengths (the synthetic medical-QA rows' shape) filling ``total`` tokens."""
    import random

    rnd = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        n = max(8, min(cap, int(rnd.lognormvariate(math.log(median), sigma))))
        out.append(min(n, total - sum(out)))
    return out


def case(name: str, lens: list[int], ragged: bool = False) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from engine.worker import attention

    dev = torch.device("cuda")
    attention.prepare_cuda(dev)
    total = sum(lens)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(total, HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(total, KV_HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(total, KV_HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=g)
    dout = torch.randn(total, HEADS, DIM, device=dev, dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=dev)
    mx = max(lens)
    scale = DIM ** -0.5
    # causal FLOPs: QKᵀ and PV over the lower triangle (with the diagonal), 2 FLOPs a multiply-add
    fwd_flops = sum(4 * HEADS * DIM * n * (n + 1) / 2 for n in lens)
    groups = HEADS // KV_HEADS

    def fa2(q_, k_, v_):
        return attention._varlen_cuda(q_, k_, v_, cu, mx, scale)

    def cudnn(q_, k_, v_, repeat: bool):
        if repeat:
            k_ = k_.repeat_interleave(groups, dim=1)
            v_ = v_.repeat_interleave(groups, dim=1)
        return torch.ops.aten._cudnn_attention_forward(q_, k_, v_, None, cu, cu, mx, mx, True, 0.0, True, False,
                                                      scale=scale)[0]

    def sdpa_dense(q_, k_, v_, backend):
        # one row only (the long-row case): SDPA over (1, heads, L, dim), GQA by the backend
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q_.transpose(0, 1)[None], k_.transpose(0, 1)[None],
                                               v_.transpose(0, 1)[None], is_causal=True, scale=scale,
                                               enable_gqa=True)
        return o[0].transpose(0, 1)

    from torch.nn.attention import SDPBackend

    kernels = {"fa2_varlen": fa2}
    if ragged:
        kernels["cudnn_ragged_gqa"] = lambda a, b, c: cudnn(a, b, c, False)
        kernels["cudnn_ragged_repeat"] = lambda a, b, c: cudnn(a, b, c, True)
    def per_example(q_, k_, v_, backend):
        # each example its own dense call (rows of a few long examples), outputs laid back end to end
        bounds = [0] + [sum(lens[: i + 1]) for i in range(len(lens))]
        return torch.cat([sdpa_dense(q_[a:b], k_[a:b], v_[a:b], backend) for a, b in zip(bounds, bounds[1:])])

    if 1 < len(lens) <= 8:
        kernels["cudnn_per_example"] = lambda a, b, c: per_example(a, b, c, SDPBackend.CUDNN_ATTENTION)
    if len(lens) == 1:
        kernels["cudnn_dense_gqa"] = lambda a, b, c: sdpa_dense(a, b, c, SDPBackend.CUDNN_ATTENTION)
        kernels["flash_dense_gqa"] = lambda a, b, c: sdpa_dense(a, b, c, SDPBackend.FLASH_ATTENTION)

    def grads(fn):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = fn(qq, kk, vv)
        o.backward(dout)
        return o.detach(), qq.grad, kk.grad, vv.grad

    rows = []
    ref = None
    for kname, fn in kernels.items():
        row = {"case": name, "kernel": kname, "tokens": total, "examples": len(lens), "max_len": mx}
        try:
            got = grads(fn)
            torch.cuda.synchronize()
            if ref is None:
                ref = got
            else:
                for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                    a, b = a.float().flatten(), b.float().flatten()
                    row[f"{label}_maxdiff"] = round((a - b).abs().max().item(), 5)
                    row[f"{label}_cos"] = round(F.cosine_similarity(a, b, dim=0).item(), 6)
            with torch.no_grad():
                row["fwd_ms"] = round(timed(lambda fn=fn: fn(q, k, v)) * 1e3, 3)
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))

            def step(fn=fn, qq=qq, kk=kk, vv=vv):
                fn(qq, kk, vv).backward(dout)

            row["fwd_bwd_ms"] = round(timed(step) * 1e3, 3)
            row["fwd_tflops"] = round(fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12, 1)
            row["fwd_bwd_tflops"] = round(3.5 * fwd_flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12, 1)
        except Exception as e:  # noqa: BLE001 - what this torch / cuDNN lacks is the finding
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ragged", action="store_true", help="also cuDNN's ragged path (see above)")
    ap.add_argument("--single", default="", help="comma-separated lengths of one-example rows")
    ap.add_argument("--no-packed", action="store_true", help="skip the packed and long cases")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("attn_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}))
    rows = []
    for n in [int(x) for x in args.single.split(",") if x.strip()]:
        rows += case(f"single {n}", [n])
    if not args.no_packed:
        rows += case("packed 16x1024", lengths(16 * 1024, 380, 0.6, 1024, 1), args.ragged)
        rows += case("packed 24x1024", lengths(24 * 1024, 380, 0.6, 1024, 2), args.ragged)
        rows += case("packed 6x1024", lengths(6 * 1024, 380, 0.6, 1024, 3), args.ragged)
        rows += case("long 2x8192", lengths(2 * 8192, 6000, 0.5, 8192, 4), args.ragged)
        rows += case("long 1x8192", [8192], args.ragged)
        rows += case("long 1x32768", [32768], args.ragged)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "attn_probe.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(args.out / "attn_probe.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
