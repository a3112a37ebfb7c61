"""Inference jobs a client asks the engine for (``run_inference``): each is ``voxtui infer`` as a
process of its own, so the engine's loop never waits on it; its ``inference`` events come back on the
workers' events socket and join the run's stream. The engine leaves once the last job has ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.protocol import Reply, RunInference


class InferenceJobs:
    """The ``voxtui infer`` processes started from one run (``events``: the endpoint they push to)."""

    def __init__(self, run_dir: Path, nproc: int, events: str) -> None:
        self.run_dir = run_dir
        self.nproc = nproc
        self.events = events
        self.procs: list[subprocess.Popen] = []
        self.jobs: dict[tuple, subprocess.Popen] = {}  # (checkpoint, data) → its running process
        self._gpu_count: int | None = None

    def running(self) -> bool:
        """Whether a job is still running (ended ones are forgotten)."""
        self.procs = [p for p in self.procs if p.poll() is None]
        self.jobs = {k: p for k, p in self.jobs.items() if p.poll() is None}
        return bool(self.procs)

    def start(self, cmd: RunInference, state: str) -> Reply:
        """Check there is data and a checkpoint to run on, then start the job; ``state`` is the run's, for
        the reply."""
        from engine.runs import complete_checkpoints

        try:
            from engine.config import read_toml

            cfg = read_toml(self.run_dir / "config.toml")
        except Exception:
            cfg = {}  # no readable config: the command must name its data
        data = cmd.data or cfg.get("val_jsonl", "")
        if not data or not Path(data).is_file():
            return Reply(status="error", reason=f"no data file to run inference on ({data or 'none given, no val_jsonl'})",
                         state=state)
        done = dict(complete_checkpoints(self.run_dir / "checkpoints"))
        if cmd.checkpoint is not None and cmd.checkpoint not in done:
            return Reply(status="error", reason=f"no complete checkpoint-{cmd.checkpoint}", state=state)
        if cmd.checkpoint is None and not done and not (self.run_dir / "lora_final").is_dir():
            return Reply(status="error", reason="no checkpoint yet", state=state)
        key = (cmd.checkpoint, str(Path(data).resolve()))
        self.running()
        if key in self.jobs:  # two clients (or one asked twice): both would write one infer/ folder
            which = "the latest checkpoint" if cmd.checkpoint is None else f"checkpoint-{cmd.checkpoint}"
            return Reply(status="error", reason=f"inference on {which} with {data} is running already (pid "
                                                f"{self.jobs[key].pid})", state=state)
        argv = [sys.executable, "-m", "engine", "infer", "--run", str(self.run_dir), "--data", data,
                "--events", self.events, "--device", self.device(), "--json", "-"]
        if cmd.checkpoint is not None:
            argv += ["--checkpoint", str(cmd.checkpoint)]
        with open(self.run_dir / "infer.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
        if cmd.checkpoint is not None:  # marked in the job's name at once: the worker's pruning keeps it while the
            # job starts (seconds); the job marks it again itself, then finds it still there (or fails, saying so)
            from engine.runs import mark_in_use

            try:
                mark_in_use(done[cmd.checkpoint], pid=proc.pid)
            except OSError:
                pass  # pruned in between: the job says so
        self.procs.append(proc)
        self.jobs[key] = proc
        return Reply(status="ok", reason=f"inference started (pid {proc.pid})", state=state)

    def device(self) -> str:
        """A GPU that training does not use, else the CPU (so inference never starves training). NVML is
        asked once."""
        if self._gpu_count is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._gpu_count = pynvml.nvmlDeviceGetCount()
                pynvml.nvmlShutdown()
            except Exception:
                self._gpu_count = 0  # no NVML, no GPU: the CPU
        return f"cuda:{self.nproc}" if self._gpu_count > self.nproc else "cpu"
