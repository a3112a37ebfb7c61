"""The training data of each rank, step by step: the rows tokenised (rank 0 first, the others then read
its cache), this rank's batch plan of each epoch with the loss normaliser of every micro-batch, and each
step's tensors: the next step's built on a helper thread meanwhile, and sent to the device before the step
ends (``prefetch``), while the GPU still has the step's work queued."""

from __future__ import annotations

from engine.config import TrainConfig
from engine.worker.dist import Dist


def tokenize_ranked(path: str, fmt, cfg: TrainConfig, cache_dir: str, d: Dist):
    """``batching.tokenize`` on rank 0, then on the others, which then hit the cache it wrote."""
    from engine.worker.batching import tokenize

    tok = tokenize(path, fmt, cfg.max_len, cfg.long, cache_dir) if d.main else None
    d.barrier()
    if not d.main:
        tok = tokenize(path, fmt, cfg.max_len, cfg.long, cache_dir)
    return tok


class Feed:
    """This rank's micro-batches, from the run plan (``batching.plan_run``, which preflight computes too)."""

    @classmethod
    def load(cls, cfg: TrainConfig, d: Dist, fmt, cache_dir: str, out) -> Feed:
        """The training rows tokenised and planned (``out``: report.Report, which is told both). A run that
        cannot make one step stops here (UsageError), before the model loads, with the change that fixes it."""
        import time

        from engine.protocol import Log
        from engine.util import UsageError
        from engine.worker.batching import plan_run

        t0 = time.perf_counter()
        tok = tokenize_ranked(cfg.train_jsonl, fmt, cfg, cache_dir, d)
        out.log(f"data: {len(tok)} train rows ({'cache hit' if tok.cache_hit else 'tokenized'}"
                f" in {time.perf_counter() - t0:.2f}s), {tok.truncated} truncated, "
                f"{tok.dropped} dropped over --max_len {cfg.max_len}")
        run_plan = plan_run(tok, cfg, d.world)
        if run_plan.problem:
            raise UsageError(run_plan.problem)
        out.log(f"plan: {run_plan.summary()}")
        if run_plan.shrunk:
            out.emit(Log(level="info", message=run_plan.summary()))
        return cls(tok, run_plan, cfg, d, fmt.pad)

    def __init__(self, tok, run_plan, cfg: TrainConfig, d: Dist, pad: int) -> None:
        self.tok, self.run_plan, self.cfg, self.d, self.pad = tok, run_plan, cfg, d, pad
        self.plan_cache: dict[int, list] = {}
        self.global_targets: list[int] = []
        self._pool = None  # the helper thread that builds the next step's tensors
        self._next = None  # ((plan id, first micro-batch), its future)
        self._ready = None  # ((plan id, first micro-batch), its tensors on the device): prefetch's
        self.dense_min = 0  # examples this long get their own cuDNN attention call (attention.dense_min)

    def plan(self, epoch: int) -> list:
        """This rank's micro-batches of ``epoch`` (and, in ``self.global_targets``, every micro-batch
        index's target-token count summed over all ranks: the loss normaliser, known without a collective)."""
        from engine.worker.batching import plan_epoch_all

        if epoch not in self.plan_cache:
            cfg, d = self.cfg, self.d
            if epoch == 0 and self.run_plan.plans is not None:
                plans = self.run_plan.plans
            else:
                plans = plan_epoch_all(self.tok, epoch, cfg.seed, cfg.per_device_bsz, d.world, cfg.max_len,
                                       cfg.packing, cfg.group_by_length, self.run_plan.budget)
            per_example = self.tok.lengths - self.tok.prompt_lens
            self.global_targets = [sum(int(per_example[x]) for p in plans for row in p[i] for x in row)
                                   for i in range(len(plans[0]))]
            self.plan_cache = {epoch: plans[d.rank]}
        return self.plan_cache[epoch]

    def micro_batches(self, plan: list, micro: int) -> list[dict]:
        """The tensors of the step whose micro-batches start at ``micro`` of ``plan``; the following
        step's are prepared on a helper thread meanwhile, in pinned memory, so the GPU does not wait for
        the host between steps."""
        from concurrent.futures import ThreadPoolExecutor

        from engine.worker.batching import HOST_KEYS, collate
        from engine.worker.knobs import knobs

        cfg = self.cfg
        pin = self.d.device.type == "cuda"
        fixed = knobs().cuda_graphs and cfg.compile and pin  # CUDA graphs: few shapes (knobs.py)
        dense = self.dense_min  # long examples' own cuDNN attention (attention.dense_min)

        def build(p, start):
            out = []
            for i in range(cfg.grad_accum):
                m = collate(self.tok, p[start + i], self.pad, cfg.packing, budget=self.run_plan.budget,
                            max_len=cfg.max_len, fixed_segments=fixed, dense_min=dense)
                if pin:
                    m = {k: v.pin_memory() if hasattr(v, "pin_memory") and k not in HOST_KEYS else v
                         for k, v in m.items()}
                out.append(m)
            return out

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="collate")
        key = (id(plan), micro)
        if self._ready is not None and self._ready[0] == key:
            batches = self._ready[1]
        elif self._next is not None and self._next[0] == key:
            batches = self._next[1].result()
        else:
            batches = build(plan, micro)
        self._ready = None
        after = micro + cfg.grad_accum
        self._next = ((id(plan), after), self._pool.submit(build, plan, after)) if after + cfg.grad_accum <= len(plan) else None
        return batches

    def prefetch(self, plan: list, micro: int) -> bool:
        """The tensors of the step whose micro-batches start at ``micro`` of ``plan`` (the one the helper
        thread is building) copied to the device now, asynchronously, from pinned memory: called once the
        current step's work is queued and before the host waits for it, so that the next step's first
        kernels need not wait for the host's copies (docs/benchmarks.md). False when that step is not the
        one being built (a new epoch's plan starts with its first step's build)."""
        key = (id(plan), micro)
        if self._next is None or self._next[0] != key:
            return False
        from engine.worker.batching import to_device

        dev = self.d.device
        batches = [to_device(m, dev) for m in self._next[1].result()]
        self._ready, self._next = (key, batches), None
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
