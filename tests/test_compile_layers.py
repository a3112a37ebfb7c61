"""modeling.compile_layers: the decoder layers compiled once for all (one graph, plus one for the first
layer, whose input needs no gradient), with the eager model's loss and adapter gradients, before and after
an evaluation that runs eagerly. Traced with aot_eager here (Inductor's kernels: tests/gpu)."""

import pytest
import torch

from conftest import load_lora_model, lora_loss_and_grads


def test_compiled_layers_share_one_graph_and_train_like_the_eager_model(tiny_model):
    from torch._dynamo.utils import counters

    from engine.worker.modeling import compile_layers, eager

    eager_loss, eager_grads = lora_loss_and_grads(load_lora_model(tiny_model))
    model = load_lora_model(tiny_model)
    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(model, backend="aot_eager") == 2
    loss, grads = lora_loss_and_grads(model)
    assert counters["stats"]["unique_graphs"] == 2 and dict(counters["graph_break"]) == {}
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    for k in eager_grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-5, atol=1e-7)
    model.eval()
    with eager(), torch.no_grad():  # evaluation: eager, no new graph
        model(input_ids=torch.tensor([[1, 3, 500, 4]]))
    model.train()
    model.zero_grad()
    assert lora_loss_and_grads(model)[0] == pytest.approx(eager_loss, rel=1e-6)
    assert counters["stats"]["unique_graphs"] == 2



def test_inductor_tuning_is_what_torch_compile_takes():
    """VOXTUI_INDUCTOR's settings are arguments torch.compile accepts (Inductor checks option names when it
    compiles; the compile itself runs in tests/gpu and the benchmarks)."""
    import torch._inductor.config as cfg

    from engine.worker.modeling import inductor_tuning

    assert inductor_tuning("default", graphs=False) == {}
    assert hasattr(cfg, "coordinate_descent_tuning")
    assert inductor_tuning("coordinate", graphs=False) == {"options": {"coordinate_descent_tuning": True}}
    assert inductor_tuning("autotune", graphs=False)["mode"] in torch._inductor.list_mode_options()
    assert inductor_tuning("autotune", graphs=True)["mode"] in torch._inductor.list_mode_options()
    assert inductor_tuning("default", graphs=True) == {"options": {"triton.cudagraphs": True}}
    for how in ("coordinate", "autotune"):
        for graphs in (False, True):
            torch.compile(torch.nn.Linear(2, 2), **inductor_tuning(how, graphs))  # the arguments are checked here
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):  # ... as this shows
        torch.compile(torch.nn.Linear(2, 2), options={"coordinate_descent": True})
