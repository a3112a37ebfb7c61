"""The training worker: ``torchrun --nproc_per_node N -m engine.train <flags>``.

Reads top to bottom as torchtune's recipes do: ``setup`` (``_setup_output``, ``_setup_data``,
``_setup_model``, ``_setup_optimizer``, a resumed run's ``_restore``) → ``train`` (one optimizer step at a
time, then what its boundary asks for) → ``save`` → ``cleanup``. Distributed mode comes from torchrun's
environment (gloo on the CPU, NCCL on GPUs); rank 0 alone writes the run folder, TensorBoard and
events. Every decision that must be the same on all ranks (skip a non-finite step, a command, a stop
signal) is taken from one all-gather per optimizer step, so all ranks act at the same step boundary.

The rooms beside it: cli.py (the flags, the run folder), feed.py (each step's data), step.py (a step's
arithmetic), dist.py (ranks, the gradient sync), schedule.py (the learning rate), control.py (commands,
pause), evaluation.py (validation loss, previews), saving.py (checkpoints, resume), report.py (events,
log, TensorBoard), knobs.py (the environment knobs of tests and benchmarks).
"""

from __future__ import annotations

import math
import socket
import sys
import time
from pathlib import Path

from engine.config import TrainConfig, write_config
from engine.protocol import Alert, Status
from engine.util import UsageError, first_on_its_node, print_traceback, printable, shell_quote
from engine.worker.cli import SAID_FIRST_S, build_parser, read_engine, resolve_run
from engine.worker.dist import Dist, data_parallel
from engine.worker.knobs import knobs
from engine.worker.profiling import phase
from engine.worker.report import Board, Report, peak_flops, step_event
from engine.worker.saving import Saver
from engine.worker.schedule import Schedule, resumed

SETTLED = 2  # steps after which what training compiles has been compiled (Trainer._settle)


class Trainer:
    """One run on this rank: the state exact resume needs (step, epoch, micro-batch) and the parts that
    act on it, made in ``setup``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resuming: bool, d: Dist) -> None:
        self.cfg, self.run_dir, self.resuming, self.d = cfg, run_dir, resuming, d
        self.knobs = knobs()
        self.profiler = None
        if self.knobs.profile_steps and d.main:
            from engine.worker.profiling import StepProfiler

            self.profiler = StepProfiler(self.knobs.profile_steps, run_dir / "profile.txt")
        self.out = Report(d.main)
        self.step = 0
        self.steps_here = 0  # optimizer steps this process ran (a resumed run starts again at 0)
        self.epoch = 0
        self.micro = 0  # next micro-batch of the epoch's plan
        self.resumed = ""  # a resumed run: from where, at which learning rate (its "running" status says it)
        self.saved_step = -1
        self.full = ""  # the last save failed for want of space: why (saving.no_space); "" otherwise
        self.stopped_unsaved = ""  # a stop asked for while the disk was full, whose checkpoint did not fit: why
        self.control = None
        self.telemetry = None
        self.feed = None

    def emit(self, event) -> None:
        self.out.emit(event)

    def log(self, message: str) -> None:
        self.out.log(message)

    def setup(self) -> None:
        """Everything before the first step. A run that cannot make one step stops in ``_setup_data``,
        before the model loads."""
        import random

        import numpy as np
        import torch

        self._setup_output()
        cfg, d = self.cfg, self.d
        if d.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        if self.resuming:
            self._restore()
        self._start_reporting()

    def _setup_output(self) -> None:
        """The run folder (rank 0), where events go and where commands come from."""
        import msgspec

        from engine.worker import checkpoint
        from engine.worker.control import Control

        cfg, d = self.cfg, self.d
        engine = read_engine(cfg.engine) if cfg.engine and d.main else None  # only rank 0 talks to the engine
        if d.main:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one private, as the engine makes it
            write_config(msgspec.structs.replace(cfg, engine=""), self.run_dir / "config.toml")  # launch detail
            checkpoint.remove_partial(self.run_dir / "checkpoints")
        self.out.open(self.run_dir, engine, standalone=d.main and not cfg.engine)
        endpoint = engine.get("endpoints", engine).get("worker_control") if engine else None
        timeout = self.knobs.engine_timeout if self.knobs.engine_timeout is not None else cfg.engine_timeout
        self.control = Control(endpoint, timeout, d, self.out)
        self.emit(Status(state="starting", message=f"rank 0 of {d.world} on {socket.gethostname()}"))

    def _setup_data(self) -> None:
        """The training rows tokenised and planned (feed.py), the validation rows, the preview prompts."""
        from engine.formatting import load_format
        from engine.worker.batching import cache_dir_for
        from engine.worker.evaluation import Evaluator, PreviewParams, Previews, preview_rows
        from engine.worker.feed import Feed, tokenize_ranked

        cfg, d = self.cfg, self.d
        self.fmt = load_format(cfg.model_id)
        self.cache_dir = cache_dir_for(cfg, self.run_dir)  # where preflight tokenised this file already
        self.feed = Feed.load(cfg, d, self.fmt, self.cache_dir, self.out)
        self.train_tok, self.total_steps = self.feed.tok, self.feed.run_plan.total_steps
        self.train_print = rows_fingerprint(self.train_tok)  # checked on resume: the rows the position is in
        self.val_tok = tokenize_ranked(cfg.val_jsonl, self.fmt, cfg, self.cache_dir, d) if cfg.val_jsonl else None
        self.evaluator = Evaluator(self.val_tok, cfg, d, self.fmt, self.out)
        self.previews = Previews(preview_rows(cfg, self.fmt), PreviewParams.of(cfg), cfg, d, self.fmt, self.out)
        self.control.previews = self.previews

    def _setup_model(self) -> None:
        """The LoRA model, its loss (fused head + CE) and, with several ranks, the gradient sync."""
        import os

        from engine.protocol import ParamRow, ParamTable
        from engine.worker.modeling import (
            CausalLMLoss,
            attention_flops_per_pair,
            load_model,
            matmul_params,
            param_table,
            render_param_table,
        )

        cfg, d = self.cfg, self.d
        if cfg.compile:  # compiled kernels are cached beside the token cache: the next start reuses them
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(self.cache_dir).resolve() / "inductor"))
        t0 = time.perf_counter()
        self.model, removed = load_model(cfg, d.device)
        self.model.train()
        self.log(f"model loaded in {time.perf_counter() - t0:.1f}s")
        self.previews.limit_to(self.model)  # preview lengths within the model's positions
        if cfg.grad_ckpt:
            from engine.worker.modeling import checkpoint_place, checkpointed_layers

            n, of = checkpointed_layers(self.model)
            where = {"inside": "the checkpoint inside each layer's forward",
                     "around": "the checkpoint around each layer's call"}[checkpoint_place()]
            self.log(f"gradient checkpointing: {n} of {of} decoder layers recompute their activations ({where})")
        if cfg.quant != "nf4":
            from engine.worker.fp8 import describe, products

            mode, why = products(cfg.quant, cfg.fp8_products, d.device)
            self.log(f"FP8 products: {mode} — {describe(cfg.quant, mode)} ({why})")
        # knobs.py VOXTUI_CUDA_GRAPHS: the compiled layers replayed as CUDA graphs
        self.graphs = self.knobs.cuda_graphs and cfg.compile and d.device.type == "cuda"
        if cfg.packing:
            from engine.worker.attention import dense_min, gqa_mode, varlen_available

            kind = (f"varlen FlashAttention (torch.nn.attention.varlen, grouped heads: {gqa_mode()})"
                    if d.device.type == "cuda" and varlen_available() else "SDPA example by example")
            shortest = 0 if self.graphs else dense_min(d.device, self.knobs.dense_attention)
            # none longer than --max_len: every row one varlen call, exactly as without (no operator around it)
            self.feed.dense_min = shortest if shortest <= cfg.max_len else 0
            if self.feed.dense_min:
                from engine.worker.attention import warm_plans
                from engine.worker.modeling import _unwrap, language_model

                t1 = time.perf_counter()
                lm = language_model(_unwrap(self.model)).config
                heads = lm.num_attention_heads
                dim = getattr(lm, "head_dim", None) or lm.hidden_size // heads
                plans = warm_plans(d.device, heads, lm.num_key_value_heads, dim, self.feed.dense_min, cfg.max_len)
                kind += (f"; examples of {self.feed.dense_min} tokens or more: "
                         f"{'cuDNN' if d.device.type == 'cuda' else 'SDPA'}, one call each, at "
                         f"{plans} lengths (plans made in {time.perf_counter() - t1:.1f}s; VOXTUI_DENSE_ATTENTION)")
            self.log(f"packed rows of {self.feed.run_plan.budget} tokens, attention: {kind}")
        if self.graphs:
            self.log("CUDA graphs: each compiled layer's forward and backward replayed as one graph "
                     "(VOXTUI_CUDA_GRAPHS=1)")
        rows, trainable, total = param_table(self.model, removed=removed)
        self.log("parameters:\n" + render_param_table(rows, trainable, total))
        self.emit(ParamTable(rows=[ParamRow(*r) for r in rows], trainable=trainable, total=total))
        self.flops_per_token = 4 * matmul_params(self.model)  # MFU: forward and backward
        self.flops_per_pair = attention_flops_per_pair(self.model)  # and the MFU that counts attention
        peak = peak_flops(cfg.peak_tflops, d.device)
        self.peak = peak * d.world if peak else None  # all ranks together
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # on a GPU with --compile the loss's softmax and gradient are compiled kernels (modeling.ce_chunk)
        loss = CausalLMLoss(self.model, compiled=cfg.compile and d.device.type == "cuda" and not self.knobs.eager_ce)
        self.loss_module, self.grad_sync = data_parallel(loss, self.trainable, d, cfg.grad_sync, cfg.compile,
                                                         self.knobs.ddp_split_graphs)
        if self.grad_sync is not None:
            self.log(f"{d.world} ranks: one all-reduce of {sum(p.numel() for p in self.trainable):,} gradient "
                     "values per step")

    def _setup_optimizer(self) -> None:
        """AdamW on the adapter weights (fused: one kernel for them all, and the skip of a non-finite step
        decided on the device, step.py) and the learning-rate schedule (schedule.py)."""
        import torch

        from engine.worker.step import Update

        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), fused=True)
        self.update = Update(self.loss_module, self.trainable, self.grad_sync, self.optimizer, cfg, self.d,
                             overlap=self.knobs.step_overlap, graphs=self.graphs)
        self.schedule = Schedule(self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.schedule.lr_lambda(cfg.warmup_steps, cfg.min_lr_ratio))
        self.saver = Saver(self.run_dir, cfg.save_total_limit, self.d, self.out, self.knobs.slow_save,
                           self.knobs.disk_full)

    def _restore(self) -> None:
        """A resumed run: the model, optimizer, scheduler and RNG from the latest complete checkpoint
        (saving.py), then the trainer's own state, and the learning-rate schedule continued."""
        cfg, d = self.cfg, self.d
        restored = self.saver.restore(self.model, self.optimizer, self.scheduler)
        if restored is None:
            return
        path, state = restored
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        self.schedule, message = resumed(Schedule.saved(state), self.total_steps, self.step, cfg.warmup_steps,
                                         cfg.min_lr_ratio, self.scheduler.get_last_lr()[0], self.scheduler.base_lrs[0])
        if message:
            self.out.say(message)
        self.scheduler.lr_lambdas = [self.schedule.lr_lambda(cfg.warmup_steps, cfg.min_lr_ratio)
                                     for _ in self.scheduler.lr_lambdas]
        self._override_rates()
        best = self.evaluator
        best.best_loss = state.get("best_loss") if state.get("best_loss") is not None else math.inf
        best.best_step, best.bad_evals = state.get("best_step", 0), state.get("bad_evals", 0)
        self.previews.params = self.previews.params.updated(state.get("preview", {}))
        if state.get("world_size") != d.world:
            self.log(f"resume: the run had {state.get('world_size')} ranks, now {d.world}: "
                     "the data order continues, but the result will not match an uninterrupted run exactly")
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, micro-batch {self.micro})")
        then = state.get("train_rows")
        if isinstance(then, dict) and then != self.train_print:
            now = self.train_print
            self.emit(Alert(level="warning", kind="data_changed",
                            message=f"the training rows differ from those {path.name} was trained on "
                                    f"({then.get('rows')} rows, {then.get('tokens')} tokens then; {now['rows']} rows, "
                                    f"{now['tokens']} tokens now): training goes on from epoch {self.epoch}, "
                                    f"micro-batch {self.micro} of the new rows' plan — not an exact resume"))
        lr = self.scheduler.get_last_lr()[0]
        # said with the run's "running" status: the console and the dashboard show where it goes on from
        self.resumed = f"resumed from {path.name} at step {self.step}, learning rate {lr:.3g}"
        if lr == 0 and cfg.min_lr_ratio == 0 and self.step < self.total_steps:  # every step after it at 0
            self.emit(Alert(level="warning", kind="learning_rate",
                            message=f"the learning rate in force at step {self.step} is 0 (the schedule had decayed "
                                    f"to --min_lr_ratio {cfg.min_lr_ratio:g}): the steps after it change nothing"))

    def _override_rates(self) -> None:
        """--lr and --weight_decay given again on a resume apply from its first step (the optimizer's and the
        scheduler's restored state hold the run's own): the schedule keeps its shape, scaled to the new peak."""
        cfg, sched = self.cfg, self.scheduler
        was_lr, was_wd = sched.base_lrs[0], self.optimizer.param_groups[0]["weight_decay"]
        if cfg.lr == was_lr and cfg.weight_decay == was_wd:
            return
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * cfg.lr / g["initial_lr"]
            g["initial_lr"], g["weight_decay"] = cfg.lr, cfg.weight_decay
        sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        said = [f"--lr {cfg.lr:g} (was {was_lr:g}; in force now {sched._last_lr[0]:.3g})" if cfg.lr != was_lr else "",
                f"--weight_decay {cfg.weight_decay:g} (was {was_wd:g})" if cfg.weight_decay != was_wd else ""]
        self.out.say("resume: " + " and ".join(x for x in said if x) + " from this step on")

    def _start_reporting(self) -> None:
        """TensorBoard and telemetry on rank 0, and the run_info event: what this run is."""
        import torch

        from engine.protocol import RunInfo

        cfg, d = self.cfg, self.d
        if d.main:
            self.out.board = Board(self.run_dir / "tb")
        val_rows = len(self.val_tok) if self.val_tok else 0
        self.emit(RunInfo(model_id=cfg.model_id, world_size=d.world, device=str(d.device),
                          train_rows=len(self.train_tok), val_rows=val_rows, total_steps=self.total_steps,
                          steps_per_epoch=self.feed.run_plan.steps_per_epoch,
                          config={k: getattr(cfg, k) for k in cfg.__struct_fields__},
                          cache_hit=self.train_tok.cache_hit, dropped_long=self.train_tok.dropped,
                          truncated_long=self.train_tok.truncated, preview=self.previews.params.to_dict()))
        if d.main and cfg.telemetry_interval > 0:
            from engine.worker.telemetry import TelemetryThread

            gpus = list(range(torch.cuda.device_count())) if d.device.type == "cuda" else None
            self.telemetry = TelemetryThread(self._on_telemetry, cfg.telemetry_interval, gpus, d.rank)
            self.telemetry.start()

    def _on_telemetry(self, ev) -> None:
        self.emit(ev)
        self.out.board.telemetry(ev, self.step)

    # ---- the loop
    def train(self) -> str:
        """Runs until done, stopped or failed; returns the final state."""
        cfg = self.cfg
        self.emit(Status(state="running", step=self.step, message=self.resumed))
        while self.step < self.total_steps:
            plan = self.feed.plan(self.epoch)
            if self.micro + cfg.grad_accum > len(plan):
                self.epoch += 1
                self.micro = 0
                continue
            state = self._train_step(plan)
            if state is not None:
                return state
        if self.val_tok is not None and not self._due(cfg.eval_steps):
            self.evaluate()
        if self.save(reason="final", final=True):
            return "finished"
        ended = self._wait_for_space("final", final=True) if self.full else None
        return ended or ("finished" if self.saved_step == self.step else "save_failed")

    def _train_step(self, plan: list) -> str | None:
        """One optimizer step, then its boundary: the step's gradients (step.py), ONE all-gather of what
        every rank must agree on (the loss, the tokens, the times, the gradient norm, whether commands or
        a stop signal wait), the update or its skip (a non-finite loss or gradient), the step event, then
        the commands. Returns the final state when the run ends here."""
        cfg, d = self.cfg, self.d
        if self.profiler is not None:
            self.profiler.before(self.step + 1)
        t0 = time.perf_counter()
        with phase("batch"):
            micro = self.feed.micro_batches(plan, self.micro)
        n_global = float(sum(self.feed.global_targets[self.micro:self.micro + cfg.grad_accum]))
        after = self.micro + cfg.grad_accum
        prefetch = (lambda: self.feed.prefetch(plan, after)) if self.knobs.step_overlap else None
        loss_sum, grad_norm = self.update.gradients(micro, n_global, poison=self.knobs.nan_step == self.step + 1,
                                                    before_wait=prefetch)
        step_time = time.perf_counter() - t0
        real = sum(m["real_tokens"] for m in micro)
        slots = sum(m["slots"] for m in micro)
        pairs = sum(m["attn_pairs"] for m in micro)
        with phase("control"):
            commands, stop_signal = self.control.poll()
        with phase("gather"):
            gathered = d.all_gather([float(loss_sum), real, slots, step_time, float(bool(commands)),
                                     float(grad_norm), float(stop_signal), float(pairs)])
        loss = float(gathered[:, 0].sum()) / max(n_global, 1.0)
        gnorm = float(gathered[0, 5])
        nonfinite = "loss" if not math.isfinite(loss) else ("grad_norm" if not math.isfinite(gnorm) else "")
        lr = self.scheduler.get_last_lr()[0]
        if not nonfinite:
            self.update.apply()
        elif self._skip_update(nonfinite):
            return "failed"
        self.scheduler.step()
        self.step += 1
        self.micro += cfg.grad_accum
        self.steps_here += 1
        if self.steps_here == SETTLED:
            self._settle()
        slowest = float(gathered[:, 3].max())
        if d.main and (self.step % cfg.log_steps == 0 or nonfinite):
            with phase("report"):
                ev = step_event(gathered, self.step, self.epoch + self.micro / max(len(plan), 1), loss, gnorm, lr,
                                nonfinite, slowest, self.flops_per_token, self.peak, d.device, self.flops_per_pair)
                self.emit(ev)
                self.out.board.step(ev)
        # commands and signals act here, on every rank, at this step boundary
        with phase("boundary"):
            actions = self.control.agree(commands, bool(gathered[:, 4].max()), self.step)
            if gathered[:, 6].max() > 0:
                actions.add("stop")
            state = self._boundary(actions, slowest)
        if self.profiler is not None:
            self.profiler.after(self.step)  # the window ends after the boundary: a step's whole cost
        if state is None and self.knobs.step_pause:
            time.sleep(self.knobs.step_pause)  # VOXTUI_STEP_PAUSE: a test's run idles between its steps
        return state

    def _settle(self) -> None:
        """Once the first steps have compiled what training runs: everything alive now (the model, the
        compiled code, about a million Python objects) is frozen out of Python's garbage collector, so that
        its occasional full collection never walks them in the middle of a step."""
        import gc

        gc.collect()
        gc.freeze()

    def _skip_update(self, nonfinite: str) -> bool:
        """A non-finite loss or gradient: no update, an alert; with --on_nan stop, the last good state is
        saved and the run fails (returns True)."""
        self.update.skip()
        at = self.step + 1
        self.emit(Alert(level="error", kind=f"nan_{nonfinite}", step=at,
                        message=f"non-finite {nonfinite} at step {at}: "
                                + ("update skipped" if self.cfg.on_nan == "skip" else "saving and stopping")))
        if self.cfg.on_nan != "stop":
            return False
        self.save(reason="nan")
        self.emit(Status(state="failed", step=self.step, message=f"non-finite {nonfinite} at step {at}"))
        return True

    def _boundary(self, actions: set[str], slowest: float) -> str | None:
        """What this step boundary asks for, in order: stop, evaluation, previews, a checkpoint, a pause.
        Returns the final state when the run ends here."""
        cfg, previews = self.cfg, self.previews
        if "stop" in actions:
            self.emit(Status(state="stopping", step=self.step, message="stop requested: saving"))
            return "stopped" if self.save(reason="stop") else "save_failed"
        if self._due(cfg.eval_steps) or "eval" in actions:
            if self.evaluate() == "early_stop":
                self.save(reason="early_stop")
                return "early_stopped"
        previews.since += slowest
        if self._due(cfg.preview_steps):
            previews.pending = True
        if "preview" in actions or (previews.pending and previews.affordable()):
            previews.run_timed(self.model, self.step)
        # not tried twice at one boundary: a best checkpoint that a full disk refused here is what the wait
        # below writes (a second try said the same alert again)
        if "save" in actions and not self.full:
            self.save(reason="requested")
        elif self._due(cfg.save_steps) and not self.full:
            self.save(reason="periodic")
        if self.full:  # this boundary's checkpoint (periodic, requested or best) did not fit on the disk
            ended = self._wait_for_space("requested" if "save" in actions else "periodic")
            if ended:
                return ended
        if "pause" in actions:
            ended = self.control.pause(self.step, self._while_paused)
            if ended == "stop":
                return "stopped" if self.save(reason="stop") else "save_failed"
            if ended != "resume":  # an evaluation out of patience while paused
                return ended
        return None

    def _wait_for_space(self, reason: str, final: bool = False) -> str | None:
        """A checkpoint that a full disk refused (``self.full`` says why): rather than train on for steps that
        could not be saved either, the run pauses (the model stays in memory) until someone frees space and
        resumes it, and the save is tried again — paused again, saying so, while it still does not fit. A
        worker without an engine can be resumed by nobody: the run ends failed, for that reason. Returns the
        final state when the run ends here; None once the checkpoint is written (or failed for another
        reason, which is reported and trained on, as before)."""
        while True:
            # rank 0's answer for every rank (only it takes the engine's commands: a rank 1 that ended here alone
            # while rank 0 paused tore the run down); a collective, as the ranks come here together
            if not self.d.broadcast(self.control.resumable):
                return "save_failed"
            then = (f"free space there, then resume (p in the dashboard, or voxtui engine resume "
                    f"{shell_quote(self.run_dir)}): the checkpoint is written again")
            ended = self.control.pause(self.step, self._while_paused, why=f"{self.full}; {then}")
            if ended == "stop":  # asked for while the disk is full: stopped all the same, saved or not
                if self.save(reason="stop"):
                    return "stopped"
                self.stopped_unsaved = self.full
                return "stopped" if self.full else "save_failed"
            if ended != "resume":  # an evaluation out of patience while paused
                return ended
            if self.save(reason=reason, final=final) or not self.full:
                return None

    def _while_paused(self, actions: set[str]) -> str | None:
        """A save, an evaluation or previews asked for while the run is paused: done at once, at the paused
        step (they were acknowledged, so they must happen). Returns the final state when an evaluation runs
        out of patience."""
        if "eval" in actions and self.evaluate() == "early_stop":
            self.save(reason="early_stop")
            return "early_stopped"
        if "preview" in actions:
            self.previews.run_timed(self.model, self.step)
        if "save" in actions:
            self.save(reason="requested")
        return None

    # ---- evaluation, checkpoints
    def evaluate(self) -> str:
        """The validation loss now (evaluation.py); "early_stop" when patience has run out, "none" without
        validation rows. An improvement is saved as the best checkpoint (unless checkpoints are off)."""
        ev = self.evaluator
        if not ev.has_rows:
            return "none"
        improved = ev.run(self.loss_module, self.model, self.step, self.update.autocast)
        if improved and self.step < self.total_steps and self.cfg.save_steps:
            self.save(reason="best")
        if ev.out_of_patience:
            self.log(f"early stopping: {ev.bad_evals} evaluations without improvement")
            return "early_stop"
        return "ok"

    def save(self, reason: str, final: bool = False) -> bool:
        """A checkpoint of this step (saving.py: rank 0 writes, the others wait); False on every rank when
        it could not be written (reported; the previous checkpoint stays as it was)."""
        if self.saved_step == self.step and not final:
            return True  # this step is already saved (e.g. a best checkpoint, then the periodic one)
        state = self._trainer_state(reason) if self.d.main else None
        ok = self.saver.save(self.model, self.optimizer, self.scheduler, state, final=final)
        self.saved_step = self.step if ok else -1
        self.full = "" if ok else self.saver.full
        return ok

    def _trainer_state(self, reason: str) -> dict:
        """trainer_state.json: what exact resume needs beyond the weights, optimizer and RNG."""
        cfg, best = self.cfg, self.evaluator
        return {"step": self.step, "epoch": self.epoch, "micro": self.micro, "world_size": self.d.world,
                "best_loss": best.best_loss if math.isfinite(best.best_loss) else None,
                "best_step": best.best_step, "bad_evals": best.bad_evals, "preview": self.previews.params.to_dict(),
                "total_steps": self.total_steps, "schedule": self.schedule.to_dict(), "reason": reason,
                "time": time.time(), "model_id": cfg.model_id, "train_rows": self.train_print,
                "config": {k: getattr(cfg, k) for k in cfg.__struct_fields__}}

    def cleanup(self, state: str, error: str = "") -> None:
        if self.telemetry is not None:
            self.telemetry.stop()
            self.telemetry.join(timeout=5)  # no sample after the sink closes
        if self.feed is not None:
            self.feed.close()
        if state in ("finished", "stopped", "early_stopped"):
            lost = state == "stopped" and self.control is not None and self.control.engine_lost
            outcome = "engine_lost" if lost else {"finished": "completed"}.get(state, state)
            message = {"completed": "done", "stopped": "stopped on request", "early_stopped": "early stopping",
                       "engine_lost": "the engine went away: saved and stopped"}[outcome]
            if state == "stopped" and self.stopped_unsaved:  # the stop's own checkpoint did not fit either
                message = (f"stopped on request; its checkpoint at step {self.step} could not be written: "
                           f"{self.stopped_unsaved}")
            self.emit(Status(state="finished", step=self.step, message=message, outcome=outcome))
        elif state == "error":
            self.emit(Status(state="failed", step=self.step, message=error))
        elif state == "save_failed":
            self.emit(Status(state="failed", step=self.step,
                             message=self.full or "the last checkpoint could not be written"))
        self.out.close()
        if self.control is not None:
            self.control.close()

    # ---- small helpers
    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0 and self.step < self.total_steps


def rows_fingerprint(tok) -> dict:
    """The tokenised training rows in brief (their count, tokens and a digest of both arrays): a resume
    compares it with its checkpoint's, so a training file edited since is said, not trained on silently."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for a in (tok.ids, tok.offsets):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return {"rows": len(tok), "tokens": int(tok.ids.size), "digest": h.hexdigest()}


def refuse_finished(run_dir: Path, cfg, world: int) -> None:
    """The worker started alone (``torchrun -m engine.train --resume RUN``) on a run whose latest checkpoint
    has every step the run has, or that would train only at a learning rate of 0, or that stopped early and
    would stop again at its next evaluation: refused before the run folder is touched, as ``voxtui run
    --resume`` refuses it (engine.runs.refuse_nothing_to_resume, refuse_out_of_patience). Where the flags given again change how many steps an epoch
    has, the total needs the data planned: ``voxtui run`` plans it (preflight); the worker alone refuses then
    only a finished run whose rate has decayed to 0, and otherwise resumes (with no step left it evaluates and
    saves its last checkpoint again)."""
    from engine.runs import refuse_nothing_to_resume, refuse_out_of_patience, resume_steps

    refuse_out_of_patience(run_dir, cfg)
    done, total = resume_steps(run_dir, cfg, world)
    refuse_nothing_to_resume(run_dir, cfg, done, total)  # total None: refused only if every step would be at 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    d = None
    trainer = None
    try:
        d = Dist()
        cfg, run_dir, resuming = resolve_run(args, d)
        if cfg.quant != "nf4":
            from engine.util import without_bitsandbytes

            without_bitsandbytes()  # a second of every start: this run loads no 4-bit weights
        if resuming:
            refuse_finished(run_dir, cfg, d.world)
        trainer = Trainer(cfg, run_dir, resuming, d)
        trainer.setup()
        state = trainer.train()
        trainer.cleanup(state)
        return 1 if state in ("failed", "save_failed") else 0
    except UsageError as e:
        if first_on_its_node():  # every rank meets the same bad setting: said once (per node)
            print(f"voxtui: error: {printable(e)}", file=sys.stderr)
        if trainer is not None:
            trainer.cleanup("error", str(e))
        if not first_on_its_node():  # the first rank's line is said before torchrun, once this rank has exited,
            time.sleep(SAID_FIRST_S)  # ends the others
        return 2
    except Exception as e:
        print_traceback()  # its paths (the run folder's among them) escaped, as every line of worker.log
        if trainer is not None:
            trainer.emit(Alert(level="error", kind="exception", message=f"{type(e).__name__}: {e}",
                               rank=d.rank if d else None))
            trainer.cleanup("error", f"{type(e).__name__}: {e}")
        return 1
    finally:
        # the model, and DDP's reducer with it, go before the process group they use: left to the interpreter's
        # exit, a reducer outliving its group aborted the process once ("terminate called without an active
        # exception", exit -6 after the final checkpoint, --grad_sync ddp under a loaded CI)
        trainer = None
        import gc

        gc.collect()
        if d is not None:
            d.close()


if __name__ == "__main__":
    sys.exit(main())
