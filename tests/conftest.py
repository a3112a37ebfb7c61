from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list, raw: bytes | None = None) -> Path:
    """Rows as JSON lines (dicts/lists/scalars are dumped, str/bytes written as they are)."""
    if raw is None:
        parts = []
        for r in rows:
            if isinstance(r, bytes):
                parts.append(r)
            elif isinstance(r, str):
                parts.append(r.encode())
            else:
                parts.append(json.dumps(r, ensure_ascii=False).encode())
        raw = b"\n".join(parts) + b"\n"
    path.write_bytes(raw)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def voxtui(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"voxtui {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from engine.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def fmt():
    from engine.formatting import load_format

    return load_format()
