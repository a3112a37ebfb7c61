"""One optimizer step's arithmetic on this rank (docs/training.md: loss, several GPUs, optimiser).

``Update.gradients`` runs forward and backward over the step's micro-batches, each loss scaled so that the
step's gradient is the mean over every rank's target tokens (DDP averages the ranks' gradients on the last
micro-batch; the flat sync sums them after it), then clips them; ``apply`` (AdamW) or ``skip`` ends the
step. No collective but the gradient sync (and, on several ranks, one flag: below): the trainer's one
all-gather per step follows.

AdamW's update is queued before the host waits for the step's GPU work (``ahead``), so that the GPU does
not sit idle while the host launches it after the wait: the update skips itself on the GPU when the loss or
the gradient norm is not finite (fused AdamW's ``found_inf``, the flag GradScaler sets; on several ranks the
flag is the maximum over them, so every rank skips or none does), which is exactly when the trainer, once
it has the step's numbers, calls ``skip`` instead of ``apply``.

Under CUDA graphs (``graphs``: knobs.py ``VOXTUI_CUDA_GRAPHS``), what a compiled layer returns lives in the
graphs' memory, which the next micro-batch's replay writes over: each micro-batch starts a new generation
(``torch.compiler.cudagraph_mark_step_begin``), and the adapters' gradients are tensors of their own, made
once and zeroed in place, so the backward adds into them instead of keeping the graph's output as one.
"""

from __future__ import annotations

import contextlib

import torch

from engine.config import TrainConfig
from engine.worker.batching import to_device
from engine.worker.dist import Dist
from engine.worker.profiling import phase


class Update:
    def __init__(self, loss_module, params: list, grad_sync, optimizer, cfg: TrainConfig, d: Dist,
                 overlap: bool = True, graphs: bool = False) -> None:
        """``loss_module``: modeling.CausalLMLoss, maybe in DDP; ``grad_sync``: dist.FlatGradSync or None
        (dist.data_parallel made both); ``overlap``: the update queued before the wait (``ahead``);
        ``graphs``: the compiled layers replay CUDA graphs (above)."""
        self.loss_module, self.params, self.grad_sync, self.optimizer = loss_module, params, grad_sync, optimizer
        self.cfg, self.d = cfg, d
        self.ddp = d.world > 1 and grad_sync is None  # else one rank, or the flat all-reduce after the backward
        self.max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        self.bf16 = cfg.bf16 and d.device.type == "cuda"
        self.overlap = overlap  # knobs.py: VOXTUI_STEP_OVERLAP=0 queues it after, the comparison's baseline
        self.stepped = False  # this step's update is queued (``ahead``)
        self.graphs = graphs
        if graphs and grad_sync is None:  # (the flat sync's gradients are views into its own buffers already)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    @property
    def ahead(self) -> bool:
        """The update is queued before the wait: fused AdamW takes the skip as a device flag (a run resumed
        from a checkpoint of an unfused optimizer keeps it unfused: its update waits for the numbers)."""
        return self.overlap and all(g.get("fused") for g in self.optimizer.param_groups)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def gradients(self, micro: list[dict], n_global: float, poison: bool = False, before_wait=None):
        """The step's gradients over ``micro`` (collated micro-batches), summed over the ranks and clipped,
        not yet applied; returns this rank's summed loss (a device tensor) and the norm before clipping.
        ``n_global``: the step's target tokens over every rank; ``poison``: a NaN loss (knobs.py);
        ``before_wait``: called once the step's work is queued, before the host waits for the GPU (the next
        step's batch goes to the device then: feed.Feed.prefetch)."""
        d, ddp, scale = self.d, self.ddp, self.d.world if self.ddp else 1
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        for i, m in enumerate(micro):
            with phase("to_device"):
                batch = to_device(m, d.device)
            sync = i == len(micro) - 1
            ctx = self.loss_module.no_sync() if ddp and not sync else contextlib.nullcontext()
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with ctx, self.autocast():
                with phase("forward"):
                    total, _ = self.loss_module(**batch)
                if poison:
                    total = total * float("nan")
                # DDP averages the ranks' gradients, the flat sync sums them: either way the mean over
                # every rank's target tokens
                with phase("backward"):
                    (total * (scale / max(n_global, 1.0))).backward()
            loss_sum += total.detach().double()
        if self.grad_sync is not None:
            with phase("grad_sync"):
                self.grad_sync.all_reduce()
        with phase("clip"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if self.ahead:
            with phase("optimizer"):
                self._step_unless_nonfinite(loss_sum, grad_norm)
        if before_wait is not None:
            with phase("prefetch"):
                before_wait()
        if d.device.type == "cuda":
            with phase("wait_gpu"):
                torch.cuda.synchronize(d.device)  # the step's GPU work counts in its time (the gather waits anyway)
        return loss_sum, grad_norm

    def _step_unless_nonfinite(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """AdamW's update, queued now, skipped on the GPU when this step's loss or gradient norm on any rank
        is not finite (then neither the weights nor the optimizer's state nor its step count change)."""
        bad = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
        if self.d.world > 1:
            self.d.dist.all_reduce(bad, op=self.d.dist.ReduceOp.MAX)
        self.optimizer.found_inf = bad
        self.optimizer.step()
        self.stepped = True

    def apply(self) -> None:
        """The step's update (already queued when ``ahead``), then its gradients dropped."""
        if not self.stepped:
            with phase("optimizer"):
                self.optimizer.step()
        self.skip()

    def skip(self) -> None:
        """Drops the step's gradients (when ``ahead``, the queued update has skipped itself: the trainer
        calls this for a non-finite loss or gradient norm, the same test the update's flag made)."""
        self.stepped = False
        with phase("zero_grad"):
            if self.grad_sync is not None:
                self.grad_sync.zero()  # the gradients stay views into the all-reduce buffers
            else:
                self.optimizer.zero_grad(set_to_none=not self.graphs)
