"""Preflight's data and plan checks. Each file is audited (broken rows, duplicates, leakage), then
tokenised once, as the worker will: with the run's own tokenizer (``load_format(cfg.model_id)``, loaded once), by
``engine.worker.batching.tokenize`` into the token cache the worker then reads (its key: the file's
bytes, the tokenizer, --max_len, --long). The length check and the plan both read those rows."""

from __future__ import annotations

from engine.config import TrainConfig


def tokenize_as_worker(cfg: TrainConfig, path: str):
    """``path``'s rows as the worker tokenises them (``batching.Tokenized``), read from or written to its
    cache. UsageError when the tokenizer cannot be had or a row is broken. The tokenizer is loaded once a
    process (``data_format``: the audit's, then train's and val's; 1.2 s a load of Tekken's 131,072 pieces)."""
    from engine.data.scan import data_format
    from engine.worker import batching

    return batching.tokenize(path, data_format(cfg.model_id), cfg.max_len, cfg.long, batching.cache_dir_for(cfg))


def check_data(cfg: TrainConfig, r) -> tuple[dict, dict]:
    """The audit and length checks of train and val. Returns the length statistics of each file's
    formatted rows (``{"train": {"p50", "p99", "max", …}}``) and its tokenised rows, for the plan."""
    from engine.data.audit import audit
    from engine.formatting import TokenizerFileError
    from engine.rows import FATAL_KINDS
    from engine.util import UsageError, counted

    lengths: dict = {}
    toks: dict = {}
    empty: set[str] = set()  # files with no row
    for name, path, against in (("train", cfg.train_jsonl, cfg.val_jsonl or None), ("val", cfg.val_jsonl, None)):
        if not path:
            if name == "val":
                r.add("data", "val", "warn", "no --val_jsonl: no evaluation, early stopping or best checkpoint")
            continue
        try:
            rep = audit(path, against=against)  # parses rows; no tokenizing without --max-len
        except UsageError as e:
            r.add("data", name, "fail", str(e))
            continue
        fatal = [d for d in rep["defects"] if d["kind"] in FATAL_KINDS]
        if fatal:
            broken: dict[int, list[dict]] = {}  # a row can have several problems: one entry per line
            for d in fatal:
                broken.setdefault(d["line"], []).append(d)
            first = ", ".join(f"line {line} {_problems(ds)}" for line, ds in list(broken.items())[:5])
            more = ", …" if len(broken) > 5 else ""
            r.add("data", name, "fail", f"{path}: {len(broken)} broken row(s) ({first}{more}); clean it with "
                                        f"`voxtui data split` or fix those lines", rows=len(broken),
                  defects=len(fatal))
        elif not rep["rows"] and name == "val":
            empty.add(name)
            r.add("data", name, "warn", f"{path}: 0 rows: no evaluation, early stopping or best checkpoint")
        else:
            r.add("data", name, "ok", f"{path}: {counted(rep['rows'], 'row')}")
        for kind, level in (("duplicate", "warn"), ("leak", "warn"), ("control_chars", "info")):
            n = rep["counts"].get(kind, 0)
            if n:
                what = {"leak": f"also stand in {against}", "duplicate": "are duplicates",
                        "control_chars": "hold control characters"}[kind]
                r.add("data", f"{name}-{kind}", level, f"{n} row(s) of {path} {what}")
        if not fatal and name not in empty:
            try:
                toks[name] = tokenize_as_worker(cfg, path)
            except TokenizerFileError as e:  # the model's, not the data's: said once, and no run can start
                if not _tokenizer_failed(r):
                    r.add("model", "tokenizer", "fail", str(e))
                continue
            except UsageError as e:
                r.add("data", f"{name}-length", "warn", f"length check skipped: {e}")
                continue
            lengths[name] = _check_lengths(cfg, r, name, toks[name])
    _check_early_stopping(cfg, r, "val" in empty or not cfg.val_jsonl)
    return lengths, toks


def _check_early_stopping(cfg: TrainConfig, r, no_val: bool) -> None:
    """--early_stopping_patience above 0 with no validation rows, or with --eval_steps 0 (the one evaluation
    is the run's last): early stopping was asked for and cannot happen (nor can a best checkpoint be kept
    with no rows), so the run trains every step it plans."""
    if cfg.early_stopping_patience <= 0:
        return
    if not no_val and cfg.eval_steps == 0:
        r.add("data", "early_stopping", "warn",
              f"--early_stopping_patience {cfg.early_stopping_patience} asks for early stopping, but --eval_steps 0 "
              f"evaluates only after the last step: the run cannot stop early and trains all its steps (give "
              f"--eval_steps N, or leave --early_stopping_patience at 0)")
        return
    if not no_val:
        return
    why = f"{cfg.val_jsonl} has no rows" if cfg.val_jsonl else "there is no --val_jsonl"
    r.add("data", "early_stopping", "warn",
          f"--early_stopping_patience {cfg.early_stopping_patience} asks for early stopping, but {why}: no evaluation "
          f"runs, so the run cannot stop early and trains all its steps (give --val_jsonl rows, or leave "
          f"--early_stopping_patience at 0)")


def _tokenizer_failed(r) -> bool:
    """Whether the run's tokenizer file has been found unusable (``check_data``'s model/tokenizer fail)."""
    return any(c["area"] == "model" and c["name"] == "tokenizer" and c["level"] == "fail" for c in r.checks)


def _problems(defects: list[dict]) -> str:
    """One row's problems, each kind once: ``missing_field (instruction, output) + wrong_type``."""
    fields: dict[str, list[str]] = {}
    for d in defects:
        fields.setdefault(d["kind"], []).append(d["detail"])
    return " + ".join(kind + (f" ({', '.join(names)})" if kind in ("missing_field", "empty_field") else "")
                      for kind, names in fields.items())


def _check_lengths(cfg: TrainConfig, r, name: str, tok) -> dict:
    """The length distribution of a file's formatted rows and how many are over --max_len (the worker's
    counts: each one is truncated or dropped)."""
    from engine.data.scan import percentiles

    stats = percentiles(tok.full_lengths)
    over = tok.truncated + tok.dropped
    level = "warn" if over / max(len(tok.full_lengths), 1) > 0.01 else "ok"
    r.add("data", f"{name}-length", level,
          f"p50 {stats['p50']:.0f}, p99 {stats['p99']:.0f}, max {stats['max']} tokens; {over} row(s) over "
          f"--max_len {cfg.max_len} (--long {cfg.long})", p99=stats["p99"])
    return stats


def check_plan(cfg: TrainConfig, r, tok=None):
    """The plan the worker will make (``engine.worker.batching.plan_run``, the same code): rows kept after
    --long, micro-batches per rank, steps per epoch and in all, a shrunk packing budget; no-go with the
    fix when no optimizer step can run. ``tok``: the training rows ``check_data`` tokenised (else they
    are tokenised here). Returns them (reused after a probe)."""
    from engine.util import UsageError
    from engine.worker import batching

    r.checks = [c for c in r.checks if c["name"] != "plan"]
    if any(c["area"] == "data" and c["name"] == "train" and c["level"] == "fail" for c in r.checks):
        return None  # the data check has said what is wrong with the file
    if _tokenizer_failed(r):
        return None  # and what is wrong with the tokenizer
    if tok is None:
        try:
            tok = tokenize_as_worker(cfg, cfg.train_jsonl)
        except UsageError as e:
            r.add("plan", "plan", "fail", f"cannot tokenize the training rows as the worker will: {e}")
            return None
    plan = batching.plan_run(tok, cfg, cfg.nproc)
    r.add("plan", "plan", "fail" if plan.problem else "ok", plan.summary(), plan=plan.as_dict())
    r.checks = [c for c in r.checks if c["name"] != "warmup"]
    if not plan.problem and cfg.warmup_steps >= plan.total_steps:
        r.add("plan", "warmup", "warn", f"--warmup_steps {cfg.warmup_steps} is not below the run's "
              f"{plan.total_steps} step(s): the learning rate only rises and never decays (fewer warm-up steps, "
              "or more steps)")
    return tok
