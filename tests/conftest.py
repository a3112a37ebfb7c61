from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One OpenMP thread a process, in the test processes and all they start: the tests run side by side (one
# process more than the cores, each starting workers), and torch's threads on cores that are busy already spin
# waiting for each other — tests/test_decode.py's two largest tests took 45 s of CPU beside two busy cores
# with two threads, 13 s with one. (The workers the tests start were given one already.)
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (a plugin): its threads are set already
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """The slowest tests first (tests/slowest.txt: the two xdist workers then end together, on short tests);
    tests/gpu: marked ``gpu``, skipped where there is no CUDA (``make test-gpu`` runs them on a GPU)."""
    listed = Path(__file__).with_name("slowest.txt")
    rank = {name: i for i, name in enumerate(
        line.strip() for line in listed.read_text().splitlines() if line.strip() and not line.startswith("#"))}

    # stable: the rest keep their order (a node id is the file from the repository's root, then the test)
    items.sort(key=lambda item: rank.get(f"{item.nodeid.split('::')[0]}::{item.originalname}", len(rank)))
    items[:] = dealt(items, sum(f"{item.nodeid.split('::')[0]}::{item.originalname}" in rank for item in items),
                     int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    gpu = [item for item in items if "/tests/gpu/" in str(item.path).replace("\\", "/")]
    if not gpu:
        return
    import torch

    for item in gpu:
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA (make test-gpu on a GPU machine)"))


def dealt(items: list, slow: int, workers: int) -> list:
    """``items`` (the ``slow`` ones first, slowest first) reordered for pytest-xdist's worksteal scheduler, which
    gives each of its ``workers`` one contiguous part of the list (the first ``len // workers``, then half the
    rest, …) and later lets an idle one take the end of another's queue: the slow tests dealt round the parts,
    each part's first, the others filling them up. In one list, the first part held every slow test, run one
    after another by one process while the others ran short ones."""
    if workers < 2 or len(items) < workers:
        return items
    sizes, left = [], len(items)
    for k in range(workers):  # worksteal's own split: len(pending) // nodes_remaining
        sizes.append(left // (workers - k))
        left -= sizes[-1]
    parts = [items[k:slow:workers] for k in range(workers)]
    rest = iter(items[slow:])
    for part, size in zip(parts, sizes):
        part.extend(itertools.islice(rest, max(0, size - len(part))))
    parts[-1].extend(rest)  # (only where one part's slow share outgrew its size)
    return [item for part in parts for item in part]


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


def load_lora_model(model_dir: Path, env: dict | None = None, **flags):
    """The worker's LoRA model (``load_model``) of ``model_dir`` on the CPU — fp32, not compiled, no dropout, no
    checkpointing unless ``flags`` say otherwise — in training mode, each adapter's B random (seeded by its
    name: B starts at zero, a random one makes every adapter weight matter). ``env``: worker knobs
    (``VOXTUI_*``, engine/worker/knobs.py) in force while it loads."""
    import zlib

    import torch

    from engine.config import TrainConfig
    from engine.worker.knobs import knobs
    from engine.worker.modeling import load_model

    cfg = TrainConfig(model_id=str(model_dir), train_jsonl="x", compile=False,
                      **{"quant": "none", "bf16": False, "lora_dropout": 0.0, "grad_ckpt": False, **flags})
    before = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    knobs.cache_clear()
    try:
        torch.manual_seed(0)
        model, _ = load_model(cfg, torch.device("cpu"))
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        knobs.cache_clear()
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model.train()


def lora_loss_and_grads(model) -> tuple[float, dict]:
    """The worker's loss (``CausalLMLoss``) over two short rows of 8 tokens (16 positions; targets from the
    fourth on), backward: the summed loss and every adapter weight's gradient."""
    import torch

    from engine.worker.modeling import CausalLMLoss

    ids = torch.tensor([[1, 3, 500, 600, 700, 800, 4, 900], [1, 3, 510, 610, 710, 4, 2, 2]])
    flat = ids[:, 1:].reshape(-1)
    idx = torch.arange(3, flat.shape[0])
    total, _ = CausalLMLoss(model)(input_ids=ids, target_idx=idx, targets=flat[idx])
    total.backward()
    return float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def kept_for_backward(model, step) -> int:
    """Bytes a training step keeps for its backward: every tensor the autograd graph saves that is not one of
    ``model``'s weights or buffers. ``step()`` returns the loss (under whatever autocast it needs); it runs
    twice — the first compiles — and the second is counted."""
    import torch

    weights = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    total = [0]

    def pack(t):
        if t.data_ptr() not in weights:
            total[0] += t.numel() * t.element_size()
        return t

    for _ in range(2):
        total[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
        loss.backward()
    return total[0]


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


ENDLESS = 10_000  # a run of this many steps or more trains until its test stops it


def paced(args: list[str]) -> dict:
    """The environment of a run that trains until its test stops it (--max_steps ENDLESS or more): it sleeps
    0.1 s after each step (VOXTUI_STEP_PAUSE), a third of a core instead of a whole one, so the tests beside it
    on a 2-core machine keep theirs (a test's ``env`` may set it otherwise)."""
    steps = args[args.index("--max_steps") + 1] if "--max_steps" in args else "0"
    return {"VOXTUI_STEP_PAUSE": "0.1"} if steps.isdigit() and int(steps) >= ENDLESS else {}


def worker(args: list[str], nproc: int = 1, env: dict | None = None, wait: bool = True, timeout: int = 300):
    """Run the real worker: `python -m engine.train` for 1 rank, real torchrun (gloo) for more."""
    cmd = [sys.executable, "-m", "engine.train", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "engine.train", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **paced(args), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def start_detached(model: Path, runs: Path, name: str, train: Path, nproc: int = 2, env: dict | None = None,
                   preflight: bool = False, **flags) -> Path:
    """`voxtui run --detach` for real; returns the run folder once its engine is up. Without preflight
    (``--skip_preflight``: 7 s of a CPU core a run) unless ``preflight``: the tests of `voxtui run` around
    preflight ask for it (tests/test_runner.py, test_preflight*.py)."""
    args = train_args(model, runs / name, train, **flags) + ["--nproc", str(nproc), "--detach"]
    if not preflight:
        args.append("--skip_preflight")
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **paced(args), **(env or {})}
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
