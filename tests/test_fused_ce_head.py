"""The fused head + cross-entropy when the head itself trains (modeling.fused_head_ce's trainable-head
branch: each chunk's logits recomputed in the backward): the loss and the gradients of the hidden states
and of the head equal those of the plain computation, across chunk boundaries. The frozen head is
tests/test_batching.py::test_fused_head_ce_matches_cross_entropy."""

import pytest
import torch

from engine.worker.modeling import fused_head_ce


@pytest.fixture(autouse=True)
def own_rng():
    """These tests seed torch for themselves and leave its global generator as they found it (later tests
    that draw from it see the same numbers as without these)."""
    with torch.random.fork_rng():
        yield


def plain(h, w, y):
    return torch.nn.functional.cross_entropy((h @ w.T).float(), y, reduction="sum")


@pytest.mark.parametrize("chunk", [5, 23, 1024])  # a last chunk of 3 rows; exactly one chunk; one larger one
def test_trainable_head_loss_and_gradients_match_cross_entropy(chunk):
    torch.manual_seed(0)
    y = torch.randint(0, 50, (23,))
    w1 = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    h1 = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    h2 = h1.detach().clone().requires_grad_()
    fused = fused_head_ce(h1, w1, y, chunk=chunk)
    ref = plain(h2, w2, y)
    assert fused.dtype == torch.float32  # the logits go through fp32, as in the frozen branch
    assert torch.allclose(fused.double(), ref.double(), rtol=1e-6)
    (fused * 0.37).backward()
    (ref * 0.37).backward()
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    assert w1.grad.abs().sum() > 0 and h1.grad.abs().sum() > 0


def test_trainable_head_alone_gets_its_gradient():
    """Hidden states that need no gradient (a frozen body under a trainable head): the head's gradient
    only, equal to the plain computation's."""
    torch.manual_seed(1)
    y = torch.randint(0, 40, (17,))
    h = torch.randn(17, 8)
    w1 = torch.randn(40, 8, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    fused = fused_head_ce(h, w1, y, chunk=4)
    ref = plain(h, w2, y)
    assert torch.allclose(fused, ref, rtol=1e-5)
    fused.backward()
    ref.backward()
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_trainable_head_in_bf16_follows_the_fp32_result():
    """bf16 weights and hidden states (as on a GPU): close to the fp32 computation, gradients in bf16."""
    torch.manual_seed(2)
    y = torch.randint(0, 64, (30,))
    w = torch.randn(64, 32) * 0.2
    h = torch.randn(30, 32)
    wb = w.to(torch.bfloat16).requires_grad_()
    hb = h.to(torch.bfloat16).requires_grad_()
    fused = fused_head_ce(hb, wb, y, chunk=8)
    w32 = wb.detach().float().requires_grad_()
    h32 = hb.detach().float().requires_grad_()
    ref = plain(h32, w32, y)
    assert torch.allclose(fused, ref, rtol=2e-2)
    fused.backward()
    ref.backward()
    assert wb.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16
    assert torch.allclose(wb.grad.float(), w32.grad, rtol=5e-2, atol=2e-2)
    assert torch.allclose(hb.grad.float(), h32.grad, rtol=5e-2, atol=2e-2)


def test_causal_lm_loss_with_a_trainable_head(tiny_model):
    """Through CausalLMLoss on the tiny Voxtral with its head unfrozen: the summed loss and the head's
    gradient are those of the model's own logits."""
    from engine.config import TrainConfig
    from engine.worker.modeling import CausalLMLoss, _unwrap, load_model

    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl="x", quant="none", bf16=False, grad_ckpt=False,
                      lora_dropout=0.0, compile=False)
    model, _ = load_model(cfg, torch.device("cpu"))
    head = _unwrap(model).get_output_embeddings().weight
    head.requires_grad_(True)
    ids = torch.tensor([[1, 3, 500, 600, 700, 800, 4, 900], [1, 3, 510, 610, 710, 4, 2, 2]])
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    flat = labels[:, 1:].reshape(-1)
    target_idx = torch.nonzero(flat != -100).squeeze(1)
    targets = flat[target_idx]
    attention = (labels != -100) | (torch.arange(8) < 3)
    loss = CausalLMLoss(model, chunk=3)
    total, n = loss(input_ids=ids, target_idx=target_idx, targets=targets, attention_mask=attention.long())
    total.backward()
    got = head.grad.clone()
    head.grad = None
    logits = model(input_ids=ids, attention_mask=attention.long()).logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, reduction="sum",
                                            ignore_index=-100)
    ref.backward()
    assert int(n) == int((flat != -100).sum())
    assert torch.allclose(total, ref, rtol=1e-5)
    assert got.abs().sum() > 0 and torch.allclose(got, head.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_compiled_chunk_matches_cross_entropy(compiled, dtype):
    """The frozen head's path with the chunk's softmax and gradient compiled (``ce_chunk`` under
    torch.compile; aot_eager here, Inductor on a GPU: tests/gpu) and without: the loss and the hidden
    states' gradient of the plain computation, over chunks of 7 rows and a last one of 2 (a second shape)."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    y = torch.randint(0, 300, (23,))
    w = torch.randn(300, 16).to(dtype)
    h1 = torch.randn(23, 16, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_()
    fused = fused_head_ce(h1, w, y, chunk=7, compiled=compiled)
    ref = plain(h2.to(dtype), w, y)
    assert torch.allclose(fused, ref, rtol=1e-5 if dtype == torch.float32 else 2e-3)
    (fused * 0.5).backward()
    (ref * 0.5).backward()
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    assert h1.grad.abs().sum() > 0
    with torch.no_grad():  # no gradient wanted (evaluation): the loss alone, the same
        assert torch.allclose(fused_head_ce(h1, w, y, chunk=7, compiled=compiled), fused.detach())
