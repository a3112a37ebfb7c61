"""What the comparison of runs shows, read from each run's folder (no Textual here: plain data).

Each run is read from its ``events.jsonl`` (``engine.client.read_events``: only what was appended since
the last read, a piece at a time, on a worker thread), so a finished or crashed run needs no engine, a
big file never holds up the screen, and a running one is followed by reading again; its state comes from ``summary`` (the engine process and the folder decide), its config from
``config.toml`` (else the ``run_info`` event's), its inference results from ``infer/*/metrics.json``
(else the jobs' ``inference`` events).
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from engine.client import inference_results, read_events, run_config, summary

TYPES = ("step", "eval", "run_info", "inference")  # what a comparison folds (telemetry, previews … are skipped)
METRICS = (("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("distinct_1", "Distinct-1"), ("distinct_2", "Distinct-2"))
NOT_COMPARED = ("output_dir", "engine")  # each run's own folder and engine: they always differ
# config keys naming files or folders: compared as the files they name (engine/daemon/launch.py stores
# them absolute; older runs have them relative to where they were started)
PATH_KEYS = ("train_jsonl", "val_jsonl", "preview_file", "cache_dir")
MAX_POINTS = 400  # a terminal plot shows a few hundred points at most
CHUNK = 1 << 20  # bytes of events.jsonl read and folded at a time (the UI waits for at most one piece)
CKPT = re.compile(r"checkpoint-(\d+)$")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class RunSeries:
    """One run's curves: train loss, tokens/s and tokens seen by step; val loss by step; inference
    metrics by checkpoint step; its config, model and state.

    ``update`` reads and folds on a worker thread, a piece of the file at a time (``CHUNK``), under
    ``lock``; the screen reads the curves (``series``) under the same lock, so a redraw never sees a
    half-folded piece and never waits for more than one piece."""

    path: str
    name: str = ""
    offset: int = 0  # bytes of events.jsonl folded so far
    size: int = 0  # the file's size at the last read (offset < size: still reading)
    step_x: list = field(default_factory=list)  # step numbers, increasing (a resume cuts what it redoes)
    loss: list = field(default_factory=list)  # train loss at each step (None: not finite)
    seen: list = field(default_factory=list)  # real tokens seen by each step, all ranks (see ``fold``)
    tps: list = field(default_factory=list)  # tokens/s at each step
    evals: list = field(default_factory=list)  # (step, val loss)
    event_inference: dict = field(default_factory=dict)  # job → (step, metrics) from finished inference events
    disk_inference: dict = field(default_factory=dict)  # job → (step, metrics) from infer/<job>/metrics.json
    info_config: dict = field(default_factory=dict)  # run_info.config
    file_config: dict = field(default_factory=dict)  # config.toml
    model: str = ""
    state: str = "…"
    step: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.name = self.name or Path(self.path).name

    # ------------------------------------------------------------------ reading and folding (a worker thread)

    def update(self, max_bytes: int = CHUNK) -> bool:
        """Read up to ``max_bytes`` more of events.jsonl and fold it in, and the run's state, config and
        inference results; whether anything shown changed. Files only: meant for a worker thread."""
        run = Path(self.path)
        events, offset = read_events(run, self.offset, TYPES, max_bytes)
        try:
            size = (run / "events.jsonl").stat().st_size
        except OSError:
            size = 0
        changed = False
        with self.lock:
            if offset < self.offset:  # the file was replaced (or is gone): start again
                self.step_x, self.loss, self.seen, self.tps, self.evals = [], [], [], [], []
                self.event_inference, changed = {}, True
            changed |= offset != self.offset or size != self.size
            self.offset, self.size = offset, max(size, offset)
            for ev in events:
                self.fold(ev)
        if self.loading:
            return changed  # the state and results once the events are read
        s = summary(run)
        config = self.file_config or run_config(run)
        disk = {}
        last = s.get("step") if isinstance(s.get("step"), int) else None
        for job, m in inference_results(run).items():
            st = checkpoint_step(m.get("checkpoint"), last)
            if m.get("state") == "finished" and st is not None:
                disk[job] = (st, {k: m[k] for k, _ in METRICS if finite(m.get(k))})
        state, step = str(s.get("state", "")), s.get("step") if isinstance(s.get("step"), int) else 0
        with self.lock:
            if (state, step) != (self.state, self.step):
                self.state, self.step, changed = state, step, True
            if config and config != self.file_config:
                self.file_config, changed = config, True
            if disk != self.disk_inference:
                self.disk_inference, changed = disk, True
        return changed

    @property
    def loading(self) -> bool:
        """Whether part of events.jsonl as it was at the last read is still to be folded."""
        return self.offset < self.size

    def fold(self, ev) -> None:
        match ev.type:
            case "step":
                if self.step_x and ev.step <= self.step_x[-1]:  # a resume redoes the steps after its checkpoint
                    cut = bisect.bisect_left(self.step_x, ev.step)
                    for col in (self.step_x, self.loss, self.seen, self.tps):
                        del col[cut:]
                    self.evals = [e for e in self.evals if e[0] < ev.step]
                # Step.tokens counts the logged step only: with log_steps > 1 the steps between are taken
                # to have seen as many
                gap = ev.step - (self.step_x[-1] if self.step_x else 0)
                self.seen.append((self.seen[-1] if self.seen else 0) + max(int(ev.tokens or 0), 0) * max(gap, 1))
                self.step_x.append(ev.step)
                self.loss.append(ev.loss if finite(ev.loss) else None)
                self.tps.append(ev.tokens_per_s if finite(ev.tokens_per_s) else None)
            case "eval":
                if finite(ev.loss):
                    self.evals.append((ev.step, ev.loss))
            case "run_info":
                self.info_config = ev.config if isinstance(ev.config, dict) else {}
                self.model = str(ev.model_id or "")
            case "inference":
                st = checkpoint_step(ev.checkpoint, self.step_x[-1] if self.step_x else None)
                if ev.state == "finished" and st is not None and isinstance(ev.metrics, dict):
                    self.event_inference[ev.name] = (st, {k: ev.metrics[k] for k, _ in METRICS
                                                          if finite(ev.metrics.get(k))})

    # ------------------------------------------------------------------ what is drawn (the app's thread)

    @property
    def config(self) -> dict:
        return self.file_config or self.info_config

    def tokens_at(self, step: int) -> int:
        """Tokens seen when ``step`` was done (the last step at or before it; 0 before the first)."""
        i = bisect.bisect_right(self.step_x, step)
        return self.seen[i - 1] if i else 0

    def inference_points(self, metric: str) -> list[tuple[int, float]]:
        """(checkpoint step, value) of every finished inference job that has ``metric``, by step."""
        jobs = {**self.event_inference, **self.disk_inference}  # metrics.json is the truth
        return sorted((st, m[metric]) for st, m in jobs.values() if metric in m)

    def has_inference(self) -> bool:
        return bool(self.event_inference or self.disk_inference)

    def series(self, what: str, by_tokens: bool = False) -> tuple[list, list]:
        """(x, y) of one curve: ``train``, ``val``, ``tps`` or an inference metric (``rougeL`` …); x is the
        step, or the tokens seen by then. At most MAX_POINTS points (evenly thinned, the last one kept)."""
        with self.lock:
            if what in ("train", "tps"):
                ys = self.loss if what == "train" else self.tps
                xs = self.seen if by_tokens else self.step_x
                n = min(len(xs), len(ys))
                stride = max(1, math.ceil(n / MAX_POINTS))
                idx = list(range(0, n, stride))
                if n and idx[-1] != n - 1:
                    idx.append(n - 1)
                pts = [(xs[i], ys[i]) for i in idx if ys[i] is not None]
            else:
                pts = list(self.evals) if what == "val" else self.inference_points(what)
                if by_tokens:
                    pts = [(self.tokens_at(st), y) for st, y in pts]
        return [p[0] for p in pts], [p[1] for p in pts]


def checkpoint_step(name, final: int | None = None) -> int | None:
    """The step of ``checkpoint-N`` (a name or a path); for ``lora_final`` (the adapter a run saves at its
    end: what ``voxtui infer`` takes by default) ``final``, the run's last step, as the Evals tab counts it;
    None for anything else."""
    m = CKPT.search(str(name or ""))
    if m:
        return int(m.group(1))
    if final and Path(str(name or "")).name == "lora_final":
        return final
    return None


MISSING = object()


def shown_value(v) -> str:
    """A config value as the table shows it."""
    if v is MISSING or v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ", ".join(shown_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def differing_config(runs: list[RunSeries]) -> list[tuple[str, list[str]]]:
    """What changed between the runs: the model first (always), then every config key whose values
    differ (a key one run lacks counts as differing), in the config's own order; ``NOT_COMPARED`` keys
    are left out."""
    configs = [r.config for r in runs]
    keys: list[str] = []
    for c in configs:
        keys += [k for k in c if k not in keys]
    rows = [("model_id", [shown_value(c.get("model_id", r.model or MISSING)) for c, r in zip(configs, runs)])]
    for k in keys:
        if k in NOT_COMPARED or k == "model_id":
            continue
        values = [c.get(k, MISSING) for c in configs]
        compared = [as_path(r, v) if k in PATH_KEYS else v for r, v in zip(runs, values)]
        if any(not same(v, compared[0]) for v in compared[1:]):
            rows.append((k, [shown_value(v) for v in values]))
    return rows


def as_path(run: RunSeries, value):
    """A file or folder named in a run's config, as the file it is: a relative path (runs made before
    paths were stored absolute) is taken from the folder that holds runs/ — where such runs were started —
    when it is there, so the same data file named both ways is not a difference."""
    if not isinstance(value, str) or not value:
        return value
    p = Path(value)
    if not p.is_absolute():
        p = Path(run.path).resolve().parent.parent / p
    try:
        return str(p.resolve()) if p.exists() else value
    except OSError:
        return value


def same(a, b) -> bool:
    if a is MISSING or b is MISSING:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b
