"""``voxtui infer --nproc N``: the rows split over N processes (one GPU each), one merged result.

The rows still to generate, sorted by prompt length, are dealt round-robin to N shard processes
(``python -m engine.eval.shard_worker SPEC``), so each gets a like mix of short and long prompts. Each loads
the merged model on its own device (``cuda:k``; on a machine without GPUs, the CPU) and appends its rows
to ``infer/<name>/shards/<k>.jsonl``, flushed per batch; the parent folds them into
``generations.jsonl`` when they end. Perplexity is split the same way: each shard sums the negative
log-likelihood of its share of the references, the parent adds the sums, so the result is the one
process's up to summation order. A job stopped midway keeps what its shards wrote: the next run of the
same command folds those rows in first (``fold_shards``) and generates the rest.

Greedy output is the same for any N (every row is decoded alone in its batch's width the same way);
sampled rows depend on the batch they fall in, so ``nproc`` is part of a sampled job's parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.util import UsageError, write_json


def devices(device: str, nproc: int) -> list[str]:
    """One device per shard: ``cuda:0`` … ``cuda:N-1`` where there are GPUs, else the CPU."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        have = torch.cuda.device_count()
        if have < nproc:
            raise UsageError(f"--nproc {nproc} needs {nproc} GPUs (this machine has {have})")
        return [f"cuda:{k}" for k in range(nproc)]
    if device in ("auto", "cpu"):
        return ["cpu"] * nproc
    if device == "cuda":
        raise UsageError("--device cuda: this machine has no GPU that torch can use")
    raise UsageError(f"--nproc {nproc} spreads over every GPU: give --device auto, cuda or cpu (got {device})")


def fold_shards(out_dir: Path, done: dict[int, dict]) -> int:
    """Append the complete rows of ``shards/*.jsonl`` (a stopped sharded job's) to generations.jsonl and
    ``done``; the shard files go. Returns how many rows came in."""
    folder = out_dir / "shards"
    if not folder.is_dir():
        return 0
    added = 0
    with open(out_dir / "generations.jsonl", "a", encoding="utf-8") as gen:
        for part in sorted(folder.glob("*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    i = int(r["index"])
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line: that row is generated again
                if i not in done:
                    done[i] = r
                    gen.write(json.dumps(r, ensure_ascii=False) + "\n")
                    added += 1
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return added


def run_shards(run_dir: Path, data: str, ckpt: Path, rows: list, prompts: list, done: dict[int, dict],
               params: dict, out_dir: Path, nproc: int, device: str, ppl: bool, progressed) -> dict | None:
    """Generate the rows not ``done`` over ``nproc`` processes and fold them in; the perplexity of every
    row's reference when ``ppl`` ({"perplexity", "nll", "tokens"}, else None)."""
    devs = devices(device, nproc)
    todo = sorted((i for i in range(len(rows)) if i not in done), key=lambda i: len(prompts[i]))
    folder = out_dir / "shards"
    folder.mkdir(exist_ok=True)
    procs = []
    threads = max(1, (os.cpu_count() or 1) // nproc)
    for k, dev in enumerate(devs):
        spec = {"run_dir": str(run_dir), "data": str(data), "checkpoint": str(ckpt), "params": params,
                "rows": todo[k::nproc], "ppl_rows": list(range(k, len(rows), nproc)) if ppl else [],
                "device": dev, "out": str(folder / f"{k}.jsonl"), "ppl_out": str(folder / f"{k}.ppl.json")}
        write_json(folder / f"{k}.spec.json", spec)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if dev == "cpu" else dict(os.environ)
        log = open(folder / f"{k}.log", "wb")
        cmd = [sys.executable, "-m", "engine.eval.shard_worker", str(folder / f"{k}.spec.json")]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        seen = len(done)
        while any(p.poll() is None for p, _ in procs):
            time.sleep(0.5)
            now = len(done) + sum(_lines(folder / f"{k}.jsonl") for k in range(nproc))
            if now != seen:
                seen = now
                progressed(now)
    except BaseException:
        for p, _ in procs:
            p.kill()
        raise
    finally:
        for p, log in procs:
            p.wait()
            log.close()
    failed = [(k, p.returncode) for k, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        k, code = failed[0]
        tail = (folder / f"{k}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"shard {k} of {nproc} failed (exit {code}): {tail[0] if tail else 'no output'} "
                           f"(its log: {folder / f'{k}.log'}; run the same command again to resume)")
    result = None
    if ppl:
        nll = tokens = 0.0
        for k in range(nproc):
            part = json.loads((folder / f"{k}.ppl.json").read_text())
            nll += part["nll_sum"]
            tokens += part["tokens"]
        import math

        mean = nll / max(tokens, 1)
        result = {"perplexity": math.exp(min(mean, 50)), "nll": mean, "tokens": int(tokens)}
    fold_shards(out_dir, done)
    progressed(len(done))
    return result


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except OSError:
        return 0
