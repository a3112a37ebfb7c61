"""Gradient checkpointing under the compiled layers, on a GPU: what a step keeps for the backward.

A checkpointed layer should keep little more than its input; run P (docs/benchmarks.md) found NF4's and
FP8's compiled layers keeping their activations when the checkpoint sat inside the layer (NF4 20.3 against
5.6 GiB, an ``autograd.Function`` inside the checkpoint under torch 2.11), while bf16's held. For each
quantisation, the worker's model (real widths, both layers checkpointed, compiled) runs one packed row
under bf16 autocast; every tensor the autograd graph saves that is not a weight is counted. Each place
(``VOXTUI_CHECKPOINT``) must keep at most half of what no checkpointing keeps; what each keeps is printed.
"""

from __future__ import annotations

import pytest
import torch
from gpu_util import save_real_width
from test_train_path_gpu import DEV, packed_row, worker_model

from conftest import kept_for_backward


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory):
    return save_real_width(tmp_path_factory)


def saved_bytes(path, quant: str, ckpt: int, place: str, monkeypatch, products: str = "") -> int:
    from engine.worker.knobs import knobs
    from engine.worker.modeling import CausalLMLoss

    monkeypatch.setenv("VOXTUI_CHECKPOINT", place)
    knobs.cache_clear()
    torch._dynamo.reset()
    model = worker_model(path, quant, ckpt, products)
    batch, _ = packed_row()
    loss_fn = CausalLMLoss(model, compiled=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            return loss_fn(**{k: v.to(DEV) if torch.is_tensor(v) else v for k, v in batch.items()})[0]

    kept = kept_for_backward(model, step)
    del model
    knobs.cache_clear()
    return kept


@pytest.mark.parametrize("quant,products", [("none", ""), ("nf4", ""), ("fp8", ""), ("none", "backward"),
                                            ("fp8", "backward"), ("fp8", "mlp")])
def test_a_checkpointed_compiled_layer_keeps_little(real_width_dir, quant, products, monkeypatch):
    """… for bf16, NF4 and every product FP8, and with FP8 input gradients (--fp8_products backward) on bf16
    and on FP8 weights, and with the MLP's forward products FP8 ones too (--fp8_products mlp)."""
    kept = {"no checkpointing": saved_bytes(real_width_dir, quant, 0, "inside", monkeypatch, products)}
    for place in ("inside", "around"):
        kept[place] = saved_bytes(real_width_dir, quant, 2, place, monkeypatch, products)
    print(f"{quant}{f' FP8 {products}' if products else ''}: kept for the backward, MiB: "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in kept.items()))
    assert kept["inside"] <= 0.5 * kept["no checkpointing"] and kept["around"] <= 0.5 * kept["no checkpointing"], kept
