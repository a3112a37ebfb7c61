"""``voxtui infer``, ``voxtui score`` and ``voxtui export``: generations and metrics from a checkpoint.

Without ``--checkpoint`` the run's ``lora_final`` is used, else its latest *complete* checkpoint (a
half-written one is never taken). The base model and template come from the run's own config.
Results go to ``runs/<run>/infer/<name>/generations.jsonl`` (appended and flushed per batch, so an
interrupted job resumes where it stopped) and ``metrics.json`` (written atomically).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from engine.util import Progress, UsageError, atomic_write, write_json


def pick_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    from engine.checkpoint import complete_checkpoints

    root = run_dir / "checkpoints"
    if step is not None:
        done = dict(complete_checkpoints(root))
        if step not in done:
            have = ", ".join(str(s) for s in done) or "none"
            raise UsageError(f"{run_dir}: no complete checkpoint-{step} (complete: {have})")
        return done[step]
    for final in (run_dir / "lora_final", run_dir / "lora_stage1"):
        if (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file():
            return final
    done = complete_checkpoints(root) or complete_checkpoints(run_dir)  # the seed's layout: checkpoint-N in DIR
    if not done:
        raise UsageError(f"{run_dir}: no lora_final and no complete checkpoint")
    return done[-1][1]


def run_config(run_dir: Path):
    import msgspec

    from engine.config import TrainConfig, read_toml

    if (run_dir / "config.toml").is_file():
        return msgspec.convert(read_toml(run_dir / "config.toml"), TrainConfig)
    # the seed's output_dir: the adapter config names the base model
    ckpt = pick_checkpoint(run_dir)
    base = json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{run_dir}: no config.toml and no base model in {ckpt}/adapter_config.json")
    return TrainConfig(model_id=base, train_jsonl="-")


def load_base(cfg, device, quant: str | None = None, dtype=None):
    """The base model as the run trained it (text only: the audio tower is not kept)."""
    import torch
    from transformers import VoxtralForConditionalGeneration

    from engine.modeling import _drop_audio_tower, nf4_config

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

    from engine import metrics
    from engine.formatting import file_digest, load_format
    from engine.modeling import generate
    from engine.protocol import Inference
    from engine.rows import read_examples

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
    from engine import metrics

    preds = [r["prediction"] for r in rows]
    refs = [r["output"] for r in rows]
    out = metrics.corpus(preds, refs)
    out["ci95"] = metrics.bootstrap(preds, refs)
    return out


# ----------------------------------------------------------------------------------------- commands


def _run_dir(args) -> Path:
    from engine.runner import find_run

    if getattr(args, "output_dir", None):
        p = Path(args.output_dir)
        if not p.is_dir():
            raise UsageError(f"--output_dir {p}: no such folder")
        return p
    if not args.run:
        raise UsageError("name the run: --run RUN (or the seed's --output_dir DIR)")
    return find_run(args.run)


def cmd_infer(args) -> int:
    from engine.checkpoint import complete_checkpoints

    run_dir = _run_dir(args)
    data = args.data or args.jsonl
    if not data:
        raise UsageError("--data FILE is required")
    from engine.rows import open_checked

    open_checked(data)
    common = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "seed": args.seed, "device": args.device, "ppl": not args.no_perplexity}
    sink = None
    if args.events:
        from engine.events import PushSink

        sink = PushSink(args.events, run_dir.name)
    try:
        if args.all_checkpoints:
            table = []
            for step, _ in complete_checkpoints(run_dir / "checkpoints"):
                m = infer(run_dir, data, checkpoint=step, sink=sink, **common)
                table.append({"checkpoint": f"checkpoint-{step}", "step": step,
                              **{k: m.get(k) for k in ("rougeL", "bleu", "distinct_1", "distinct_2", "perplexity")}})
            if args.json:
                write_json(args.json, table)
            print(f"{'checkpoint':<20}{'rougeL':>9}{'bleu':>8}{'dist-1':>8}{'dist-2':>8}{'ppl':>12}")
            for t in table:
                print(f"{t['checkpoint']:<20}{t['rougeL']:>9.4f}{t['bleu']:>8.2f}{t['distinct_1']:>8.3f}"
                      f"{t['distinct_2']:>8.3f}{t['perplexity'] if t['perplexity'] is not None else float('nan'):>12.2f}")
            return 0
        m = infer(run_dir, data, checkpoint=args.checkpoint, name=args.name, sink=sink, **common)
    except BaseException as e:
        if sink is not None:
            from engine.protocol import Inference

            sink.emit(Inference(name=args.name or "", checkpoint=str(args.checkpoint or ""), state="failed",
                                message=f"{type(e).__name__}: {e}"))
        raise
    finally:
        if sink is not None:
            sink.close()
    if args.json:
        write_json(args.json, m)
    if args.json != "-":
        print(render(m))
    return 0


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


def cmd_score(args) -> int:
    from engine.rows import iter_lines, open_checked

    open_checked(args.file)
    rows = []
    for lineno, raw in iter_lines(args.file):
        if not raw.strip():
            continue
        try:
            r = json.loads(raw)
        except ValueError as e:
            raise UsageError(f"{args.file}:{lineno}: invalid_json: {e}") from None
        if not isinstance(r, dict):
            raise UsageError(f"{args.file}:{lineno}: not_object")
        for k in ("prediction", "output"):
            if not isinstance(r.get(k), str):
                raise UsageError(f"{args.file}:{lineno}: missing_field: {k} (a string) is needed")
        rows.append(r)
    if not rows:
        raise UsageError(f"{args.file}: no rows")
    m = score_rows(rows)
    m["file"] = args.file
    if args.json:
        write_json(args.json, m)
    if args.json != "-":
        print(render(m))
    return 0


def cmd_export(args) -> int:
    import torch

    run_dir = _run_dir(args)
    ckpt = pick_checkpoint(run_dir, args.checkpoint)
    cfg = run_config(run_dir)
    out = Path(args.merge)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty")
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
