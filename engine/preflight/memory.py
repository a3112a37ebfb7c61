"""Preflight's model and memory checks: the model's parameter counts (from its config, on the meta device),
a per-GPU memory estimate against the free memory with the fastest setting that fits, and with
``--probe`` real steps per batch size (``engine.preflight.probe``)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from engine.config import TrainConfig
from engine.worker.batching import packed_budget


def check_model(cfg: TrainConfig, r) -> dict | None:
    import torch
    from transformers import AutoConfig

    from engine.util import looks_local
    from engine.worker.modeling import lora_target_regex

    if not cfg.grad_ckpt and cfg.grad_ckpt_layers > 0:
        r.add("model", "grad_ckpt_layers", "warn",
              f"--grad_ckpt_layers {cfg.grad_ckpt_layers} with --no-grad_ckpt: no layer is checkpointed, the number is "
              f"ignored (--grad_ckpt --grad_ckpt_layers {cfg.grad_ckpt_layers} checkpoints that many; or leave "
              f"--grad_ckpt_layers out)")
    if looks_local(cfg.model_id) and not Path(cfg.model_id).expanduser().exists():
        r.add("model", "config", "fail", f"{cfg.model_id}: no such model folder (a local model is a folder with its "
                                         "config.json; a hub id is org/name)")
        return None
    try:
        mcfg = AutoConfig.from_pretrained(cfg.model_id)
    except Exception as e:
        r.add("model", "config", "fail", f"{cfg.model_id}: cannot load its config ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''})")
        return None
    if getattr(mcfg, "model_type", "") != "voxtral":
        r.add("model", "config", "fail", f"{cfg.model_id} is a {mcfg.model_type!r} model, not Voxtral")
        return None
    from transformers import VoxtralForConditionalGeneration

    with torch.device("meta"):
        model = VoxtralForConditionalGeneration(mcfg)
    import re

    rx = re.compile(lora_target_regex(cfg.lora_targets))
    total = audio = embed = lin = lora = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and rx.fullmatch(name):
            lora += cfg.lora_r * (mod.in_features + mod.out_features)
    for name, p in model.named_parameters():
        total += p.numel()
        if "audio_tower" in name or "multi_modal_projector" in name:
            audio += p.numel()
        elif "embed_tokens" in name or "lm_head" in name:
            embed += p.numel()
        elif p.dim() == 2:
            lin += p.numel()
    tc = mcfg.text_config
    info = {"total": total, "audio": audio, "embed_head": embed, "llm_linear": lin, "lora": lora,
            "hidden": tc.hidden_size, "intermediate": tc.intermediate_size, "layers": tc.num_hidden_layers,
            "vocab": tc.vocab_size}
    r.add("model", "config", "ok", f"{cfg.model_id}: {total / 1e9:.2f} B parameters (language model linears "
                                   f"{lin / 1e9:.2f} B, embedding + head {embed / 1e9:.2f} B, audio tower + projector "
                                   f"{audio / 1e9:.2f} B: frozen and not kept on the device)")
    r.add("model", "trainable", "ok", f"LoRA r={cfg.lora_r} α={cfg.lora_alpha} on {','.join(cfg.lora_targets)}: "
                                      f"{lora:,} trainable parameters ({100 * lora / total:.2f}%), all in the language model")
    positions = getattr(tc, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_len > positions:
        r.add("model", "max_len", "warn",
              f"--max_len {cfg.max_len} is above the model's {positions:,} positions (max_position_embeddings): an "
              f"example longer than {positions:,} tokens would train at positions the model was never trained at "
              f"(--max_len {positions} keeps every example within them)")
    if cfg.grad_ckpt and cfg.grad_ckpt_layers > tc.num_hidden_layers:
        r.add("model", "grad_ckpt_layers", "info",
              f"--grad_ckpt_layers {cfg.grad_ckpt_layers}: the model has {tc.num_hidden_layers} decoder layers; all "
              f"{tc.num_hidden_layers} are checkpointed (--grad_ckpt_layers -1 says so)")
    return info


def fp8_mode(quant: str, products: str, fp8_auto: bool = False) -> str:
    """What --fp8_products ``products`` means with --quant ``quant`` on a Hopper GPU (``fp8_auto``) or not:
    none, backward or all (the worker's choice: ``fp8.products``)."""
    from engine.worker.fp8 import auto_mode

    return products if products != "auto" else auto_mode(quant, fp8_auto)


def estimate_memory(cfg: TrainConfig, m: dict, bsz: int | None = None, seq_len: int | None = None,
                    fp8_auto: bool = False, host: bool = False) -> dict:
    """A per-GPU estimate in GiB (weights, adapter + optimiser, activations, loss head, overhead) for
    batches of ``seq_len`` tokens (the data's p99 when known, else --max_len; packing fills --max_len).
    Activation bytes per token and layer are the ones measured on an H200 (docs/benchmarks.md):
    about 16·hidden + 6·intermediate, plus 8·hidden + 2.5·intermediate with LoRA dropout. FP8 input
    gradients on bf16 weights keep an e4m3 copy of them (``fp8_auto``: where --fp8_products auto gives them).
    In fp32 (``--no-bf16``, the CPU's usual choice) the weights and the activations take twice the bytes.
    ``host``: a CPU run, whose process keeps about twice what every layer's forward allocates, checkpointed
    or not (the allocator does not hand freed memory back; the forward and the recompute each leave theirs):
    measured with the tiny model in fp32, packed rows of 8,192, 32,768 and 98,304 tokens peaked at 1.68,
    2.05 and 2.92 GiB of RSS — 13.9 KB a token, twice its two layers' 3.6 KB — where counting one layer said
    1.7, 1.7 and 2.1 GiB (now 1.8, 2.2, 3.1); ``--per_device_bsz 2000`` was OOM-killed at 24 GiB after an
    estimate of 6 GiB (now 32).
    A compiled NF4 layer that is not checkpointed dequantises its weights again in its backward
    (engine/worker/nf4.py): measured on an H200 at 6 × 1024 tokens, each such layer takes 0.48 GiB against
    bf16's 0.55, and without checkpointing NF4 peaked at 12.2 / 20.4 / 37.0 GiB for 3 / 6 / 12 × 1024 tokens
    (runs AR–AS). With ``VOXTUI_NF4_KEEP_WEIGHTS=1`` it keeps them dequantised (bf16) from its forward, as it
    did before: 0.71 GiB a layer, 18.2 / 26.4 / 42.9 GiB, where bf16 weights took 17.3 / 26.2 / 44.2 — the
    4.4 GiB its weights save were spent again (runs AI–AK); the estimate then counts them."""
    bsz = bsz or cfg.per_device_bsz
    g = 2**30
    wide = 1 if cfg.bf16 else 2  # fp32 against bf16
    per_param = {"nf4": 0.53, "fp8": 1.0}.get(cfg.quant, 2.0 * wide)  # bytes a linear weight takes
    if cfg.quant == "none" and fp8_mode(cfg.quant, cfg.fp8_products, fp8_auto) == "backward":
        per_param += 1.0
    weights = (m["llm_linear"] * per_param + m["embed_head"] * 2 * wide) / g
    adapter = m["lora"] * 16 / g  # fp32 weight + grad + two Adam moments
    # packed: one row of the packed budget; padded: bsz rows of the p99 length (at most --max_len)
    tokens = packed_budget(bsz, cfg.max_len) if cfg.packing or not seq_len else bsz * min(seq_len, cfg.max_len)
    H, inter, n = m["hidden"], m["intermediate"], m["layers"]
    per_token = (16 * H + 6 * inter + ((8 * H + 2.5 * inter) if cfg.lora_dropout > 0 else 0)) * wide
    per_layer = tokens * per_token  # bytes of activations kept by one decoder layer
    ckpt = checkpointed_count(cfg, n)
    # a checkpointed layer keeps its input; the others all they make; one layer's recompute on top
    if host:  # see above: what every layer allocated stays with the process, about twice
        acts = 2 * n * per_layer / g
    else:
        acts = (ckpt * tokens * H * 2 * wide + (n - ckpt) * per_layer + (per_layer if ckpt else 0)) / g
        if cfg.quant == "nf4" and cfg.compile and _nf4_keeps_weights():  # see above: in bf16, each layer not checkpointed
            acts += (n - ckpt) * m["llm_linear"] / n * 2 / g
    head = min(tokens, 1024) * m["vocab"] * 6 / g  # the fused head's fp32 chunk and its bf16 softmax
    base = weights + adapter + acts + head
    return {"weights": round(weights, 2), "adapter_optimizer": round(adapter, 2), "activations": round(acts, 2),
            "loss_head": round(head, 2), "overhead": round(0.1 * base + 0.8, 2), "total": round(1.1 * base + 0.8, 2)}


def _nf4_keeps_weights() -> bool:
    """Whether the worker's NF4 layers outside the checkpoints keep their weights dequantised
    (``VOXTUI_NF4_KEEP_WEIGHTS``, engine/worker/knobs.py); an unreadable knob is the worker's to refuse."""
    from engine.util import UsageError
    from engine.worker.knobs import read

    try:
        return read().nf4_keep_weights
    except UsageError:
        return False


# what a step costs per token, relative to bf16 LoRA without checkpointing, by (--quant, FP8 products), as
# measured on an H200 (docs/benchmarks.md): FP8 input gradients on bf16 weights 29,293 → 32,513 tokens/s (run
# T; 29,346 → 32,547 in U), on FP8 weights 32,014 (T); every product FP8 29,205 → 36,229 (run J; 29,349 →
# 36,537 in R); NF4 about 5% more than bf16 at the same checkpointing (runs G, I: 52.6 against 50.3 µs a
# token, all layers recomputed). FP8 weights with bf16 products (--fp8_products none) were never measured:
# taken as bf16's. Recomputing every layer, the checkpoint inside each compiled layer (the default): bf16 +32%
# (run R, 16 × 1024 tokens: 29,349 without, 22,242 with; with FP8 input gradients +32%, T: 32,513 against
# 24,685 at 20 × 1024), FP8 +29% (R: 36,537 against 28,374; input gradients alone +31%, T: 32,014 against
# 24,453), NF4 +32% (run Q: 9.8% faster than around the layer's call, which cost +44.5% in run G); each
# checkpointed layer its share of that. The MLP's forward products FP8 ones too (--fp8_products mlp, FP8
# weights; runs AE: bf16 products 29,968 → 35,905 tokens/s; FP8 input gradients alone on FP8 weights
# 31,989 → 35,251): 0.833; its recompute taken between FP8 input gradients' and every product FP8's (0.30)
SPEED_COST = {("none", "none"): 1.0, ("none", "backward"): 0.901, ("fp8", "backward"): 0.915, ("fp8", "all"): 0.806,
              ("fp8", "mlp"): 0.833,
              ("fp8", "none"): 1.0, ("nf4", "none"): 1.05}
RECOMPUTE_COST = {("none", "none"): 0.32, ("none", "backward"): 0.32, ("fp8", "backward"): 0.31, ("fp8", "all"): 0.29,
                  ("fp8", "mlp"): 0.30,
                  ("fp8", "none"): 0.32, ("nf4", "none"): 0.32}


def checkpointed_count(cfg: TrainConfig, layers: int) -> int:
    """How many of the ``layers`` decoder layers recompute their activations under ``cfg``."""
    return (layers if cfg.grad_ckpt_layers < 0 else min(cfg.grad_ckpt_layers, layers)) if cfg.grad_ckpt else 0


def step_cost(quant: str, ckpt: int, layers: int, mode: str = "none") -> float:
    """A step's cost per token relative to bf16 LoRA without checkpointing (``SPEED_COST``), ``mode``: which
    products are FP8 ones (``fp8_mode``)."""
    key = (quant, mode if quant != "nf4" else "none")
    return SPEED_COST[key] * (1 + RECOMPUTE_COST[key] * ckpt / max(layers, 1))


def _cost(cfg: TrainConfig, n: int, fp8_auto: bool) -> float:
    return step_cost(cfg.quant, checkpointed_count(cfg, n), n, fp8_mode(cfg.quant, cfg.fp8_products, fp8_auto))


def _candidates(cfg: TrainConfig, fp8: bool, fp8_auto: bool) -> list[tuple[str, str]]:
    """(--quant, --fp8_products) pairs to weigh: bf16, NF4, and FP8 weights where the GPU takes FP8 products
    (``fp8``) and either auto gives its input gradients (``fp8_auto``) or --quant fp8 was asked for. The
    run's --fp8_products is kept where the pair takes it, else auto; every product FP8 (``all``: its
    adapters' gradients miss the GPU tests' bound) and the MLP's forward FP8 (``mlp``: its loss curve 1.6–2.2%
    from bf16's at three seeds, outside 1%) only where asked for."""
    out = []
    for quant in ("fp8", "none", "nf4"):
        products = cfg.fp8_products
        if (products in ("all", "mlp") and quant != "fp8") or (products == "backward" and quant == "nf4"):
            products = "auto"
        if quant == "fp8" and not (fp8 and (cfg.quant == "fp8" or (fp8_auto and products != "none"))):
            continue
        out.append((quant, products))
    return out


def fastest_fit(cfg: TrainConfig, m: dict, free_gib: float, seq_len: int | None = None,
                fp8: bool = False, fp8_auto: bool = False) -> tuple[dict, dict] | None:
    """The fastest memory setting that fits in 90% of ``free_gib`` at this batch by the costs measured on
    an H200 (``step_cost``): bf16, NF4 or FP8 weights (``_candidates``; ``fp8``: the GPU takes FP8 products,
    ``fp8_auto``: --fp8_products auto gives FP8 input gradients there), each with as few layers
    checkpointed (--grad_ckpt_layers) as fit. Returns the changed fields (--fp8_products only where it must
    change) and the estimate, or None when nothing fits."""
    n = m["layers"]
    best = None
    for quant, products in _candidates(cfg, fp8, fp8_auto):
        for ckpt in range(n + 1):
            fields = {"quant": quant, "grad_ckpt": ckpt > 0, "grad_ckpt_layers": -1 if ckpt in (0, n) else ckpt}
            if products != cfg.fp8_products:
                fields["fp8_products"] = products
            est = estimate_memory(msgspec.structs.replace(cfg, **fields), m, seq_len=seq_len, fp8_auto=fp8_auto)
            if est["total"] <= 0.9 * free_gib:
                cost = step_cost(quant, ckpt, n, fp8_mode(quant, products, fp8_auto))
                if best is None or cost < best[0]:
                    best = (cost, fields, est)
                break  # more layers checkpointed only costs more
    return None if best is None else best[1:]


def _flags(fields: dict) -> str:
    out = f"--quant {fields['quant']} " + ("--grad_ckpt" if fields["grad_ckpt"] else "--no-grad_ckpt")
    out += f" --grad_ckpt_layers {fields['grad_ckpt_layers']}" if fields["grad_ckpt_layers"] >= 0 else ""
    return out + (f" --fp8_products {fields['fp8_products']}" if "fp8_products" in fields else "")


def _speedup(cfg: TrainConfig, fields: dict, n: int, fp8_auto: bool = False) -> float:
    """How many times ``cfg``'s tokens/s the setting ``fields`` would reach, by ``step_cost``."""
    return _cost(cfg, n, fp8_auto) / _cost(msgspec.structs.replace(cfg, **fields), n, fp8_auto)


def check_memory(cfg: TrainConfig, r, m: dict | None, system: dict, lengths: dict) -> None:
    if m is None:
        return
    seq = int(lengths["train"]["p99"]) if "train" in lengths else None
    gpu_fp8, fp8_auto = system.get("fp8", False), system.get("fp8_auto", False)
    est = estimate_memory(cfg, m, seq_len=seq, fp8_auto=fp8_auto)
    parts = ", ".join(f"{k} {v}" for k, v in est.items() if k != "total")
    if system["gpus"]:
        free = min(g["free_gib"] for g in system["gpus"][: cfg.nproc])
        level = "fail" if est["total"] > free else "warn" if est["total"] > 0.9 * free else "ok"
        batch = (f"packed rows of {packed_budget(cfg.per_device_bsz, cfg.max_len):,} tokens" if cfg.packing else
                 f"batch {cfg.per_device_bsz} × {min(seq or cfg.max_len, cfg.max_len)} tokens")
        r.add("memory", "estimate", level, f"about {est['total']:.1f} GiB per GPU for {batch} ({parts}); "
                                           f"{free:.1f} GiB free", estimate=est)
        best = fastest_fit(cfg, m, free, seq, fp8=gpu_fp8, fp8_auto=fp8_auto)
        now = {"quant": cfg.quant, "grad_ckpt": cfg.grad_ckpt,
               "grad_ckpt_layers": cfg.grad_ckpt_layers if cfg.grad_ckpt and 0 <= cfg.grad_ckpt_layers < m["layers"] else -1}
        if best is not None and best[0] != now:
            fields, fit = best
            r.add("memory", "recommend", "info",
                  f"fastest setting that fits: {_flags(fields)} (about {fit['total']:.1f} GiB), about "
                  f"{_speedup(cfg, fields, m['layers'], fp8_auto):.2f}× this setting's tokens/s by the speeds measured "
                  "on an H200 (docs/benchmarks.md)", recommend=fields)
        # every product FP8 only where asked for: its forward rounds each row of activations to 8 bits, and its
        # adapters' gradients miss tests/gpu's bound (cosine 0.990 against 0.995; docs/benchmarks.md)
        if gpu_fp8 and cfg.fp8_products != "all":
            fast = fastest_fit(msgspec.structs.replace(cfg, quant="fp8", fp8_products="all"), m, free, seq, fp8=True)
            if fast is not None and fast[0]["quant"] == "fp8":
                fields = {**fast[0], "fp8_products": "all"}
                r.add("memory", "fp8", "info",
                      f"{_flags(fields)} would fit (about {fast[1]['total']:.1f} GiB) at about "
                      f"{_speedup(cfg, fields, m['layers'], fp8_auto):.2f}× this setting's tokens/s, but is not "
                      "recommended unasked: its forward's FP8 products round each row of activations to 8 bits, and "
                      "the adapters' gradients stay further from exact than the GPU tests allow (docs/benchmarks.md)")
    else:
        import psutil

        est = estimate_memory(cfg, m, seq_len=seq, host=True)
        parts = ", ".join(f"{k} {v}" for k, v in est.items() if k != "total")
        avail = psutil.virtual_memory().available / 2**30
        need = est["total"] * cfg.nproc
        r.add("memory", "estimate", "fail" if need > avail else "ok",
              f"about {need:.1f} GiB of host memory for {cfg.nproc} CPU rank(s) ({parts}); {avail:.1f} GiB available",
              estimate=est)


def check_probe(cfg: TrainConfig, r, lengths: dict) -> dict | None:
    from engine.preflight.probe import probe

    seq = cfg.max_len if cfg.packing or "train" not in lengths else int(min(cfg.max_len, lengths["train"]["max"]))
    try:
        result = probe(cfg, seq)
    except Exception as e:
        r.add("memory", "probe", "fail", f"probe failed: {type(e).__name__}: {e}")
        return None
    rec = result["recommended"]
    if rec is None:
        r.add("memory", "probe", "fail", f"not even batch 1 × {seq} tokens fits on {result['device']}", probe=result)
        return result
    tried = ", ".join(f"{x['batch']}: {x['tokens_per_s']:,.0f} tok/s" + (f" {x['peak_gib']} GiB" if x["peak_gib"] else "")
                      for x in result["modes"][cfg.quant])
    r.add("memory", "probe", "ok", f"measured on {result['device']} at {seq} tokens ({tried}); for the effective batch "
                                   f"{result['effective_batch']}: --per_device_bsz {rec['per_device_bsz']} --grad_accum "
                                   f"{rec['grad_accum']}", probe=result)
    if rec["quant"] != cfg.quant:
        r.add("memory", "probe-quant", "info", f"recommend --quant {rec['quant']}: {rec['why']}")
    cfg.per_device_bsz, cfg.grad_accum = rec["per_device_bsz"], rec["grad_accum"]
    return result
