"""Checkpoint inference and previews: the path voxtui used before (HF ``generate`` on the PEFT model)
against the fast decoder (engine/worker/decode.py on the merged model), in one run.

    python bench/infer_speed.py --model /tmp/voxtral-random --out gpu-out [--quick]

On a full-size random-weight Voxtral (bench/random_voxtral.py), with a LoRA r16/α32 adapter on the 7
LLM projections whose B is random (not zero, so the adapter changes every output), saved the way the
worker saves it into a run folder:

1. start-up: the old load (base + ``PeftModel.from_pretrained``) and the new one (``MergedModel``:
   text-only base, adapter merged), each to its first generated token;
2. decoding, greedy, prompts of 200 tokens, 128 new tokens forced (no EOS stop), batch 64 and 16: the
   time of a decoding step (the whole generation less a 1-token generation, over 127 steps) and generated
   tokens/s, old and new;
3. the same tokens: over the batch-64 rows in bf16, how many are identical over 128 tokens, and for each
   row that differs, the gap between the top two logits where it first differs (from the reference);
   a few rows in fp32 (the old path on an fp32 copy): identical token for token;
4. a second checkpoint: the adapter swapped into the loaded base vs. a full reload;
5. previews: 4 prompts × 64 tokens on the live PEFT model (un-merged), old vs new;
6. NF4 (``--nf4``): a run trained in 4-bit: the old path on the 4-bit base vs the new on the 4-bit base
   expanded once, batch 64.

One JSON line per measurement goes to ``<out>/infer_speed.jsonl``; a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, EOS = 11, 2
RESULTS: list[dict] = []


def record(out: Path, **row) -> None:
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    with open(out / "infer_speed.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return r, time.perf_counter() - t


def make_run(model_dir: str, runs: Path, quant: str, dev, seed: int = 0) -> Path:
    """A run folder (config.toml + lora_final + checkpoint-1) whose adapters have random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import VoxtralForConditionalGeneration

    from engine.worker.modeling import lora_target_regex

    run = runs / f"bench-{quant}"
    if (run / "checkpoint-1" / "adapter_model.safetensors").exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(f'model_id = "{model_dir}"\ntrain_jsonl = "-"\nquant = "{quant}"\nbf16 = true\n')
    model = VoxtralForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": dev})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex(TARGETS)))
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, ckpt in (("lora_final", 0.01), ("checkpoint-1", 0.02)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * ckpt)
        model.save_pretrained(run / name)
    del model
    empty_cache()
    return run


def empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts(n: int, length: int = 200, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 131000, (n, length), generator=g).tolist()


def step_time(gen, batch: int, new: int, first: list | None = None) -> tuple[float, float]:
    """(seconds per decoding step, generated tokens/s) of ``gen(prompts, max_new_tokens)``: the whole
    generation less a one-token one (the prefill), over the new-1 steps. ``first``: gets the warm-up's
    seconds (the new path compiles its step and captures its graph for this shape there, and keeps them)."""
    p = prompts(batch)
    _, warm = timed(lambda: gen(p, new))
    if first is not None:
        first.append(warm)
    _, one = timed(lambda: gen(p, 1))
    out, full = timed(lambda: gen(p, new))
    assert all(len(r) == new for r in out), [len(r) for r in out][:4]
    return (full - one) / (new - 1), batch * new / full


def agreement(reference: list[list[int]], other: list[list[int]]) -> list[int]:
    """Per row, how many leading tokens ``other`` shares with ``reference``."""
    return [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            for a, b in zip(reference, other)]


def top2_gap(model, prompt: list[int], prefix: list[int], dev) -> float:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + prefix], device=dev)).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/voxtral-random")
    ap.add_argument("--out", default="gpu-out")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--nf4", action="store_true", help="also the NF4 run (needs bitsandbytes)")
    ap.add_argument("--quick", action="store_true", help="batch 64 only")
    ap.add_argument("--profile", action="store_true", help="also profile the decoding step's kernels")
    ap.add_argument("--only", default="", help="comma-separated sections: decode, continuous, same, swap, previews, "
                                                "fp32 (default: all; start-up always runs; --nf4 and --profile add theirs)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to try the script on the tiny model")
    args = ap.parse_args()
    import torch

    from engine.config import TrainConfig
    from engine.eval.infer import load_for_inference
    from engine.eval.loading import MergedModel
    from engine.worker.decode import ATTENTIONS, Decoder, generate_hf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    want = lambda section: not only or section in only  # noqa: E731
    dev = torch.device(args.device)
    record(out, what="machine", gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           torch=torch.__version__,
           date=time.strftime("%Y-%m-%d"))
    run = make_run(args.model, out / "runs", "none", dev)
    cfg = TrainConfig(model_id=args.model, train_jsonl="-", quant="none", bf16=True)

    # 1. start-up to the first generated token
    first = prompts(64)
    t0 = time.perf_counter()
    old, _ = load_for_inference(run, run / "lora_final", dev)
    generate_hf(old, first, 1, 0.0, 1.0, 0, EOS, PAD, dev, stop_at_eos=False)
    sync()
    old_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = MergedModel(cfg, dev)
    t_load = time.perf_counter() - t0
    merged.use(run / "lora_final")
    t_merge = time.perf_counter() - t0 - t_load
    dec = Decoder(merged.model)
    dec.generate(first, 1, pad=PAD)
    sync()
    new_start = time.perf_counter() - t0
    record(out, what="startup", old_s=round(old_start, 2), new_s=round(new_start, 2), new_load_s=round(t_load, 2),
           new_merge_s=round(t_merge, 2))

    # 2. decoding step and tokens/s
    if want("decode"):
        for batch in ((64,) if args.quick else (64, 16)):
            o_step, o_tps = step_time(lambda p, n: generate_hf(old, p, n, 0.0, 1.0, 0, EOS, PAD, dev, stop_at_eos=False),
                                      batch, args.new)
            warm: list[float] = []
            n_step, n_tps = step_time(lambda p, n: dec.generate(p, n, pad=PAD, stop_at_eos=False), batch, args.new, warm)
            plain = Decoder(merged.model, compile=False)  # the same CUDA graph, the layers' work not compiled
            u_step, _ = step_time(lambda p, n, plain=plain: plain.generate(p, n, pad=PAD, stop_at_eos=False), batch, args.new)
            plain.release()
            eager = Decoder(merged.model, graphs=False, compile=False)
            e_step, e_tps = step_time(lambda p, n, eager=eager: eager.generate(p, n, pad=PAD, stop_at_eos=False), batch, args.new)
            eager.release()
            record(out, what="decode", batch=batch, new_tokens=args.new, old_step_ms=round(o_step * 1e3, 2),
                   old_tokens_per_s=round(o_tps), new_step_ms=round(n_step * 1e3, 2), new_tokens_per_s=round(n_tps),
                   compiled=dec.compiled, first_generation_s=round(warm[0], 2),
                   new_uncompiled_step_ms=round(u_step * 1e3, 2), new_eager_step_ms=round(e_step * 1e3, 2),
                   speedup=round(o_step / n_step, 1), attention=dec.attention)
            for attention in ATTENTIONS:  # each way of attending over the cache, same graph otherwise
                if attention == dec.attention:
                    continue
                other = Decoder(merged.model, attention=attention)
                a_step, a_tps = step_time(lambda p, n, other=other: other.generate(p, n, pad=PAD, stop_at_eos=False),
                                          batch, args.new)
                other.release()
                record(out, what="decode_attention", batch=batch, attention=attention, step_ms=round(a_step * 1e3, 2),
                       tokens_per_s=round(a_tps), vs_default_step_ms=round(n_step * 1e3, 2))

    # 2b. answers of different lengths (EOS at a different step per row): a batch at a time, each batch running
    # to its longest answer (how rows were decoded before), against continuous batching (``Decoder.stream``:
    # a finished row takes the next prompt). Per-row limits stand in for EOS (a random model never says it).
    if want("continuous") and not args.quick:
        import random

        rnd = random.Random(0)
        n_rows = 512 if dev.type == "cuda" else 24
        lens = sorted(rnd.randint(40, 300) for _ in range(n_rows))  # prompts, shortest first (as infer sorts)
        rows_p = [prompts(1, length=k, seed=100 + i)[0] for i, k in enumerate(lens)]
        limits = [max(8, min(256, round(rnd.lognormvariate(4.4, 0.7)))) for _ in range(n_rows)]  # median ~80
        dec.generate(rows_p[:64], 8, pad=PAD, stop_at_eos=False)  # warm (a graph for this batch and width)

        def batched():
            for b in range(0, n_rows, 64):
                dec.generate(rows_p[b:b + 64], max(limits[b:b + 64]), pad=PAD, stop_at_eos=False)

        _, t_batched = timed(batched)
        tokens = sum(limits)
        for every in (8, 16):  # how often the host looks for finished rows
            got, t_stream = timed(lambda every=every: dict(dec.stream(rows_p, limits, 64, pad=PAD, check_every=every)))
            assert [len(got[i]) for i in range(n_rows)] == limits
            record(out, what="continuous_batching", rows=n_rows, batch=64, answer_tokens=tokens,
                   answer_median=sorted(limits)[n_rows // 2], answer_max=max(limits), batched_s=round(t_batched, 2),
                   batched_tokens_per_s=round(tokens / t_batched), check_every=every, stream_s=round(t_stream, 2),
                   stream_tokens_per_s=round(tokens / t_stream), speedup=round(t_batched / t_stream, 2),
                   steps=dec.stats["steps"], admissions=dec.stats["admissions"], cache_width=dec._key[1])

    if args.profile:  # where a step's GPU time goes: the kernels of 16 decoding steps alone (no prefill),
        # run without the graph (the same kernels the graph replays), compiled as the default decoder is
        from torch.profiler import ProfilerActivity, profile

        on_gpu = dev.type == "cuda"
        for batch in (64, 16):
            eager = Decoder(merged.model, graphs=False, compile=dec.compiled)
            pp = prompts(batch)
            eager.generate(pp, 4, pad=PAD, stop_at_eos=False)  # compiled and warm
            eager.generate(pp, 1, pad=PAD, stop_at_eos=False)  # prefill: the state is ready for a step
            with profile(activities=[ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
                for _ in range(16):
                    eager._step()
                sync()
            sort = "cuda_time_total" if on_gpu else "cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=160)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 16 / 1e3 if on_gpu else 0.0
            with open(out / "decode_profile.txt", "a") as f:
                f.write(f"batch {batch}: {len(kernels) / 16:.0f} kernels a step, {busy:.2f} ms of kernel time a step\n")
                f.write(table + "\n")
            record(out, what="decode_profile", batch=batch, compiled=eager.compiled, kernels_per_step=round(len(kernels) / 16),
                   kernel_ms_per_step=round(busy, 3))
            print(table, flush=True)
            eager.release()

    # 3. the same tokens. A random model's next-token distribution is flat: in bf16 its top two logits are
    # within rounding of each other every few steps, so no two bf16 decoders keep the same tokens for long.
    # HF itself on the same rows in batches of 8 (other kernel shapes, other rounding) is the yardstick.
    if want("same"):
        p = prompts(64, seed=1)
        ref = generate_hf(old, p, args.new, 0.0, 1.0, 0, EOS, PAD, dev, stop_at_eos=False)
        hf8 = [r for j in range(0, 64, 8)
               for r in generate_hf(old, p[j:j + 8], args.new, 0.0, 1.0, 0, EOS, PAD, dev, stop_at_eos=False)]
        rows = {"hf_batch8": hf8, "merged": dec.generate(p, args.new, pad=PAD, stop_at_eos=False),
                "peft_live": Decoder(old).generate(p, args.new, pad=PAD, stop_at_eos=False)}
        for label, got in rows.items():
            same = agreement(ref, got)
            gaps = [round(top2_gap(old, p[i], ref[i][:at], dev), 4) for i, at in enumerate(same) if at < args.new]
            record(out, what="same_tokens_bf16", vs="hf_batch64", decoder=label, rows=len(p),
                   identical=same.count(args.new), mean_tokens_before_first_difference=round(sum(same) / len(same), 1),
                   top2_gaps_at_differences=gaps[:16])
    dec.release()

    # 4. another checkpoint: a full reload vs swapping an adapter into the loaded base
    merged = dec = None
    empty_cache()
    if want("swap"):
        swappable, reload = timed(lambda: MergedModel(cfg, dev, swappable=True).use(run / "checkpoint-1"))
        _, swap = timed(lambda: swappable.use(run / "lora_final"))
        swappable = None
        empty_cache()
        record(out, what="checkpoint_swap", swap_s=round(swap, 2), reload_s=round(reload, 2))

    # 5. previews on the live (un-merged) PEFT model: 4 prompts × 64 tokens; the worker keeps one decoder
    # from one preview to the next (its cache and graph made once), so the second round is the steady cost
    if want("previews"):
        pv = prompts(4, length=120, seed=2)
        live = Decoder(old)
        plain = Decoder(old, compile=False)
        for round_ in (1, 2):
            _, o_prev = timed(lambda: generate_hf(old, pv, 64, 0.7, 0.9, 0, EOS, PAD, dev, stop_at_eos=False))
            _, n_prev = timed(lambda: live.generate(pv, 64, 0.7, 0.9, 0, pad=PAD, stop_at_eos=False))
            _, u_prev = timed(lambda: plain.generate(pv, 64, 0.7, 0.9, 0, pad=PAD, stop_at_eos=False))
            record(out, what="previews", round=round_, prompts=4, new_tokens=64, old_s=round(o_prev, 3),
                   new_s=round(n_prev, 3), compiled=live.compiled, new_uncompiled_s=round(u_prev, 3), live_adapter=True)
        live.release()
        plain.release()

    # fp32: a few rows, token for token
    old = None
    empty_cache()
    if want("fp32"):
        cfg32 = TrainConfig(model_id=args.model, train_jsonl="-", quant="none", bf16=False)
        from peft import PeftModel

        from engine.eval.loading import load_base

        old32 = PeftModel.from_pretrained(load_base(cfg32, dev, dtype=torch.float32), str(run / "lora_final")).eval()
        p32 = prompts(4, length=64, seed=3)
        ref32 = generate_hf(old32, p32, 32, 0.0, 1.0, 0, EOS, PAD, dev, stop_at_eos=False)
        got32 = Decoder(old32).generate(p32, 32, pad=PAD, stop_at_eos=False)
        record(out, what="same_tokens_fp32", rows=len(p32), new_tokens=32,
               identical=sum(a == b for a, b in zip(ref32, got32)), on="PEFT model (un-merged), fp32, CUDA graph")
        old32 = None
    empty_cache()

    # 6. NF4
    if args.nf4:
        run4 = make_run(args.model, out / "runs", "nf4", dev)
        cfg4 = TrainConfig(model_id=args.model, train_jsonl="-", quant="nf4", bf16=True)
        old4, _ = load_for_inference(run4, run4 / "lora_final", dev)
        o_step, o_tps = step_time(lambda p, n: generate_hf(old4, p, n, 0.0, 1.0, 0, EOS, PAD, dev, stop_at_eos=False),
                                  64, 32)
        del old4
        empty_cache()
        m4 = MergedModel(cfg4, dev).use(run4 / "lora_final")
        d4 = Decoder(m4.model)
        n_step, n_tps = step_time(lambda p, n: d4.generate(p, n, pad=PAD, stop_at_eos=False), 64, 32)
        record(out, what="decode_nf4", batch=64, new_tokens=32, old_step_ms=round(o_step * 1e3, 2),
               old_tokens_per_s=round(o_tps), new_step_ms=round(n_step * 1e3, 2), new_tokens_per_s=round(n_tps),
               speedup=round(o_step / n_step, 1))
    print("\nsummary:")
    for r in RESULTS:
        print(" ", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
