"""Ranks, devices and the collectives the training loop needs, and the gradient sync of several ranks.

``Dist`` reads torchrun's environment (gloo on the CPU, NCCL on GPUs; a no-op on one process).
``FlatGradSync`` keeps every adapter gradient as a view into one flat buffer per dtype and sums them
with one all-reduce per optimizer step (``--grad_sync flat``, the default; docs/benchmarks.md);
``data_parallel`` picks it, or torch's DDP (``--grad_sync ddp``).
"""

from __future__ import annotations

import os


class Dist:
    """Rank, world size, device and the few collectives the loop needs (no-ops on one process)."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def all_gather(self, values: list[float]):
        """Each rank's vector → a (world, n) tensor on the CPU."""
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world == 1:
            return t[None].cpu()
        out = [torch.zeros_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return torch.stack(out).cpu()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        self.dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.world > 1 and self.dist.is_initialized():
            self.dist.destroy_process_group()


class FlatGradSync:
    """Data-parallel gradients without DDP. Every trainable gradient is a view into one flat buffer per
    dtype (backward accumulates into it in place) and one all-reduce per optimizer step sums it over the
    ranks. With LoRA the buffer is small (27 M fp32 values for r=16 on Voxtral-Mini-3B), so the all-reduce
    is too short to be worth overlapping with the backward (measured: a two-H200 step as long as one H200's),
    while the model, compiled or not, runs exactly as on one GPU (no DDP hooks, no graphs split at buckets)."""

    def __init__(self, params: list, d: Dist) -> None:
        import torch

        self.d = d
        self.buffers = []
        for dtype in sorted({p.dtype for p in params}, key=str):
            group = [p for p in params if p.dtype == dtype]
            sizes = [p.numel() for p in group]
            flat = torch.zeros(sum(sizes), dtype=dtype, device=d.device)
            for p, g in zip(group, flat.split(sizes)):
                p.grad = g.view_as(p)
            self.buffers.append(flat)
            # every rank starts from rank 0's adapter weights (as DDP's constructor does)
            weights = torch.cat([p.detach().reshape(-1) for p in group])
            d.dist.broadcast(weights, src=0)
            with torch.no_grad():
                for p, w in zip(group, weights.split(sizes)):
                    p.copy_(w.view_as(p))

    def all_reduce(self) -> None:
        for flat in self.buffers:
            self.d.dist.all_reduce(flat)

    def zero(self) -> None:
        for flat in self.buffers:
            flat.zero_()


def data_parallel(loss_module, params: list, d: Dist, mode: str, compiled: bool, split_graphs: bool = False):
    """``loss_module`` as the step runs it on ``d.world`` ranks, and the flat gradient sync (None unless
    ``mode`` is "flat" with several ranks). One rank: the module as it is. "flat": the module as it is, its
    gradients summed by ``FlatGradSync``. "ddp": the module in torch's DistributedDataParallel."""
    if d.world == 1:
        return loss_module, None
    if mode == "flat":
        return loss_module, FlatGradSync(params, d)
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    cuda = d.device.type == "cuda"
    if compiled and cuda and not split_graphs:
        # each decoder layer is its own compiled graph, so DDP's hooks already fire layer by layer;
        # dynamo's DDPOptimizer would split every layer's graph at bucket edges (less fusion, more memory)
        torch._dynamo.config.optimize_ddp = False
    # buffers (rotary tables) never change: no broadcast before each forward; gradients live in the
    # all-reduce buckets (no copy)
    return DDP(loss_module, device_ids=[d.local_rank] if cuda else None, broadcast_buffers=False,
               gradient_as_bucket_view=True), None
