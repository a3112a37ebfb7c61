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
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
