"""The training worker: ``torchrun --nproc_per_node N -m engine.train <flags>``.

Reads top to bottom: setup → train → save → cleanup. Distributed mode comes from torchrun's
environment (gloo on the CPU, NCCL on GPUs); rank 0 alone writes the run folder, TensorBoard and
events. Every decision that must be the same on all ranks (skip a non-finite step, a command, a stop
signal) is taken from one all-gather per optimizer step, so all ranks act at the same step boundary.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
import time
from pathlib import Path

from engine.config import TrainConfig, add_flags, resolve, write_config
from engine.util import UsageError
from engine.worker.dist import Dist, FlatGradSync

# --------------------------------------------------------------------------------------------- setup


def resolve_run(args: argparse.Namespace, d: Dist) -> tuple[TrainConfig, Path, bool]:
    """The config and run folder, for a new run or ``--resume RUN``."""
    from engine.runs import find_run, merge_saved_config, new_run_dir

    if args.resume:
        run_dir = find_run(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UsageError(f"--resume {args.resume}: no run folder with a config.toml")
        merge_saved_config(args, run_dir)
        return resolve(args), run_dir, True
    cfg = resolve(args)
    name = cfg.output_dir or str(new_run_dir())
    run_dir = Path(d.broadcast(name))
    cfg.output_dir = str(run_dir)
    return cfg, run_dir, False


def lr_lambda(warmup: int, total: int, min_ratio: float, start: int = 0, start_ratio: float | None = None):
    """The learning rate as a share of --lr after ``step`` scheduler steps: linear warm-up, then a cosine
    to ``min_ratio`` at ``total``. With ``start_ratio`` (a resume that changed the total): from step
    ``start`` on, a cosine from ``start_ratio`` (the share in force at the checkpoint) to ``min_ratio`` at
    ``total``, so the rate never jumps."""
    def f(step: int) -> float:
        if start_ratio is not None and step >= start:
            progress = (step - start) / max(total - start, 1)
            return min_ratio + (start_ratio - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


def peak_flops(cfg: TrainConfig, device) -> float | None:
    import torch

    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


# --------------------------------------------------------------------------------------------- run


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resuming: bool, d: Dist) -> None:
        self.cfg, self.run_dir, self.resuming, self.d = cfg, run_dir, resuming, d
        self.step = 0
        self.epoch = 0
        self.micro = 0  # next micro-batch of the epoch's plan
        self.best_loss = math.inf
        self.best_step = 0
        self.bad_evals = 0
        self.preview = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
        self.sink = None
        self.tb = None
        self.telemetry = None
        self.saved_step = -1
        self.preview_cost = 0.0  # seconds the last previews took (all ranks agree)
        self.since_preview = 0.0  # training seconds since then (slowest rank)
        self.preview_pending = False
        self._score_failed = False  # a preview's ROUGE-L could not be computed (said once)
        self.grad_sync = None  # FlatGradSync with several ranks and --grad_sync flat
        self._pool = None  # the helper thread that builds the next step's tensors (_micro_batches)
        self._next = None

    # ---- output
    def emit(self, event) -> None:
        if self.sink is not None:
            self.sink.emit(event)

    def log(self, message: str) -> None:
        if self.d.main:
            print(f"[voxtui] {message}", file=sys.stderr, flush=True)

    def setup(self) -> None:
        import numpy as np
        import torch

        from engine.formatting import load_format
        from engine.protocol import ParamRow, ParamTable, RunInfo, Status
        from engine.worker import batching, checkpoint
        from engine.worker.modeling import (
            CausalLMLoss,
            load_model,
            matmul_params,
            param_table,
            render_param_table,
        )
        from engine.worker.sinks import ControlInbox, JsonlSink, NullSink, PushSink

        cfg, d = self.cfg, self.d
        engine = _read_engine(cfg.engine) if cfg.engine and d.main else None  # only rank 0 talks to the engine
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import msgspec

            write_config(msgspec.structs.replace(cfg, engine=""), self.run_dir / "config.toml")  # launch detail
            checkpoint.remove_partial(self.run_dir / "checkpoints")
        run_id = self.run_dir.name
        endpoints = (engine or {}).get("endpoints", engine or {})
        if engine:
            self.sink = PushSink(endpoints["worker_events"], run_id, spool=self.run_dir / "spool")
        else:
            self.sink = JsonlSink(self.run_dir / "events.jsonl", run_id) if d.main and not cfg.engine else NullSink()
        self.inbox = ControlInbox(endpoints.get("worker_control") if engine else None,
                                  engine_timeout=float(os.environ.get("VOXTUI_ENGINE_TIMEOUT", "30")))
        self.inbox.install_signal_handlers()
        self.emit(Status(state="starting", message=f"rank 0 of {d.world} on {socket.gethostname()}"))

        if d.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        import random
        random.seed(cfg.seed + d.rank)

        # data: rank 0 tokenizes (or hits the cache) first; the others then read the cache
        self.fmt = load_format(cfg.model_id)
        cache_dir = cfg.cache_dir or str(self.run_dir.parent / "_cache")
        t0 = time.perf_counter()
        if d.main:
            self.train_tok = batching.tokenize(cfg.train_jsonl, self.fmt, cfg.max_len, cfg.long, cache_dir)
        d.barrier()
        if not d.main:
            self.train_tok = batching.tokenize(cfg.train_jsonl, self.fmt, cfg.max_len, cfg.long, cache_dir)
        self.val_tok = None
        if cfg.val_jsonl:
            if d.main:
                self.val_tok = batching.tokenize(cfg.val_jsonl, self.fmt, cfg.max_len, cfg.long, cache_dir)
            d.barrier()
            if not d.main:
                self.val_tok = batching.tokenize(cfg.val_jsonl, self.fmt, cfg.max_len, cfg.long, cache_dir)
        self.log(f"data: {len(self.train_tok)} train rows ({'cache hit' if self.train_tok.cache_hit else 'tokenized'}"
                 f" in {time.perf_counter() - t0:.2f}s), {self.train_tok.truncated} truncated, "
                 f"{self.train_tok.dropped} dropped over --max_len {cfg.max_len}")
        # the plan preflight computed too (batching.plan_run): a run that cannot make one step stops here,
        # before the model loads, with the change that fixes it
        self.run_plan = batching.plan_run(self.train_tok, cfg, d.world)
        if self.run_plan.problem:
            raise UsageError(self.run_plan.problem)
        self.log(f"plan: {self.run_plan.summary()}")
        if self.run_plan.shrunk:
            from engine.protocol import Log

            self.emit(Log(level="info", message=self.run_plan.summary()))
        self.previews = self._preview_rows()

        # model
        if cfg.compile:  # compiled kernels are cached beside the token cache: the next start reuses them
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir).resolve() / "inductor"))
        t0 = time.perf_counter()
        self.model, self.model_removed = load_model(cfg, d.device)
        self.model.train()
        self.log(f"model loaded in {time.perf_counter() - t0:.1f}s")
        if cfg.packing:
            from engine.worker.attention import gqa_mode, varlen_available

            kind = (f"varlen FlashAttention (torch.nn.attention.varlen, grouped heads: {gqa_mode()})"
                    if d.device.type == "cuda" and varlen_available() else "SDPA example by example")
            self.log(f"packed rows of {self.run_plan.budget} tokens, attention: {kind}")
        rows, trainable, total = param_table(self.model, removed=self.model_removed)
        self.log("parameters:\n" + render_param_table(rows, trainable, total))
        self.emit(ParamTable(rows=[ParamRow(*r) for r in rows], trainable=trainable, total=total))
        self.matmul_params = matmul_params(self.model)
        self.peak = peak_flops(cfg, d.device)
        self.loss_module = CausalLMLoss(self.model)
        params = self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if d.world > 1 and cfg.grad_sync == "flat":
            self.grad_sync = FlatGradSync(params, d)
            self.log(f"{d.world} ranks: one all-reduce of {sum(p.numel() for p in params):,} gradient values per step")
        elif d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if cfg.compile and d.device.type == "cuda" and os.environ.get("VOXTUI_DDP_SPLIT_GRAPHS") != "1":
                # each decoder layer is its own compiled graph, so DDP's hooks already fire layer by layer;
                # dynamo's DDPOptimizer would split every layer's graph at bucket edges (less fusion, more memory)
                torch._dynamo.config.optimize_ddp = False
            # buffers (rotary tables) never change: no broadcast before each forward; gradients live in the
            # all-reduce buckets (no copy)
            self.loss_module = DDP(self.loss_module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                   broadcast_buffers=False, gradient_as_bucket_view=True)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                           fused=d.device.type == "cuda")
        self.plan_cache: dict[int, list] = {}
        self.steps_per_epoch = self.run_plan.steps_per_epoch
        self.total_steps = self.run_plan.total_steps
        self.schedule = {"total": self.total_steps, "start": 0, "start_ratio": None}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        if self.resuming:
            self._restore()
        if d.main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.emit(RunInfo(model_id=cfg.model_id, world_size=d.world, device=str(d.device),
                          train_rows=len(self.train_tok), val_rows=len(self.val_tok) if self.val_tok else 0,
                          total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                          config={k: getattr(cfg, k) for k in cfg.__struct_fields__},
                          cache_hit=self.train_tok.cache_hit, dropped_long=self.train_tok.dropped,
                          truncated_long=self.train_tok.truncated, preview=dict(self.preview)))
        if d.local_rank == 0:
            from engine.worker.telemetry import TelemetryThread

            gpus = list(range(torch.cuda.device_count())) if d.device.type == "cuda" else None
            if d.main and cfg.telemetry_interval > 0:
                self.telemetry = TelemetryThread(self._on_telemetry, cfg.telemetry_interval, gpus, d.rank)
                self.telemetry.start()

    def _zero_grad(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.zero()  # the gradients stay views into the all-reduce buffers
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _on_telemetry(self, ev) -> None:
        self.emit(ev)
        if self.tb is not None:
            for g in ev.gpus:
                for k in ("util", "mem_used", "power", "temp", "sm_clock"):
                    self.tb.add_scalar(f"gpu/{g.index}/{k}", getattr(g, k), self.step)
            if ev.rss is not None:
                self.tb.add_scalar("host/rss_gib", ev.rss, self.step)
                self.tb.add_scalar("host/cpu_percent", ev.cpu_percent or 0.0, self.step)

    def _preview_rows(self) -> list[tuple[list[int], str, str]]:
        from engine.rows import read_examples

        src = self.cfg.preview_file or self.cfg.val_jsonl
        if not src or self.cfg.preview_steps == 0 and not self.cfg.engine:
            return []
        out = []
        for _, ex in read_examples(src):
            (prompt, _), = self.fmt.encode([ex])
            out.append((prompt, ex.prompt_text, ex.target_text))
            if len(out) >= self.cfg.preview_count:
                break
        return out

    def plan(self, epoch: int) -> list:
        """This rank's micro-batches of ``epoch`` (and, in ``self.global_targets``, every micro-batch
        index's target-token count summed over all ranks: the loss normaliser, known without a collective)."""
        from engine.worker.batching import plan_epoch_all

        if epoch not in self.plan_cache:
            cfg, d = self.cfg, self.d
            if epoch == 0 and self.run_plan.plans is not None:
                plans = self.run_plan.plans
            else:
                plans = plan_epoch_all(self.train_tok, epoch, cfg.seed, cfg.per_device_bsz, d.world, cfg.max_len,
                                       cfg.packing, cfg.group_by_length, self.run_plan.budget)
            per_example = self.train_tok.lengths - self.train_tok.prompt_lens
            self.global_targets = [sum(int(per_example[x]) for p in plans for row in p[i] for x in row)
                                   for i in range(len(plans[0]))]
            self.plan_cache = {epoch: plans[d.rank]}
        return self.plan_cache[epoch]

    def _restore(self) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from engine.worker import checkpoint

        path = checkpoint.latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            self.log("resume: no complete checkpoint yet, starting from step 0")
            return
        state = checkpoint.load_trainer_state(path)
        weights = load_file(str(path / "adapter_model.safetensors"), device=str(self.d.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {path} does not fit this model: {result.unexpected_keys[:3]}")
        opt = torch.load(path / "optimizer.pt", map_location=self.d.device, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        self._resume_schedule(state)
        self.best_loss = state.get("best_loss") if state.get("best_loss") is not None else math.inf
        self.best_step, self.bad_evals = state.get("best_step", 0), state.get("bad_evals", 0)
        self.preview.update(state.get("preview", {}))
        if state.get("world_size") != self.d.world:
            self.log(f"resume: the run had {state.get('world_size')} ranks, now {self.d.world}: "
                     "the data order continues, but the result will not match an uninterrupted run exactly")
        rng = checkpoint.load_rng(path, self.d.rank)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, micro-batch {self.micro})")

    def _lr_lambda(self):
        s = self.schedule
        return lr_lambda(self.cfg.warmup_steps, s["total"], self.cfg.min_lr_ratio, s["start"], s["start_ratio"])

    def _resume_schedule(self, state: dict) -> None:
        """The learning-rate schedule after a resume. The same total: the run's own schedule, exactly. A
        different total (a new --max_steps or --epochs, another rank count): the warm-up, if not over, goes
        on into the new total's cosine; past it, the rate in force at the checkpoint decays by a cosine to
        --min_lr_ratio × --lr at the new total, so it never jumps back up."""
        saved = state.get("schedule") or {"total": state.get("total_steps"), "start": 0, "start_ratio": None}
        if saved["total"] == self.total_steps:
            self.schedule = dict(saved)
        else:
            from engine.protocol import Log

            lr, base = self.scheduler.get_last_lr()[0], self.scheduler.base_lrs[0]
            floor = self.cfg.min_lr_ratio * base
            if self.step < self.cfg.warmup_steps and saved.get("start_ratio") is None:
                self.schedule = {"total": self.total_steps, "start": 0, "start_ratio": None}
                message = (f"resume: {saved['total']} steps before, {self.total_steps} now; still warming up "
                           f"(step {self.step} of {self.cfg.warmup_steps}): the warm-up goes on, then a cosine to "
                           f"{floor:.3g} at step {self.total_steps}")
            else:
                self.schedule = {"total": self.total_steps, "start": self.step, "start_ratio": lr / base}
                message = (f"resume: {saved['total']} steps before, {self.total_steps} now: the learning rate "
                           f"goes on from {lr:.3g} (in force at step {self.step}) and decays by a cosine to "
                           f"{floor:.3g} at step {self.total_steps}")
            self.log(message)
            self.emit(Log(level="info", message=message))
        self.scheduler.lr_lambdas = [self._lr_lambda() for _ in self.scheduler.lr_lambdas]

    # ---- the loop
    def train(self) -> str:
        """Runs until done, stopped or failed; returns the final state."""
        import torch

        from engine.protocol import Alert, Status, Step

        cfg, d = self.cfg, self.d
        self.emit(Status(state="running", step=self.step))
        fault_nan = int(os.environ.get("VOXTUI_FAULT_NAN_STEP", "0"))
        packed = cfg.packing
        ddp = d.world > 1 and self.grad_sync is None  # else one rank, or the flat all-reduce after the backward
        while self.step < self.total_steps:
            plan = self.plan(self.epoch)
            if self.micro + cfg.grad_accum > len(plan):
                self.epoch += 1
                self.micro = 0
                continue
            t0 = time.perf_counter()
            micro = self._micro_batches(plan, packed)
            n_global = float(sum(self.global_targets[self.micro:self.micro + cfg.grad_accum]))
            loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
            for i, m in enumerate(micro):
                batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in m.items()}
                sync = i == len(micro) - 1
                ctx = self.loss_module.no_sync() if ddp and not sync else contextlib.nullcontext()
                with ctx, self._autocast():
                    total, _ = self.loss_module(**batch)
                    if fault_nan and self.step + 1 == fault_nan:
                        total = total * float("nan")
                    # DDP averages the ranks' gradients, the flat sync sums them: either way the mean over
                    # every rank's target tokens
                    (total * ((d.world if ddp else 1) / max(n_global, 1.0))).backward()
                loss_sum += total.detach().double()
            if self.grad_sync is not None:
                self.grad_sync.all_reduce()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)  # the step's GPU work counts in its time (the gather below waits anyway)
            step_time = time.perf_counter() - t0
            real = sum(m["real_tokens"] for m in micro)
            slots = sum(m["slots"] for m in micro)
            commands = self.inbox.poll()  # rank 0: engine commands and signals; others: signals only
            stop_signal = any(type(c).__name__ == "Stop" for c in commands)
            if not d.main:
                commands = []
            gathered = d.all_gather([float(loss_sum), real, slots, step_time, float(bool(commands)),
                                     float(grad_norm), float(stop_signal)])
            loss = float(gathered[:, 0].sum()) / max(n_global, 1.0)
            gnorm = float(gathered[0, 5])
            nonfinite = "loss" if not math.isfinite(loss) else ("grad_norm" if not math.isfinite(gnorm) else "")
            lr = self.scheduler.get_last_lr()[0]
            if nonfinite:
                self._zero_grad()
                self.emit(Alert(level="error", kind=f"nan_{nonfinite}", step=self.step + 1,
                                message=f"non-finite {nonfinite} at step {self.step + 1}: "
                                        + ("update skipped" if cfg.on_nan == "skip" else "saving and stopping")))
                if cfg.on_nan == "stop":
                    self.save(reason="nan")
                    self.emit(Status(state="failed", step=self.step, message=f"non-finite {nonfinite} at step {self.step + 1}"))
                    return "failed"
            else:
                self.optimizer.step()
                self._zero_grad()
            self.scheduler.step()
            self.step += 1
            self.micro += cfg.grad_accum
            times = gathered[:, 3]
            toks = gathered[:, 1]
            slowest = float(times.max())
            tps = float(toks.sum()) / max(slowest, 1e-9)
            mfu = (tps * 4 * self.matmul_params / (self.peak * d.world)) if self.peak else None
            if d.main and (self.step % cfg.log_steps == 0 or nonfinite):
                ev = Step(step=self.step, loss=loss if math.isfinite(loss) else None, lr=lr,
                          grad_norm=gnorm if math.isfinite(gnorm) else None, tokens_per_s=tps,
                          epoch=self.epoch + self.micro / max(len(plan), 1), tokens=int(toks.sum()),
                          tokens_per_s_rank=[float(t / max(s, 1e-9)) for t, s in zip(toks, times)],
                          step_time=slowest, step_time_rank=[float(s) for s in times],
                          pad_frac=1 - float(gathered[:, 1].sum()) / max(float(gathered[:, 2].sum()), 1.0),
                          mfu=mfu, skipped=bool(nonfinite), nonfinite=nonfinite, **self._memory())
                self.emit(ev)
                self._tb_step(ev)
            # commands and signals act here, on every rank, at this step boundary
            actions = self._agree(commands, bool(gathered[:, 4].max()))
            if gathered[:, 6].max() > 0:
                actions.add("stop")
            if "stop" in actions:
                self.emit(Status(state="stopping", step=self.step, message="stop requested: saving"))
                return "stopped" if self.save(reason="stop") else "save_failed"
            if self._due(cfg.eval_steps) or "eval" in actions:
                if self.evaluate() == "early_stop":
                    self.save(reason="early_stop")
                    return "early_stopped"
            self.since_preview += slowest
            if self._due(cfg.preview_steps):
                self.preview_pending = True
            if "preview" in actions or (self.preview_pending and self._preview_affordable()):
                self._timed_previews()
            if self._due(cfg.save_steps) or "save" in actions:
                self.save(reason="periodic")
            if "pause" in actions:
                if self._pause() == "stop":
                    self.save(reason="stop")
                    return "stopped"
        if self.val_tok is not None and not self._due(cfg.eval_steps):
            self.evaluate()
        return "finished" if self.save(reason="final", final=True) else "save_failed"

    def _micro_batches(self, plan: list, packed: bool) -> list[dict]:
        """The tensors of the next step's micro-batches; the following step's are prepared on a helper
        thread meanwhile, in pinned memory, so the GPU does not wait for the host between steps."""
        from concurrent.futures import ThreadPoolExecutor

        from engine.worker.batching import collate

        cfg = self.cfg
        pin = self.d.device.type == "cuda"

        def build(p, start):
            out = []
            for i in range(cfg.grad_accum):
                m = collate(self.train_tok, p[start + i], self.fmt.pad, packed, budget=self.run_plan.budget,
                            max_len=cfg.max_len)
                if pin:
                    m = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in m.items()}
                out.append(m)
            return out

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="collate")
        key = (id(plan), self.micro)
        if self._next is not None and self._next[0] == key:
            micro = self._next[1].result()
        else:
            micro = build(plan, self.micro)
        after = self.micro + cfg.grad_accum
        self._next = ((id(plan), after), self._pool.submit(build, plan, after)) if after + cfg.grad_accum <= len(plan) else None
        return micro

    def _preview_affordable(self) -> bool:
        """Whether the training time since the last preview pays for one within --preview_budget
        (the same answer on every rank: both numbers come from collectives)."""
        b = self.cfg.preview_budget
        return b <= 0 or self.since_preview * b >= self.preview_cost

    def _timed_previews(self) -> None:
        t = time.perf_counter()
        self.run_previews()
        cost = float(self.d.broadcast(time.perf_counter() - t))
        if self.preview_cost == 0.0 and self.cfg.preview_budget > 0:
            from engine.protocol import Log

            message = (f"previews take {cost:.1f}s: with --preview_budget {self.cfg.preview_budget:g} the next runs "
                       f"after at least {cost / self.cfg.preview_budget:.0f}s of training")
            self.log(message)
            self.emit(Log(level="info", message=message))
        self.preview_cost, self.since_preview, self.preview_pending = cost, 0.0, False

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0 and self.step < self.total_steps

    def _autocast(self):
        import torch

        if self.cfg.bf16 and self.d.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _memory(self) -> dict:
        import torch

        if self.d.device.type != "cuda":
            return {}
        g = 2**30
        return {"mem_allocated": torch.cuda.memory_allocated() / g, "mem_reserved": torch.cuda.memory_reserved() / g,
                "mem_peak": torch.cuda.max_memory_allocated() / g}

    def _tb_step(self, ev) -> None:
        if self.tb is None:
            return
        s = ev.step
        if ev.loss is not None:
            self.tb.add_scalar("train/loss", ev.loss, s)
        if ev.grad_norm is not None:
            self.tb.add_scalar("train/grad_norm", ev.grad_norm, s)
        self.tb.add_scalar("train/lr", ev.lr, s)
        self.tb.add_scalar("perf/tokens_per_s", ev.tokens_per_s, s)
        self.tb.add_scalar("perf/step_time", ev.step_time, s)
        self.tb.add_scalar("perf/pad_frac", ev.pad_frac, s)
        if ev.mfu is not None:
            self.tb.add_scalar("perf/mfu", ev.mfu, s)
        if ev.mem_peak:
            self.tb.add_scalar("mem/allocated_gib", ev.mem_allocated, s)
            self.tb.add_scalar("mem/peak_gib", ev.mem_peak, s)

    def _agree(self, commands: list, any_pending: bool) -> set[str]:
        """Rank 0's commands, shared with every rank; returns the actions for this boundary."""
        from engine.protocol import EvalNow, Pause, PreviewNow, SaveCheckpoint, SetPreviewParams, Stop

        if not any_pending:
            return set()
        commands = self.d.broadcast(commands if self.d.main else None)
        actions = set()
        for c in commands:
            if isinstance(c, SetPreviewParams):
                self._set_preview(c)
            if c.id:
                self._ack(c)
            match c:
                case PreviewNow():
                    actions.add("preview")
                case SaveCheckpoint():
                    actions.add("save")
                case EvalNow():
                    actions.add("eval")
                case Pause():
                    actions.add("pause")
                case Stop():
                    actions.add("stop")
        return actions

    def _pause(self) -> str:
        from engine.protocol import Resume, Status, Stop

        self.emit(Status(state="paused", step=self.step))
        self.log(f"paused at step {self.step}")
        while True:
            commands = self.inbox.poll() if self.d.main else []
            commands = self.d.broadcast(commands if self.d.main else None)
            kinds = {type(c) for c in commands}
            for c in commands:
                if c.type == "set_preview_params":
                    self._set_preview(c)
                if c.id:
                    self._ack(c)
            if Stop in kinds:
                return "stop"
            if Resume in kinds:
                self.emit(Status(state="running", step=self.step))
                return "resume"
            time.sleep(0.2)

    def _ack(self, c) -> None:
        from engine.protocol import Ack

        params = dict(self.preview) if c.type == "set_preview_params" else {}
        self.emit(Ack(id=c.id, command=c.type, step=self.step, params=params))

    def _set_preview(self, c) -> None:
        for k in ("temperature", "top_p", "max_new_tokens"):
            if getattr(c, k) is not None:
                self.preview[k] = getattr(c, k)

    # ---- evaluation, previews, checkpoints
    def evaluate(self) -> str:
        import torch

        from engine.protocol import Eval
        from engine.worker.batching import collate

        if self.val_tok is None or len(self.val_tok) == 0:
            return "none"
        d, cfg = self.d, self.cfg
        idx = list(range(d.rank, len(self.val_tok), d.world))
        idx.sort(key=lambda i: -int(self.val_tok.lengths[i]))
        model = getattr(self.loss_module, "module", self.loss_module)
        self.model.eval()
        loss_sum = 0.0
        tokens = 0
        from engine.worker.modeling import eager

        with torch.no_grad(), eager():
            for i in range(0, len(idx), cfg.per_device_bsz):
                m = collate(self.val_tok, [[x] for x in idx[i:i + cfg.per_device_bsz]], self.fmt.pad, False)
                batch = {k: v.to(d.device) for k, v in m.items() if torch.is_tensor(v)}
                with self._autocast():
                    total, n = model(**batch)
                loss_sum += float(total)
                tokens += int(n)
        self.model.train()
        g = d.all_gather([loss_sum, tokens])
        loss = float(g[:, 0].sum()) / max(float(g[:, 1].sum()), 1.0)
        improved = loss < self.best_loss - cfg.early_stopping_min_delta
        if improved:
            self.best_loss, self.best_step, self.bad_evals = loss, self.step, 0
        else:
            self.bad_evals += 1
        patience_left = max(cfg.early_stopping_patience - self.bad_evals, 0) if cfg.early_stopping_patience else 0
        self.emit(Eval(step=self.step, loss=loss, ppl=math.exp(min(loss, 50)), tokens=int(g[:, 1].sum()),
                       best_loss=self.best_loss, best_step=self.best_step, improved=improved,
                       patience_left=patience_left))
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", loss, self.step)
            self.tb.add_scalar("eval/ppl", math.exp(min(loss, 50)), self.step)
            self.tb.flush()
        self.log(f"eval step {self.step}: loss {loss:.4f} ppl {math.exp(min(loss, 50)):.2f}"
                 + (" (best)" if improved else ""))
        if improved and self.step < self.total_steps and cfg.save_steps:
            self.save(reason="best")
        if cfg.early_stopping_patience and self.bad_evals >= cfg.early_stopping_patience:
            self.log(f"early stopping: {self.bad_evals} evaluations without improvement")
            return "early_stop"
        return "ok"

    def run_previews(self) -> None:
        from engine.protocol import Preview
        from engine.worker.modeling import eager, generate

        if not self.previews:
            return
        d, p = self.d, self.preview
        mine = list(range(d.rank, len(self.previews), d.world))  # spread over the ranks
        seed = self.cfg.seed + self.step
        texts = []
        if mine:
            with eager():
                outs = generate(self.model, [self.previews[i][0] for i in mine],
                                int(p["max_new_tokens"]), float(p["temperature"]), float(p["top_p"]), seed,
                                self.fmt.eos, self.fmt.pad, d.device)
            texts = [(i, self.fmt.decode(o)) for i, o in zip(mine, outs)]
        everything = d.gather(texts)
        if not d.main:
            return
        for rank, part in enumerate(everything):
            for i, text in part:
                _, prompt, reference = self.previews[i]
                ev = Preview(step=self.step, prompt=prompt, text=text, temperature=float(p["temperature"]),
                             top_p=float(p["top_p"]), max_new_tokens=int(p["max_new_tokens"]), index=i,
                             reference=reference, rank=rank, seed=seed,
                             rougeL=self._preview_score(text, reference) if reference else None)
                self.emit(ev)
                if self.tb is not None:
                    self.tb.add_text(f"preview/{i}", f"**prompt** {prompt}\n\n**output** {text}", self.step)

    def _preview_score(self, text: str, reference: str) -> float | None:
        """A preview's ROUGE-L, best effort: a score that cannot be computed (rouge-score missing, say) is
        left out, once said, and never stops training."""
        from engine.eval.metrics import rouge_l

        try:
            return rouge_l(text, reference)
        except Exception as e:
            if not self._score_failed:
                from engine.protocol import Log

                self._score_failed = True
                message = f"previews go without ROUGE-L: {type(e).__name__}: {e}"
                self.log(message)
                self.emit(Log(level="warning", message=message))
            return None

    def save(self, reason: str, final: bool = False) -> bool:
        """Write a checkpoint (rank 0; the others wait). A failed write (a full disk, say) is reported
        and leaves the previous checkpoint as it was; returns False then."""
        from engine.protocol import Alert, Checkpoint
        from engine.worker import checkpoint

        d = self.d
        if self.saved_step == self.step and not final:
            return True  # this step is already saved (e.g. a best checkpoint, then the periodic one)
        self.saved_step = self.step
        states = d.gather(checkpoint.rng_state())
        ok = True
        if d.main:
            state = {"step": self.step, "epoch": self.epoch, "micro": self.micro, "world_size": d.world,
                     "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
                     "best_step": self.best_step, "bad_evals": self.bad_evals, "preview": self.preview,
                     "total_steps": self.total_steps, "schedule": self.schedule, "reason": reason, "time": time.time(),
                     "model_id": self.cfg.model_id,
                     "config": {k: getattr(self.cfg, k) for k in self.cfg.__struct_fields__}}
            slow = float(os.environ.get("VOXTUI_FAULT_SLOW_SAVE", "0"))
            root = self.run_dir / "checkpoints"
            try:
                path = checkpoint.save_checkpoint(root, self.step, self.model, self.optimizer, self.scheduler, states,
                                                  state, slow_hook=(lambda: time.sleep(slow)) if slow else None)
                checkpoint.prune(root, self.cfg.save_total_limit, self.best_step or None)
                if final:
                    checkpoint.save_adapter_atomically(self.model, self.run_dir / "lora_final")
            except Exception as e:  # OSError, or safetensors' own error for the same full disk
                ok = False
                self.saved_step = -1
                previous = checkpoint.latest_checkpoint(root)
                reason_text = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
                msg = (f"checkpoint at step {self.step} not written: {reason_text}; "
                       + (f"{previous} is intact" if previous else "no earlier checkpoint exists"))
                self.emit(Alert(level="error", kind="checkpoint_failed", step=self.step, message=msg))
                self.log(msg)
            if ok:
                best = self.best_step == self.step and math.isfinite(self.best_loss)
                self.emit(Checkpoint(step=self.step, path=str(path), best=best,
                                     val_loss=self.best_loss if best else None, final=final))
                self.log(f"checkpoint {path} ({reason})")
            if self.tb is not None:
                self.tb.flush()
        d.barrier()
        return bool(d.broadcast(ok))

    def cleanup(self, state: str, error: str = "") -> None:
        from engine.protocol import Status

        if self.telemetry is not None:
            self.telemetry.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if state in ("finished", "stopped", "early_stopped"):
            lost = state == "stopped" and getattr(self, "inbox", None) is not None and self.inbox.engine_lost
            outcome = "engine_lost" if lost else {"finished": "completed"}.get(state, state)
            message = {"completed": "done", "stopped": "stopped on request", "early_stopped": "early stopping",
                       "engine_lost": "the engine went away: saved and stopped"}[outcome]
            self.emit(Status(state="finished", step=self.step, message=message, outcome=outcome))
        elif state == "error":
            self.emit(Status(state="failed", step=self.step, message=error))
        elif state == "save_failed":
            self.emit(Status(state="failed", step=self.step, message="the last checkpoint could not be written"))
        if self.tb is not None:
            self.tb.close()
        if self.sink is not None:
            self.sink.close()
        if hasattr(self, "inbox"):
            self.inbox.close()


def _read_engine(path: str) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--engine {path}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m engine.train",
                                description="voxtui's training worker: LoRA / QLoRA on Voxtral's language model.")
    add_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN (a run folder or a name under runs/) from its "
                                                  "latest complete checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    d = None
    trainer = None
    try:
        d = Dist()
        cfg, run_dir, resuming = resolve_run(args, d)
        trainer = Trainer(cfg, run_dir, resuming, d)
        trainer.setup()
        state = trainer.train()
        trainer.cleanup(state)
        return 1 if state in ("failed", "save_failed") else 0
    except UsageError as e:
        print(f"voxtui: error: {e}", file=sys.stderr)
        if trainer is not None:
            trainer.cleanup("error", str(e))
        return 2
    except Exception as e:
        import traceback

        traceback.print_exc()
        if trainer is not None:
            from engine.protocol import Alert

            trainer.emit(Alert(level="error", kind="exception", message=f"{type(e).__name__}: {e}",
                               rank=d.rank if d else None))
            trainer.cleanup("error", f"{type(e).__name__}: {e}")
        return 1
    finally:
        if d is not None:
            d.close()


if __name__ == "__main__":
    sys.exit(main())
