"""``voxtui export-metrics RUN [--csv OUT | --json OUT] [--skip-bad]``: every scalar of a run by step, from
its ``events.jsonl`` alone (no engine needed; a run still going is read as far as it has got).

One row per step, one column per scalar. The columns are named as the worker's TensorBoard tags
(engine/worker/report.py) where there is one, and in the same style where there is not:

    step, time, epoch                                   the step event (time: its Unix time)
    train/loss, train/grad_norm, train/lr, train/tokens, train/skipped
    perf/tokens_per_s, perf/step_time, perf/pad_frac, perf/mfu, perf/mfu_attn, perf/tokens_per_s/rank<r>, perf/step_time/rank<r>
    mem/allocated_gib, mem/reserved_gib, mem/peak_gib   where recorded (GPU runs; a CPU run's 0.0s are not)
    eval/loss, eval/ppl, eval/tokens                    the evaluation at that step
    preview/rougeL                                      the mean ROUGE-L of the previews made at that step
    infer/<metric>, infer/<metric>_lo, infer/<metric>_hi   inference jobs, at their checkpoint's step
    gpu/<i>/{util,mem_used,power,temp,sm_clock}         telemetry, averaged over the samples of that step
    host/{cpu_percent,rss_gib,mem_used_frac}            (a sample belongs to the last step logged before it,
                                                         as in TensorBoard)

A step logged twice (a resumed run repeats the steps after its checkpoint) keeps its last values.
Inference metrics come from the ``inference`` events and from ``infer/<job>/metrics.json`` (which also
holds the bootstrap intervals, ``_lo`` / ``_hi``); with jobs over several data files, the column says
which: ``infer/<data>/<metric>``. Lines are decoded as the protocol's events (engine/protocol.py), one
at a time: a line that is not one (not JSON, a field missing or of the wrong type, a negative step)
stops the export with one line naming the line and the field (exit 2), unless ``--skip-bad``, which
reads past such lines and names them on stderr. An event of a type this version does not know (a newer
engine's) is passed over; an unterminated last line that is not a whole event yet (a run writing it now)
is left for next time.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from pathlib import Path

from engine.util import UsageError, atomic_write, printable, same_file

STEP_FIELDS = (  # (event field, column)
    ("epoch", "epoch"), ("loss", "train/loss"), ("grad_norm", "train/grad_norm"), ("lr", "train/lr"),
    ("tokens", "train/tokens"), ("skipped", "train/skipped"), ("tokens_per_s", "perf/tokens_per_s"),
    ("step_time", "perf/step_time"), ("pad_frac", "perf/pad_frac"), ("mfu", "perf/mfu"), ("mfu_attn", "perf/mfu_attn"),
    ("mem_allocated", "mem/allocated_gib"), ("mem_reserved", "mem/reserved_gib"), ("mem_peak", "mem/peak_gib"),
)
RANK_FIELDS = (("tokens_per_s_rank", "perf/tokens_per_s"), ("step_time_rank", "perf/step_time"))
EVAL_FIELDS = (("loss", "eval/loss"), ("ppl", "eval/ppl"), ("tokens", "eval/tokens"))
GPU_FIELDS = ("util", "mem_used", "power", "temp", "sm_clock")
HOST_FIELDS = (("cpu_percent", "host/cpu_percent"), ("rss", "host/rss_gib"), ("mem_used_frac", "host/mem_used_frac"))
INFER_METRICS = ("rougeL", "bleu", "distinct_1", "distinct_2", "exact_match", "length_ratio", "perplexity")
SHOWN_BAD = 20  # with --skip-bad: bad lines named on stderr; the rest are counted

# the order of column groups in the output: by this prefix, then as first seen
_ORDER = ("step", "time", "epoch", "train/", "eval/", "perf/", "mem/", "preview/", "infer/", "gpu/", "host/")
_UNKNOWN_TYPE = re.compile(r"ValidationError: Invalid value .* - at `\$\.type`$", re.S)
_REASON = re.compile(r"^\w+: (.*?)(?: - at `\$\.?(.*)`)?$", re.S)


def _num(value) -> float | None:
    """A finite number (bools as 0/1), or None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def why_not_an_event(reason: str) -> str:
    """The protocol's decode failure in a few words, naming the field: "ValidationError: Expected `int`,
    got `str` - at `$.step`" → "step: expected int, got str"; "DecodeError: JSON is malformed: …" → "not JSON (…)"."""
    m = _REASON.match(reason)
    if not m:
        return reason
    what, where = m.group(1).replace("`", ""), m.group(2)
    if what.startswith("JSON is malformed: "):
        return f"not JSON ({what.removeprefix('JSON is malformed: ')})"
    if what.startswith("Input data was truncated"):
        return "not JSON (cut short)"
    what = what[:1].lower() + what[1:]
    return f"{where}: {what}" if where else what


class Table:
    """Scalars by step, filled from events in file order."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self.columns: dict[str, None] = {"step": None}  # insertion-ordered set
        self.step: int | None = None  # the last step logged so far (telemetry belongs to it)
        self._samples: dict[int, dict[tuple, list[float]]] = {}  # telemetry, averaged at the end
        self._previews: dict[int, list[float]] = {}
        self._checkpoint_steps: dict[str, int] = {}  # checkpoint name → step (lora_final: the final one)
        self._jobs: dict[str, dict] = {}  # inference job name → {"checkpoint", "metrics"}
        self.hosts: set[str] = set()

    def put(self, step: int, column: str, value) -> None:
        value = _num(value)
        if value is None:
            return
        self.rows.setdefault(step, {})[column] = value
        self.columns.setdefault(column, None)

    def add(self, ev) -> str:
        """Fold one event (an ``engine.protocol`` message) in: "" when it fits, else why not (a bad line)."""
        kind = ev.type
        if kind in ("step", "eval", "preview", "checkpoint") and ev.step < 0:
            return f"step: {ev.step} is negative"
        if kind == "step":
            step = self.step = ev.step
            self.rows[step] = {}  # logged again (a resumed run): the last values count
            self._samples.pop(step, None)
            self._previews.pop(step, None)
            self.put(step, "time", ev.time)
            for name, column in STEP_FIELDS:
                if name.startswith("mem_") and not ev.mem_peak:
                    continue  # not recorded (a CPU run's step events hold 0.0): empty, as in TensorBoard
                self.put(step, column, getattr(ev, name))
            for name, column in RANK_FIELDS:
                for r, v in enumerate(getattr(ev, name)):
                    self.put(step, f"{column}/rank{r}", v)
        elif kind == "eval":
            for name, column in EVAL_FIELDS:
                self.put(ev.step, column, getattr(ev, name))
        elif kind == "preview":
            if _num(ev.rougeL) is not None:
                self._previews.setdefault(ev.step, []).append(ev.rougeL)
        elif kind == "checkpoint":
            self._checkpoint_steps[Path(ev.path).name] = ev.step
            if ev.final:
                self._checkpoint_steps["lora_final"] = ev.step
        elif kind == "inference":
            if ev.state == "finished":
                self._jobs[ev.name] = {"checkpoint": ev.checkpoint, "metrics": ev.metrics}
        elif kind == "telemetry" and self.step is not None:  # before the first step: no row to put it in
            self.hosts.add(ev.host)
            samples = self._samples.setdefault(self.step, {})
            for g in ev.gpus:
                for k in GPU_FIELDS:
                    v = _num(getattr(g, k))
                    if v is not None:
                        samples.setdefault(("gpu", ev.host, g.index, k), []).append(v)
            for name, column in HOST_FIELDS:
                v = _num(getattr(ev, name))
                if v is not None:
                    samples.setdefault(("host", ev.host, ev.rank, column), []).append(v)
        return ""

    def add_job_results(self, results: dict[str, dict]) -> None:
        """Finished jobs' ``metrics.json`` (engine.runs.inference_results): they win over the events'
        copy of the same job (they also hold the intervals)."""
        for name, m in results.items():
            if m.get("state") == "finished":
                params = m.get("params") if isinstance(m.get("params"), dict) else {}
                self._jobs[name] = {"checkpoint": str(m.get("checkpoint", "")), "metrics": m,
                                    "data": params.get("data") if isinstance(params.get("data"), str) else ""}

    def finish(self) -> tuple[list[str], list[list]]:
        """The columns and the rows (by step; None where a step has no value for a column)."""
        multi_host = len(self.hosts) > 1
        ranks = {key[2] for samples in self._samples.values() for key in samples if key[0] == "host"}
        for step, samples in self._samples.items():
            for (kind, host, index, k), values in samples.items():
                where = f"{host}:" if multi_host else ""
                if kind == "gpu":
                    column = f"gpu/{where}{index}/{k}"
                else:
                    column = k if len(ranks) <= 1 and not multi_host else k.replace("host/", f"host/{where}rank{index}/")
                self.put(step, column, sum(values) / len(values))
        for step, scores in self._previews.items():
            self.put(step, "preview/rougeL", sum(scores) / len(scores))
        self._put_jobs()
        order = {p: i for i, p in enumerate(_ORDER)}

        def rank(column: str) -> int:
            for p, i in order.items():
                if column == p or (p.endswith("/") and column.startswith(p)):
                    return i
            return len(order)

        columns = sorted(self.columns, key=rank)  # stable: first seen within a group
        rows = []
        for step in sorted(self.rows):
            values = self.rows[step]
            if values:
                rows.append([step if c == "step" else values.get(c) for c in columns])
        return columns, rows

    def _put_jobs(self) -> None:
        series = {name: _series(name, job) for name, job in self._jobs.items()}
        several = len(set(series.values())) > 1
        for name, job in sorted(self._jobs.items(), key=lambda kv: _num(kv[1]["metrics"].get("time")) or 0):
            step = self._checkpoint_step(job["checkpoint"])
            if step is None:
                continue
            prefix = f"infer/{series[name]}/" if several else "infer/"
            m, ci = job["metrics"], job["metrics"].get("ci95") or {}
            for k in INFER_METRICS:
                self.put(step, prefix + k, m.get(k))
                bounds = ci.get(k) if isinstance(ci, dict) else None
                if isinstance(bounds, list) and len(bounds) == 2:
                    self.put(step, f"{prefix}{k}_lo", bounds[0])
                    self.put(step, f"{prefix}{k}_hi", bounds[1])

    def _checkpoint_step(self, name: str) -> int | None:
        if name in self._checkpoint_steps:
            return self._checkpoint_steps[name]
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m:
            return int(m.group(1))
        if name == "lora_final" and self.rows:
            return max(self.rows)
        return None


def _series(name: str, job: dict) -> str:
    """Which data a job scored: its data file's stem, else its name without the checkpoint part."""
    data = job.get("data")
    if data:
        return Path(data).stem
    ckpt = job["checkpoint"]
    return name[len(ckpt) + 1:] if ckpt and name.startswith(ckpt + "-") else name



def read_events(path: Path, table: Table, skip_bad: bool = False) -> tuple[int, list[tuple[int, str]], int]:
    """Fold every event of ``path`` into ``table``, a line at a time: (lines read, [(line number, why)] of
    the bad ones, events of unknown types passed over). A bad line raises ``UsageError`` naming it and
    its field, unless ``skip_bad``."""
    from engine.protocol import decode, event_decoder

    bad: list[tuple[int, str]] = []
    unknown = n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            ev, reason = decode(event_decoder, raw)
            if ev is None and not raw.endswith(b"\n"):
                n -= 1  # the last line, torn: a run writing it now; left for next time
                break
            if ev is None and _UNKNOWN_TYPE.match(reason):
                unknown += 1  # a newer engine's event: nothing this version knows to read in it
                continue
            why = why_not_an_event(reason) if ev is None else table.add(ev)
            if why:
                if not skip_bad:
                    raise UsageError(f"{path}:{n}: not a usable event: {why} (--skip-bad reads past such lines)")
                bad.append((n, why))
    return n, bad, unknown


def events_path(run: str) -> tuple[str, Path]:
    """The run's name and its events.jsonl, from a run folder, a name under runs/, or an events file."""
    p = Path(run)
    if p.is_file():
        return (p.parent.name if p.name == "events.jsonl" else p.stem), p
    from engine.runs import find_run, fold_spool

    run_dir = find_run(run)
    fold_spool(run_dir)  # the workers' last events, when they outlived their engine
    path = run_dir / "events.jsonl"
    if not path.is_file():
        raise UsageError(f"{run}: no events.jsonl in {run_dir} (has the run started?)")
    return run_dir.resolve().name, path


def export(run: str, skip_bad: bool = False) -> dict:
    """``{"run", "events", "columns", "rows", "lines", "bad_lines", "unknown_events"}`` for a run (see the
    module's text)."""
    name, path = events_path(run)
    table = Table()
    try:
        lines, bad, unknown = read_events(path, table, skip_bad)
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.name == "events.jsonl":
        from engine.runs import inference_results

        table.add_job_results(inference_results(path.parent))
    columns, rows = table.finish()
    if not rows:
        why = f"{len(bad)} of {lines} lines unreadable" if bad else f"{lines} lines, none of them a step, eval or inference"
        raise UsageError(f"{path}: no scalars by step ({why})")
    return {"run": name, "events": str(path), "columns": columns, "rows": rows, "lines": lines,
            "bad_lines": [{"line": n, "reason": r} for n, r in bad], "unknown_events": unknown}


def to_csv(columns: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def to_json(result: dict) -> str:
    """The result as JSON, one row per line (a long run stays readable and diffable)."""
    import json

    head = {k: v for k, v in result.items() if k != "rows"}
    text = json.dumps(head, ensure_ascii=False, indent=2)[:-2]  # without the closing "\n}"
    rows = ",\n".join("    " + json.dumps(r, ensure_ascii=False) for r in result["rows"])
    return f'{text},\n  "rows": [\n{rows}\n  ]\n}}\n'


def cmd_export_metrics(args) -> int:
    out = args.json if args.json is not None else args.csv
    if out not in (None, "-"):
        name, path = events_path(args.run)
        if Path(out).exists() and same_file(out, path):
            raise UsageError(f"{out}: is the run's events file; choose another output")
        if Path(out).is_dir():
            raise UsageError(f"{out}: is a folder; give a file name")
    result = export(args.run, args.skip_bad)
    for b in result["bad_lines"][:SHOWN_BAD]:
        print(printable(f"{result['events']}:{b['line']}: skipped: {b['reason']}"), file=sys.stderr)
    if len(result["bad_lines"]) > SHOWN_BAD:
        print(printable(f"{result['events']}: … and {len(result['bad_lines']) - SHOWN_BAD} more bad lines"),
              file=sys.stderr)
    text = to_json(result) if args.json is not None else to_csv(result["columns"], result["rows"])
    if out in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            with atomic_write(out) as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"{out}: cannot write: {e.strerror or e}") from None
    bad = len(result["bad_lines"])
    where = "" if out in (None, "-") else f" → {out}"
    print(printable(f"export-metrics: {len(result['rows'])} steps × {len(result['columns'])} columns{where}"
                    + (f" ({bad} bad line{'s' * (bad != 1)} skipped)" if bad else "")), file=sys.stderr)
    return 0
