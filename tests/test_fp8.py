"""``--quant fp8`` (engine/worker/fp8.py) on the CPU, whose ``torch._scaled_mm`` takes the same row-wise
e4m3 products: the quantisation, the product and its input gradient against the dequantised weight, the
worker's model (e4m3 projections, fp32 adapters) against LoRA on the weights rounded through FP8, a real
run, and the weights inference uses. Speed and the GPU's kernels: tests/gpu and docs/benchmarks.md."""

import pytest
import torch

from conftest import load_lora_model, lora_loss_and_grads, train_args, worker, write_jsonl
from engine.config import TrainConfig
from engine.worker import fp8


def test_rows_quantise_to_e4m3_with_one_scale_each():
    torch.manual_seed(0)
    x = torch.randn(40, 64) * torch.logspace(-3, 3, 40)[:, None]  # rows of very different sizes
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (40, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s[:, 0], x.abs().amax(1) / 448)
    back = q.float() * s
    assert ((back - x).abs() <= 0.0625 * x.abs() + 1e-30 * s).all()  # 3 mantissa bits: within 1/16 of each value
    assert q.float().abs().amax(1).eq(448).all()  # each row's largest value lands on e4m3's largest


@pytest.mark.parametrize("rows,out", [(32, 48), (5, 48), (32, 40)])  # FP8 products (5 × 2 rows padded to 16);
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # a weight they do not take (40 rows)
def test_product_and_input_gradient_follow_the_dequantised_weight(rows, out, dtype):
    torch.manual_seed(1)
    w = torch.randn(out, 64)
    wq, ws = fp8.quantize_rows(w)
    ws = ws[:, 0]
    wd = (wq.double() * ws.double()[:, None])  # what the products multiply by
    x = torch.randn(2, rows // 2 if rows % 2 == 0 else rows, 64).to(dtype).requires_grad_()
    y = fp8.linear(x, wq, ws)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], out)
    ref = x.detach().double() @ wd.T
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    gref = g @ wd
    for got, want in ((y.detach().double(), ref), (x.grad.double(), gref)):
        rel = (got - want).norm() / want.norm()
        # activations (and gradients) rounded to e4m3 per row: a few percent at most, but not exact; the
        # dequantised weight's product is exact in fp32
        if out % 16 == 0:
            assert 1e-4 < rel < 0.05, rel
        else:
            assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("rows,out", [(32, 48), (5, 48), (32, 40)])  # FP8 gradients (rows padded for them);
@pytest.mark.parametrize("given", [True, False])  # the forward's weight given (bf16 weights) or dequantised
def test_fp8_input_gradients_under_an_exact_forward(rows, out, given):
    """``grad_linear`` (--fp8_products backward): the product is the weight's own (the activations never
    rounded), the input's gradient an FP8 product of the output's gradient (rounded by rows) — a few percent
    from exact, not the bf16 fallback — except where the weight's dimensions FP8 products do not take."""
    torch.manual_seed(2)
    w = torch.randn(out, 64)
    wq, ws = fp8.quantize_rows(w)
    ws = ws[:, 0]
    wd = wq.double() * ws.double()[:, None]
    wcol = fp8._column_major(wq)
    assert wcol.stride(0) == 1 and torch.equal(wcol, wq)
    x = torch.randn(rows, 64).requires_grad_()
    y = fp8.grad_linear(x, wd.float() if given else None, wcol, ws)
    want = x.detach().double() @ wd.T
    assert (y.detach().double() - want).norm() / want.norm() < 1e-6  # the forward is exact
    g = torch.randn_like(want)
    y.backward(g.float())
    rel = (x.grad.double() - g @ wd).norm() / (g @ wd).norm()
    assert (1e-4 < rel < 0.05) if out % 16 == 0 else rel < 1e-6, rel


def _load(tiny_model, quant, products="all"):
    return load_lora_model(tiny_model, quant=quant, fp8_products=products if quant == "fp8" else "none")


@pytest.mark.parametrize("products", ["all", "mlp", "backward", "none"])
def test_the_worker_model_trains_on_fp8_weights_like_lora_on_those_weights(tiny_model, products):
    """--quant fp8 against LoRA on the weights rounded through FP8: every product FP8 (all), the MLP's
    forward products and every input gradient FP8 (mlp: the attention projections' forward exact), FP8 input
    gradients under an exact forward (backward: the same loss), or none (the same loss and gradients)."""
    from engine.worker.modeling import _unwrap, language_model, param_table

    model = _load(tiny_model, "fp8", products)
    layers = language_model(_unwrap(model)).layers
    assert sum(hasattr(m, "_fp8_scale") for m in layers.modules()) == 2 * 7
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers.modules() if hasattr(m, "_fp8_scale"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    rows, n_train, total = param_table(model)
    assert n_train == sum(p.numel() for p in trainable)
    quantized = {r[0]: r[3] for r in rows}["language_model.layers (base)"]
    assert quantized == sum(m.weight.numel() for m in layers.modules() if hasattr(m, "_fp8_scale"))  # e4m3 counts
    ref = _load(tiny_model, "none")
    assert fp8.round_trip(language_model(_unwrap(ref)).layers) == 2 * 7
    out = []
    for m in (model, ref):  # 16 positions: FP8 products
        loss, grads = lora_loss_and_grads(m)
        out.append((loss, torch.cat([grads[k].flatten() for k in sorted(grads)])))
    (loss, g), (loss_ref, g_ref) = out
    cos = float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0))
    if products in ("all", "mlp"):
        assert loss == pytest.approx(loss_ref, rel=0.02) and loss != pytest.approx(loss_ref, rel=1e-6)
        assert cos > 0.98
        # the MLP's weights row-major for their forward's FP8 products, the attention's column-major for the
        # input's gradients (mlp); every weight row-major (all)
        row_major = {m.weight.stride(1) == 1 for name, m in layers.named_modules()
                     if hasattr(m, "_fp8_scale") and not any(p in name for p in fp8.MLP)}
        assert row_major == {products == "all"}
        assert all(m.weight.stride(1) == 1 for name, m in layers.named_modules()
                   if hasattr(m, "_fp8_scale") and any(p in name for p in fp8.MLP))
    elif products == "backward":
        assert loss == pytest.approx(loss_ref, rel=1e-6)
        assert 0.99 < cos < 1 - 1e-7  # FP8 input gradients: close, not the exact product
    else:
        assert loss == pytest.approx(loss_ref, rel=1e-6) and cos > 1 - 1e-6


def test_fp8_input_gradients_on_bf16_weights_keep_the_forward_and_its_decoder(tiny_model):
    """--quant none --fp8_products backward: the weights stay as they are (an e4m3 copy beside them, for the
    input's gradients only): the loss is the plain model's, the gradients close to its, and the weights are
    plain ones to the fast decoder (no FP8 scale on them)."""
    from engine.worker.modeling import _unwrap, language_model

    model = load_lora_model(tiny_model, quant="none", fp8_products="backward")
    ref = load_lora_model(tiny_model, quant="none")
    mods = list(language_model(_unwrap(model)).layers.modules())
    copies = [m for m in mods if hasattr(m, "_fp8_grad_weight")]
    assert len(copies) == 2 * 7 and not any(hasattr(m, "_fp8_scale") for m in mods)
    assert all(m.weight.dtype == torch.float32 and m._fp8_grad_weight.dtype == torch.float8_e4m3fn
               and m._fp8_grad_weight.stride(0) == 1 for m in copies)
    (loss, g), (loss_ref, g_ref) = [lora_loss_and_grads(m) for m in (model, ref)]
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    a, b = (torch.cat([x[k].flatten() for k in sorted(x)]) for x in (g, g_ref))
    assert 0.99 < float(torch.nn.functional.cosine_similarity(a, b, dim=0)) < 1 - 1e-7


def test_fp8_products_auto_and_its_checks():
    """auto: no FP8 products on the CPU (emulated there) nor with NF4; a choice that cannot hold is refused
    with the flag named."""
    from engine.util import UsageError

    cpu = torch.device("cpu")
    assert [fp8.products(q, "auto", cpu)[0] for q in ("none", "fp8", "nf4")] == ["none"] * 3
    # asked for on the CPU: taken, and said to be emulated (as auto says why it takes none there)
    assert fp8.products("none", "backward", cpu) == (
        "backward", "--fp8_products backward; the CPU's FP8 products are emulated, slower than its bf16 ones")
    assert fp8.products("fp8", "none", cpu) == ("none", "--fp8_products none")
    for quant, products, says in (("none", "all", "--fp8_products all needs --quant fp8"),
                                  ("nf4", "backward", "--fp8_products backward needs --quant none or fp8"),
                                  ("nf4", "all", "--fp8_products all needs --quant fp8")):
        with pytest.raises(UsageError, match=says):
            TrainConfig(train_jsonl="", quant=quant, fp8_products=products).validate()


def test_fp8_is_a_quant_choice_of_the_cli_and_runs_on_the_cpu(tmp_path):
    from engine.config import resolve
    from engine.train import build_parser

    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}])
    assert resolve(build_parser().parse_args(["--train_jsonl", str(train), "--quant", "fp8"])).quant == "fp8"
    assert fp8.available(torch.device("cpu")) == ""  # the CPU's _scaled_mm takes e4m3


def test_a_real_fp8_run_saves_an_adapter_that_loads_on_the_rounded_base(tmp_path, tiny_model):
    from peft import PeftModel

    from engine.eval.loading import load_base

    rows = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} {i}."} for i in range(24)])
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, rows, quant="fp8", fp8_products="backward", max_steps=3, packing=True))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FP8 products: backward — the input's gradients are FP8 products" in proc.stdout + proc.stderr
    assert 'quant = "fp8"' in (out / "config.toml").read_text()
    assert 'fp8_products = "backward"' in (out / "config.toml").read_text()
    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl="x", quant="fp8", bf16=False)
    base = load_base(cfg, torch.device("cpu"))
    w = base.model.language_model.layers[0].self_attn.q_proj.weight
    q, s = fp8.quantize_rows(w.data)
    assert torch.equal(w.data, (q.float() * s).to(w.dtype))  # already on the FP8 grid: rounding again keeps it
    peft = PeftModel.from_pretrained(base, str(out / "lora_final"))
    with torch.no_grad():
        assert torch.isfinite(peft(input_ids=torch.tensor([[1, 3, 500, 4]])).logits).all()


def test_an_fp8_layer_compiles_into_one_graph_with_the_eager_results(tiny_model):
    """What ``--compile`` does on a GPU, traced here (aot_eager): no graph break at the FP8 products, and the
    layer's output and input gradient those of the eager layer."""
    from torch._dynamo.utils import counters

    from engine.worker.modeling import _unwrap, language_model

    model = _load(tiny_model, "fp8")
    lm = language_model(_unwrap(model))
    layer = lm.layers[0]
    torch.manual_seed(5)
    h0 = torch.randn(2, 16, lm.config.hidden_size)  # 32 rows: FP8 products
    pos = torch.arange(16)[None].expand(2, 16)
    outs = []
    torch._dynamo.reset()
    counters.clear()
    for fn in (layer, torch.compile(layer, backend="aot_eager")):
        h = h0.clone().requires_grad_()
        out = fn(h, position_embeddings=lm.rotary_emb(h, pos), attention_mask=None, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        outs.append((out.detach(), h.grad))
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant,products", [("fp8", "all"), ("fp8", "mlp"), ("fp8", "backward"), ("none", "backward")])
@pytest.mark.parametrize("seq", [16, 7])  # 2 × 16 rows; 2 × 7, padded to 16 for the FP8 products
def test_a_checkpointed_compiled_fp8_model_gives_the_eager_results(tiny_model, seq, quant, products):
    """The FP8 model as the 16 GiB configurations run it — both layers checkpointed (inside each layer) and
    compiled (aot_eager here) — gives the eager, uncheckpointed model's loss and adapter gradients, also
    where its rows are padded for the FP8 products; so do the MLP's forward products alone FP8 ones (mlp) and
    FP8 input gradients under bf16 forward products (--fp8_products backward), on FP8 weights and on bf16
    ones."""
    from engine.worker.modeling import CausalLMLoss, compile_layers

    ids = torch.randint(5, 1000, (2, seq), generator=torch.Generator().manual_seed(seq))
    flat = ids[:, 1:].reshape(-1)
    idx = torch.arange(1, flat.shape[0])
    out = []
    for ckpt in (False, True):
        torch._dynamo.reset()
        model = load_lora_model(tiny_model, quant=quant, fp8_products=products, grad_ckpt=ckpt)
        if ckpt:
            compile_layers(model, backend="aot_eager")
        loss = CausalLMLoss(model)(input_ids=ids, target_idx=idx, targets=flat[idx])[0]
        loss.backward()
        out.append((float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch._dynamo.reset()
    (loss0, g0), (loss1, g1) = out
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    assert g1.keys() == g0.keys() and all(g.abs().sum() > 0 for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_resumed_fp8_run_from_before_fp8_products_keeps_every_product_fp8(tmp_path):
    """A --quant fp8 run's config.toml from before --fp8_products has no such field: its products were all
    FP8, so a resume keeps them so (auto would change them midway); a saved choice or a flag given again wins."""
    import argparse

    from engine.runs import merge_saved_config

    for saved, flag, want in (('quant = "fp8"\n', None, "all"), ('quant = "fp8"\nfp8_products = "auto"\n', None, "auto"),
                              ('quant = "fp8"\n', "backward", "backward"), ('quant = "none"\n', None, None)):
        (tmp_path / "config.toml").write_text(saved)
        args = argparse.Namespace(quant=None, fp8_products=flag)
        merge_saved_config(args, tmp_path)
        assert args.fp8_products == want, (saved, flag)
