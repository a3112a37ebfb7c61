"""Read-only views of a run folder that need no torch: complete checkpoints, the engine's file.

The engine's loop, ``voxtui engine list`` and the dashboard read the run folder through these, so
none of them imports torch to answer a question about files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (a ``checkpoint-<step>`` folder exists only
    once it is complete: it is written under a temp name and renamed)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file() and (p / "adapter_model.safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1][1] if done else None


def engine_info(run_dir: Path) -> dict:
    """``engine.json`` (pid, endpoints, key, …), or {} when missing or unreadable."""
    try:
        info = json.loads((Path(run_dir) / "engine.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid runs (a zombie does not)."""
    import psutil

    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def checkpoint_states(ckpt_root: Path) -> list[dict]:
    """The complete checkpoints on disk now, oldest first, each with what its ``trainer_state.json`` says:
    ``{"step", "name", "path", "best_step", "best_loss", "reason", "time"}`` (None where unreadable)."""
    out = []
    for step, path in complete_checkpoints(ckpt_root):
        state = _read_json(path / "trainer_state.json")
        out.append({"step": step, "name": path.name, "path": str(path), "best_step": state.get("best_step"),
                    "best_loss": state.get("best_loss"), "reason": state.get("reason", ""),
                    "time": state.get("time")})
    return out


def final_adapter(run_dir: Path) -> Path | None:
    """``lora_final/`` when it holds a complete adapter (it is written under a temp name and renamed)."""
    path = Path(run_dir) / "lora_final"
    return path if (path / "adapter_model.safetensors").is_file() else None


def inference_results(run_dir: Path) -> dict[str, dict]:
    """The inference jobs under ``runs/<run>/infer/``, by name. A finished one: its ``metrics.json`` with
    ``"state": "finished"``; one without metrics yet (running, or interrupted): ``"state": "incomplete"``,
    ``"done"`` (rows generated so far) and its ``params``."""
    root = Path(run_dir) / "infer"
    out: dict[str, dict] = {}
    if not root.is_dir():
        return out
    for job in sorted(root.iterdir()):
        if not job.is_dir() or job.name.startswith("."):
            continue
        metrics = _read_json(job / "metrics.json")
        if metrics:
            out[job.name] = {**metrics, "state": "finished", "path": str(job)}
            continue
        params = _read_json(job / "params.json")
        if not params:
            continue
        try:
            with open(job / "generations.jsonl", "rb") as f:
                done = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except OSError:
            done = 0
        out[job.name] = {"state": "incomplete", "done": done, "params": params,
                         "checkpoint": params.get("checkpoint", ""), "path": str(job)}
    return out


def _json_lines(path: Path):
    """The JSON objects of a JSONL file another process wrote, skipping whatever is not one."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                yield value


def inference_samples(job_dir: Path, n: int = 5) -> list[dict]:
    """The first ``n`` rows of a finished job (by input order), as the engine's ``inference`` event carries
    them: ``{line, prompt, prediction, reference, rougeL}``."""
    job_dir = Path(job_dir)
    rows: dict[int, dict] = {}
    try:
        for r in _json_lines(job_dir / "generations.jsonl"):
            index = r.get("index")
            if isinstance(index, int) and 0 <= index < n:
                rows[index] = r
                if len(rows) == n:
                    break
    except OSError:
        return []
    scores: dict[int, float] = {}
    try:
        for _, p in zip(range(n), _json_lines(job_dir / "per_row.jsonl")):
            score = p.get("rougeL")
            if isinstance(p.get("index"), int) and isinstance(score, (int, float)):
                scores[p["index"]] = score
    except OSError:
        pass
    return [{"line": r.get("line"), "prompt": str(r.get("prompt", ""))[:300],
             "prediction": str(r.get("prediction", ""))[:500], "reference": str(r.get("output", ""))[:500],
             "rougeL": scores.get(i)} for i, r in sorted(rows.items())]
