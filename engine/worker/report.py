"""Where the worker's output goes: events (to the sink: events.jsonl, or the spool and the engine), lines
on stderr and TensorBoard (rank 0 only, ``runs/<run>/tb``).

TensorBoard's tags, all written here: ``train/loss``, ``train/grad_norm``, ``train/lr``,
``perf/tokens_per_s``, ``perf/step_time``, ``perf/pad_frac``, ``perf/mfu``, ``perf/mfu_attn``,
``mem/allocated_gib``, ``mem/peak_gib`` (each logged step); ``eval/loss``, ``eval/ppl``; ``preview/<i>`` (text);
``gpu/<i>/{util,mem_used,power,temp,sm_clock}``, ``host/rss_gib``, ``host/cpu_percent`` (telemetry, at
the step it arrives).
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

from engine.protocol import Log, Message, Step, Telemetry
from engine.util import printable, printable_lines, run_name


class Report:
    """The trainer's one way out: ``emit`` an event, ``log`` a line (rank 0), ``say`` both at once. The
    sink and the board are set during setup; until then events go nowhere (nothing is emitted before)."""

    def __init__(self, main: bool) -> None:
        self.main = main
        self.sink = None
        self.board = Board(None)

    def open(self, run_dir: Path, engine: dict | None, standalone: bool) -> None:
        """Events to the engine (spool, then PUSH) when ``engine`` (its engine.json, rank 0 under the engine)
        is given, else to ``run_dir``/events.jsonl when ``standalone`` (rank 0 on its own), else nowhere."""
        from engine.worker.sinks import JsonlSink, NullSink, PushSink

        if engine:
            endpoints = engine.get("endpoints", engine)
            self.sink = PushSink(endpoints["worker_events"], run_name(run_dir), spool=run_dir / "spool")
        else:
            self.sink = JsonlSink(run_dir / "events.jsonl", run_name(run_dir)) if standalone else NullSink()

    def emit(self, event: Message) -> None:
        if self.sink is not None:
            self.sink.emit(event)

    def log(self, message: str) -> None:
        """A line (or lines) in worker.log; what it quotes from the run (its folder's path, a file's text, an
        error's message) escaped, as ``voxtui`` prints it: ``tail -f`` on the log is safe on a terminal."""
        if self.main:
            try:
                print(f"[voxtui] {printable_lines(message)}", file=sys.stderr, flush=True)
            except OSError:  # worker.log on a full disk (ENOSPC): the line is lost, never the run (events say it)
                pass

    def say(self, message: str, level: str = "info") -> None:
        """A line in the log that the dashboard shows too (a ``log`` event)."""
        self.log(message)
        self.emit(Log(level=level, message=message))

    def close(self) -> None:
        self.board.close()
        if self.sink is not None:
            self.sink.close()


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


def peak_flops(peak_tflops: float, device) -> float | None:
    """The device's bf16 matmul peak in FLOP/s, for MFU: ``--peak_tflops``, or looked up by name."""
    import torch

    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def memory(device) -> dict:
    """The step event's device memory fields, in GiB (none on the CPU)."""
    import torch

    if device.type != "cuda":
        return {}
    g = 2**30
    return {"mem_allocated": torch.cuda.memory_allocated() / g, "mem_reserved": torch.cuda.memory_reserved() / g,
            "mem_peak": torch.cuda.max_memory_allocated() / g}


def step_event(gathered, step: int, epoch: float, loss: float, gnorm: float, lr: float, nonfinite: str,
               slowest: float, flops_per_token: int, peak: float | None, device, flops_per_pair: int = 0) -> Step:
    """The step event from the step's all-gather (a rank per row; columns: summed loss, real tokens, token
    slots, step time, …, causal attention pairs; ``slowest``: the largest step time). ``peak``: all ranks'
    FLOP/s together (None: no MFU). MFU: ``4 · matmul params`` FLOPs per real token; ``mfu_attn`` adds
    ``flops_per_pair`` for every causal query-key pair of the step's real examples."""
    times = gathered[:, 3]
    toks = gathered[:, 1]
    tps = float(toks.sum()) / max(slowest, 1e-9)
    pairs = float(gathered[:, 7].sum()) if gathered.shape[1] > 7 else 0.0
    mfu = tps * flops_per_token / peak if peak else None
    mfu_attn = mfu + pairs * flops_per_pair / max(slowest, 1e-9) / peak if peak and flops_per_pair else None
    return Step(step=step, loss=loss if math.isfinite(loss) else None, lr=lr,
                grad_norm=gnorm if math.isfinite(gnorm) else None, tokens_per_s=tps, epoch=epoch,
                tokens=int(toks.sum()), tokens_per_s_rank=[float(t / max(s, 1e-9)) for t, s in zip(toks, times)],
                step_time=slowest, step_time_rank=[float(s) for s in times],
                pad_frac=1 - float(gathered[:, 1].sum()) / max(float(gathered[:, 2].sum()), 1.0),
                mfu=mfu, mfu_attn=mfu_attn, skipped=bool(nonfinite), nonfinite=nonfinite,
                **memory(device))


def _writer_thread_hook(previous):
    """``threading.excepthook`` that lets TensorBoard's writer thread fail quietly on an OSError (a full
    disk, its folder removed): the writer keeps the error and raises it at the next write, where
    ``Board._guarded`` says it in one line — not a thread's traceback in worker.log besides. Any other
    thread, or error, goes to the hook that was there."""
    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.voxtui = True
    return hook


class Board:
    """A SummaryWriter on rank 0; on the other ranks every method does nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.writer = None
        self.folder = folder
        if folder is not None:
            import threading

            from torch.utils.tensorboard import SummaryWriter

            if not getattr(threading.excepthook, "voxtui", False):
                threading.excepthook = _writer_thread_hook(threading.excepthook)

            self.writer = SummaryWriter(str(folder))

    def _guarded(self, write) -> None:
        """``write(writer)``; the tb folder removed or unwritable while the run goes (TensorBoard's writer
        opens its file again at each flush: FileNotFoundError) costs that record, never the run — a new event
        file is begun (the folder made again), or, where none can be, TensorBoard output ends."""
        if self.writer is None:
            return
        try:
            write(self.writer)
        except OSError as e:
            from torch.utils.tensorboard import SummaryWriter

            with contextlib.suppress(OSError):  # (worker.log on the same full disk)
                print(printable(f"[voxtui] TensorBoard: {e}; writing a new event file"), file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self.writer.close()
            try:
                self.writer = SummaryWriter(str(self.folder))
            except OSError as again:
                with contextlib.suppress(OSError):
                    print(printable(f"[voxtui] TensorBoard output ends: {again}"), file=sys.stderr, flush=True)
                self.writer = None

    def step(self, ev: Step) -> None:
        self._guarded(lambda w: self._step(w, ev))

    def _step(self, w, ev: Step) -> None:
        s = ev.step
        if ev.loss is not None:
            w.add_scalar("train/loss", ev.loss, s)
        if ev.grad_norm is not None:
            w.add_scalar("train/grad_norm", ev.grad_norm, s)
        w.add_scalar("train/lr", ev.lr, s)
        w.add_scalar("perf/tokens_per_s", ev.tokens_per_s, s)
        w.add_scalar("perf/step_time", ev.step_time, s)
        w.add_scalar("perf/pad_frac", ev.pad_frac, s)
        if ev.mfu is not None:
            w.add_scalar("perf/mfu", ev.mfu, s)
        if ev.mfu_attn is not None:
            w.add_scalar("perf/mfu_attn", ev.mfu_attn, s)
        if ev.mem_peak:
            w.add_scalar("mem/allocated_gib", ev.mem_allocated, s)
            w.add_scalar("mem/peak_gib", ev.mem_peak, s)

    def telemetry(self, ev: Telemetry, step: int) -> None:
        self._guarded(lambda w: self._telemetry(w, ev, step))

    def _telemetry(self, w, ev: Telemetry, step: int) -> None:
        for g in ev.gpus:
            for k in ("util", "mem_used", "power", "temp", "sm_clock"):
                w.add_scalar(f"gpu/{g.index}/{k}", getattr(g, k), step)
        if ev.rss is not None:
            w.add_scalar("host/rss_gib", ev.rss, step)
            w.add_scalar("host/cpu_percent", ev.cpu_percent or 0.0, step)

    def eval(self, loss: float, step: int) -> None:
        def write(w):
            w.add_scalar("eval/loss", loss, step)
            w.add_scalar("eval/ppl", math.exp(min(loss, 50)), step)
            w.flush()

        self._guarded(write)

    def preview(self, index: int, prompt: str, text: str, step: int) -> None:
        self._guarded(lambda w: w.add_text(f"preview/{index}", f"**prompt** {prompt}\n\n**output** {text}", step))

    def flush(self) -> None:
        self._guarded(lambda w: w.flush())

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()
