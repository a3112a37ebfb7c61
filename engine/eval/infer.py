"""``voxtui infer``: generations and metrics from a checkpoint (``voxtui score``: engine/eval/score.py,
``voxtui export``: engine/eval/export.py).

Without ``--checkpoint`` the run's ``lora_final`` is used, else its latest *complete* checkpoint (a
half-written one is never taken). The base model and template come from the run's own config.
Results go to ``runs/<run>/infer/<name>/generations.jsonl`` (appended and flushed per batch, so an
interrupted job resumes where it stopped) and ``metrics.json`` (written atomically).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from engine.eval.score import render, score_rows
from engine.util import Progress, UsageError, atomic_write, shell_quote, write_json


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's complete checkpoints, oldest first (the seed's layout: checkpoint-N in DIR)."""
    from engine.runs import complete_checkpoints

    return complete_checkpoints(run_dir / "checkpoints") or complete_checkpoints(run_dir)


def pick_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """checkpoint-``step``, else lora_final (lora_stage1), else the latest complete checkpoint (torch-free)."""
    if step is not None:
        done = dict(checkpoints(run_dir))
        if step not in done:
            have = ", ".join(str(s) for s in done) or "none"
            raise UsageError(f"{run_dir}: no complete checkpoint-{step} (complete: {have})")
        return done[step]
    for final in (run_dir / "lora_final", run_dir / "lora_stage1"):
        if (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file():
            return final
    done = checkpoints(run_dir)
    if not done:
        raise UsageError(f"{run_dir}: no lora_final and no complete checkpoint")
    return done[-1][1]


def run_config(run_dir: Path):
    import msgspec

    from engine.config import TrainConfig, read_toml

    if (run_dir / "config.toml").is_file():
        try:
            return msgspec.convert(read_toml(run_dir / "config.toml"), TrainConfig)
        except msgspec.ValidationError as e:
            raise UsageError(f"{run_dir / 'config.toml'}: {e}") from None
    # the seed's output_dir: the adapter config names the base model
    ckpt = pick_checkpoint(run_dir)
    try:
        adapter = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{ckpt}/adapter_config.json: cannot read it ({e})") from None
    base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if not base or not isinstance(base, str):
        raise UsageError(f"{run_dir}: no config.toml and no base model in {ckpt}/adapter_config.json")
    return TrainConfig(model_id=base, train_jsonl="-")


def load_for_inference(run_dir: Path, ckpt: Path, device):
    """The base + the checkpoint's adapter as PEFT loads it (un-merged)."""
    from peft import PeftModel

    from engine.eval.loading import load_base

    cfg = run_config(run_dir)
    return PeftModel.from_pretrained(load_base(cfg, device), str(ckpt)).eval(), cfg


BATCH_GPU, BATCH_CPU = 64, 8  # rows decoded together when --batch_size is not given


def infer(run_dir: Path, data: str, checkpoint: int | None = None, name: str | None = None,
          batch_size: int | None = None,
          max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
          device: str = "auto", model=None, sink=None, ppl: bool = True, nproc: int = 1, held: bool = False) -> dict:
    """Generate for every row of ``data`` with a checkpoint of the run (resuming a job stopped midway),
    then score: ``runs/<run>/infer/<name>/`` gets generations.jsonl, per_row.jsonl and metrics.json.
    ``model``: a ``MergedModel`` to reuse (``--all-checkpoints``: the base is loaded once). ``nproc`` > 1:
    the rows split over that many processes, one GPU each (engine/eval/shards.py). ``batch_size``: rows
    decoded together (default: 64 on a GPU, 8 on the CPU). The checkpoint is marked in use while the job reads
    it (``hold_checkpoint``; ``held``: the caller has marked it already)."""
    from engine.protocol import Inference

    dev = pick_device(device)
    ckpt, params, name = job_of(run_dir, data, checkpoint, name, batch_size, max_new_tokens, temperature, top_p,
                                seed, nproc, dev.type == "cuda")
    total = [0]

    def emit(state, **kw):
        if sink is not None:
            sink.emit(Inference(name=name, checkpoint=ckpt.name, state=state, total=total[0], **kw))

    marker = None
    try:  # from here every failure is reported under this job's name and checkpoint
        marker = None if held else hold_checkpoint(ckpt)
        return _infer(run_dir, data, ckpt, params, name, dev, model, emit, total, ppl, nproc, device)
    except BaseException as e:
        if sink is not None:
            emit("failed", message=f"{type(e).__name__}: {e}")
            e.inference_reported = True  # cmd_infer: said already
        raise
    finally:
        if marker is not None:
            from engine.runs import unmark_in_use

            unmark_in_use(marker)


def job_of(run_dir: Path, data: str, checkpoint: int | None, name: str | None, batch_size: int | None,
           max_new_tokens: int, temperature: float, top_p: float, seed: int, nproc: int, on_gpu: bool,
           quiet: bool = False) -> tuple[Path, dict, str]:
    """The checkpoint a job runs on, its parameters (params.json) and its name (its folder under infer/), as
    ``infer`` resolves them and the failure event of a job that failed before says them (torch-free)."""
    from engine.formatting import file_digest

    ckpt = pick_checkpoint(run_dir, checkpoint)
    # the data file by its absolute path (said in messages, metrics.json); a job is the same as another by its
    # content (data_sha256, same_job), however either path was written
    params = {"checkpoint": ckpt.name, "data": os.path.abspath(data), "data_sha256": file_digest(str(Path(data).resolve())),
              "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
              "batch_size": batch_size or (BATCH_GPU if on_gpu else BATCH_CPU)}
    if nproc > 1 and temperature > 0:
        params["nproc"] = nproc  # a sampled row depends on the batch it falls in
    return ckpt, params, job_name(run_dir / "infer", name, f"{ckpt.name}-{Path(data).stem}", params, quiet)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def hold_checkpoint(ckpt: Path) -> Path | None:
    """Mark ``ckpt`` in use by this process (``engine.runs.mark_in_use``: the worker's pruning keeps it until
    the marker is gone) and check that it is still there with its adapter; returns the marker to remove when
    the job ends (None: its folder cannot be written, so no worker's pruning can empty it either). A checkpoint gone or incomplete is a one-line UsageError."""
    from engine.runs import mark_in_use

    marker, gone = None, False
    for _ in range(5):
        try:
            marker = mark_in_use(ckpt)
        except FileNotFoundError:
            gone = True  # pruned (or deleted) before it could be marked
            break
        except OSError:
            marker = None  # a folder this process may not write: no worker's pruning can empty it either
        missing = [f for f in ADAPTER_FILES if not (ckpt / f).is_file()]
        if not missing:
            return marker
        if marker is None:
            break
        # the pruner moves a checkpoint aside before it deletes it, and puts a marked one back: look again
        time.sleep(0.1)
    if marker is not None:
        from engine.runs import unmark_in_use

        unmark_in_use(marker)
    if gone or not ckpt.is_dir():
        raise UsageError(f"{ckpt}: gone (pruned by the run's save_total_limit, or deleted) before this job could "
                         f"mark it in use: infer a checkpoint the run still keeps")
    raise UsageError(f"{ckpt}: incomplete ({' and '.join(missing)} missing): no adapter to infer with")


def _infer(run_dir: Path, data: str, ckpt: Path, params: dict, name: str, dev, model, emit, total: list,
           ppl: bool, nproc: int, device: str) -> dict:
    from engine.eval.loading import MergedModel
    from engine.eval.shards import fold_shards, run_shards
    from engine.formatting import load_format
    from engine.rows import read_examples

    rows = list(read_examples(data))
    if not rows:
        raise UsageError(f"{data}: no rows")
    total[0] = len(rows)
    batch_size = params["batch_size"]
    cfg = run_config(run_dir)
    out_dir = run_dir / "infer" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _resume(out_dir, params)
    fold_shards(out_dir, done)  # what a stopped --nproc job's shards wrote

    emit("started", done=len(done))
    fmt = load_format(cfg.model_id)
    if nproc > 1:
        progress = Progress(len(rows), f"infer {name}", unit=" rows")
        progress.update(len(done))
        shown = [len(done)]

        def progressed(n: int) -> None:
            progress.update(n - shown[0])
            shown[0] = n
            emit("progress", done=n)

        prompts = fmt.encode_prompt([ex for _, ex in rows])
        try:
            perplexity = run_shards(run_dir, data, ckpt, rows, prompts, done, params, out_dir, nproc, device, ppl,
                                    progressed)
        finally:
            progress.close()
    else:
        model = (model or MergedModel(cfg, dev)).use(ckpt).model
        _generate(model, fmt, rows, done, out_dir / "generations.jsonl", params, dev, f"infer {name}",
                  lambda: emit("progress", done=len(done)))
        if ppl:
            from engine.eval import metrics

            perplexity = metrics.perplexity(model, fmt, [ex for _, ex in rows], dev, batch_size)
    ordered = [done[i] for i in range(len(rows))]
    with atomic_write(out_dir / "generations.jsonl") as f:  # in the data file's order, whatever --nproc
        for r in ordered:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    result, samples = _score(out_dir, ordered)
    if ppl:
        result.update(perplexity)
    result.update({"checkpoint": ckpt.name, "checkpoint_path": str(ckpt), "run": str(run_dir), "params": params,
                   "time": time.time()})
    write_json(out_dir / "metrics.json", result)
    print(f"infer {name}: generations.jsonl and metrics.json in {out_dir}", file=sys.stderr)
    emit("finished", done=len(rows), metrics={k: result[k] for k in FINISHED_METRICS if k in result},
         path=str(out_dir), samples=samples)
    return result


def pick_device(device: str):
    """``--device``: auto is the GPU when there is one."""
    import torch

    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


SAMPLES = 5  # sample generations carried by the "finished" event, for the dashboard
FINISHED_METRICS = ("rougeL", "bleu", "distinct_1", "distinct_2", "perplexity")  # carried by the "finished" event


def other_job(out_dir: Path, params: dict) -> dict | None:
    """The parameters of the job ``out_dir`` holds when they are not ``params`` and it holds results (rows
    generated, metrics, a stopped --nproc job's shards); None when the folder is free for these (absent,
    empty, or the same job: it resumes). Unreadable parameters beside results count as another job."""
    if not out_dir.is_dir():
        return None
    gen = out_dir / "generations.jsonl"
    held = (out_dir / "metrics.json").exists() or (gen.exists() and gen.stat().st_size > 0) \
        or (out_dir / "shards").is_dir()
    try:
        old = json.loads((out_dir / "params.json").read_text())
    except (OSError, ValueError):
        old = None
    if same_job(old, params) or not held:
        return None
    return old if isinstance(old, dict) else {}


def same_job(old, params: dict) -> bool:
    """Whether a job's recorded parameters (``old``: its params.json) are these: equal but for the data file's
    path where both name the same content (data_sha256) — a relative path and an absolute one, a job started
    from another folder, or a record from before paths were saved absolute (relative to a folder it does not
    say) name one file as well as the other."""
    if not isinstance(old, dict):
        return False
    if old == params:
        return True
    digest = params.get("data_sha256")
    return isinstance(digest, str) and bool(digest) and old.get("data_sha256") == digest and \
        {k: v for k, v in old.items() if k != "data"} == {k: v for k, v in params.items() if k != "data"}


def settings_diff(old: dict, params: dict) -> str:
    """How a job's settings differ from these, in words (``max_new_tokens 16, not 128``)."""
    said = [f"{k} {old.get(k, '?')}, not {params[k]}" for k in params if k != "data_sha256" and old.get(k) != params[k]]
    if not said and old.get("data_sha256") != params.get("data_sha256"):
        said.append("the data file has changed since")
    return "; ".join(said) or "other settings"


def job_name(infer_dir: Path, name: str | None, default: str, params: dict, quiet: bool = False) -> str:
    """The folder under infer/ for a job: ``name`` as given (refused when it holds results of other
    settings: they are never replaced unasked), else ``default``, or when that holds results of other
    settings (say a CLI job with another --max_new_tokens) the first of ``default-2``, ``default-3``, …
    that is free or holds this very job. Nothing a job left is ever deleted here."""
    if name is not None:
        old = other_job(infer_dir / name, params)
        if old is not None:
            raise UsageError(f"{infer_dir / name} holds a job with other settings ({settings_diff(old, params)}): "
                             f"give another --name, or delete that folder to replace it")
        return name
    candidate, n = default, 1
    while (old := other_job(infer_dir / candidate, params)) is not None:
        n += 1
        if n == 2:
            first = (candidate, old)
        candidate = f"{default}-{n}"
    if n > 1 and not quiet:
        print(f"infer: {infer_dir / first[0]} holds a job with other settings ({settings_diff(first[1], params)}): "
              f"kept; this one goes to {infer_dir / candidate}", file=sys.stderr)
    return candidate


def _resume(out_dir: Path, params: dict) -> dict[int, dict]:
    """The rows a job with the same ``params`` already generated (by index), with generations.jsonl
    rewritten to hold only them (a torn last line is gone); a folder without them starts afresh (``job_name``
    never picks one that holds another job's results)."""
    gen_path, state_path = out_dir / "generations.jsonl", out_dir / "params.json"
    done: dict[int, dict] = {}
    old = json.loads(state_path.read_text()) if gen_path.exists() and state_path.exists() else None
    if same_job(old, params):
        for line in gen_path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                done[r["index"]] = r
            except (ValueError, KeyError):
                break  # a torn last line: regenerate from there
        if old != params:  # the same file by another path: the record says it as given now
            with atomic_write(state_path) as f:
                json.dump(params, f, indent=2)
    else:
        gen_path.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "shards", ignore_errors=True)  # a stopped --nproc job's rows, other parameters
        with atomic_write(state_path) as f:
            json.dump(params, f, indent=2)
    with atomic_write(gen_path) as f:  # rewrite the kept rows so a torn tail is gone; then append
        for r in done.values():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return done


def _generate(model, fmt, rows: list, done: dict[int, dict], gen_path: Path, params: dict, dev, label: str,
              progressed) -> None:
    """Generate the rows not ``done`` yet, shortest prompt first; each row is appended to ``gen_path`` as it
    finishes and flushed at least once a second (so a stopped job resumes there), and ``progressed()`` is
    called then. With the fast decoder, rows are continuously batched (``Decoder.stream``: a row that
    finishes hands its place to the next prompt); otherwise HF ``generate`` runs batch after batch."""
    from engine.worker.decode import Decoder, generate, supported

    batch_size = params["batch_size"]
    todo = [i for i in range(len(rows)) if i not in done]
    prompts = fmt.encode_prompt([ex for _, ex in rows])
    todo.sort(key=lambda i: len(prompts[i]))
    progress = Progress(len(rows), label, unit=" rows")
    progress.update(len(done))

    def finished(f, pairs) -> None:
        for i, o in pairs:
            line, ex = rows[i]
            r = {"index": i, "line": line, "prompt": ex.prompt_text, "output": ex.target_text,
                 "prediction": fmt.decode(o)}
            done[i] = r
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        progress.update(len(pairs))

    with open(gen_path, "a", encoding="utf-8") as f:
        if supported(model) and todo:
            decoder = Decoder(model)  # its captured graph serves the whole job
            model.eval()
            said = time.monotonic()
            for j, o in decoder.stream([prompts[i] for i in todo], params["max_new_tokens"], batch_size,
                                       params["temperature"], params["top_p"], params["seed"], fmt.eos, fmt.pad):
                finished(f, [(todo[j], o)])
                if time.monotonic() - said >= 1.0:
                    f.flush()
                    progressed()
                    said = time.monotonic()
            decoder.release()
        else:
            for b in range(0, len(todo), batch_size):
                batch = todo[b:b + batch_size]
                outs = generate(model, [prompts[i] for i in batch], params["max_new_tokens"], params["temperature"],
                                params["top_p"], params["seed"] + batch[0], fmt.eos, fmt.pad, dev)
                finished(f, list(zip(batch, outs)))
                f.flush()
                progressed()
        f.flush()
    progressed()
    progress.close()


def _score(out_dir: Path, ordered: list[dict]) -> tuple[dict, list[dict]]:
    """Corpus metrics of the generations, per_row.jsonl (ROUGE-L, Distinct-1/2, exact match, length ratio
    per row), and the first rows as samples for the dashboard."""
    from engine.eval import metrics

    result = score_rows(ordered)
    per_row = [{"index": r["index"], "line": r["line"], **metrics.per_row(r["prediction"], r["output"])}
               for r in ordered]
    with atomic_write(out_dir / "per_row.jsonl") as f:
        for p in per_row:
            f.write(json.dumps(p) + "\n")
    samples = [{"line": r["line"], "prompt": r["prompt"][:300], "prediction": r["prediction"][:500],
                "reference": r["output"][:500], "rougeL": p.get("rougeL")} for r, p in zip(ordered[:SAMPLES], per_row)]
    return result, samples


# ----------------------------------------------------------------------------------------- commands


def run_dir_of(args) -> Path:
    """The run folder ``--run`` or ``--output_dir`` names (UsageError when there is none)."""
    from engine.daemon.launch import find_run

    if getattr(args, "output_dir", None):
        p = Path(args.output_dir)
        if not p.is_dir():
            raise UsageError(f"--output_dir {p}: no such folder")
        return p
    if not args.run:
        raise UsageError("name the run: --run RUN (or the seed's --output_dir DIR)")
    return find_run(args.run, checkpoint_flag=True)


DEVICE_RE = re.compile(r"(auto|cpu|cuda|cuda:\d+|mps)")


def check_data(path: str) -> int:
    """The number of rows of an inference data file; UsageError naming the first broken line (torch-free)."""
    from engine.rows import iter_lines, open_checked, parse_line

    open_checked(path)
    rows, bad = 0, []
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        ex, defects = parse_line(raw)
        if ex is None:
            bad.append((lineno, *defects[0]))
        else:
            rows += 1
    if bad:
        line, kind, detail = bad[0]
        more = f" (and {len(bad) - 1} more broken rows; `voxtui data audit {shell_quote(path)}` lists them)" if len(bad) > 1 else ""
        raise UsageError(f"{path}:{line}: {kind}: {detail}{more}")
    if not rows:
        raise UsageError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return rows


def check_infer_args(args) -> tuple[Path, str]:
    """Every argument of ``voxtui infer``, checked before torch is imported: the parameters, the run
    folder and its config, the checkpoint, the data file and its rows. Returns ``(run_dir, data)``."""
    from engine.protocol import preview_param_problems
    from engine.rows import check_outputs

    # the sampling limits of previews (--max_new_tokens here is the evaluation's, any length above 0)
    problems = preview_param_problems(args.temperature, args.top_p, got=True,
                                      names={"temperature": "--temperature", "top_p": "--top_p"})
    if not DEVICE_RE.fullmatch(args.device):
        problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps (got {args.device!r})")
    if args.name is not None and (not args.name.strip() or args.name in (".", "..") or "/" in args.name
                                  or "\\" in args.name or "\0" in args.name):
        problems.append(f"--name must be a plain folder name (got {args.name!r})")
    if args.checkpoint is not None and args.checkpoint < 0:
        problems.append(f"--checkpoint must be a step, 0 or more (got {args.checkpoint})")
    if args.nproc > 1 and args.device not in ("auto", "cuda", "cpu"):
        problems.append(f"--nproc {args.nproc} spreads the rows over every GPU (or CPU processes): give --device "
                        f"auto, cuda or cpu (got {args.device})")
    if args.checkpoint is not None and args.all_checkpoints:
        problems.append("--checkpoint and --all-checkpoints: give one")
    if problems:
        raise UsageError("; ".join(problems))
    run_dir = run_dir_of(args)
    data = args.data or args.jsonl
    if not data:
        raise UsageError("--data FILE is required")
    if args.all_checkpoints:
        if not checkpoints(run_dir):
            raise UsageError(f"{run_dir}: no complete checkpoint")
    else:
        pick_checkpoint(run_dir, args.checkpoint)
    run_config(run_dir)
    check_data(data)
    check_outputs({"--data": data}, {"--json": args.json})
    return run_dir, data


def cmd_infer(args) -> int:
    try:
        run_dir, data = check_infer_args(args)
    except UsageError as e:
        if args.events:  # started by the engine: say why in the run's event stream too
            _failed(args, None, e)
        raise
    common = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "seed": args.seed, "device": args.device, "ppl": not args.no_perplexity,
              "nproc": args.nproc}
    try:
        if run_config(run_dir).quant != "nf4":  # this process loads no 4-bit weights: a second of start-up
            from engine.util import without_bitsandbytes

            without_bitsandbytes()
    except UsageError:
        pass  # said where the config is read for the job
    sink = None
    if args.events:
        from engine.worker.sinks import PushSink

        sink = PushSink(args.events, run_dir.name)
    held: list[Path] = []
    try:
        if args.all_checkpoints:
            from engine.eval.loading import MergedModel

            # every checkpoint marked in use first: none is pruned while the others' turns come
            todo = []
            for step, path in checkpoints(run_dir):
                try:
                    marker = hold_checkpoint(path)
                except UsageError as e:
                    print(f"infer: {e}; skipped", file=sys.stderr)
                    continue
                todo.append(step)
                if marker is not None:
                    held.append(marker)
            if not todo:
                raise UsageError(f"{run_dir}: no complete checkpoint left to infer with")
            # the base read once, each adapter merged in turn (with --nproc, each shard loads its own)
            model = None if args.nproc > 1 else MergedModel(run_config(run_dir), pick_device(args.device),
                                                            swappable=True)
            table = []
            for step in todo:
                m = infer(run_dir, data, checkpoint=step, sink=sink, model=model, held=True,
                          name=f"{args.name}-checkpoint-{step}" if args.name else None, **common)
                table.append({"checkpoint": f"checkpoint-{step}", "step": step,
                              **{k: m.get(k) for k in FINISHED_METRICS}})
            if args.json:
                write_json(args.json, table)
            if args.json != "-":
                print(f"{'checkpoint':<20}{'rougeL':>9}{'bleu':>8}{'dist-1':>8}{'dist-2':>8}{'ppl':>12}")
                for t in table:
                    ppl = t["perplexity"] if t["perplexity"] is not None else float("nan")
                    print(f"{t['checkpoint']:<20}{t['rougeL']:>9.4f}{t['bleu']:>8.2f}{t['distinct_1']:>8.3f}"
                          f"{t['distinct_2']:>8.3f}{ppl:>12.2f}")
            return 0
        m = infer(run_dir, data, checkpoint=args.checkpoint, name=args.name, sink=sink, **common)
    except BaseException as e:
        if sink is not None and not getattr(e, "inference_reported", False):
            _failed(args, run_dir, e, sink)
        raise
    finally:
        from engine.runs import unmark_in_use

        for marker in held:
            unmark_in_use(marker)
        if sink is not None:
            sink.close(linger=10.0)  # its last events have no spool behind them
    if args.json:
        write_json(args.json, m)
    if args.json != "-":
        print(render(m))
    return 0


def _failed(args, run_dir: Path | None, error: BaseException, sink=None) -> None:
    """An ``inference`` event in state ``failed`` to the engine that started this job, for a failure before
    ``infer`` named the job: named as ``infer`` names it (``failed_job``), so the dashboard's row of the job
    reads failed."""
    from engine.protocol import Inference

    name, checkpoint = failed_job(args, run_dir)
    own = sink is None
    if own:
        from engine.worker.sinks import PushSink

        sink = PushSink(args.events, run_dir.name if run_dir else Path(args.output_dir or args.run or "").name)
    try:
        sink.emit(Inference(name=name, checkpoint=checkpoint, state="failed",
                            message=f"{type(error).__name__}: {error}"))
    finally:
        if own:
            sink.close(linger=10.0)  # its last events have no spool behind them


def failed_job(args, run_dir: Path | None) -> tuple[str, str]:
    """(job name, checkpoint name) of a job that failed before ``infer`` resolved them: resolved the same way
    (``job_of``) as far as the run, the checkpoint and the data allow, else the parts known (``--name``,
    ``checkpoint-N``, the data file's stem). Never empty: a nameless row would stand for no job."""
    data = args.data or args.jsonl or ""
    if args.all_checkpoints:
        checkpoint = ""
        return args.name or f"all-checkpoints-{Path(data).stem}".rstrip("-"), checkpoint
    checkpoint = f"checkpoint-{args.checkpoint}" if args.checkpoint is not None else ""
    if run_dir is None:
        try:
            run_dir = run_dir_of(args)
        except Exception:  # noqa: BLE001 (the failure being reported may be this very one)
            run_dir = None
    if run_dir is not None:
        try:
            checkpoint = pick_checkpoint(run_dir, args.checkpoint).name
            on_gpu = args.device.startswith("cuda") or (args.device == "auto" and pick_device("auto").type == "cuda")
            _, _, name = job_of(run_dir, data, args.checkpoint, args.name, args.batch_size, args.max_new_tokens,
                                args.temperature, args.top_p, args.seed, args.nproc, on_gpu, quiet=True)
            return name, checkpoint
        except Exception:  # noqa: BLE001 (as far as it can be resolved)
            pass
    default = "-".join(x for x in (checkpoint or "latest", Path(data).stem if data else "") if x)
    return args.name or default, checkpoint
