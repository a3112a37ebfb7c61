"""voxtui::packed_attention on a GPU (attention.py): a packed row whose long examples each take cuDNN's
fused attention and whose short ones take varlen FlashAttention gives FlashAttention's output and
gradients for the whole row, at Voxtral's heads (32 query / 8 key-value heads of 128), bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

DEV = torch.device("cuda")


@pytest.mark.parametrize("short,pads,long_", [([300, 700, 1024, 1], [500], [2048, 4000]), ([], [], [8192]),
                                               ([17, 2100], [], [3000, 2048, 5000]), ([300, 700, 1], [1000], [])])
def test_packed_attention_equals_varlen_flash_attention(short, pads, long_):
    from engine.worker import attention

    attention.register(DEV)
    seg = short + pads + long_
    total = sum(seg)
    cu = torch.tensor([0, *np.cumsum(seg)], dtype=torch.int32, device=DEV)
    first = sum(short) + sum(pads)
    bounds = torch.tensor([first, *(first + np.cumsum(long_))] if long_ else [total, total],
                          dtype=torch.int64)  # on the host
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(total, 32, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(total, 8, 128, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(total, 32, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    mx = max(seg)

    def run(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(do)
        return out.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()

    got = run(lambda a, b, c: torch.ops.voxtui.packed_attention(a, b, c, cu, bounds, mx, 128 ** -0.5)[0])
    want = run(lambda a, b, c: attention._varlen_cuda(a, b, c, cu, mx, 128 ** -0.5))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        diff = float((a - b).abs().max())
        print(f"{seg}: {name} cosine {cos:.6f}, largest difference {diff:.4f}")
        assert cos >= 0.9999 and diff <= 0.1 * float(b.abs().max())
    print(f"cuDNN takes grouped key/value heads as they are: {attention._CUDNN_GQA}")
