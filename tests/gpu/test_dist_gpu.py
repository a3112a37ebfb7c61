"""The gradient sync over NCCL (issue 15, step 1): two ranks on two GPUs, each through the worker's whole
fast path (varlen attention, compiled layers, the compiled loss kernels, bf16), with the default flat
all-reduce and with DistributedDataParallel — the same losses step by step and the same adapter, as
the CPU test (tests/test_train.py, gloo) checks exactly. Skipped with fewer than two GPUs (the device
tool's ``nvidia-h200-x2``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from gpu_util import save_real_width

from conftest import read_events, train_args, worker, write_jsonl

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (nvidia-h200-x2)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.formatting import bundled_tekken_path

    out = save_real_width(tmp_path_factory)
    shutil.copyfile(bundled_tekken_path(), out / "tekken.json")
    return out


def test_two_gpus_flat_all_reduce_trains_as_ddp(tmp_path, model_dir):
    from safetensors.torch import load_file

    rows = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say the code word {i}. " * (1 + i % 7),
                                               "output": f"The code word {i} is {i * 7}. " * (1 + i % 5)}
                                              for i in range(256)])
    common = {"max_steps": 6, "per_device_bsz": 2, "max_len": 512, "packing": True, "grad_accum": 2,
              "quant": "none", "bf16": True, "compile": True, "grad_ckpt": False, "lr": 2e-4,
              "cache_dir": tmp_path / "c"}
    losses, logs = {}, {}
    for mode in ("flat", "ddp"):
        # the carried wheels' folder stays on the path (bench/gpu_env.sh puts it in PYTHONPATH)
        path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])
        proc = worker(train_args(model_dir, tmp_path / mode, rows, grad_sync=mode, **common), nproc=2, timeout=900,
                      env={"PYTHONPATH": path})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[mode] = {e["step"]: e["loss"] for e in read_events(tmp_path / mode) if e["type"] == "step"}
        logs[mode] = proc.stdout + proc.stderr
    assert "2 ranks: one all-reduce of" in logs["flat"]
    assert sorted(losses["flat"]) == list(range(1, 7))
    print("two GPUs, flat:", [round(losses["flat"][s], 4) for s in range(1, 7)],
          "ddp:", [round(losses["ddp"][s], 4) for s in range(1, 7)])
    # bf16 products and two reduction orders: equal to bf16's rounding, not bit for bit
    assert losses["flat"] == pytest.approx(losses["ddp"], rel=2e-3)
    a, b = (load_file(str(tmp_path / m / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"))
            for m in ("flat", "ddp"))
    assert a.keys() == b.keys()
    flat = torch.cat([a[k].float().flatten() for k in sorted(a)])
    ddp = torch.cat([b[k].float().flatten() for k in sorted(a)])
    assert float(torch.nn.functional.cosine_similarity(flat, ddp, dim=0)) > 0.999
