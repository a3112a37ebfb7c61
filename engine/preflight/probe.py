"""``voxtui preflight --probe``: a few real optimizer steps per batch size, on this machine's device,
to find the largest per-device batch that fits, rescale --grad_accum so the effective batch stays what
was asked, and compare NF4 with bf16 LoRA."""

from __future__ import annotations

import contextlib
import math
import time

from engine.config import TrainConfig


def _try(cfg: TrainConfig, model, bsz: int, seq: int, device, steps: int = 2) -> dict | None:
    """Peak memory and tokens/s for ``steps`` steps at ``bsz × seq``; None when it does not fit."""
    import torch

    from engine.worker.modeling import CausalLMLoss

    loss_fn = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    ids = torch.randint(1000, 100_000, (bsz, seq), device=device)
    labels = ids.clone()
    labels[:, : seq // 8] = -100
    shifted = labels[:, 1:].reshape(-1)
    target_idx = (shifted != -100).nonzero().squeeze(1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else contextlib.nullcontext()
            with ctx:
                total, n = loss_fn(input_ids=ids, target_idx=target_idx, targets=shifted[target_idx])
                (total / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step = min(times)
    return {"batch": bsz, "seq": seq, "step_s": round(step, 4), "tokens_per_s": round(bsz * seq / step, 1),
            "peak_gib": round(peak, 2) if peak is not None else None}


def probe(cfg: TrainConfig, seq: int, max_batch: int = 64) -> dict:
    """Doubling search up to ``max_batch`` (on a GPU it stops at the first batch that does not fit, or
    leaves under 10% free); returns the results and the recommended batch / grad_accum."""
    import torch

    from engine.worker.modeling import load_model

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    effective = cfg.per_device_bsz * cfg.grad_accum
    out: dict = {"device": str(device), "seq": seq, "effective_batch": effective, "modes": {}}
    for quant in dict.fromkeys([cfg.quant, "none" if cfg.quant == "nf4" else cfg.quant]):
        mcfg = TrainConfig(**{**{k: getattr(cfg, k) for k in cfg.__struct_fields__}, "quant": quant})
        model, _ = load_model(mcfg, device)
        model.train()
        results, bsz = [], 1
        limit = min(max_batch, effective) if device.type == "cpu" else max_batch
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
        while bsz <= limit:
            r = _try(mcfg, model, bsz, seq, device)
            if r is None:
                break
            results.append(r)
            if total is not None and r["peak_gib"] > 0.9 * total:
                break
            bsz *= 2
        out["modes"][quant] = results
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fits = out["modes"][cfg.quant]
    if not fits:
        out["recommended"] = None
        return out
    best = max(r["batch"] for r in fits)
    # the largest batch that fits and divides the effective batch keeps it exactly what was asked
    b = max([d for d in range(1, min(best, effective) + 1) if effective % d == 0] or [1])
    out["recommended"] = {"per_device_bsz": b, "grad_accum": math.ceil(effective / b), "quant": cfg.quant}
    if cfg.quant == "nf4" and out["modes"].get("none"):
        same = {r["batch"]: r for r in out["modes"]["none"]}
        nf4 = {r["batch"]: r for r in fits}
        if b in same and same[b]["tokens_per_s"] > nf4[b]["tokens_per_s"]:
            out["recommended"]["quant"] = "none"
            out["recommended"]["why"] = (f"bf16 LoRA fits batch {b} and runs at {same[b]['tokens_per_s']:,.0f} tokens/s "
                                         f"against NF4's {nf4[b]['tokens_per_s']:,.0f}")
    return out
