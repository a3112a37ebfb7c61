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


@pytest.mark.parametrize("ckpt", [False, True])
def test_long_examples_own_attention_compiles_without_breaks_or_recompiles(tiny_model, ckpt):
    """A packed row whose long examples take voxtui::packed_attention (``dense_bounds``, attention.py) goes
    through the compiled layers (checkpointed inside, too) in one graph, with no graph break, the eager
    model's loss and gradients; rows with another number of long examples, or none, compile nothing new."""
    import numpy as np
    from torch._dynamo.utils import counters

    from engine.worker.modeling import CausalLMLoss, compile_layers

    def row(short, long_, width=96):
        seg = short + [width - sum(short) - sum(long_)] + long_
        g = np.random.default_rng(sum(seg) + len(seg))
        ids = torch.tensor(g.integers(3, 900, width))[None]
        first = width - sum(long_)
        m = {"input_ids": ids, "position_ids": torch.tensor([[p for n in seg for p in range(n)]]),
             "cu_seq_lens_q": torch.tensor([0, *np.cumsum(seg)], dtype=torch.int32), "max_length_q": 40}
        m["dense_bounds"] = torch.tensor([first, *(first + np.cumsum(long_))] if long_ else [width, width],
                                         dtype=torch.int64)
        idx = torch.arange(2, width - 1)
        return {**m, "target_idx": idx, "targets": ids[0, 1:][idx]}

    def run(model, m):
        model.zero_grad()
        total, _ = CausalLMLoss(model)(**m)
        total.backward()
        return float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    rows = [row([5, 9], [30, 21]), row([12], [33]), row([3, 4, 7], [20, 20, 25]), row([10, 20], []), row([], [40])]
    eager_model = load_lora_model(tiny_model, grad_ckpt=ckpt)
    want = [run(eager_model, m) for m in rows]
    model = load_lora_model(tiny_model, grad_ckpt=ckpt)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(model, backend="aot_eager")
    for i, (m, (loss, grads)) in enumerate(zip(rows, want)):
        got_loss, got = run(model, m)
        assert got_loss == pytest.approx(loss, rel=1e-6)
        for k in grads:  # fp32 in another order (aot_eager's decompositions): within 1e-6 of the values
            torch.testing.assert_close(got[k], grads[k], rtol=1e-4, atol=1e-6)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert 1 <= graphs <= 2  # the first layer and the others (one, checkpointed)
    # rows with 2, 1, 3, no long examples and one filling the row: no graph break, no recompile
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
