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
        # jobs asked for while one runs, started one after another (the dashboard's "Infer all" once started a
        # model copy per checkpoint at once beside training): (key, argv, checkpoint folder or None)
        self.queue: list[tuple[tuple, list[str], Path | None]] = []
        self._gpu_count: int | None = None

    def running(self) -> bool:
        """Whether a job is still running or waits its turn (ended ones are forgotten; the next waiting one
        starts once none runs). The engine asks every second while jobs wait."""
        self.procs = [p for p in self.procs if p.poll() is None]
        self.jobs = {k: p for k, p in self.jobs.items() if p.poll() is None}
        if not self.procs and self.queue:
            self._launch(*self.queue.pop(0))
        return bool(self.procs) or bool(self.queue)

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
        which = "the latest checkpoint" if cmd.checkpoint is None else f"checkpoint-{cmd.checkpoint}"
        if key in self.jobs:  # two clients (or one asked twice): both would write one infer/ folder
            return Reply(status="error", reason=f"inference on {which} with {data} is running already (pid "
                                                f"{self.jobs[key].pid})", state=state)
        if any(key == waiting for waiting, _, _ in self.queue):
            return Reply(status="error", reason=f"inference on {which} with {data} is waiting its turn already",
                         state=state)
        argv = [sys.executable, "-m", "engine", "infer", "--run", str(self.run_dir), "--data", data,
                "--events", self.events, "--device", self.device(), "--json", "-"]
        if cmd.checkpoint is not None:
            argv += ["--checkpoint", str(cmd.checkpoint)]
        folder = done[cmd.checkpoint] if cmd.checkpoint is not None else None
        if self.procs:  # one job at a time: a model copy each, beside training
            self.queue.append((key, argv, folder))
            ahead = len(self.queue) - 1
            return Reply(status="ok", reason=f"inference on {which} waits its turn: it starts once the running job "
                                             f"(pid {self.procs[0].pid})" + (f" and {ahead} waiting before it" if ahead
                                                                             else "") + " end", state=state)
        proc = self._launch(key, argv, folder)
        return Reply(status="ok", reason=f"inference started (pid {proc.pid})", state=state)

    def _launch(self, key: tuple, argv: list[str], folder: Path | None) -> subprocess.Popen:
        with open(self.run_dir / "infer.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
        if folder is not None:  # marked in the job's name at once: the worker's pruning keeps it while the job
            # starts (seconds); the job marks it again itself, then finds it still there (or fails, saying so)
            from engine.runs import mark_in_use

            try:
                mark_in_use(folder, pid=proc.pid)
            except OSError:
                pass  # pruned in between (or while the job waited its turn): the job says so
        self.procs.append(proc)
        self.jobs[key] = proc
        return proc

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
