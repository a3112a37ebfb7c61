from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """tests/gpu: marked ``gpu``, skipped where there is no CUDA (``make test-gpu`` runs them on a GPU)."""
    gpu = [item for item in items if "/tests/gpu/" in str(item.path).replace("\\", "/")]
    if not gpu:
        return
    import torch

    for item in gpu:
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA (make test-gpu on a GPU machine)"))


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


def read_events(run_dir: Path) -> list[dict]:
    """The run's events so far: whole lines only (the engine may be writing the last one as we read)."""
    text = (Path(run_dir) / "events.jsonl").read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def train_args(model: Path, out: Path, train: Path, val: Path | None = None, **flags) -> list[str]:
    """Flags for a small, exact CPU run of the worker (fp32, no quantisation unless asked)."""
    base = {"model_id": model, "train_jsonl": train, "output_dir": out, "quant": "none", "bf16": False,
            "per_device_bsz": 2, "max_steps": 6, "lr": 5e-3, "warmup_steps": 1, "save_steps": 0, "eval_steps": 0,
            "preview_steps": 0, "preview_budget": 0, "packing": False, "seed": 1, "telemetry_interval": 0.5}
    if val is not None:
        base["val_jsonl"] = val
    base.update(flags)
    args = []
    for k, v in base.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no-{k}")
        else:
            args += [f"--{k}", str(v)]
    return args


def worker(args: list[str], nproc: int = 1, env: dict | None = None, wait: bool = True, timeout: int = 300):
    """Run the real worker: `python -m engine.train` for 1 rank, real torchrun (gloo) for more."""
    cmd = [sys.executable, "-m", "engine.train", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "engine.train", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def start_detached(model: Path, runs: Path, name: str, train: Path, nproc: int = 2, env: dict | None = None,
                   **flags) -> Path:
    """`voxtui run --detach` for real; returns the run folder once its engine is up."""
    args = train_args(model, runs / name, train, **flags) + ["--nproc", str(nproc), "--detach"]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", *args], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == str(runs / name)
    _DETACHED.append(runs / name)
    return runs / name


_DETACHED: list[Path] = []  # run folders whose engines this test started (and maybe resumed): reaped after it


@pytest.fixture(autouse=True)
def _reap_detached_runs():
    """After each test, the engine (and its workers) of every run it detached is killed if still alive — a
    test that failed halfway must not leave a long run training beside the next tests."""
    yield
    import signal

    import psutil

    while _DETACHED:
        run = _DETACHED.pop()
        try:
            pid = int(json.loads((run / "engine.json").read_text())["pid"])
            engine = psutil.Process(pid)
            if str(run) not in " ".join(engine.cmdline()):  # gone, its pid now another process's
                continue
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            continue
        for q in [*descendants_of(pid), pid]:
            try:
                os.kill(q, signal.SIGKILL)
            except OSError:
                pass


def wait_for(pred, timeout: float = 120.0, every: float = 0.2, what: str = "a condition"):
    """Poll ``pred`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


async def pilot_wait(pilot, pred, timeout: float = 90.0, every: float = 0.2) -> None:
    """In a Pilot test: let the app run until ``pred()`` holds, or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await pilot.pause(every)
    raise AssertionError("timed out")


def engine_sockets(folder: Path):
    """The worker-side sockets of an engine played by the test (PULL for events, PUB for commands) and
    the engine.json that names them, as `--engine` takes it."""
    import zmq

    ctx = zmq.Context.instance()
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    ev, ctl = f"ipc://{folder}/ev.sock", f"ipc://{folder}/ctl.sock"
    pull.bind(ev)
    pub.bind(ctl)
    (folder / "engine.json").write_text(json.dumps({"worker_events": ev, "worker_control": ctl}))
    return pull, pub


def descendants_of(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


async def until_still(pilot, timeout: float = 10.0, every: float = 0.15, looks: int = 3) -> None:
    """In a Pilot test: let the app run until its screen stops changing (``looks`` screenshots in a row
    the same) — a loaded machine paints a tab later than a fixed pause allows — or ``timeout`` passes."""
    import time

    deadline, last, same = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline:
        await pilot.pause(every)
        shot = pilot.app.export_screenshot()
        same = same + 1 if shot == last else 0
        if same >= looks - 1:
            return
        last = shot
