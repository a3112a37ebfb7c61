"""Compare two runs' loss curves step by step (issue 15's FP8 bar: "within 1% of bf16's over 200 steps").

    python bench/compare_losses.py REFERENCE CANDIDATE [--window 10] [--bound 0.01] [--json OUT]

REFERENCE and CANDIDATE are run folders (or their events.jsonl). Both runs must have trained on the same
data in the same order (same seed, batch and steps). Step losses are noisy, so each curve is first
smoothed by a trailing mean over ``--window`` steps; the report gives, over the steps both runs logged,
the largest and the mean relative gap of the smoothed curves, the final losses, and whether the largest
gap is within ``--bound``. Exit 0 within the bound, 1 outside it, 2 for unusable input (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_losses(path: str | Path) -> dict[int, float]:
    """``step → loss`` from a run folder's (or a file's) events; skipped (non-finite) steps are left out."""
    p = Path(path)
    if p.is_dir():
        p = p / "events.jsonl"
    if not p.is_file():
        raise ValueError(f"{path}: no events.jsonl")
    out: dict[int, float] = {}
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            if n == len(lines):
                break  # a last line still being written
            raise ValueError(f"{p}:{n}: not JSON") from None
        if isinstance(e, dict) and e.get("type") == "step" and isinstance(e.get("step"), int) \
                and isinstance(e.get("loss"), (int, float)) and e["loss"] == e["loss"]:
            out[e["step"]] = float(e["loss"])
    return out


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def compare(ref: dict[int, float], cand: dict[int, float], window: int = 10) -> dict:
    steps = sorted(set(ref) & set(cand))
    if not steps:
        raise ValueError("the two runs share no logged step")
    a = smooth([ref[s] for s in steps], window)
    b = smooth([cand[s] for s in steps], window)
    gaps = [abs(y - x) / abs(x) if x else float("inf") for x, y in zip(a, b)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    return {"steps": len(steps), "first": steps[0], "last": steps[-1], "window": window,
            "max_rel_gap": gaps[worst], "at_step": steps[worst], "mean_rel_gap": sum(gaps) / len(gaps),
            "final_ref": ref[steps[-1]], "final_candidate": cand[steps[-1]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--bound", type=float, default=0.01)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    try:
        if args.window < 1:
            raise ValueError(f"--window must be 1 or more (got {args.window})")
        r = compare(step_losses(args.reference), step_losses(args.candidate), args.window)
    except ValueError as e:
        print(f"compare_losses: error: {e}", file=sys.stderr)
        return 2
    r["bound"] = args.bound
    r["within"] = r["max_rel_gap"] <= args.bound
    print(f"{r['steps']} common steps ({r['first']}–{r['last']}), trailing mean over {args.window}: largest gap "
          f"{100 * r['max_rel_gap']:.2f}% at step {r['at_step']}, mean {100 * r['mean_rel_gap']:.2f}%; final loss "
          f"{r['final_ref']:.4f} → {r['final_candidate']:.4f}; {'within' if r['within'] else 'outside'} "
          f"{100 * args.bound:g}%")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(args.json)
    return 0 if r["within"] else 1


if __name__ == "__main__":
    sys.exit(main())
