"""Preflight's system checks: versions, GPUs and NVML, bf16, CPU cores, disk, /dev/shm, a loopback port."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from engine.config import TrainConfig


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _vt(v: str | None) -> tuple:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", v or "0")[:3])


def check_system(cfg: TrainConfig, r) -> dict:
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
        from engine.worker.fp8 import available, describe, products

        gpu0 = torch.device("cuda", 0)
        why = available(gpu0)
        info["fp8"] = not why  # the GPU takes FP8 products: memory's check weighs FP8 weights
        info["fp8_auto"] = products("none", "auto", gpu0)[0] == "backward"  # auto gives FP8 input gradients
        if cfg.quant == "fp8" and why:
            r.add("system", "fp8", "fail", why + "; use --quant none or nf4")
        elif cfg.quant != "nf4":
            mode, because = products(cfg.quant, cfg.fp8_products, gpu0)
            if mode != "none" and why:
                r.add("system", "fp8", "fail", f"--fp8_products {cfg.fp8_products}: {why}; use --fp8_products none")
            else:
                measured = {"backward": f"on an H200 {'1.09' if cfg.quant == 'fp8' else '1.11'}× the tokens/s of bf16 "
                                        "products, the loss within 0.54% of theirs over 205 steps, the adapters' "
                                        "gradients within the GPU tests' bounds: docs/benchmarks.md",
                            "mlp": "on an H200 1.20× the tokens/s of bf16 products and 1.10× FP8 input gradients "
                                   "alone on FP8 weights, the adapters' gradients within the GPU tests' bounds; its "
                                   "loss curve 1.6–2.2% from bf16's in its steep part at each of three seeds (1% is "
                                   "a default's bound): docs/benchmarks.md",
                            "all": "on an H200 1.24× bf16's tokens/s, its adapters' gradients further from exact than "
                                   "the GPU tests allow: docs/benchmarks.md",
                            "none": "" if why else "--fp8_products backward: 1.11× on an H200"}[mode]
                r.add("system", "fp8", "ok", f"FP8 products: {mode} — {describe(cfg.quant, mode)} ({because}"
                                             + (f"; {measured})" if measured else ")"))
        if cfg.packing:
            from engine.worker.attention import dense_choice
            from engine.worker.knobs import knobs

            dense = dense_choice(gpu0, cfg.max_len, knobs().dense_attention)
            if dense:
                r.add("system", "attention", "ok", f"attention: {dense}")
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
        if cfg.quant == "fp8":
            r.add("system", "fp8-cpu", "info", "--quant fp8 on the CPU runs (torch's CPU FP8 products) but is slow; "
                                               "its speed is a GPU's (compute capability 8.9+)")
        if cfg.quant != "nf4":
            from engine.worker.fp8 import describe, products

            mode, because = products(cfg.quant, cfg.fp8_products, torch.device("cpu"))
            r.add("system", "fp8", "ok", f"FP8 products: {mode} — {describe(cfg.quant, mode)} ({because})")
    check_bf16(cfg, r)
    cores = os.cpu_count() or 1
    if cores < cfg.nproc:
        r.add("system", "cpus", "warn", f"{cores} CPU core(s) for {cfg.nproc} ranks")
    out = Path(cfg.output_dir or "runs")
    probe = nearest_existing(out)  # a run folder not made yet: the filesystem it will be made on
    free = shutil.disk_usage(probe).free / 2**30
    info["disk_free_gib"] = free
    where = "" if probe == out.absolute() else f" (measured at {probe}, the nearest folder of it that exists)"
    r.add("system", "disk", "ok" if free > 5 else "warn", f"{free:.1f} GiB free for checkpoints under {out}{where}")
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


def nearest_existing(path: Path) -> Path:
    """``path`` made absolute, or the nearest folder above it that exists: where a folder not made yet will be
    made, so the filesystem its files will take space on."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_bf16(cfg: TrainConfig, r) -> None:
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
