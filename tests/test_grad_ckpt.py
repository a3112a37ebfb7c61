"""--grad_ckpt_layers: gradient checkpointing on the first N decoder layers only, the same gradients."""

import pytest
import torch

from engine.config import TrainConfig


def _grads(tiny_model, **flags):
    from engine.worker.modeling import CausalLMLoss, checkpointed_layers, load_model

    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl="x", quant="none", bf16=False, lora_dropout=0.0,
                      compile=False, **flags)
    torch.manual_seed(0)
    model, _ = load_model(cfg, torch.device("cpu"))
    model.train()
    for name, p in model.named_parameters():  # B starts at zero: make every adapter weight matter
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.tensor([[1, 3, 500, 600, 700, 800, 4, 900], [1, 3, 510, 610, 710, 4, 2, 2]])
    flat = ids[:, 1:].reshape(-1)
    target_idx = torch.arange(3, flat.shape[0])
    total, _ = CausalLMLoss(model)(input_ids=ids, target_idx=target_idx, targets=flat[target_idx])
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(total), grads, checkpointed_layers(model)


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
