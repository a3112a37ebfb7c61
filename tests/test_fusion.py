"""engine/worker/fusion.py: q/k/v and gate/up as one product each compute what PEFT's separate LoRA layers
compute (loss, every adapter gradient), share the weights' memory, and leave generation with a KV cache,
disabled adapters and the saved state as they were."""

import pytest
import torch

from conftest import load_lora_model, lora_loss_and_grads


def _load(tiny_model, fused: bool, **flags):
    return load_lora_model(tiny_model, env={"VOXTUI_FUSION": "all" if fused else "none"}, **flags)


_loss_grads = lora_loss_and_grads


@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_projections_give_peft_loss_and_gradients(tiny_model, ckpt):
    from engine.worker.modeling import _unwrap, language_model

    ref_model = _load(tiny_model, fused=False, grad_ckpt=ckpt)
    model = _load(tiny_model, fused=True, grad_ckpt=ckpt)
    layers = language_model(_unwrap(model)).layers
    assert all(hasattr(layer.self_attn, "_fused_qkv") and hasattr(layer.mlp, "_fused_gate_up") for layer in layers)
    assert not any(hasattr(layer.self_attn, "_fused_qkv") for layer in language_model(_unwrap(ref_model)).layers)
    attn = layers[0].self_attn  # the projections' weights are views into the fused one: no second copy
    assert attn.q_proj.base_layer.weight.data_ptr() == attn._fused_qkv.data_ptr()
    assert attn.v_proj.base_layer.weight.untyped_storage().data_ptr() == attn._fused_qkv.untyped_storage().data_ptr()
    assert model.state_dict().keys() == ref_model.state_dict().keys()
    loss0, ref = _loss_grads(ref_model)
    loss, got = _loss_grads(model)
    assert loss == pytest.approx(loss0, rel=1e-6)
    assert got.keys() == ref.keys() and all(g.abs().sum() > 0 for g in got.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_generation_and_disabled_adapters_run_the_original_forward(tiny_model):
    """HF generate (a KV cache) and PEFT's disable_adapter: the same tokens and logits as without fusion."""
    ref_model = _load(tiny_model, fused=False).eval()
    model = _load(tiny_model, fused=True).eval()
    ids = torch.tensor([[1, 3, 500, 600, 700]])
    with torch.no_grad():
        a = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        b = ref_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(a, b)
        with model.disable_adapter(), ref_model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits)
            base = model(input_ids=ids).logits
        assert not torch.allclose(base, model(input_ids=ids).logits)  # the adapters matter again


def test_lora_dropout_keeps_peft_layers(tiny_model):
    from engine.worker.modeling import _unwrap, language_model

    model = _load(tiny_model, fused=True, lora_dropout=0.1)
    assert not any(hasattr(layer.self_attn, "_fused_qkv") for layer in language_model(_unwrap(model)).layers)


def test_a_fused_layer_compiles_into_one_graph(tiny_model):
    from torch._dynamo.utils import counters

    from engine.worker.modeling import _unwrap, language_model

    model = _load(tiny_model, fused=True)
    lm = language_model(_unwrap(model))
    torch._dynamo.reset()
    counters.clear()
    h = torch.randn(1, 8, lm.config.hidden_size, requires_grad=True)
    pos = torch.arange(8)[None]
    out = torch.compile(lm.layers[0], backend="aot_eager")(h, position_embeddings=lm.rotary_emb(h, pos),
                                                           attention_mask=None, position_ids=pos)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("ckpt", [False, True])
def test_nf4_layers_fuse_too_and_compile_to_one_dequantisation(tiny_model, ckpt):
    """NF4 (voxtui's traceable 4-bit layers): fused, the same loss and gradients as unfused; compiled
    (aot_eager), the three q/k/v weights are dequantised by tensor operations into one product."""
    pytest.importorskip("bitsandbytes")
    from torch._dynamo.utils import counters

    from engine.worker.modeling import _unwrap, language_model

    ref_model = _load(tiny_model, fused=False, quant="nf4", grad_ckpt=ckpt)
    model = _load(tiny_model, fused=True, quant="nf4", grad_ckpt=ckpt)
    lm = language_model(_unwrap(model))
    assert all(layer.self_attn._fused_qkv is None and layer.mlp._fused_gate_up_sizes == (128, 128)
               for layer in lm.layers)
    loss0, ref = _loss_grads(ref_model)
    loss, got = _loss_grads(model)
    assert loss == pytest.approx(loss0, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    seen = []

    def backend(gm, inputs):
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in sub.graph.nodes)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, inputs)

    torch._dynamo.reset()
    counters.clear()
    layer = lm.layers[0]
    layer.gradient_checkpointing = False
    h = torch.randn(1, 8, lm.config.hidden_size, requires_grad=True)
    pos = torch.arange(8)[None]
    out = torch.compile(layer, backend=backend)(h, position_embeddings=lm.rotary_emb(h, pos), attention_mask=None,
                                                position_ids=pos)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert dict(counters["graph_break"]) == {}
    assert any("rshift" in t for t in seen) and not any("bitsandbytes" in t for t in seen)
