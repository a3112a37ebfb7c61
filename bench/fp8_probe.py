"""FP8 probe for issue 15's ``--quant fp8``: what this torch offers on this GPU for a frozen base in FP8
(row-wise or tensor-wise scales, ``torch._scaled_mm``), and how fast its products are against bf16's at the
LoRA step's shapes (16,384 tokens a micro-batch; Voxtral-Mini's LM widths). Forward (x · Wᵀ) and the
input gradient (dy · W) — the two products a frozen weight takes part in; the quantisation of the
activations is timed with them.

    python3 bench/fp8_probe.py [--tokens 16384] [--out DIR]     # one JSON line per shape and way
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

E4M3_MAX = 448.0


def timed(fn, n: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def rowwise(t):
    """``t`` in float8_e4m3fn with one fp32 scale per row (amax / 448)."""
    import torch

    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def measure(name: str, m: int, k: int, n: int) -> dict:
    import torch

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * k * n
    row = {"what": "gemm", "shape": name, "m": m, "k": k, "n": n}
    row["bf16_fwd_ms"] = timed(lambda: x @ w.t()) * 1e3
    row["bf16_dgrad_ms"] = timed(lambda: dy @ w) * 1e3
    w8, sw = rowwise(w)  # once, at load: the frozen weight, one scale per output row
    wt8, swt = rowwise(w.t().contiguous())  # for the input gradient: one scale per input column
    try:
        def fwd():
            x8, sx = rowwise(x)
            return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16)

        def dgrad():
            d8, sd = rowwise(dy)
            return torch._scaled_mm(d8, wt8.t(), scale_a=sd, scale_b=swt.t(), out_dtype=torch.bfloat16)

        ref = x.float() @ w.float().t()
        row["fp8_rowwise_rel_err"] = ((fwd().float() - ref).norm() / ref.norm()).item()
        row["fp8_rowwise_fwd_ms"] = timed(fwd) * 1e3
        row["fp8_rowwise_dgrad_ms"] = timed(dgrad) * 1e3
        x8, sx = rowwise(x)
        row["fp8_rowwise_fwd_gemm_only_ms"] = timed(
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16)) * 1e3
    except Exception as e:  # noqa: BLE001 - what this torch / GPU lacks is the finding
        row["fp8_rowwise_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for key in [k_ for k_ in row if k_.endswith("_ms")]:
        row[key.replace("_ms", "_tflops")] = round(flops / (row[key] * 1e-3) / 1e12, 1)
        row[key] = round(row[key], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default="gpu-out")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("fp8_probe: no GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"what": "machine", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
             "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
             "date": time.strftime("%Y-%m-%d %H:%M")}]
    m = args.tokens
    shapes = {"qkv": (3072, 6144), "o": (4096, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}
    for name, (k, n) in shapes.items():
        rows.append(measure(name, m, k, n))
    with open(out / "fp8_probe.jsonl", "a") as f:
        for r in rows:
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
