"""modeling.compile_layers: the decoder layers compiled once for all (one graph,
and one for the first layer, whose input needs no gradient), the guards on the layers'
modules left out of each call's check by default (VOXTUI_ALL_GUARDS=1 keeps them), and the same loss and
adapter gradients as the eager model. Traced with aot_eager here (Inductor's kernels: tests/gpu)."""

import pytest
import torch

from conftest import load_lora_model, lora_loss_and_grads


@pytest.mark.parametrize("all_guards", [False, True])
def test_compiled_layers_share_one_graph_and_train_like_the_eager_model(tiny_model, all_guards, monkeypatch):
    from torch._dynamo.utils import counters

    from engine.worker.knobs import knobs
    from engine.worker.modeling import _unwrap, compile_layers, eager, language_model

    monkeypatch.setenv("VOXTUI_ALL_GUARDS", "1" if all_guards else "")
    knobs.cache_clear()
    eager_loss, eager_grads = lora_loss_and_grads(load_lora_model(tiny_model))
    model = load_lora_model(tiny_model)
    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(model, backend="aot_eager") == 2
    loss, grads = lora_loss_and_grads(model)
    # two graphs: the first layer's input needs no gradient (frozen embeddings), the second's does
    assert counters["stats"]["unique_graphs"] == 2 and dict(counters["graph_break"]) == {}
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    for k in eager_grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-5, atol=1e-7)
    # evaluation runs eagerly, then training goes on with the same compiled graph
    model.eval()
    with eager(), torch.no_grad():
        model(input_ids=torch.tensor([[1, 3, 500, 4]]))
    model.train()
    model.zero_grad()
    assert lora_loss_and_grads(model)[0] == pytest.approx(eager_loss, rel=1e-6)
    assert counters["stats"]["unique_graphs"] == 2
    # what the left-out guards mean: a module attribute changed after compiling is seen only with all guards
    attn = language_model(_unwrap(model)).layers[0].self_attn
    attn.scaling = attn.scaling * 2
    model.zero_grad()
    changed = lora_loss_and_grads(model)[0]
    assert (changed != pytest.approx(eager_loss, rel=1e-6)) is all_guards
    assert counters["stats"]["unique_graphs"] == (3 if all_guards else 2)
    monkeypatch.undo()
    knobs.cache_clear()
