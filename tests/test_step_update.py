"""A step's update (engine/worker/step.py): queued before the host waits for the step (fused AdamW, the skip
of a non-finite step a device flag) it changes exactly what the update launched after the wait changed —
the weights, AdamW's moments and step count — and a non-finite step changes none of them, on either path."""

from types import SimpleNamespace

import pytest
import torch

from engine.config import TrainConfig
from engine.worker.step import Update


class SquaredError(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return ((self.model(x) - y) ** 2).sum(), None


def run(overlap: bool, fused: bool, poison_at: int, steps: int = 4, graphs: bool = False, micro_n: int = 1):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01, fused=fused)
    d = SimpleNamespace(world=1, device=torch.device("cpu"), main=True)
    update = Update(SquaredError(model), params, None, opt, TrainConfig(train_jsonl="x", max_grad_norm=1.0), d,
                    overlap=overlap, graphs=graphs)
    data = torch.Generator().manual_seed(1)
    called = []
    for step in range(1, steps + 1):
        micro = [{"x": torch.randn(5, 8, generator=data), "y": torch.randn(5, 3, generator=data)}
                 for _ in range(micro_n)]
        loss, norm = update.gradients(micro, 5.0 * micro_n, poison=step == poison_at, before_wait=lambda at=step: called.append(at))
        if torch.isfinite(loss) and torch.isfinite(norm):
            update.apply()
        else:
            update.skip()
    assert called == list(range(1, steps + 1))
    return update, [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("poison_at", [0, 2, 1])
def test_update_queued_ahead_is_the_update_after_the_wait(poison_at):
    ahead, p_ahead, opt_ahead = run(True, True, poison_at)
    after, p_after, opt_after = run(False, True, poison_at)
    assert ahead.ahead and not after.ahead
    for a, b in zip(p_ahead, p_after):
        assert torch.equal(a, b)
    skipped = 1 if poison_at else 0
    for p_a, p_b in zip(opt_ahead.param_groups[0]["params"], opt_after.param_groups[0]["params"]):
        sa, sb = opt_ahead.state[p_a], opt_after.state[p_b]
        assert float(sa["step"]) == float(sb["step"]) == 4 - skipped
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_a_poisoned_first_step_leaves_the_weights_and_state_as_they_were():
    torch.manual_seed(0)
    start = [p.detach().clone() for p in torch.nn.Linear(8, 3).parameters()]
    update, params, opt = run(True, True, poison_at=1, steps=1)
    for a, b in zip(params, start):
        assert torch.equal(a, b)
    assert all(float(s["step"]) == 0 for s in opt.state.values())


def test_an_unfused_optimizer_waits_for_the_numbers():
    """A run resumed from a checkpoint of an unfused AdamW (its param groups say fused: False) keeps its
    update after the wait, and gives what a fused one queued ahead gives, up to rounding."""
    unfused, p_unfused, _ = run(True, False, poison_at=2)
    assert not unfused.ahead
    _, p_fused, _ = run(True, True, poison_at=2)
    for a, b in zip(p_unfused, p_fused):
        torch.testing.assert_close(a, b)


def test_under_cuda_graphs_the_gradients_are_kept_and_zeroed_in_place():
    """With the compiled layers replayed as CUDA graphs (VOXTUI_CUDA_GRAPHS=1) a backward must add into
    gradients of their own, never keep a graph's output as one (the next replay would write over it): the
    gradients exist before the first step and stay the same tensors, zeroed in place, and two micro-batches
    a step (each a new graph generation) update the weights bit for bit as without graphs."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    d = SimpleNamespace(world=1, device=torch.device("cpu"), main=True)
    update = Update(SquaredError(model), params, None, opt, TrainConfig(train_jsonl="x"), d, graphs=True)
    grads = [p.grad for p in params]
    assert all(g is not None and not g.any() for g in grads)
    x, y = torch.randn(5, 8), torch.randn(5, 3)
    update.gradients([{"x": x, "y": y}], 5.0)
    assert all(p.grad is g and g.any() for p, g in zip(params, grads))
    update.apply()
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    for poison_at in (0, 2):
        with_graphs, p_graphs, _ = run(True, True, poison_at, graphs=True, micro_n=2)
        without, p_plain, _ = run(True, True, poison_at, graphs=False, micro_n=2)
        for a, b in zip(p_graphs, p_plain):
            assert torch.equal(a, b)


def test_a_run_that_went_back_shows_its_steps_once():
    """A resume retrains from its checkpoint, and a run with none starts over from step 1: the curves drew the
    first attempt and the second side by side on one axis (a zig-zag of losses, the warm-up twice). The steps
    trained again replace the ones after where the run went back; evaluations there go too."""
    from app.state import RunState
    from engine.protocol import Eval, Status, Step

    s = RunState(folder="r")
    seq = iter(range(1, 1000))
    s.apply(Status(seq=next(seq), state="running"))
    for step in range(1, 15):
        s.apply(Step(seq=next(seq), step=step, loss=5.0 - step / 10, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0))
        if step % 5 == 0:
            s.apply(Eval(seq=next(seq), step=step, loss=4.0, ppl=50.0, tokens=10, best_loss=4.0, improved=True))
    s.apply(Status(seq=next(seq), state="failed", message="rank 0 was killed"))
    s.apply(Status(seq=next(seq), state="running", message="started over"))
    for step in range(1, 4):
        s.apply(Step(seq=next(seq), step=step, loss=9.0, lr=1e-5, grad_norm=1.0, tokens_per_s=1.0))
    assert [row[0] for row in s.steps] == [1, 2, 3] and all(row[1] == 9.0 for row in s.steps)
    assert s.evals == []
    for step in range(4, 12):  # on to step 11, then resumed from a checkpoint at step 8: 9, 10, 11 again
        s.apply(Step(seq=next(seq), step=step, loss=3.0, lr=1e-5, grad_norm=1.0, tokens_per_s=1.0))
    for step in (9, 10):
        s.apply(Step(seq=next(seq), step=step, loss=2.0, lr=1e-5, grad_norm=1.0, tokens_per_s=1.0))
    assert [row[0] for row in s.steps] == list(range(1, 11)) and [row[1] for row in s.steps][-2:] == [2.0, 2.0]
