"""engine/worker/nf4.py: the 4-bit layers' traceable forward computes what bitsandbytes' own does (loss and
adapter gradients, exactly, on the CPU's NF4 kernels) and leaves the model's state dict as it was."""

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import load_lora_model, lora_loss_and_grads  # noqa: E402


def _run(tiny_model, traced: bool):
    # the 4-bit layers alone here (no fusion); fused ones: tests/test_fusion.py
    model = load_lora_model(tiny_model, env={"VOXTUI_NF4_BNB_FORWARD": "" if traced else "1", "VOXTUI_FUSION": "none"},
                            quant="nf4", grad_ckpt=True)
    return (model, *lora_loss_and_grads(model))


def test_traceable_nf4_equals_bitsandbytes_forward(tiny_model):
    bnb_model, loss0, ref = _run(tiny_model, traced=False)
    model, loss, got = _run(tiny_model, traced=True)
    traced = [n for n, m in model.named_modules() if hasattr(m, "_nf4_meta")]
    assert len(traced) == 2 * 7 + 2 and all(n.endswith("base_layer") or "projector" in n for n in traced)
    assert not any(hasattr(m, "_nf4_meta") for m in bnb_model.modules())
    assert loss == loss0
    assert got.keys() == ref.keys() and any(g.abs().sum() > 0 for g in got.values())
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert model.state_dict().keys() == bnb_model.state_dict().keys()  # the buffers are not saved


def test_a_traceable_layer_compiles_without_graph_breaks(tiny_model):
    from torch._dynamo.utils import counters

    from engine.worker.modeling import _unwrap, language_model

    model, _, _ = _run(tiny_model, traced=True)
    lm = language_model(_unwrap(model))
    layer = lm.layers[0]
    layer.gradient_checkpointing = False
    torch._dynamo.reset()
    counters.clear()
    h = torch.randn(1, 8, lm.config.hidden_size, requires_grad=True)
    pos = torch.arange(8)[None]
    out = torch.compile(layer, backend="aot_eager")(h, position_embeddings=lm.rotary_emb(h, pos),
                                                   attention_mask=None, position_ids=pos)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,nested", [((96, 256), True), ((100, 64), True), ((3, 320), True),
                                          ((64, 192), False), ((5, 128), False)])
def test_dequantize_ops_is_bitsandbytes_bit_for_bit(shape, nested):
    """What Inductor compiles (tensor operations) against bitsandbytes' own dequantisation, with and without
    double quantisation, also where the 256-value blocks of absmax values do not come out even."""
    import bitsandbytes.functional as F

    from engine.worker.nf4 import dequantize_ops

    torch.manual_seed(3)
    w = torch.randn(*shape, dtype=torch.bfloat16)
    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    meta = (tuple(st.shape), st.blocksize, "nf4", st.state2.blocksize if nested else 0, st.dtype)
    args = (st.absmax, st.state2.absmax, st.state2.code, st.offset) if nested else (st.absmax, None, None, None)
    got = dequantize_ops(q, *args, st.code, meta, torch.bfloat16)
    assert torch.equal(got, F.dequantize_4bit(q, st))


def test_compiled_layer_dequantises_in_tensor_operations_with_the_same_gradients(tiny_model):
    """Compiled (aot_eager: the traced graph, run eagerly), a layer takes the tensor-operation path; its output
    and input gradient equal the uncompiled layer's (bitsandbytes' operators)."""
    from engine.worker.modeling import _unwrap, language_model

    model, _, _ = _run(tiny_model, traced=True)
    lm = language_model(_unwrap(model))
    layer = lm.layers[1]
    layer.gradient_checkpointing = False
    torch.manual_seed(4)
    h0 = torch.randn(2, 8, lm.config.hidden_size)
    pos = torch.arange(8)[None].expand(2, 8)
    seen = []

    def backend(gm, inputs):  # what dynamo traced, then run as aot_eager runs it
        for sub in gm.modules():  # the graph and its subgraphs (the autograd.Function's forward, backward)
            if isinstance(sub, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in sub.graph.nodes)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, inputs)

    outs = []
    for fn in (layer, torch.compile(layer, backend=backend)):
        torch._dynamo.reset()
        h = h0.clone().requires_grad_()
        out = fn(h, position_embeddings=lm.rotary_emb(h, pos), attention_mask=None, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        outs.append((out.detach(), h.grad))
    # the dequantisation is tensor operations: the 4-bit codes' shift, no bitsandbytes operator
    assert any("rshift" in t for t in seen) and not any("bitsandbytes" in t for t in seen), seen
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)


def _weight_sized_kept(tiny_model, env: dict, **flags) -> tuple[list, float, dict]:
    """Compiled as Inductor partitions (the min-cut partition, run eagerly) in bf16 as on a GPU: the saved
    tensors of a step that have a 4-bit projection's shape, the loss and the adapters' gradients."""
    from engine.worker.modeling import CausalLMLoss, compile_layers

    torch._dynamo.reset()
    model = load_lora_model(tiny_model, env={"VOXTUI_FUSION": "none", **env}, quant="nf4", bf16=True, **flags)
    compile_layers(model, backend="aot_eager_decomp_partition")
    shapes = {tuple(m._nf4_meta[0]) for m in model.modules() if hasattr(m, "_nf4_meta")}
    weights = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    ids = torch.randint(5, 1000, (2, 50), generator=torch.Generator().manual_seed(0))  # no activation of a weight's shape
    flat = ids[:, 1:].reshape(-1)
    idx = torch.arange(3, flat.shape[0])
    for _ in range(2):  # the first compiles
        kept = []

        def pack(t, kept=kept):
            if t.data_ptr() not in weights and tuple(t.shape) in shapes | {s[::-1] for s in shapes}:
                kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            loss = CausalLMLoss(model)(input_ids=ids, target_idx=idx, targets=flat[idx])[0]
        for p in model.parameters():
            p.grad = None
        loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return kept, float(loss.detach()), grads


def test_a_layer_outside_the_checkpoints_dequantises_again_in_the_backward(tiny_model):
    """Compiled, a decoder layer that is not checkpointed kept its 4-bit weights dequantised for the backward
    (the layer's weights in bf16: NF4 took bf16's memory without checkpointing, docs/benchmarks.md runs AI–AK);
    now it keeps none of them and dequantises again — the same loss and gradients, bit for bit. With one of the
    two layers checkpointed (the other not), only the other is marked; without checkpointing, both;
    ``VOXTUI_NF4_KEEP_WEIGHTS=1`` keeps them as before."""
    from engine.worker.modeling import _unwrap, is_checkpointed, language_model

    flags = {"grad_ckpt": True, "grad_ckpt_layers": 1}
    kept, loss, grads = _weight_sized_kept(tiny_model, {}, **flags)
    assert kept == []
    before, loss0, grads0 = _weight_sized_kept(tiny_model, {"VOXTUI_NF4_KEEP_WEIGHTS": "1"}, **flags)
    assert len(before) == 7, before  # each projection's weight of the layer not checkpointed
    assert loss == loss0 and grads.keys() == grads0.keys()
    for name in grads0:
        assert torch.equal(grads[name], grads0[name]), name
    for given, marked in ((flags, [False, True]), ({"grad_ckpt": False}, [True, True])):
        model = load_lora_model(tiny_model, quant="nf4", **given)
        layers = language_model(_unwrap(model)).layers
        assert [not is_checkpointed(layer) for layer in layers] == marked
        for layer, mark in zip(layers, marked):
            assert {m._nf4_recompute for m in layer.modules() if hasattr(m, "_nf4_meta")} == {mark}
