"""Batch plans, packing and the loss: deterministic, sharded, and packing changes nothing but speed."""


import numpy as np
import torch

from conftest import write_jsonl
from engine.worker.batching import SEGMENT_SLOTS, collate, plan_epoch_all, segment_slots, tokenize


def rows(n):
    return [{"instruction": f"Question {i}: " + "why " * (i % 9), "output": "because " * (1 + i % 13) + f"{i}."}
            for i in range(n)]


def test_plan_is_deterministic_sharded_and_grouped(tmp_path, fmt):
    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(103))), fmt, 512, "truncate", None)
    a = plan_epoch_all(tok, 0, 7, 4, 2, 512, False, True)
    assert a == plan_epoch_all(tok, 0, 7, 4, 2, 512, False, True)
    assert a != plan_epoch_all(tok, 1, 7, 4, 2, 512, False, True)
    assert len(a[0]) == len(a[1]) == 103 // 8
    seen = [x for r in a for b in r for row in b for x in row]
    assert len(seen) == len(set(seen))  # no example on two ranks
    # grouped: the two ranks of one step get examples of similar length
    lengths = tok.lengths
    spread = [abs(max(lengths[[x[0] for x in a[0][s]]]) - max(lengths[[x[0] for x in a[1][s]]])) for s in range(len(a[0]))]
    assert np.median(spread) <= 3


def test_packing_plan_fits_balances_and_covers(tmp_path, fmt):
    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(200))), fmt, 128, "truncate", None)
    plans = plan_epoch_all(tok, 0, 1, 2, 2, 128, True, True)
    assert len(plans[0]) == len(plans[1]) > 0
    for plan in plans:
        for batch in plan:
            assert len(batch) == 1 and sum(tok.lengths[x] for x in batch[0]) <= 2 * 128  # one row, budget 2 × 128
    covered = sorted(x for plan in plans for b in plan for row in b for x in row)
    assert len(covered) == len(set(covered)) and len(covered) > 180
    # the ranks of one step carry about the same number of tokens (what makes DDP steps even)
    fill = [[sum(tok.lengths[x] for x in b[0]) for b in plan] for plan in plans]
    assert np.median(fill[0]) >= 0.9 * 256 and np.median(fill[1]) >= 0.9 * 256


def test_packed_collate_is_one_fixed_row_with_cu_seqlens(tmp_path, fmt):
    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(6))), fmt, 64, "truncate", None)
    m = collate(tok, [[0, 1, 2]], fmt.pad, packed=True, budget=256, max_len=64)
    assert m["input_ids"].shape == (1, 256) and m["slots"] == 256
    cu = m["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == 256 and m["cu_seq_lens_q"].dtype == torch.int32
    assert all(b - a <= 64 for a, b in zip(cu, cu[1:])) and m["max_length_q"] == 64  # padding split too
    lens = [int(tok.lengths[i]) for i in range(3)]
    assert cu[1:4] == list(np.cumsum(lens))
    assert m["position_ids"][0, cu[1]] == 0 and m["position_ids"][0, cu[1] - 1] == lens[0] - 1
    assert m["real_tokens"] == sum(lens)
    flat = m["labels"][:, 1:].reshape(-1)
    assert torch.equal(m["targets"], flat[m["target_idx"]]) and (m["targets"] != -100).all()


def test_packed_loss_and_grads_equal_unpacked(tmp_path, fmt, tiny_model):
    """The same examples packed into one row (varlen attention, restarted positions) or padded give
    the same summed loss, token count and adapter gradients."""
    from engine.config import TrainConfig
    from engine.worker.modeling import CausalLMLoss, load_model

    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(6))), fmt, 256, "truncate", None)
    cfg = TrainConfig(model_id=tiny_model, train_jsonl="x", quant="none", bf16=False, grad_ckpt=False, lora_dropout=0.0)
    model, _ = load_model(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)  # the test's own random state, whatever ran before it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters matter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    loss = CausalLMLoss(model, chunk=7)  # a small chunk exercises the chunked head
    unpacked = collate(tok, [[i] for i in range(6)], fmt.pad, packed=False)
    packed = collate(tok, [[0, 1, 2, 3, 4, 5]], fmt.pad, packed=True, budget=1024, max_len=256)
    # the same row described with empty examples after its own (CUDA graphs' few shapes: VOXTUI_CUDA_GRAPHS)
    fixed = collate(tok, [[0, 1, 2, 3, 4, 5]], fmt.pad, packed=True, budget=1024, max_len=256, fixed_segments=True)
    # the longer half of the examples at the row's end, each its own attention call (attention.packed_attention)
    cut = int(np.median([len(tok.example(i)[0]) for i in range(6)]))
    dense = collate(tok, [[0, 1, 2, 3, 4, 5]], fmt.pad, packed=True, budget=1024, max_len=256, dense_min=cut)
    assert dense["dense_bounds"][-1] == 1024 and len(dense["dense_bounds"]) >= 3
    assert packed["input_ids"].shape == (1, 1024) and "attention_mask" not in packed
    n_cu = len(packed["cu_seq_lens_q"])
    assert fixed["cu_seq_lens_q"].shape == (segment_slots(n_cu - 1) + 1,) == (SEGMENT_SLOTS + 1,)
    assert torch.equal(fixed["cu_seq_lens_q"][:n_cu], packed["cu_seq_lens_q"])
    assert (fixed["cu_seq_lens_q"][n_cu:] == 1024).all()
    grads = []
    for m in (unpacked, packed, fixed, dense):
        model.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            total, n = loss(**m)
            total.backward()
        ran = {e.name for e in prof.events()}
        # the long examples reached the attention's own operator (its forward and backward): dense only
        assert ("voxtui::packed_attention" in ran and "voxtui::packed_attention_backward" in ran) == (m is dense)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        if m is unpacked:
            a, na = total.detach(), n
        elif m is packed:
            b, nb = total.detach(), n
        elif m is fixed:
            assert torch.equal(total.detach(), b) and n == nb
        else:
            assert torch.isclose(total.detach(), b, rtol=1e-5) and n == nb
    with torch.no_grad():
        # both equal the model's own loss computed example by example
        direct = 0.0
        for i in range(6):
            ids, p = tok.example(i)
            x = torch.tensor(ids, dtype=torch.long)[None]
            logits = model(input_ids=x).logits[0, :-1].float()
            direct += torch.nn.functional.cross_entropy(logits[p - 1:], x[0, p:], reduction="sum").item()
    assert int(na) == int(nb) == int(sum(len(tok.example(i)[0]) - tok.example(i)[1] for i in range(6)))
    assert torch.isclose(a, b, rtol=1e-5) and abs(float(a) - direct) / direct < 1e-5
    for k in grads[0]:  # fp32 sums in another order: equal to 1e-4 of the values, or 1e-6 of the tensor's scale
        scale = float(grads[0][k].abs().max())
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6 * max(scale, 1.0)), k
        assert torch.equal(grads[1][k], grads[2][k]), k
        assert torch.allclose(grads[0][k], grads[3][k], rtol=1e-4, atol=1e-6 * max(scale, 1.0)), k


def test_dense_collate_lays_long_examples_last_after_the_padding(tmp_path, fmt):
    """``dense_min``: the short examples, then the padding, then the long ones; ``dense_bounds`` where the
    first long one starts and each ends (a host tensor); the targets are the same tokens."""
    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(8))), fmt, 128, "truncate", None)
    lens = [len(tok.example(i)[0]) for i in range(8)]
    cut = sorted(lens)[5]
    plain = collate(tok, [list(range(8))], fmt.pad, packed=True, budget=1024, max_len=128)
    m = collate(tok, [list(range(8))], fmt.pad, packed=True, budget=1024, max_len=128, dense_min=cut)
    long_ = [n for n in lens if n >= cut]
    short = [n for n in lens if n < cut]
    bounds = m["dense_bounds"].tolist()
    assert m["dense_bounds"].device.type == "cpu" and m["dense_bounds"].dtype == torch.int64
    assert bounds == [1024 - sum(long_)] + list(1024 - sum(long_) + np.cumsum(long_))
    cu = m["cu_seq_lens_q"].tolist()
    assert cu[:len(short) + 1] == [0] + list(np.cumsum(short)) and cu[-len(long_) - 1:] == bounds
    assert all(b - a <= 128 for a, b in zip(cu, cu[1:])) and m["max_length_q"] == plain["max_length_q"]
    ids = m["input_ids"][0].tolist()
    assert ids[sum(short):bounds[0]] == [fmt.pad] * (bounds[0] - sum(short))  # the padding before the long ones
    assert m["position_ids"][0, bounds[0]] == 0 and m["position_ids"][0, bounds[1] - 1] == long_[0] - 1
    assert sorted(m["targets"].tolist()) == sorted(plain["targets"].tolist()) and m["real_tokens"] == plain["real_tokens"]
    # no long example: the row as without dense_min, its bounds just the row's end (the same operator);
    # CUDA graphs' fixed shapes: as without dense_min
    none = collate(tok, [list(range(8))], fmt.pad, packed=True, budget=1024, max_len=128, dense_min=10_000)
    fixed = collate(tok, [list(range(8))], fmt.pad, packed=True, budget=1024, max_len=128, dense_min=cut,
                    fixed_segments=True)
    assert none["dense_bounds"].tolist() == [1024, 1024] and "dense_bounds" not in fixed
    assert torch.equal(none["cu_seq_lens_q"], plain["cu_seq_lens_q"])
    for other in (none, fixed):
        assert torch.equal(other["input_ids"], plain["input_ids"])


def test_packed_attention_op_equals_example_by_example_sdpa():
    """voxtui::packed_attention (short examples, padding, long ones; grouped key/value heads) gives the
    reference's output and gradients, and passes torch.library's checks (its fake, its autograd)."""
    from engine.worker import attention

    g = torch.Generator().manual_seed(0)
    for short, pads, long_ in [([5, 1, 9], [7], [20, 13]), ([], [], [17]), ([3], [], [8, 8, 30]), ([4, 4], [6], [])]:
        seg = short + pads + long_
        total = sum(seg)
        cu = torch.tensor([0, *np.cumsum(seg)], dtype=torch.int32)
        first = sum(short) + sum(pads)
        bounds = torch.tensor([first, *(first + np.cumsum(long_))] if long_ else [total, total], dtype=torch.int64)
        q = torch.randn(total, 8, 16, generator=g, requires_grad=True)
        k, v = (torch.randn(total, 2, 16, generator=g, requires_grad=True) for _ in range(2))
        do = torch.randn(total, 8, 16, generator=g)
        out = torch.ops.voxtui.packed_attention(q, k, v, cu, bounds, max(seg), 0.25)[0]
        got = torch.autograd.grad(out, (q, k, v), do)
        ref = attention._varlen_reference(q, k, v, cu, 0.25)
        want = torch.autograd.grad(ref, (q, k, v), do)
        assert torch.allclose(out, ref, atol=1e-5), seg
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5), seg
        torch.library.opcheck(torch.ops.voxtui.packed_attention.default, (q, k, v, cu, bounds, max(seg), 0.25))


def test_segment_slots_are_few_powers_of_two():
    assert [segment_slots(n) for n in (0, 1, SEGMENT_SLOTS, SEGMENT_SLOTS + 1, 200)] == \
        [SEGMENT_SLOTS, SEGMENT_SLOTS, SEGMENT_SLOTS, 2 * SEGMENT_SLOTS, 256]


def test_cache_hit_and_long_rows(tmp_path, fmt):
    data = write_jsonl(tmp_path / "d.jsonl", rows(20) + [{"instruction": "x " * 300, "output": "y"},
                                                         {"instruction": "q", "output": "long " * 300}])
    first = tokenize(str(data), fmt, 64, "truncate", str(tmp_path / "cache"))
    second = tokenize(str(data), fmt, 64, "truncate", str(tmp_path / "cache"))
    assert not first.cache_hit and second.cache_hit
    assert np.array_equal(first.ids, second.ids) and first.dropped == 1 and first.truncated >= 1
    assert first.lengths.max() <= 64
    dropped = tokenize(str(data), fmt, 64, "drop", str(tmp_path / "cache"))
    assert not dropped.cache_hit and dropped.truncated == 0 and len(dropped) < len(first)
    # labels cover the target (answer + EOS) only
    m = collate(first, [[0]], fmt.pad, packed=False)
    ids, p = first.example(0)
    assert (m["labels"][0, :p] == -100).all() and m["labels"][0, len(ids) - 1] == fmt.eos


def test_fused_head_ce_matches_cross_entropy():
    """The fused head + cross-entropy gives the loss and the hidden-state gradient of the plain
    computation, across chunk boundaries; without a gradient it only computes the loss."""
    from engine.worker.modeling import fused_head_ce

    torch.manual_seed(0)
    w = torch.randn(50, 16, dtype=torch.float64)
    y = torch.randint(0, 50, (23,))
    h1 = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_()
    fused = fused_head_ce(h1, w, y, chunk=5)
    plain = torch.nn.functional.cross_entropy(h2 @ w.T, y, reduction="sum")
    assert torch.allclose(fused.double(), plain, rtol=1e-6)
    (fused * 0.37).backward()
    (plain * 0.37).backward()
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)  # fp32 softmax
    with torch.no_grad():
        assert torch.allclose(fused_head_ce(h1, w, y, chunk=4).double(), plain, rtol=1e-6)


def test_attention_pairs_and_the_mfu_that_counts_attention():
    """Each micro-batch counts the causal query-key pairs of its real examples (n(n+1)/2 for n tokens; the
    padding none), packed or not; the step event's mfu_attn adds 12 · layers · heads · head_dim FLOPs per
    pair to the matmuls' 4 · params per token."""
    import torch

    from engine.worker.batching import collate
    from engine.worker.report import step_event

    class Tok:
        def example(self, i):
            n = (3, 5, 1)[i]
            return torch.arange(10, 10 + n), 1

    padded = collate(Tok(), [[0], [1], [2]], pad=0, packed=False)
    packed = collate(Tok(), [[0, 1, 2]], pad=0, packed=True, budget=16, max_len=8)
    assert padded["attn_pairs"] == packed["attn_pairs"] == 6 + 15 + 1
    assert padded["slots"] == 15 and packed["slots"] == 16  # padding is no pair
    # two ranks: [loss, real, slots, time, commands, grad norm, stop, pairs]
    gathered = torch.tensor([[1.0, 9, 16, 0.5, 0, 1.0, 0, 22], [1.0, 9, 16, 1.0, 0, 1.0, 0, 22]], dtype=torch.float64)
    ev = step_event(gathered, 1, 0.0, 1.0, 1.0, 1e-4, "", 1.0, flops_per_token=100, peak=1e4,
                    device=torch.device("cpu"), flops_per_pair=12 * 2 * 4 * 8)
    assert ev.tokens_per_s == 18.0 and ev.mfu == 18.0 * 100 / 1e4
    assert abs(ev.mfu_attn - (ev.mfu + 44 * 12 * 2 * 4 * 8 / 1.0 / 1e4)) < 1e-12
    no_peak = step_event(gathered, 1, 0.0, 1.0, 1.0, 1e-4, "", 1.0, 100, None, torch.device("cpu"), 768)
    assert no_peak.mfu is None and no_peak.mfu_attn is None


def test_attention_flops_per_pair_of_the_tiny_model(tiny_model):
    from transformers import AutoConfig, VoxtralForConditionalGeneration

    from engine.worker.modeling import attention_flops_per_pair

    cfg = AutoConfig.from_pretrained(tiny_model).text_config
    model = VoxtralForConditionalGeneration.from_pretrained(tiny_model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert attention_flops_per_pair(model) == 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim


def test_feed_prefetch_gives_the_same_batches_over_epochs(tmp_path, fmt):
    """The next step's tensors sent ahead (feed.Feed.prefetch) are the ones the step would have built:
    step by step over two epochs, with and without it, and prefetch declines a step that is not the one
    being built (the last of an epoch: the next starts a new plan)."""
    from types import SimpleNamespace

    from engine.config import TrainConfig
    from engine.worker.batching import plan_run
    from engine.worker.feed import Feed

    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(40))), fmt, 128, "truncate", None)
    cfg = TrainConfig(train_jsonl="d.jsonl", max_len=128, per_device_bsz=2, grad_accum=2, packing=True)
    d = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), main=True)

    def steps(prefetch: bool) -> list:
        feed = Feed(tok, plan_run(tok, cfg, 1), cfg, d, fmt.pad)
        out, declined = [], 0
        try:
            for epoch in range(2):
                plan = feed.plan(epoch)
                for micro in range(0, len(plan) - cfg.grad_accum + 1, cfg.grad_accum):
                    out.append(feed.micro_batches(plan, micro))
                    if prefetch:
                        ok = feed.prefetch(plan, micro + cfg.grad_accum)
                        declined += not ok
                        assert ok == (micro + 2 * cfg.grad_accum <= len(plan))
        finally:
            feed.close()
        if prefetch:
            assert declined == 2  # each epoch's last step
        return out

    plain, ahead = steps(False), steps(True)
    assert len(plain) == len(ahead) >= 4
    for a, b in zip(plain, ahead):
        for ma, mb in zip(a, b):
            assert ma.keys() == mb.keys()
            for k in ma:
                assert torch.equal(ma[k], mb[k]) if torch.is_tensor(ma[k]) else ma[k] == mb[k]


def test_the_cpu_packed_attention_keeps_no_score_matrix():
    """The CPU's example-by-example attention runs SDPA's flash kernel (a log-sum-exp per row kept for the
    backward), not its math path (every example's heads × L × L probabilities: 16 KB a token per layer for
    the tiny model, what made a large packed row run out of host memory), with the math path's results."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from engine.worker.attention import _varlen_reference

    torch.manual_seed(0)
    q = torch.randn(600, 4, 16, requires_grad=True)  # (tokens, heads, head_dim); two kv heads: grouped
    k, v = (torch.randn(600, 2, 16, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 250, 600], dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _varlen_reference(q, k, v, cu, 0.25)
    ops = {e.key for e in prof.key_averages()}
    assert any("flash" in op for op in ops) and "aten::_softmax" not in ops, ops
    kept = sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)
    probabilities = 4 * 4 * (250**2 + 350**2)  # bytes of fp32 heads × L × L, both examples
    assert kept < probabilities / 2  # (the math path allocates all of them, and more)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.empty_like(q)
    for a, b in ((0, 250), (250, 600)):  # the math path, example by example
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            ref[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_dense_choice_says_what_packed_rows_attention_will_be():
    """preflight's attention line: on a device where long examples get their own call and --max_len lets
    one be that long; nothing on the CPU by default, nor when --max_len is below the threshold."""
    from engine.worker.attention import bucket, dense_choice, dense_min

    cpu = torch.device("cpu")
    assert dense_min(cpu) == 0 and dense_choice(cpu, 32768) == ""
    assert dense_choice(cpu, 1024, knob=2048) == "" and dense_choice(cpu, 4096, knob=0) == ""
    assert dense_choice(cpu, 4096, knob=2048).startswith("examples of 2048 tokens or more each through SDPA")
    # the lengths a long example runs at: few (cuDNN plans), never shorter, at most an eighth longer
    for n in range(1, 40000, 37):
        assert 0 <= bucket(n) - n < max(256, n // 8 + 1)
    assert len({bucket(n) for n in range(2048, 32769)}) == 33
