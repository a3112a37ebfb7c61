"""Environment knobs for tests and benchmarks: the one place the worker reads the environment for them.

None of them is needed to train; a run is configured by its TrainConfig (engine/config.py). They are read
once per process (``knobs()``), and a value that is not a number stops the worker with one line (exit 2).

``VOXTUI_FAULT_NAN_STEP=N``
    step N's loss is made NaN (the tests of ``--on_nan``)
``VOXTUI_FAULT_SLOW_SAVE=S``
    every checkpoint write sleeps S seconds midway (the tests that kill a run while it saves)
``VOXTUI_FAULT_DISK_FULL=PATH``
    while the file PATH exists, every checkpoint write fails midway as on a full disk (``OSError`` ENOSPC);
    removing it is freeing space (the tests of a full disk: the run pauses, a resume saves again)
``VOXTUI_STEP_PAUSE=S``
    after each step the worker sleeps S seconds (the tests whose runs train on while they watch the engine
    and the dashboard: such a run then idles most of the time instead of taking a core from the tests
    beside it on a small machine; commands still act at the next step boundary)
``VOXTUI_ENGINE_TIMEOUT=S``
    overrides ``--engine_timeout`` for this process, without changing the run's config.toml (the engine
    and chaos tests stop engines on purpose, and set it low for every process they start)
``VOXTUI_DDP_SPLIT_GRAPHS=1``
    with ``--grad_sync ddp`` and ``--compile`` on GPUs, leaves dynamo's DDPOptimizer on, which splits each
    compiled layer at DDP's buckets (the comparison in bench/throughput.py; docs/benchmarks.md)
``VOXTUI_NF4_BNB_FORWARD=1``
    with --quant nf4, the 4-bit layers keep bitsandbytes' own forward instead of voxtui's traceable one
    (engine/worker/nf4.py; the comparison in bench/throughput.py)
``VOXTUI_NF4_KEEP_WEIGHTS=1``
    with --quant nf4 and --compile on a GPU, a decoder layer that is not checkpointed keeps its 4-bit
    weights dequantised (bf16) from its forward for its backward, as Inductor's partition chooses, instead
    of dequantising them again in the backward (engine/worker/nf4.py; the ``-keepw`` comparison in
    bench/throughput.py)
``VOXTUI_FUSION=none|nf4|all``
    which layers run q/k/v and gate/up as one product each (engine/worker/fusion.py): none (default), NF4
    ones, or all (each measured slower on an H200, bf16's also larger: the comparisons in bench/throughput.py)
``VOXTUI_INDUCTOR=default|coordinate|autotune``
    with --compile on a GPU, how Inductor tunes the compiled layers' kernels: its defaults, coordinate
    descent over each generated kernel's launch settings, or max-autotune (Triton templates for the
    products too, so elementwise work can fuse into them; a longer first compile). On an H200 neither paid:
    coordinate descent left NF4 as fast, max-autotune's compile outlasted 240 s (docs/benchmarks.md, runs
    N, O; the comparisons in bench/throughput.py, ``-cdt``, ``-autotune``)
``VOXTUI_CUDA_GRAPHS=1``
    with --compile on a GPU, each compiled layer's forward and backward are replayed as CUDA graphs
    (Inductor's CUDA graph trees): one launch a layer instead of one a kernel. A packed row's example
    boundaries are padded with empty examples to a few fixed counts, so the graphs see few shapes
    (batching.collate); the adapters' gradients are kept in their own memory, zeroed in place (step.py).
    Measured on an H200: the same speed (the step is bound by its kernels, not their launching;
    docs/benchmarks.md, runs AA–AB; the ``-graphs`` comparisons in bench/throughput.py)
``VOXTUI_DENSE_ATTENTION=N``
    in packed rows on a GPU, examples of N tokens or more are laid at the row's end and each gets its own
    cuDNN attention call, the rest one varlen FlashAttention call (attention.packed_attention); 0: every
    example through FlashAttention. Default: 2048 on a Hopper GPU (cuDNN measured 1.7× FlashAttention 2
    from 2,048 tokens on an H200, 1.1× at 1,024: docs/benchmarks.md, run AM), 0 elsewhere; never with
    VOXTUI_CUDA_GRAPHS (the row's shapes must stay few)
``VOXTUI_CHECKPOINT=inside|around``
    with --grad_ckpt, where each checkpointed layer's checkpoint is taken (modeling.checkpoint_layers): in
    the layer's forward (default), so a compiled layer's recompute is part of its compiled backward, or
    around the layer's call, where the backward enters each compiled layer again (measured slower for every
    quantisation on an H200 at the same memory: the ``-ckptout`` comparisons in bench/throughput.py)
``VOXTUI_EAGER_CE=1``
    with --compile on a GPU, the fused head's softmax and gradient run as eager operations instead of
    compiled kernels (modeling.fused_head_ce; the comparison in bench/throughput.py)
``VOXTUI_STEP_OVERLAP=0``
    the step boundary as it was: AdamW's update launched after the host has the step's numbers and each
    step's batch sent to the device when the step starts, instead of both queued before the host waits for
    the previous step's GPU work (step.Update.ahead, feed.Feed.prefetch; the ``-nooverlap`` comparison in
    bench/throughput.py)
``VOXTUI_PROFILE_STEPS=A:B``
    steps A to B (counted from 1) run under ``torch.profiler``; rank 0 writes the kernels' table, sorted by
    device time and summed by kind (matmuls, attention, fused elementwise, ...), and how long the GPU sat
    idle with the host operation under way in each gap, to ``<run>/profile.txt`` (``bench/throughput.py
    --profile``)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from engine.util import UsageError


@dataclass(frozen=True)
class Knobs:
    nan_step: int = 0  # 0: no fault
    slow_save: float = 0.0  # seconds; 0: no fault
    disk_full: str = ""  # a file: while it exists, checkpoint writes fail with ENOSPC; "": no fault
    step_pause: float = 0.0  # seconds slept after each step
    engine_timeout: float | None = None  # None: --engine_timeout holds
    ddp_split_graphs: bool = False
    profile_steps: tuple[int, int] | None = None  # (first, last), counted from 1
    nf4_bnb_forward: bool = False
    nf4_keep_weights: bool = False
    eager_ce: bool = False
    fusion: str = "none"  # none | nf4 | all
    inductor: str = "default"  # default | coordinate | autotune
    checkpoint: str = "inside"  # inside | around
    step_overlap: bool = True
    cuda_graphs: bool = False
    dense_attention: int | None = None  # None: attention.dense_min's default for the device


def _number(name: str, kind: type, env) -> int | float | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{name}={text}: not {'a whole number' if kind is int else 'a number'}") from None
    if value < 0 or (kind is float and value != value):
        raise UsageError(f"{name}={text}: must be 0 or more")
    return value


def read(env=None) -> Knobs:
    """The knobs in ``env`` (default: this process's environment)."""
    env = os.environ if env is None else env
    timeout = _number("VOXTUI_ENGINE_TIMEOUT", float, env)
    if timeout is not None and timeout <= 0:
        raise UsageError(f"VOXTUI_ENGINE_TIMEOUT={env['VOXTUI_ENGINE_TIMEOUT']}: must be above 0")
    pause = _number("VOXTUI_STEP_PAUSE", float, env) or 0.0
    if pause > 60:
        raise UsageError(f"VOXTUI_STEP_PAUSE={env['VOXTUI_STEP_PAUSE']}: at most 60 (seconds)")
    return Knobs(nan_step=_number("VOXTUI_FAULT_NAN_STEP", int, env) or 0,
                 slow_save=_number("VOXTUI_FAULT_SLOW_SAVE", float, env) or 0.0,
                 disk_full=env.get("VOXTUI_FAULT_DISK_FULL", "").strip(),
                 step_pause=pause,
                 engine_timeout=timeout,
                 ddp_split_graphs=env.get("VOXTUI_DDP_SPLIT_GRAPHS") == "1",
                 profile_steps=_steps("VOXTUI_PROFILE_STEPS", env),
                 nf4_bnb_forward=env.get("VOXTUI_NF4_BNB_FORWARD") == "1",
                 nf4_keep_weights=_choice("VOXTUI_NF4_KEEP_WEIGHTS", ("0", "1"), "0", env) == "1",
                 eager_ce=env.get("VOXTUI_EAGER_CE") == "1",
                 fusion=_choice("VOXTUI_FUSION", ("none", "nf4", "all"), "none", env),
                 inductor=_choice("VOXTUI_INDUCTOR", ("default", "coordinate", "autotune"), "default", env),
                 checkpoint=_choice("VOXTUI_CHECKPOINT", ("inside", "around"), "inside", env),
                 step_overlap=_choice("VOXTUI_STEP_OVERLAP", ("0", "1"), "1", env) == "1",
                 cuda_graphs=_choice("VOXTUI_CUDA_GRAPHS", ("0", "1"), "0", env) == "1",
                 dense_attention=_number("VOXTUI_DENSE_ATTENTION", int, env))


def _choice(name: str, options: tuple[str, ...], default: str, env) -> str:
    text = env.get(name, "").strip()
    if not text:
        return default
    if text not in options:
        raise UsageError(f"{name}={text}: must be one of {', '.join(options)}")
    return text


def _steps(name: str, env) -> tuple[int, int] | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    first, _, last = text.partition(":")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise UsageError(f"{name}={text}: not A:B (two step numbers)") from None
    if not 1 <= a <= b:
        raise UsageError(f"{name}={text}: needs 1 <= A <= B")
    return a, b


@functools.cache
def knobs() -> Knobs:
    """This process's knobs, read once."""
    return read()
