"""``voxtui preflight``: system, data, model and memory checks → go / warn / no-go, and the exact
launch command. Every problem is collected, then reported once."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from pathlib import Path

from engine.config import TrainConfig, to_toml

LEVELS = ("ok", "info", "warn", "fail")


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []

    def add(self, area: str, name: str, level: str, message: str, **extra) -> None:
        self.checks.append({"area": area, "name": name, "level": level, "message": message, **extra})

    @property
    def verdict(self) -> str:
        levels = {c["level"] for c in self.checks}
        return "no-go" if "fail" in levels else "warn" if "warn" in levels else "go"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _vt(v: str | None) -> tuple:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", v or "0")[:3])


def check_system(cfg: TrainConfig, r: Report) -> dict:
    import torch

    info: dict = {"cuda": torch.cuda.is_available(), "gpus": []}
    tv, trv, pv, bv = _version("torch"), _version("transformers"), _version("peft"), _version("bitsandbytes")
    r.add("system", "versions", "ok", f"torch {tv}, transformers {trv}, peft {pv}, bitsandbytes {bv or 'missing'}")
    if _vt(trv) < (4, 54):
        r.add("system", "transformers", "fail", f"transformers {trv} has no Voxtral: 4.54 or newer is needed")
    if _vt(pv) < (0, 13):
        r.add("system", "peft", "fail", f"peft {pv} is too old: 0.13 or newer is needed")
    if cfg.quant == "nf4" and bv is None:
        r.add("system", "bitsandbytes", "fail", "--quant nf4 needs bitsandbytes (pip install bitsandbytes), or use --quant none")
    if info["cuda"]:
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                name = pynvml.nvmlDeviceGetName(h)
                info["gpus"].append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                                     "free_gib": mem.free / 2**30, "total_gib": mem.total / 2**30})
            pynvml.nvmlShutdown()
        except Exception as e:  # NVML missing: fall back to torch
            driver = f"unknown ({type(e).__name__})"
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                info["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                     "free_gib": free / 2**30, "total_gib": total / 2**30})
        gpus = ", ".join(f"{g['index']}: {g['name']} {g['free_gib']:.1f}/{g['total_gib']:.1f} GiB free" for g in info["gpus"])
        r.add("system", "gpus", "ok", f"{len(info['gpus'])} GPU(s), driver {driver}, CUDA {torch.version.cuda}: {gpus}")
        if cfg.nproc > len(info["gpus"]):
            r.add("system", "nproc", "fail", f"--nproc {cfg.nproc} but only {len(info['gpus'])} GPU(s)")
        if cfg.nproc > 1 and not torch.distributed.is_nccl_available():
            r.add("system", "nccl", "fail", "several ranks on GPUs need NCCL, which this torch build lacks")
    else:
        r.add("system", "gpus", "warn", "no CUDA GPU: training runs on the CPU (fine for the tiny model, "
                                        "far too slow for a 3B model)")
        if cfg.quant == "nf4":
            r.add("system", "nf4-cpu", "info", "NF4 on the CPU works with bitsandbytes ≥ 0.49 but is slow")
    check_bf16(cfg, r)
    cores = os.cpu_count() or 1
    if cores < cfg.nproc:
        r.add("system", "cpus", "warn", f"{cores} CPU core(s) for {cfg.nproc} ranks")
    out = Path(cfg.output_dir or "runs")
    probe = out if out.exists() else Path.cwd()
    free = shutil.disk_usage(probe).free / 2**30
    info["disk_free_gib"] = free
    r.add("system", "disk", "ok" if free > 5 else "warn", f"{free:.1f} GiB free for checkpoints under {out}")
    if Path("/dev/shm").exists():
        shm = shutil.disk_usage("/dev/shm").free / 2**30
        r.add("system", "shm", "ok" if shm >= 1 or cfg.nproc == 1 else "warn", f"/dev/shm: {shm:.1f} GiB free")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        r.add("system", "ports", "ok", "a loopback port can be bound (torchrun's rendezvous)")
    except OSError as e:
        r.add("system", "ports", "fail", f"cannot bind a loopback port: {e}")
    r.add("system", "dataloader", "ok", "data is pre-tokenised and collated in the training process: "
                                       "no dataloader workers are needed")
    return info


def check_bf16(cfg: TrainConfig, r: Report) -> None:
    """What --bf16 is and why: auto's choice (``engine.config.bf16_auto``), or the flag / config value,
    with a warning when bf16 is asked for on hardware that has to emulate it."""
    from engine.config import bf16_auto

    on = "bf16" if cfg.bf16 else "fp32"
    chosen = getattr(cfg, "bf16_reason", "")
    if chosen:
        r.add("system", "bf16", "ok", f"bf16: chose {on} because {chosen} (auto; --bf16 or --no-bf16 overrides)",
              bf16=cfg.bf16, auto=True)
        return
    auto, why = bf16_auto()
    if cfg.bf16 == auto:
        r.add("system", "bf16", "ok", f"bf16: {on}, as set (auto would choose the same: {why})", bf16=cfg.bf16, auto=False)
    elif cfg.bf16:
        r.add("system", "bf16", "fail" if _gpu_lacks_bf16() else "warn",
              f"bf16: bf16 as set, but {why}: leave the flag out (auto) or use --no-bf16", bf16=True, auto=False)
    else:
        r.add("system", "bf16", "info", f"bf16: fp32 as set; auto would choose bf16 ({why}), which is faster and "
                                        "takes half the memory for the weights", bf16=False, auto=False)


def _gpu_lacks_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and not torch.cuda.is_bf16_supported()


def check_plan(cfg: TrainConfig, r: Report, tok=None):
    """The plan the worker will make (``engine.worker.batching.plan_run``, the same code): rows kept after
    --long, micro-batches per rank, steps per epoch and in all, a shrunk packing budget; no-go with the
    fix when no optimizer step can run. Returns the tokenised rows (reused after a probe)."""
    from engine.formatting import load_format
    from engine.util import UsageError
    from engine.worker import batching

    r.checks = [c for c in r.checks if c["name"] != "plan"]
    if any(c["area"] == "data" and c["name"] == "train" and c["level"] == "fail" for c in r.checks):
        return None  # the data check has said what is wrong with the file
    if tok is None:
        try:
            fmt = load_format(cfg.model_id)
            tok = batching.tokenize(cfg.train_jsonl, fmt, cfg.max_len, cfg.long, _cache_dir(cfg))
        except UsageError as e:
            r.add("plan", "plan", "fail", f"cannot tokenize the training rows as the worker will: {e}")
            return None
    plan = batching.plan_run(tok, cfg, cfg.nproc)
    r.add("plan", "plan", "fail" if plan.problem else "ok", plan.summary(), plan=plan.as_dict())
    return tok


def _cache_dir(cfg: TrainConfig) -> str:
    """The worker's token cache (``--cache_dir``, else ``_cache`` beside the run folder): preflight fills it."""
    return cfg.cache_dir or str(Path(cfg.output_dir or "runs/run").parent / "_cache")


def check_data(cfg: TrainConfig, r: Report) -> dict:
    from engine.data.analyze import analyze
    from engine.data.audit import audit
    from engine.rows import FATAL_KINDS
    from engine.util import UsageError

    lengths: dict = {}
    for name, path, against in (("train", cfg.train_jsonl, cfg.val_jsonl or None), ("val", cfg.val_jsonl, None)):
        if not path:
            if name == "val":
                r.add("data", "val", "warn", "no --val_jsonl: no evaluation, early stopping or best checkpoint")
            continue
        try:
            rep = audit(path, against=against)
        except UsageError as e:
            r.add("data", name, "fail", str(e))
            continue
        fatal = [d for d in rep["defects"] if d["kind"] in FATAL_KINDS]
        if fatal:
            first = ", ".join(f"line {d['line']} {d['kind']}" for d in fatal[:5])
            r.add("data", name, "fail", f"{path}: {len(fatal)} broken row(s) ({first}); clean it with "
                                        f"`voxtui data split` or fix those lines", defects=len(fatal))
        else:
            r.add("data", name, "ok", f"{path}: {rep['rows']} rows")
        for kind, level in (("duplicate", "warn"), ("leak", "warn"), ("control_chars", "info")):
            n = rep["counts"].get(kind, 0)
            if n:
                what = {"leak": f"also stand in {against}", "duplicate": "are duplicates",
                        "control_chars": "hold control characters"}[kind]
                r.add("data", f"{name}-{kind}", level, f"{n} row(s) of {path} {what}")
        if not fatal:
            try:
                a = analyze(path, cfg.model_id if Path(cfg.model_id).exists() else None, cfg.max_len)
                share = a["over_max_len"] / max(a["usable"], 1)
                level = "warn" if share > 0.01 else "ok"
                r.add("data", f"{name}-length", level,
                      f"p50 {a['length']['total']['p50']:.0f}, p99 {a['length']['total']['p99']:.0f}, max "
                      f"{a['length']['total']['max']} tokens; {a['over_max_len']} row(s) over --max_len {cfg.max_len} "
                      f"(--long {cfg.long})", p99=a["length"]["total"]["p99"])
                lengths[name] = a["length"]["total"]
            except UsageError as e:
                r.add("data", f"{name}-length", "warn", f"length check skipped: {e}")
    return lengths


def check_model(cfg: TrainConfig, r: Report) -> dict | None:
    import torch
    from transformers import AutoConfig

    from engine.worker.modeling import lora_target_regex

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
    return info


def estimate_memory(cfg: TrainConfig, m: dict, bsz: int | None = None, seq_len: int | None = None) -> dict:
    """A per-GPU estimate in GiB (weights, adapter + optimiser, activations, loss head, overhead) for
    batches of ``seq_len`` tokens (the data's p99 when known, else --max_len; packing fills --max_len).
    Activation bytes per token and layer are the ones measured on an H200 (docs/benchmarks.md):
    about 16·hidden + 6·intermediate, plus 8·hidden + 2.5·intermediate with LoRA dropout."""
    bsz = bsz or cfg.per_device_bsz
    g = 2**30
    weights = (m["llm_linear"] * (0.53 if cfg.quant == "nf4" else 2) + m["embed_head"] * 2) / g
    adapter = m["lora"] * 16 / g  # fp32 weight + grad + two Adam moments
    tokens = bsz * (cfg.max_len if cfg.packing or not seq_len else min(seq_len, cfg.max_len))
    H, inter, n = m["hidden"], m["intermediate"], m["layers"]
    per_token = 16 * H + 6 * inter + ((8 * H + 2.5 * inter) if cfg.lora_dropout > 0 else 0)
    per_layer = tokens * per_token  # bytes of bf16 activations kept by one decoder layer
    acts = (n * tokens * H * 2 + per_layer) / g if cfg.grad_ckpt else n * per_layer / g
    head = min(tokens, 1024) * m["vocab"] * 6 / g  # the fused head's fp32 chunk and its bf16 softmax
    base = weights + adapter + acts + head
    return {"weights": round(weights, 2), "adapter_optimizer": round(adapter, 2), "activations": round(acts, 2),
            "loss_head": round(head, 2), "overhead": round(0.1 * base + 0.8, 2), "total": round(1.1 * base + 0.8, 2)}


def fastest_fit(cfg: TrainConfig, m: dict, free_gib: float, seq_len: int | None = None) -> tuple[dict, dict] | None:
    """The fastest memory setting that fits in 90% of ``free_gib`` at this batch, in the order measured
    on an H200 (docs/benchmarks.md): bf16 LoRA without checkpointing, bf16 with, NF4 with. Returns the
    changed fields and the estimate, or None when nothing fits."""
    import msgspec

    for quant, ckpt in (("none", False), ("none", True), ("nf4", True)):
        trial = msgspec.structs.replace(cfg, quant=quant, grad_ckpt=ckpt)
        est = estimate_memory(trial, m, seq_len=seq_len)
        if est["total"] <= 0.9 * free_gib:
            return {"quant": quant, "grad_ckpt": ckpt}, est
    return None


def check_memory(cfg: TrainConfig, r: Report, m: dict | None, system: dict, lengths: dict) -> None:
    if m is None:
        return
    seq = int(lengths["train"]["p99"]) if "train" in lengths else None
    est = estimate_memory(cfg, m, seq_len=seq)
    parts = ", ".join(f"{k} {v}" for k, v in est.items() if k != "total")
    if system["gpus"]:
        free = min(g["free_gib"] for g in system["gpus"][: cfg.nproc])
        level = "fail" if est["total"] > free else "warn" if est["total"] > 0.9 * free else "ok"
        r.add("memory", "estimate", level, f"about {est['total']:.1f} GiB per GPU for batch {cfg.per_device_bsz} × "
                                           f"{seq or cfg.max_len} tokens ({parts}); {free:.1f} GiB free", estimate=est)
        best = fastest_fit(cfg, m, free, seq)
        if best is not None and best[0] != {"quant": cfg.quant, "grad_ckpt": cfg.grad_ckpt}:
            fields, fit = best
            flags = f"--quant {fields['quant']} " + ("--grad_ckpt" if fields["grad_ckpt"] else "--no-grad_ckpt")
            r.add("memory", "recommend", "info",
                  f"fastest setting that fits: {flags} (about {fit['total']:.1f} GiB); on an H200 bf16 LoRA without "
                  "checkpointing trains 1.7× faster than NF4 with it (docs/benchmarks.md)", recommend=fields)
    else:
        import psutil

        avail = psutil.virtual_memory().available / 2**30
        need = est["total"] * cfg.nproc
        r.add("memory", "estimate", "fail" if need > avail else "ok",
              f"about {need:.1f} GiB of host memory for {cfg.nproc} CPU rank(s) ({parts}); {avail:.1f} GiB available",
              estimate=est)


def launch_command(cfg: TrainConfig, config_path: str | None = None) -> str:
    head = ["torchrun", "--standalone", "--nproc_per_node", str(cfg.nproc), "-m", "engine.train"]
    if config_path:
        return shlex.join(head + ["--config", config_path])
    default = TrainConfig()
    flags = []
    for k in cfg.__struct_fields__:
        v, d = getattr(cfg, k), getattr(default, k)
        if v == d or k in ("engine", "nproc"):
            continue
        if isinstance(v, bool):
            flags.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, list):
            flags += [f"--{k}", ",".join(v)]
        else:
            flags += [f"--{k}", str(v)]
    return shlex.join(head + flags)


def check_probe(cfg: TrainConfig, r: Report, lengths: dict) -> dict | None:
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


def preflight(cfg: TrainConfig, config_path: str | None = None, probe: bool = False) -> dict:
    r = Report()
    system = check_system(cfg, r)
    lengths = check_data(cfg, r)
    tok = check_plan(cfg, r)
    m = check_model(cfg, r)
    check_memory(cfg, r, m, system, lengths)
    if probe and r.verdict != "no-go":
        batch = (cfg.per_device_bsz, cfg.grad_accum)
        check_probe(cfg, r, lengths)  # rescales the batch in cfg, so the command below uses it
        if (cfg.per_device_bsz, cfg.grad_accum) != batch and tok is not None:
            check_plan(cfg, r, tok)  # the plan of the batch the command launches
    return {"verdict": r.verdict, "checks": r.checks, "command": launch_command(cfg, config_path),
            "config": to_toml(cfg)}


def render(report: dict) -> str:
    marks = {"ok": "  ok ", "info": " info", "warn": " WARN", "fail": " FAIL"}
    out = [f"{marks[c['level']]}  {c['area']:<7} {c['message']}" for c in report["checks"]]
    out.append(f"\nverdict: {report['verdict'].upper()}")
    out.append(f"launch:  {report['command']}")
    return "\n".join(out)
