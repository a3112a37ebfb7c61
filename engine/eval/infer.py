"""``voxtui infer``, ``voxtui score`` and ``voxtui export``: generations and metrics from a checkpoint.

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

from engine.util import Progress, UsageError, atomic_write, write_json


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


def load_base(cfg, device, quant: str | None = None, dtype=None):
    """The base model as the run trained it (text only: the audio tower is not kept)."""
    import torch
    from transformers import VoxtralForConditionalGeneration

    from engine.worker.modeling import _drop_audio_tower, nf4_config

    quant = cfg.quant if quant is None else quant
    dtype = dtype or (torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32)
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
    model = VoxtralForConditionalGeneration.from_pretrained(cfg.model_id, **kwargs)
    _drop_audio_tower(model)
    return model.eval()


def load_for_inference(run_dir: Path, ckpt: Path, device):
    from peft import PeftModel

    cfg = run_config(run_dir)
    return PeftModel.from_pretrained(load_base(cfg, device), str(ckpt)).eval(), cfg


def infer(run_dir: Path, data: str, checkpoint: int | None = None, name: str | None = None, batch_size: int = 8,
          max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
          device: str = "auto", model=None, sink=None, ppl: bool = True) -> dict:
    import torch

    from engine.eval import metrics
    from engine.formatting import file_digest, load_format
    from engine.protocol import Inference
    from engine.rows import read_examples
    from engine.worker.modeling import generate

    ckpt = pick_checkpoint(run_dir, checkpoint)
    rows = list(read_examples(data))
    if not rows:
        raise UsageError(f"{data}: no rows")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    cfg = run_config(run_dir)
    name = name or f"{ckpt.name}-{Path(data).stem}"
    out_dir = run_dir / "infer" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"checkpoint": ckpt.name, "data": str(data), "data_sha256": file_digest(str(Path(data).resolve())), "max_new_tokens": max_new_tokens,
              "temperature": temperature, "top_p": top_p, "seed": seed, "batch_size": batch_size}
    gen_path = out_dir / "generations.jsonl"
    state_path = out_dir / "params.json"
    done: dict[int, dict] = {}
    if gen_path.exists() and state_path.exists() and json.loads(state_path.read_text()) == params:
        for line in gen_path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                done[r["index"]] = r
            except (ValueError, KeyError):
                break  # a torn last line: regenerate from there
    else:
        gen_path.unlink(missing_ok=True)
        with atomic_write(state_path) as f:
            json.dump(params, f, indent=2)
    # rewrite the kept rows so a torn tail is gone, then append
    with atomic_write(gen_path) as f:
        for r in done.values():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def emit(state, **kw):
        if sink is not None:
            sink.emit(Inference(name=name, checkpoint=ckpt.name, state=state, total=len(rows), **kw))

    emit("started", done=len(done))
    fmt = load_format(cfg.model_id)
    if model is None:
        model, _ = load_for_inference(run_dir, ckpt, dev)
    todo = [i for i in range(len(rows)) if i not in done]
    prompts = fmt.encode_prompt([ex for _, ex in rows])
    todo.sort(key=lambda i: len(prompts[i]))
    progress = Progress(len(rows), f"infer {name}", unit=" rows")
    progress.update(len(done))
    with open(gen_path, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            outs = generate(model, [prompts[i] for i in batch], max_new_tokens, temperature, top_p,
                            seed + batch[0], fmt.eos, fmt.pad, dev)
            for i, o in zip(batch, outs):
                line, ex = rows[i]
                r = {"index": i, "line": line, "prompt": ex.prompt_text, "output": ex.target_text,
                     "prediction": fmt.decode(o)}
                done[i] = r
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            progress.update(len(batch))
            emit("progress", done=len(done))
    progress.close()
    ordered = [done[i] for i in range(len(rows))]
    result = score_rows(ordered)
    per_row = [{"index": r["index"], "line": r["line"], **metrics.per_row(r["prediction"], r["output"])}
               for r in ordered]
    with atomic_write(out_dir / "per_row.jsonl") as f:  # ROUGE-L, Distinct-1/2, exact match, length ratio per row
        for p in per_row:
            f.write(json.dumps(p) + "\n")
    samples = [{"line": r["line"], "prompt": r["prompt"][:300], "prediction": r["prediction"][:500],
                "reference": r["output"][:500], "rougeL": p.get("rougeL")} for r, p in zip(ordered[:SAMPLES], per_row)]
    if ppl:
        result.update(metrics.perplexity(model, fmt, [ex for _, ex in rows], dev, batch_size))
    result.update({"checkpoint": ckpt.name, "checkpoint_path": str(ckpt), "run": str(run_dir), "params": params,
                   "time": time.time()})
    write_json(out_dir / "metrics.json", result)
    emit("finished", done=len(rows), metrics={k: result[k] for k in ("rougeL", "bleu", "distinct_1", "distinct_2",
                                                                    "perplexity") if k in result},
         path=str(out_dir), samples=samples)
    return result


SAMPLES = 5  # sample generations carried by the "finished" event, for the dashboard


def score_rows(rows: list[dict]) -> dict:
    from engine.eval import metrics

    preds = [r["prediction"] for r in rows]
    refs = [r["output"] for r in rows]
    out = metrics.corpus(preds, refs)
    out["ci95"] = metrics.bootstrap(preds, refs)
    return out


# ----------------------------------------------------------------------------------------- commands


def _run_dir(args) -> Path:
    from engine.daemon.launch import find_run

    if getattr(args, "output_dir", None):
        p = Path(args.output_dir)
        if not p.is_dir():
            raise UsageError(f"--output_dir {p}: no such folder")
        return p
    if not args.run:
        raise UsageError("name the run: --run RUN (or the seed's --output_dir DIR)")
    return find_run(args.run)


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
        more = f" (and {len(bad) - 1} more broken rows; `voxtui data audit {path}` lists them)" if len(bad) > 1 else ""
        raise UsageError(f"{path}:{line}: {kind}: {detail}{more}")
    if not rows:
        raise UsageError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return rows


def check_infer_args(args) -> tuple[Path, str]:
    """Every argument of ``voxtui infer``, checked before torch is imported: the parameters, the run
    folder and its config, the checkpoint, the data file and its rows. Returns ``(run_dir, data)``."""
    from engine.rows import check_outputs

    problems = []
    if not 0 <= args.temperature <= 2:
        problems.append(f"--temperature must be in [0, 2] (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1] (got {args.top_p})")
    if not DEVICE_RE.fullmatch(args.device):
        problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps (got {args.device!r})")
    if args.name is not None and (not args.name.strip() or args.name in (".", "..") or "/" in args.name
                                  or "\\" in args.name or "\0" in args.name):
        problems.append(f"--name must be a plain folder name (got {args.name!r})")
    if args.checkpoint is not None and args.checkpoint < 0:
        problems.append(f"--checkpoint must be a step, 0 or more (got {args.checkpoint})")
    if args.checkpoint is not None and args.all_checkpoints:
        problems.append("--checkpoint and --all-checkpoints: give one")
    if problems:
        raise UsageError("; ".join(problems))
    run_dir = _run_dir(args)
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
            _failed(args, Path(args.output_dir or args.run or "").name, e)
        raise
    common = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "seed": args.seed, "device": args.device, "ppl": not args.no_perplexity}
    sink = None
    if args.events:
        from engine.worker.sinks import PushSink

        sink = PushSink(args.events, run_dir.name)
    try:
        if args.all_checkpoints:
            table = []
            for step, _ in checkpoints(run_dir):
                m = infer(run_dir, data, checkpoint=step, sink=sink, **common)
                table.append({"checkpoint": f"checkpoint-{step}", "step": step,
                              **{k: m.get(k) for k in ("rougeL", "bleu", "distinct_1", "distinct_2", "perplexity")}})
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
        if sink is not None:
            _failed(args, run_dir.name, e, sink)
        raise
    finally:
        if sink is not None:
            sink.close()
    if args.json:
        write_json(args.json, m)
    if args.json != "-":
        print(render(m))
    return 0


def _failed(args, run: str, error: BaseException, sink=None) -> None:
    """An ``inference`` event in state ``failed`` to the engine that started this job."""
    from engine.protocol import Inference

    own = sink is None
    if own:
        from engine.worker.sinks import PushSink

        sink = PushSink(args.events, run)
    try:
        sink.emit(Inference(name=args.name or "", checkpoint=str(args.checkpoint or ""), state="failed",
                            message=f"{type(error).__name__}: {error}"))
    finally:
        if own:
            sink.close()


def render(m: dict) -> str:
    ci = m.get("ci95", {})

    def f(k, fmt="{:.4f}"):
        v = fmt.format(m[k])
        return v + (f" [{fmt.format(ci[k][0])}, {fmt.format(ci[k][1])}]" if k in ci else "")

    out = [f"{m.get('checkpoint', 'predictions')}: {m['rows']} rows",
           f"  ROUGE-L      {f('rougeL')}", f"  BLEU         {f('bleu', '{:.2f}')}",
           f"  Distinct-1   {f('distinct_1')}", f"  Distinct-2   {f('distinct_2')}",
           f"  exact match  {f('exact_match')}", f"  length ratio {m['length_ratio']:.3f}"]
    if "perplexity" in m:
        out.append(f"  perplexity   {m['perplexity']:.3f} ({m['tokens']} reference tokens)")
    return "\n".join(out)


def read_predictions(path: str) -> tuple[list[dict], list[dict]]:
    """The rows of a predictions file that hold string ``prediction`` and ``output``, and every other
    non-blank line as ``{"line", "reason", "detail"}`` (never raises on a bad row)."""
    import msgspec

    from engine.rows import _json_type, iter_lines

    decoder = msgspec.json.Decoder()
    rows, bad = [], []
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        reason = detail = ""
        try:
            r = decoder.decode(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            reason, detail = "bad_encoding", f"invalid UTF-8 at byte {e.start}"
        except msgspec.DecodeError as e:
            reason, detail = "invalid_json", str(e)
        except RecursionError:
            reason, detail = "invalid_json", "nested too deeply"
        else:
            if not isinstance(r, dict):
                reason, detail = "not_object", f"a JSON {_json_type(r)}, not an object"
            else:
                for k in ("prediction", "output"):
                    if r.get(k) is None:
                        reason, detail = "missing_field", f"{k} (a string) is needed"
                        break
                    if not isinstance(r[k], str):
                        reason, detail = "wrong_type", f"{k} is a {_json_type(r[k])}, not a string"
                        break
        if reason:
            bad.append({"line": lineno, "reason": reason, "detail": detail})
        else:
            rows.append(r)
    return rows, bad


BAD_ROWS_SHOWN = 20  # bad rows listed on stderr; the JSON report holds them all


def cmd_score(args) -> int:
    from engine.rows import check_outputs, open_checked

    open_checked(args.file)
    check_outputs({"the input": args.file}, {"--json": args.json})
    rows, bad = read_predictions(args.file)
    if not rows:
        if not bad:
            raise UsageError(f"{args.file}: no rows (the file is empty or holds only blank lines)")
        first = bad[0]
        raise UsageError(f"{args.file}: no row to score: {len(bad)} bad row(s); line {first['line']}: "
                         f"{first['reason']}: {first['detail']}")
    for b in bad[:BAD_ROWS_SHOWN]:
        print(f"{args.file}:{b['line']}: {b['reason']}: {b['detail']}", file=sys.stderr)
    if len(bad) > BAD_ROWS_SHOWN:
        print(f"{args.file}: … and {len(bad) - BAD_ROWS_SHOWN} more bad rows (--json lists them all)", file=sys.stderr)
    m = score_rows(rows)
    m["file"] = args.file
    m["bad_rows"] = bad
    if args.json:
        write_json(args.json, m)
    if args.json != "-":
        print(render(m))
        if bad:
            print(f"  skipped      {len(bad)} bad row(s) (listed on stderr)")
    return 0


def cmd_export(args) -> int:
    run_dir = _run_dir(args)  # every argument is checked before torch is imported
    ckpt = pick_checkpoint(run_dir, args.checkpoint)
    cfg = run_config(run_dir)
    out = Path(args.merge)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder")
    import torch
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = VoxtralForConditionalGeneration.from_pretrained(cfg.model_id, dtype=dtype)  # full model, audio included
    merged = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    from engine.formatting import resolve_tokenizer_file

    shutil.copyfile(resolve_tokenizer_file(cfg.model_id), tmp / "tekken.json")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(out)
    print(f"merged {ckpt} into {cfg.model_id} ({args.dtype})", file=sys.stderr)
    return 0
