"""--grad_ckpt_layers: gradient checkpointing on the first N decoder layers only, the same gradients."""

import pytest
import torch

from conftest import kept_for_backward, load_lora_model, lora_loss_and_grads
from engine.config import TrainConfig


def _grads(tiny_model, **flags):
    from engine.worker.modeling import checkpointed_layers

    model = load_lora_model(tiny_model, **flags)
    loss, grads = lora_loss_and_grads(model)
    return loss, grads, checkpointed_layers(model)


@pytest.mark.parametrize("n,expect", [(-1, 2), (0, 0), (1, 1), (7, 2)])
def test_first_n_layers_recompute_and_the_gradients_are_the_same(tiny_model, n, expect):
    loss0, ref, (none, layers) = _grads(tiny_model, grad_ckpt=False)
    assert (none, layers) == (0, 2)
    loss, got, (ckpt, _) = _grads(tiny_model, grad_ckpt=True, grad_ckpt_layers=n)
    assert ckpt == expect
    assert loss == pytest.approx(loss0, rel=1e-6)
    assert got.keys() == ref.keys() and any(g.abs().sum() > 0 for g in got.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("place", ["inside", "around"])
def test_checkpointed_layers_recompute_in_the_backward(tiny_model, place):
    """Each checkpointed layer's MLP runs again in the backward, the others' once: (1 layer checkpointed) the
    first layer's twice, the second's once — with the checkpoint inside the layer's forward and around its
    call (VOXTUI_CHECKPOINT); the same gradients either way, and one pass each in evaluation."""
    from engine.worker.modeling import _unwrap, language_model

    model = load_lora_model(tiny_model, env={"VOXTUI_CHECKPOINT": place}, grad_ckpt=True, grad_ckpt_layers=1)
    calls = [0, 0]
    for i, layer in enumerate(language_model(_unwrap(model)).layers):
        # a pre-hook: the recompute stops once it has every saved tensor, inside the MLP's last product
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss, got = lora_loss_and_grads(model)
    assert calls == [2, 1]
    _, ref, _ = _grads(tiny_model, grad_ckpt=False)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    calls[:] = [0, 0]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 3, 500, 600]]))
    assert calls == [1, 1]


@pytest.mark.parametrize("quant", ["none", "nf4", "fp8"])
def test_the_checkpoint_sits_inside_each_layer_by_default(tiny_model, quant):
    """VOXTUI_CHECKPOINT: inside each layer's forward by default, for every quantisation (measured faster than
    around the call on an H200 for bf16, NF4 and FP8 at the same memory: docs/benchmarks.md, runs P and Q)."""
    from engine.worker import modeling as m

    assert m.checkpoint_place() == "inside"
    model = load_lora_model(tiny_model, quant=quant, grad_ckpt=True)
    layers = m.language_model(m._unwrap(model)).layers
    assert all(isinstance(layer, m._CheckpointedForward) and not layer.gradient_checkpointing for layer in layers)
    model = load_lora_model(tiny_model, env={"VOXTUI_CHECKPOINT": "around"}, quant=quant, grad_ckpt=True)
    layers = m.language_model(m._unwrap(model)).layers
    if m._transformers_wraps_call():  # transformers ≤ 5.17: its own switch wraps the call
        assert all(layer.gradient_checkpointing and not isinstance(layer, m._Checkpointed) for layer in layers)
    else:
        assert all(isinstance(layer, m._CheckpointedCall) and not layer.gradient_checkpointing for layer in layers)


@pytest.mark.parametrize("quant,products,op", [("none", "none", ""), ("nf4", "auto", ""), ("fp8", "all", "voxtui.fp8_mm"),
                                               ("fp8", "backward", "voxtui.mm_fp8_grad"),
                                               ("none", "backward", "voxtui.mm_fp8_grad")])
def test_a_compiled_layer_holds_no_autograd_function(tiny_model, quant, products, op):
    """What dynamo traces of a checkpointed layer holds no ``autograd.Function`` (a higher-order
    ``autograd_function_apply``): with one inside the checkpoint, torch 2.11's partition kept every activation
    of the layer (NF4 20.3 against 5.6 GiB on an H200, docs/benchmarks.md run P). NF4's products are plain
    operations there, FP8's custom operators with their own backward (``voxtui::fp8_mm``; with FP8 input
    gradients alone, ``voxtui::mm_fp8_grad``)."""
    from engine.worker.modeling import compile_layers

    torch._dynamo.reset()
    targets = []

    def inspecting(gm, example_inputs):
        for mod in gm.modules():  # the checkpoint's body is a submodule of the layer's graph
            targets.extend(str(node.target) for node in mod.graph.nodes if node.op == "call_function")
        return gm.forward

    model = load_lora_model(tiny_model, quant=quant, fp8_products=products, grad_ckpt=True)
    compile_layers(model, backend=inspecting)
    lora_loss_and_grads(model)
    torch._dynamo.reset()
    assert any("tag_activation_checkpoint" in t for t in targets)
    assert not any("autograd_function_apply" in t for t in targets)
    if op:
        assert any(op in t for t in targets), sorted(set(targets))


def test_a_compiled_layer_holds_its_checkpoint_inside(tiny_model):
    """With the checkpoint inside the layer, a compiled layer is entered once a step: its recompute is part of
    its compiled backward. Around the layer's call, the backward enters each compiled checkpointed layer
    again — through dynamo's guards, a host cost on every step (docs/benchmarks.md, run O)."""
    from engine.worker.modeling import compile_layers

    entered = {}
    for place in ("inside", "around"):
        torch._dynamo.reset()
        calls = [0]

        def counting(gm, example_inputs, calls=calls):
            def run(*args):
                calls[0] += 1
                return gm(*args)
            return run

        model = load_lora_model(tiny_model, env={"VOXTUI_CHECKPOINT": place}, grad_ckpt=True)
        compile_layers(model, backend=counting)
        lora_loss_and_grads(model)  # compiles
        calls[0] = 0
        lora_loss_and_grads(model)
        entered[place] = calls[0]
    torch._dynamo.reset()
    assert entered == {"inside": 2, "around": 4}  # two layers, both checkpointed


@pytest.mark.parametrize("quant", ["none", "nf4", "fp8"])
def test_a_checkpointed_compiled_layer_keeps_little(tiny_model, quant):
    """What a step keeps for the backward (every saved tensor that is not a weight), the layers compiled
    (AOTAutograd's partition, as under Inductor) and under bf16 autocast: with both layers checkpointed,
    inside or around, at most half of what no checkpointing keeps. (tests/gpu/test_checkpoint_gpu.py
    measures the same on a GPU.)"""
    from engine.worker.modeling import CausalLMLoss, compile_layers

    ids = torch.randint(5, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    flat = ids[:, 1:].reshape(-1)
    idx = torch.arange(3, flat.shape[0])
    kept = {}
    for place, ckpt in (("inside", False), ("inside", True), ("around", True)):
        torch._dynamo.reset()
        model = load_lora_model(tiny_model, env={"VOXTUI_CHECKPOINT": place}, quant=quant, grad_ckpt=ckpt)
        compile_layers(model, backend="aot_eager")

        def step(model=model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return CausalLMLoss(model)(input_ids=ids, target_idx=idx, targets=flat[idx])[0]

        kept[place if ckpt else "none"] = kept_for_backward(model, step)
    torch._dynamo.reset()
    assert kept["inside"] <= 0.5 * kept["none"] and kept["around"] <= 0.5 * kept["none"], kept


def test_grad_ckpt_layers_is_checked():
    from engine.util import UsageError

    with pytest.raises(UsageError, match=r"--grad_ckpt_layers must be -1 \(all\) or 0 or more \(got -2\)"):
        TrainConfig(train_jsonl="x", grad_ckpt_layers=-2).validate()
