"""--grad_ckpt_layers: gradient checkpointing on the first N decoder layers only, the same gradients."""

import pytest
import torch

from conftest import load_lora_model, lora_loss_and_grads
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


def test_grad_ckpt_layers_is_checked():
    from engine.util import UsageError

    with pytest.raises(UsageError, match=r"--grad_ckpt_layers must be -1 \(all\) or 0 or more \(got -2\)"):
        TrainConfig(train_jsonl="x", grad_ckpt_layers=-2).validate()
