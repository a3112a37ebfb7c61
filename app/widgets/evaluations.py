"""Evaluations: every validation (step, loss, perplexity, the best one marked), and the checkpoint
matrix — each finished inference job by its checkpoint's step, with ROUGE-L, BLEU, Distinct-1/2 and
perplexity, the bootstrap 95% intervals where the job's metrics.json has them — as a table and
a plot."""

from __future__ import annotations

import math
import re

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from app.state import RunState
from app.text import BLEU_FORMAT, assemble, data, show_text
from app.widgets.charts import fit_axes

# metrics.json key, column, format; BLEU is 0–100, the others 0–1
MATRIX = (("rougeL", "ROUGE-L", "{:.3f}"), ("bleu", "BLEU", BLEU_FORMAT), ("distinct_1", "D-1", "{:.3f}"),
          ("distinct_2", "D-2", "{:.3f}"), ("perplexity", "ppl", "{:.2f}"))
INTERVALS = ("rougeL", "bleu")  # shown with their 95% interval
PLOTTED = (("rougeL", "ROUGE-L", 1.0), ("bleu", "BLEU/100", 0.01), ("distinct_1", "Distinct-1", 1.0),
           ("distinct_2", "Distinct-2", 1.0))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def job_step(s: RunState, checkpoint: str) -> int | None:
    """The step of a job's checkpoint: checkpoint-N → N; lora_final → the final checkpoint's step (else
    the last step)."""
    m = re.fullmatch(r"checkpoint-(\d+)", checkpoint or "")
    if m:
        return int(m.group(1))
    if checkpoint == "lora_final":
        finals = [c["step"] for c in s.disk_checkpoints or [] if s.is_final_checkpoint(c["step"])]
        finals += [st for st in s.checkpoints if s.is_final_checkpoint(st)]
        return max(finals) if finals else s.step or None
    return None


def matrix(s: RunState) -> list[dict]:
    """One row per finished job, by step then name: {"step", "name", "metrics", "ci"}; a job's
    metrics.json on disk wins over its event (it holds the intervals)."""
    jobs: dict[str, dict] = {}
    for name, ev in s.inference.items():
        if ev.state == "finished" and isinstance(ev.metrics, dict):
            jobs[name] = {"checkpoint": ev.checkpoint, "metrics": ev.metrics, "ci": {}}
    for name, d in s.disk_inference.items():
        if d.get("state") == "finished":
            ci = d.get("ci95") if isinstance(d.get("ci95"), dict) else {}
            jobs[name] = {"checkpoint": str(d.get("checkpoint", "")), "metrics": d, "ci": ci}
    rows = []
    for name, j in jobs.items():
        step = job_step(s, j["checkpoint"])
        params = j["metrics"].get("params")
        rows.append({"step": step, "name": name, "metrics": j["metrics"], "ci": j["ci"],
                     "settings": settings(params) if isinstance(params, dict) else None})
    rows = sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0, r["name"]))
    known = [r["settings"] for r in rows if r["settings"] is not None]
    usual = max(known, key=known.count) if known else None
    for r in rows:  # what a job did otherwise than most: its scores are not comparable as they stand
        r["differs"] = ["other data" if k == "data_sha256" else f"{k} {v}"
                        for (k, v), (_, u) in zip(r["settings"] or (), usual or ()) if v != u]
    return rows


# a job's generation settings that make its scores comparable or not (infer's params; the data by its digest)
SETTINGS = ("data_sha256", "max_new_tokens", "temperature", "top_p", "seed")


def settings(params: dict) -> tuple:
    return tuple((k, params.get(k)) for k in SETTINGS)


def cell(row: dict, key: str, fmt) -> str:
    v = row["metrics"].get(key)
    if not _num(v):
        return "–"
    out = fmt.format(v)
    bounds = row["ci"].get(key) if key in INTERVALS else None
    if isinstance(bounds, list) and len(bounds) == 2 and all(_num(b) for b in bounds):
        lo, hi = (_short(fmt.format(b)) for b in bounds)
        out += f" [{lo}–{hi}]"
    return out


def _short(text: str) -> str:
    """0.281 → .281 inside an interval (the value before it keeps its 0): the matrix fits 80 columns."""
    return text[1:] if text.startswith("0.") else "-" + text[2:] if text.startswith("-0.") else text


class Evaluations(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static(id="evl-head", markup=False)
        yield DataTable(id="evl-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="evl-matrix-head", markup=False)
        yield DataTable(id="evl-matrix", cursor_type="row", zebra_stripes=True)
        yield PlotextPlot(id="evl-plot")

    def on_mount(self) -> None:
        self.query_one("#evl-table", DataTable).add_columns("step", "val loss", "perplexity", "best")
        self.query_one("#evl-matrix", DataTable).add_columns("step", *(c for _, c, _ in MATRIX), "job")
        self._evals: list = []
        self._matrix: list = []

    def show(self, s: RunState) -> None:
        best = s.best_step()
        shown = [(st, lo, ppl, st == best) for st, lo, ppl in s.evals]
        if shown != self._evals:
            self._evals = shown
            table = self.query_one("#evl-table", DataTable)
            table.clear()
            for st, lo, ppl, is_best in shown:
                table.add_row(str(st), f"{lo:.4f}" if _num(lo) else "–", f"{ppl:,.2f}" if _num(ppl) else "–",
                              "★ best" if is_best else "")
        head = (f"{len(s.evals)} evaluation(s); best val loss {s.best[1]:.4f} at step {s.best[0]}"
                if s.best and _num(s.best[1]) else "no evaluation yet (every --eval_steps, or press e)")
        show_text(self.query_one("#evl-head", Static), assemble((head, "bold")))
        rows = matrix(s)
        view = [(r["step"], r["name"] + "".join(f" ≠ {d}" for d in r["differs"]),
                 *(cell(r, k, f) for k, _, f in MATRIX)) for r in rows]
        if view != self._matrix:
            self._matrix = view
            table = self.query_one("#evl-matrix", DataTable)
            table.clear()
            for step, name, *cells in view:
                job = name.replace("checkpoint-", "ckpt-", 1)  # the step says which: the row fits 80 columns
                table.add_row("–" if step is None else str(step), *(assemble(c) for c in cells), data(job, limit=60))
        show_text(self.query_one("#evl-matrix-head", Static), assemble((
            "checkpoint matrix by step (brackets: 95% bootstrap intervals"
            + ("; ≠: a job's generation settings differ from most jobs'" if any(r["differs"] for r in rows) else "")
            + ")" if rows else
            "checkpoint matrix: no finished inference job yet (Checkpoints tab: Infer selected / Infer all)", "bold")))
        self.query_one("#evl-plot", PlotextPlot).display = bool(rows)

    def show_plots(self, s: RunState) -> None:
        rows = [r for r in matrix(s) if r["step"] is not None]
        plot = self.query_one("#evl-plot", PlotextPlot)
        if not rows:
            return
        plt = plot.plt
        plt.clear_figure()
        plt.title("checkpoint metrics by step (bars: 95% intervals)")
        plt.xlabel("step")
        plt.ylabel("score")
        drawn: list[float] = []  # every y drawn (points and intervals): a flat set gets a range around it
        for key, label, scale in PLOTTED:
            pts = [(r["step"], r["metrics"][key] * scale) for r in rows if _num(r["metrics"].get(key))]
            if not pts:
                continue
            plt.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="o" if len(pts) == 1 else None)
            drawn += [p[1] for p in pts]
            for r in rows:
                bounds = r["ci"].get(key)
                if isinstance(bounds, list) and len(bounds) == 2 and all(_num(b) for b in bounds):
                    plt.plot([r["step"], r["step"]], [bounds[0] * scale, bounds[1] * scale], color="gray")
                    drawn += [bounds[0] * scale, bounds[1] * scale]
        fit_axes(plot, [r["step"] for r in rows], drawn)
        plot.refresh()
