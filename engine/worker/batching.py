"""Pre-tokenised data, cached by content, and the deterministic batch plan.

The cache key is the hash of the data file's bytes, the tokenizer + template fingerprint, max_len and
the long-row policy; a second start with the same inputs reads ``<cache>/<key>.npz`` and skips
tokenisation. Loss applies to the target (answer + EOS) only.

A plan is the list of micro-batches of one epoch for one rank: a seeded shuffle of (seed, epoch),
then either length grouping (similar lengths together, so little padding, and the ranks of one step
get batches of similar length) or packing (whole examples laid end to end in one row per micro-batch,
up to a token budget, attended example by example with varlen attention — see ``engine.worker.attention``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.formatting import ChatFormat, fit_target, shortest_max_len
from engine.rows import read_examples

CACHE_VERSION = 2  # 2: truncated targets keep their EOS (engine.formatting's rule); full_lengths


@dataclass
class Tokenized:
    ids: np.ndarray  # every example's prompt + target, end to end (int32)
    offsets: np.ndarray  # example i is ids[offsets[i]:offsets[i+1]]
    prompt_lens: np.ndarray  # tokens before the target
    dropped: int = 0
    truncated: int = 0
    cache_hit: bool = False
    shortest_dropped: int = 0  # the smallest --max_len that would have kept a dropped row (0: none dropped)
    full_lengths: np.ndarray | None = None  # every usable row's formatted length before --long (dropped ones too)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_lens[i])


def cache_dir_for(cfg, run_dir: str | os.PathLike | None = None) -> str:
    """Where a run's tokenised rows are cached: ``--cache_dir``, else ``_cache`` beside the run folder
    (``run_dir``, else ``--output_dir``, else a new run under runs/). The worker and preflight both ask
    here, so preflight fills the cache the worker then reads."""
    if cfg.cache_dir:
        return cfg.cache_dir
    from engine.runs import RUNS

    return str(Path(run_dir or cfg.output_dir or RUNS / "new").parent / "_cache")


def cache_key(path: str, fmt: ChatFormat, max_len: int, long: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"|{fmt.fingerprint}|{max_len}|{long}|v{CACHE_VERSION}".encode())
    return h.hexdigest()[:32]


def tokenize(path: str, fmt: ChatFormat, max_len: int, long: str, cache_dir: str | None) -> Tokenized:
    """Read from the cache, or tokenize and write the cache atomically."""
    target = None
    if cache_dir:
        target = Path(cache_dir) / f"{cache_key(path, fmt, max_len, long)}.npz"
        if target.exists():
            z = np.load(target)
            return Tokenized(z["ids"], z["offsets"], z["prompt_lens"], int(z["dropped"]), int(z["truncated"]), True,
                             int(z["shortest_dropped"]), z["full_lengths"])
    examples = [ex for _, ex in read_examples(path)]
    pieces, prompt_lens, full, dropped, truncated, shortest = [], [], [], 0, 0, 0
    for i in range(0, len(examples), 2048):
        for prompt, target_ids in fmt.encode(examples[i:i + 2048]):
            full.append(len(prompt) + len(target_ids))
            kept = fit_target(prompt, target_ids, max_len, long)  # the one --max_len rule (engine.formatting)
            if kept is None:
                dropped += 1
                need = shortest_max_len(len(prompt), len(target_ids), long)
                shortest = min(shortest or need, need)
                continue
            truncated += len(kept) < len(target_ids)
            pieces.append(np.asarray(prompt + kept, np.int32))
            prompt_lens.append(len(prompt))
    lengths = np.array([len(p) for p in pieces], np.int64)
    tok = Tokenized(
        ids=np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lens=np.asarray(prompt_lens, np.int32), dropped=dropped, truncated=truncated,
        shortest_dropped=shortest, full_lengths=np.asarray(full, np.int64),
    )
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, ids=tok.ids, offsets=tok.offsets, prompt_lens=tok.prompt_lens,
                     dropped=dropped, truncated=truncated, shortest_dropped=shortest, full_lengths=tok.full_lengths)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    return tok


def packed_budget(per_device_bsz: int, max_len: int) -> int:
    """The tokens of one packed micro-batch as asked: ``--per_device_bsz × --max_len`` (the one place this
    product is made; ``plan_run`` may shrink it for a small file, and its ``budget`` is then what is used)."""
    return per_device_bsz * max_len


def plan_epoch_all(tok: Tokenized, epoch: int, seed: int, bsz: int, world: int, max_len: int, packing: bool,
                   group_by_length: bool, budget: int = 0) -> list[list[list[list[int]]]]:
    """Every rank's micro-batches for ``epoch`` (index: rank), computed once.

    Packed: each micro-batch is one row of whole examples filling a budget of ``budget`` tokens (0:
    ``bsz × max_len``; ``plan_run`` picks it), so every rank of a step carries (almost) the same number
    of tokens. Every rank gets the same number of micro-batches (the tail that cannot fill all ranks is
    dropped).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(tok))
    lengths = tok.lengths
    if packing:
        rows = _pack(order, lengths, budget or packed_budget(bsz, max_len))
        rows = [rows[i] for i in rng.permutation(len(rows))]
        steps = len(rows) // world
        return [[[rows[s * world + r]] for s in range(steps)] for r in range(world)]
    per_step = bsz * world
    if group_by_length:
        mega = per_step * 64
        chunks = []
        for i in range(0, len(order), mega):
            part = order[i:i + mega]
            part = part[np.argsort(-lengths[part], kind="stable")]
            chunks.extend(part[j:j + per_step] for j in range(0, len(part), per_step))
        chunks = [c for c in chunks if len(c) == per_step]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        # inside a step, deal examples round-robin so every rank gets a similar length mix
        return [[[[int(x)] for x in c[r::world]] for c in chunks] for r in range(world)]
    steps = len(order) // per_step
    return [[[[int(x)] for x in order[s * per_step + r * bsz: s * per_step + (r + 1) * bsz]] for s in range(steps)]
            for r in range(world)]


@dataclass
class RunPlan:
    """What a run will do with its training rows: the one computation that ``voxtui preflight`` and the
    worker share (``plan_run``), so they cannot disagree."""

    rows: int  # training rows kept (after --long)
    dropped: int
    truncated: int
    world: int  # ranks
    grad_accum: int
    packing: bool
    asked_budget: int  # packed_budget(--per_device_bsz, --max_len)
    budget: int  # tokens per packed row actually used (≤ asked_budget); 0 without packing
    micro_per_rank: int  # micro-batches per rank in epoch 0
    steps_per_epoch: int
    total_steps: int
    problem: str = ""  # why no optimizer step can run, and the fix; empty when the plan works
    plans: list | None = None  # epoch 0, every rank's micro-batches (not part of the summary)

    @property
    def shrunk(self) -> bool:
        return self.packing and 0 < self.budget < self.asked_budget

    def summary(self) -> str:
        if self.problem:
            return self.problem
        text = (f"{self.rows} training rows → {self.micro_per_rank} micro-batch(es) per rank on {self.world} "
                f"rank(s) × grad_accum {self.grad_accum}: {self.steps_per_epoch} step(s) per epoch, "
                f"{self.total_steps} step(s) in all")
        if self.shrunk:
            text += (f"; packed rows shrunk from {self.asked_budget} to {self.budget} tokens, since rows of "
                     f"{self.asked_budget} would make fewer than {self.world * self.grad_accum} micro-batches "
                     f"(ranks × grad_accum)")
        return text

    def as_dict(self) -> dict:
        return {"rows": self.rows, "dropped": self.dropped, "truncated": self.truncated, "world": self.world,
                "grad_accum": self.grad_accum, "packing": self.packing, "asked_budget": self.asked_budget,
                "budget": self.budget, "shrunk": self.shrunk, "micro_batches_per_rank": self.micro_per_rank,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "problem": self.problem}


def plan_run(tok: Tokenized, cfg, world: int, source: str = "") -> RunPlan:
    """Rows kept, micro-batches per rank, steps per epoch and in all, for ``cfg`` (a TrainConfig) on
    ``world`` ranks, or the problem that stops any step from running and the change that fixes it.

    Packed rows that are fewer than ranks × grad_accum get a smaller budget: ``total tokens ÷ (ranks ×
    grad_accum)``, never below the longest example, which makes at least that many rows in every epoch."""
    import math

    acc, asked = cfg.grad_accum, packed_budget(cfg.per_device_bsz, cfg.max_len)
    need = world * acc
    budget = asked if cfg.packing else 0
    name = source or cfg.train_jsonl

    def plan(b: int) -> list:
        return plan_epoch_all(tok, 0, cfg.seed, cfg.per_device_bsz, world, cfg.max_len, cfg.packing,
                              cfg.group_by_length, b)

    def result(plans: list | None, problem: str = "") -> RunPlan:
        micro = len(plans[0]) if plans else 0
        spe = micro // acc if not problem else 0
        total = (cfg.max_steps or max(math.ceil(cfg.epochs * spe), 1)) if not problem else 0
        return RunPlan(len(tok), tok.dropped, tok.truncated, world, acc, cfg.packing, asked, budget, micro, spe,
                       total, problem, plans if not problem else None)

    if len(tok) == 0:
        if tok.dropped:
            floor = (f": raise --max_len to at least {tok.shortest_dropped} (the shortest formatted example"
                     + (", its answer cut to one token and the EOS" if cfg.long == "truncate" else "") + ")") if tok.shortest_dropped else ""
            return result(None, f"{name}: every row ({tok.dropped}) is longer than --max_len {cfg.max_len}"
                                f" (--long {cfg.long}){floor}")
        return result(None, f"{name}: the file is empty: no training rows")
    plans = plan(budget)
    if len(plans[0]) >= acc:
        return result(plans)
    lengths = tok.lengths
    if cfg.packing:
        longest, total = int(lengths.max()), int(lengths.sum())
        budget = max(longest, min(asked, total // need))
        plans = plan(budget)
        if len(plans[0]) >= acc:
            return result(plans)
        made = len(plan_epoch_all(tok, 0, cfg.seed, cfg.per_device_bsz, 1, cfg.max_len, True, False, longest)[0])
        what = (f"{len(tok)} rows make at most {made} packed row(s) (rows of {longest} tokens, the longest "
                f"example), fewer than {world} rank(s) × grad_accum {acc} = {need}")
        fixes = _fixes(made, world, acc, cfg.nproc)
        if len(tok) // need:  # unpacked rows of one example each are more micro-batches than packed rows
            fixes.append(f"--no-packing --per_device_bsz {min(len(tok) // need, cfg.per_device_bsz)}")
    else:
        bsz = cfg.per_device_bsz
        what = (f"{len(tok)} rows make {len(tok) // (bsz * world)} batch(es) of --per_device_bsz {bsz} per rank "
                f"on {world} rank(s), fewer than grad_accum {acc}")
        fixes = [f"--per_device_bsz ≤ {len(tok) // need}"] if len(tok) // need else []
        fixes += _fixes(len(tok) // bsz, world, acc, cfg.nproc) if len(tok) // bsz else []
        if not fixes:
            fixes = ["--per_device_bsz 1 with " + _fixes(len(tok), world, acc, cfg.nproc)[0]]
    if tok.dropped:
        fixes.append(f"a larger --max_len (it dropped {tok.dropped} row(s))")
    return result(plans, f"{name}: {what}, so no optimizer step can run: use " + ", or ".join(fixes))


def _fixes(units: int, world: int, acc: int, nproc: int) -> list[str]:
    """Ways to need at most ``units`` micro-batches (``units`` ≥ 1): fewer ranks, a smaller grad_accum,
    or both."""
    out = []
    if units // acc and world == nproc:
        out.append(f"--nproc ≤ {units // acc}")
    if units // world:
        out.append(f"--grad_accum ≤ {units // world}")
    if not out:
        out.append(f"--nproc ≤ {units} with --grad_accum 1" if world == nproc else "fewer ranks with --grad_accum 1")
    return out


def _pack(order: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Best-fit decreasing inside windows of the shuffled order: rows of at most ``budget`` tokens
    (about 1 s for a million rows; 99.6% full for medical-QA lengths)."""
    import bisect

    rows: list[list[int]] = []
    window = 4096
    for i in range(0, len(order), window):
        part = order[i:i + window]
        part = part[np.argsort(-lengths[part], kind="stable")]
        free: list[int] = []  # the open rows' free space, ascending …
        ids: list[int] = []  # … and which row each is
        bins: list[list[int]] = []
        for x in part.tolist():
            n = int(lengths[x])
            k = bisect.bisect_left(free, n)
            if k < len(free):  # the fullest row that still has room
                b = ids.pop(k)
                left = free.pop(k) - n
            else:
                b = len(bins)
                bins.append([])
                left = budget - n
            bins[b].append(x)
            j = bisect.bisect_left(free, left)
            free.insert(j, left)
            ids.insert(j, b)
        rows.extend(bins)
    return rows


HOST_KEYS = ("dense_bounds",)  # a micro-batch's tensors the attention reads on the host: they stay there


def to_device(m: dict, device, non_blocking: bool = True) -> dict:
    """A collated micro-batch's tensors on ``device`` (but ``HOST_KEYS``)."""
    import torch

    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) and k not in HOST_KEYS else v
            for k, v in m.items()}


SEGMENT_SLOTS = 64  # the fewest example boundaries a padded packed row describes (``segment_slots``)


def segment_slots(n: int) -> int:
    """How many examples a packed row of ``n`` is described as when its shapes must be few (CUDA graphs):
    the next power of two from ``SEGMENT_SLOTS``, the rest empty examples (zero-length: no attention work)."""
    slots = SEGMENT_SLOTS
    while slots < n:
        slots *= 2
    return slots


def collate(tok: Tokenized, batch: list[list[int]], pad: int, packed: bool, budget: int = 0,
            max_len: int = 0, fixed_segments: bool = False, dense_min: int = 0) -> dict:
    """Tensors for one micro-batch. Labels are -100 outside the targets; ``target_idx`` lists the flat
    positions (into ``B × (L-1)``) whose next token is a target, so the loss needs no host sync.

    Unpacked: right padding and a 2-D attention mask. Packed (one row): the examples end to end,
    padded to ``budget`` tokens (a fixed shape) with padding split into pieces of at most ``max_len``,
    positions restarting at each example, and ``cu_seq_lens_q`` / ``max_length_q`` for varlen attention;
    ``fixed_segments``: ``cu_seq_lens_q`` padded with empty examples to ``segment_slots`` (a few fixed shapes).
    ``dense_min``: examples of that many tokens or more go at the row's end, after the padding, and
    ``dense_bounds`` (a host tensor: where the first starts, where each ends) gives them their own cuDNN
    attention call (attention.packed_attention); a row without one is laid out as without ``dense_min``,
    its ``dense_bounds`` just the row's end (the same operator, so the compiled layers see one kind of row:
    a row of the other kind cost a 10 s recompile in run AO).
    """
    import torch

    rows = []
    for items in batch:
        ids, labels, pos, seg = [], [], [], []
        for x in items:
            e, p = tok.example(x)
            ids.extend(e.tolist())
            labels.extend([-100] * p + e[p:].tolist())
            pos.extend(range(len(e)))
            seg.append(len(e))
        rows.append((ids, labels, pos, seg))
    real = sum(len(r[0]) for r in rows)
    # query-key pairs causal attention computes over the real examples: an example of n tokens has
    # n(n+1)/2 (each token attends to itself and those before it) — the MFU that counts attention
    pairs = sum(n * (n + 1) // 2 for r in rows for n in r[3])
    if packed:
        if len(rows) != 1:
            raise ValueError("a packed micro-batch is one row")
        ids, labels, pos, seg = rows[0]
        width = max(budget, len(ids))
        gap = width - len(ids)
        piece = max_len or width
        pads = []
        while gap > 0:
            pads.append(min(gap, piece))
            gap -= pads[-1]
        dense = [] if fixed_segments or not dense_min else [i for i, n in enumerate(seg) if n >= dense_min]
        # no long example: the whole row in one call ([end, end]: a dimension of 1 would be specialised)
        bounds = torch.tensor([width, width], dtype=torch.int64)
        if dense:  # short examples, the padding, then the long ones (the padding attends within itself)
            starts = np.concatenate([[0], np.cumsum(seg)])
            order = [i for i in range(len(seg)) if seg[i] < dense_min] + dense
            ids = [t for i in order for t in ids[starts[i]:starts[i + 1]]]
            labels = [t for i in order for t in labels[starts[i]:starts[i + 1]]]
            short = [seg[i] for i in order[:len(order) - len(dense)]]
            seg = short + pads + [seg[i] for i in dense]
            cut = sum(short)
            ids = ids[:cut] + [pad] * sum(pads) + ids[cut:]
            labels = labels[:cut] + [-100] * sum(pads) + labels[cut:]
            pos = [p for n in seg for p in range(n)]
            first = width - sum(seg[-len(dense):])
            bounds = torch.tensor(np.concatenate([[first], first + np.cumsum(seg[-len(dense):])]), dtype=torch.int64)
        else:
            seg = seg + pads
            pos.extend(p for n in pads for p in range(n))
        input_ids = torch.full((1, width), pad, dtype=torch.long)
        input_ids[0, :len(ids)] = torch.tensor(ids)
        lab = torch.full((1, width), -100, dtype=torch.long)
        lab[0, :len(labels)] = torch.tensor(labels)
        if fixed_segments:
            seg = seg + [0] * (segment_slots(len(seg)) - len(seg))
        cu = torch.tensor(np.concatenate([[0], np.cumsum(seg)]), dtype=torch.int32)
        out = {"input_ids": input_ids, "labels": lab, "position_ids": torch.tensor([pos], dtype=torch.long),
               "cu_seq_lens_q": cu, "max_length_q": int(max(max_len, max(seg))), "real_tokens": real, "slots": width,
               "attn_pairs": pairs}
        if dense_min and not fixed_segments:  # every row through the same operator: one compiled graph
            out["dense_bounds"] = bounds
    else:
        width = max(len(r[0]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        lab = torch.full((n, width), -100, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, labels, _, _) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            lab[i, :len(labels)] = torch.tensor(labels)
            attention_mask[i, :len(ids)] = 1
        out = {"input_ids": input_ids, "labels": lab, "attention_mask": attention_mask, "real_tokens": real,
               "slots": n * width, "attn_pairs": pairs}
    shifted = lab[:, 1:]
    out["target_idx"] = (shifted != -100).reshape(-1).nonzero().squeeze(1)
    out["targets"] = shifted.reshape(-1)[out["target_idx"]]
    return out
