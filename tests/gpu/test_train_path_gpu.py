"""The worker's training path on a GPU against plain Hugging Face + PEFT (issue 15, step 1).

One packed row of several examples (lengths from 2 to max_len, prompts masked) goes through what the
worker runs — its model loading (LoRA r16/α32 on the 7 projections, the audio tower removed), varlen
attention, the fused head + cross-entropy, the compiled decoder layers, bf16 autocast — and the same
examples go one by one through HF + PEFT in fp32 with eager attention. The summed loss must agree within
1e-3 (relative) and the adapter gradients point the same way (cosine ≥ 0.995); NF4 likewise, against HF
on the same 4-bit weights. Any change to a fast path (attention, loss, compile, quantisation) passes this
before it lands.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_util import save_real_width

DEV = torch.device("cuda")
MAX_LEN = 1024
# (prompt, target) lengths: a one-token target, short and long rows, one that fills max_len
EXAMPLES = [(1, 1), (7, 12), (40, 90), (150, 260), (3, 200), (500, 524)]


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory):
    return save_real_width(tmp_path_factory)


def packed_row(seed: int = 0, dense_min: int = 0) -> tuple[dict, list[tuple[list[int], int]]]:
    """The worker's collated micro-batch (one packed row) and the examples it holds; ``dense_min``: examples
    that long at the row's end, each through cuDNN (attention.packed_attention)."""
    from engine.worker.batching import Tokenized, collate

    g = np.random.default_rng(seed)
    examples = [(g.integers(1000, 131000, p + t).tolist(), p) for p, t in EXAMPLES]
    ids = [np.asarray(e, np.int32) for e, _ in examples]
    tok = Tokenized(ids=np.concatenate(ids), offsets=np.concatenate([[0], np.cumsum([len(x) for x in ids])]),
                    prompt_lens=np.asarray([p for _, p in examples], np.int32))
    budget = sum(len(x) for x in ids) + 64  # a little padding at the end, as a packed budget leaves
    batch = collate(tok, [list(range(len(examples)))], 11, True, budget=budget, max_len=MAX_LEN, dense_min=dense_min)
    return batch, examples


def worker_model(path, quant: str, ckpt: int = 0, products: str = ""):
    """The model as the worker loads it (compiled layers, voxtui attention, NF4's traceable layers), adapters'
    B random; ``ckpt``: how many layers recompute in the backward (--grad_ckpt_layers; 0: no checkpointing);
    ``products``: --fp8_products ("": every product bf16 for --quant none, FP8 for --quant fp8, as before
    FP8 input gradients)."""
    from engine.config import TrainConfig
    from engine.worker.modeling import load_model

    cfg = TrainConfig(model_id=str(path), train_jsonl="-", quant=quant, bf16=True, compile=True, grad_ckpt=ckpt > 0,
                      grad_ckpt_layers=ckpt, lora_dropout=0.0, max_len=MAX_LEN,
                      fp8_products=products or {"fp8": "all", "nf4": "auto"}.get(quant, "none"))
    model, _ = load_model(cfg, DEV)
    model.train()  # as the worker runs it (checkpointing acts in training mode only; dropout is 0)
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=DEV) * 0.02)
    return model


def reference_model(path, quant: str, worker):
    """HF + PEFT with eager attention, fp32 compute, the worker's adapter weights copied in."""
    from peft import LoraConfig, get_peft_model
    from transformers import VoxtralForConditionalGeneration

    from engine.worker.modeling import _drop_audio_tower, lora_target_regex, nf4_config

    kwargs = {"dtype": torch.float32, "device_map": {"": DEV}, "attn_implementation": "eager"}
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(torch.float32)
    base = VoxtralForConditionalGeneration.from_pretrained(path, **kwargs)
    _drop_audio_tower(base)
    if quant == "fp8":  # the weights the worker's FP8 products multiply by, in fp32
        from engine.worker.fp8 import round_trip
        from engine.worker.modeling import language_model

        round_trip(language_model(base).layers)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                          target_modules=lora_target_regex(targets)))
    theirs = dict(worker.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.data = theirs[name].detach().float().clone()
                p.requires_grad_(True)
    return ref


def worker_loss_and_grads(model, batch):
    from engine.worker.batching import to_device
    from engine.worker.modeling import CausalLMLoss

    loss_fn = CausalLMLoss(model, compiled=True)  # the worker's loss on a GPU with --compile
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, n = loss_fn(**to_device(batch, DEV))
    total.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(total), n, grads


def reference_loss_and_grads(ref, examples):
    total, n = 0.0, 0
    for ids, prompt in examples:
        x = torch.tensor([ids], device=DEV)
        logits = ref(input_ids=x).logits[0, prompt - 1:-1].float()
        loss = torch.nn.functional.cross_entropy(logits, x[0, prompt:], reduction="sum")
        loss.backward()
        total += float(loss)
        n += len(ids) - prompt
    grads = {name: p.grad.detach().float().clone() for name, p in ref.named_parameters() if p.grad is not None}
    return total, n, grads


@pytest.mark.parametrize("quant,ckpt,products", [("none", 0, ""), ("none", 1, ""), ("nf4", 0, ""), ("nf4", 2, ""),
                                                ("fp8", 0, ""), ("fp8", 2, ""), ("none", 0, "backward"),
                                                ("none", 2, "backward"), ("fp8", 0, "backward"), ("fp8", 2, "backward"),
                                                ("fp8", 0, "mlp"), ("fp8", 2, "mlp")])
def test_packed_row_through_the_worker_path_equals_hf_peft_example_by_example(real_width_dir, quant, ckpt, products):
    """… with no checkpointing, the first of the two layers checkpointed (--grad_ckpt_layers 1), NF4 with
    both layers checkpointed (its default), and FP8 against HF on the weights rounded through FP8, without
    checkpointing and with both layers checkpointed (the checkpoint inside each compiled layer). FP8's
    products round each row of activations and gradients to 8 bits as well: its loss holds the same bound,
    its gradients a looser one (cosine ≥ 0.98; measured 0.990 on an H200, 0.991 on the CPU at these widths
    with a smaller vocabulary), so FP8 is neither a default nor recommended by preflight unasked. (Its
    first runs here passed 0.995 only because this row's 1,852 tokens, not a multiple of 16, sent every
    product to the bf16 fallback; rows are padded for FP8 products since: docs/benchmarks.md.)"""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    if quant == "fp8":
        from engine.worker.fp8 import available

        if available(DEV):
            pytest.skip(available(DEV))
    if products:  # --fp8_products backward: the forward's products as they are, the input's gradients FP8
        from engine.worker.fp8 import available

        if available(DEV):
            pytest.skip(available(DEV))
    batch, examples = packed_row()
    assert int(batch["max_length_q"]) == MAX_LEN and len(batch["cu_seq_lens_q"]) >= len(EXAMPLES) + 1
    model = worker_model(real_width_dir, quant, ckpt, products)
    if quant == "nf4":  # the worker's 4-bit layers: voxtui's traceable forward (engine/worker/nf4.py)
        from engine.worker.modeling import _unwrap, language_model

        assert sum(hasattr(m, "_nf4_meta") for m in language_model(_unwrap(model)).modules()) == 2 * 7
    if products:  # bf16 weights with an e4m3 copy for the backward; FP8 weights kept column-major for it
        from engine.worker.modeling import _unwrap, language_model

        mods = list(language_model(_unwrap(model)).modules())
        column_major = 4 if products == "mlp" else 7  # mlp: the MLP's 3 row-major, for their forward's products
        assert (sum(hasattr(m, "_fp8_grad_weight") for m in mods) if quant == "none" else
                sum(hasattr(m, "_fp8_scale") and m.weight.stride(0) == 1 for m in mods)) == 2 * column_major
    if ckpt:
        from engine.worker.modeling import checkpointed_layers

        assert checkpointed_layers(model) == (ckpt, 2)
    ours, n, ours_g = worker_loss_and_grads(model, batch)
    ref = reference_model(real_width_dir, quant, model)
    theirs, m, ref_g = reference_loss_and_grads(ref, examples)
    assert n == m == sum(t for _, t in EXAMPLES)
    rel = abs(ours - theirs) / abs(theirs)
    assert set(ours_g) == set(ref_g) and len(ours_g) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    a = torch.cat([ours_g[k].flatten() for k in sorted(ours_g)])
    b = torch.cat([ref_g[k].flatten() for k in sorted(ours_g)])
    cos_all = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    per = {k: float(torch.nn.functional.cosine_similarity(ours_g[k].flatten(), ref_g[k].flatten(), dim=0))
           for k in ours_g}
    worst = min(per, key=per.get)
    print(f"{quant}{f' FP8 {products}' if products else ''} (checkpointed layers {ckpt}): loss {ours:.4f} vs {theirs:.4f} (relative {rel:.2e}) over {n} target tokens; adapter "
          f"gradients cosine {cos_all:.5f} (worst tensor {per[worst]:.5f}: {worst})")
    assert rel <= 1e-3
    assert cos_all >= (0.98 if quant == "fp8" and not products else 0.995)


@pytest.mark.parametrize("ckpt", [0, 2])
def test_long_examples_through_cudnn_equal_hf_peft_example_by_example(real_width_dir, ckpt):
    """The examples of 256 tokens or more at the row's end, each through cuDNN's attention and the others
    through varlen FlashAttention (voxtui::packed_attention, VOXTUI_DENSE_ATTENTION), in the compiled
    layers, checkpointed or not: the same bounds as every other fast path against HF + PEFT in fp32."""
    batch, examples = packed_row(dense_min=256)
    long_ = [p + t for p, t in EXAMPLES if p + t >= 256]
    assert batch["dense_bounds"].tolist()[1:] == list(batch["slots"] - sum(long_) + np.cumsum(long_))
    model = worker_model(real_width_dir, "none", ckpt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours, n, ours_g = worker_loss_and_grads(model, batch)
    ran = {e.name for e in prof.events()}
    assert "voxtui::packed_attention" in ran and "voxtui::packed_attention_backward" in ran
    ref = reference_model(real_width_dir, "none", model)
    theirs, m, ref_g = reference_loss_and_grads(ref, examples)
    assert n == m == sum(t for _, t in EXAMPLES)
    rel, cos = agreement((ours, ours_g), (theirs, ref_g))
    print(f"long examples through cuDNN (checkpointed layers {ckpt}): loss {ours:.4f} vs {theirs:.4f} "
          f"(relative {rel:.2e}); adapter gradients cosine {cos:.5f}")
    assert rel <= 1e-3 and cos >= 0.995


def fixed_row() -> dict:
    """``packed_row``'s examples with the row's boundaries padded by empty examples (CUDA graphs' few shapes)."""
    from engine.worker.batching import Tokenized, collate

    batch, examples = packed_row()
    ids = [np.asarray(e, np.int32) for e, _ in examples]
    tok = Tokenized(ids=np.concatenate(ids), offsets=np.concatenate([[0], np.cumsum([len(x) for x in ids])]),
                    prompt_lens=np.asarray([p for _, p in examples], np.int32))
    return collate(tok, [list(range(len(examples)))], 11, True, budget=batch["slots"], max_len=MAX_LEN,
                   fixed_segments=True)


def agreement(got: tuple[float, dict], want: tuple[float, dict]) -> tuple[float, float]:
    """(relative loss difference, cosine of all adapter gradients)."""
    rel = abs(got[0] - want[0]) / abs(want[0])
    keys = sorted(want[1])
    assert set(got[1]) == set(keys)
    a = torch.cat([got[1][k].flatten() for k in keys])
    b = torch.cat([want[1][k].flatten() for k in keys])
    return rel, float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("ckpt", [0, 2])
def test_cuda_graphs_replay_the_compiled_path(real_width_dir, monkeypatch, ckpt):
    """VOXTUI_CUDA_GRAPHS=1: the compiled layers replayed as CUDA graphs (Inductor's graph trees), the row's
    example boundaries padded with empty examples (batching.collate), the gradients kept in tensors of their
    own (step.Update). The padded row gives the unpadded row's loss and gradients through the compiled layers
    launched kernel by kernel (the path above, against HF + PEFT); then under graphs the warm-up (the layers
    compiled anew, launched kernel by kernel) gives them again, and the recorded and the replayed step give
    the warm-up's. With FP8 input gradients (the default on Hopper; bf16 products
    elsewhere), without checkpointing and with both layers checkpointed."""
    from torch._dynamo.utils import counters

    from engine.worker import knobs as knobs_mod
    from engine.worker.batching import segment_slots
    from engine.worker.fp8 import available
    from engine.worker.modeling import CausalLMLoss

    products = "none" if available(DEV) else "backward"
    batch, fixed = packed_row()[0], fixed_row()
    assert len(fixed["cu_seq_lens_q"]) == segment_slots(len(batch["cu_seq_lens_q"]) - 1) + 1
    plain = worker_model(real_width_dir, "none", ckpt, products)
    ours, n, want = worker_loss_and_grads(plain, batch)
    plain.zero_grad(set_to_none=True)
    padded, m, padded_g = worker_loss_and_grads(plain, fixed)
    rel, cos = agreement((padded, padded_g), (ours, want))
    print(f"products {products}, checkpointed layers {ckpt}: the padded row without graphs: loss {padded:.4f} vs "
          f"{ours:.4f} (relative {rel:.2e}), gradients cosine {cos:.6f}")
    assert m == n and rel <= 1e-5 and cos >= 0.9999
    adapters = {name: p.detach().clone() for name, p in plain.named_parameters() if p.requires_grad}
    del plain
    torch._dynamo.reset()
    monkeypatch.setenv("VOXTUI_CUDA_GRAPHS", "1")
    knobs_mod.knobs.cache_clear()
    try:
        assert knobs_mod.knobs().cuda_graphs
        model = worker_model(real_width_dir, "none", ckpt, products)
        with torch.no_grad():  # the same adapters (A's initialisation draws from the global random state)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(adapters[name])
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        loss_fn = CausalLMLoss(model, compiled=True)
        counters.clear()
        first = None
        for step in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            for p in params:
                p.grad.zero_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total, m = loss_fn(**{k: v.to(DEV) if torch.is_tensor(v) else v for k, v in fixed.items()})
            total.backward()
            got = (float(total), {name: p.grad.detach().float().clone() for name, p in model.named_parameters()
                                  if p.requires_grad})
            rel, cos = agreement(got, (ours, want))
            print(f"  CUDA graphs, step {step}: loss {got[0]:.4f} (relative {rel:.2e}), gradients cosine {cos:.6f}"
                  + (" against the path without graphs" if first is None else
                     " — against step 0: relative {:.2e}, cosine {:.6f}".format(*agreement(got, first))))
            assert m == n
            if first is None:
                # the warm-up: the layers compiled anew (Inductor may pick other kernels; FP8's rounding of the
                # input's gradients then moves them a little)
                first = got
                assert rel <= 1e-4 and cos >= 0.999
            else:
                # recorded, then replayed: the warm-up's kernels, so its numbers (up to the attention backward's
                # atomics)
                rel, cos = agreement(got, first)
                assert rel <= 1e-6 and cos >= 0.99999
        print("  Inductor's counters:", dict(counters["inductor"]))
        assert counters["inductor"]["cudagraph_skips"] == 0  # the graphs ran (a skip falls back silently)
    finally:
        monkeypatch.delenv("VOXTUI_CUDA_GRAPHS")
        knobs_mod.knobs.cache_clear()
        torch._dynamo.reset()
