"""``voxtui preflight``: system, data, model and memory checks → go / warn / no-go, and the exact
launch command. Every problem is collected, then reported once."""

from __future__ import annotations

from pathlib import Path

import msgspec

from engine.config import TrainConfig, read_toml, to_toml
from engine.preflight.data import check_data, check_plan
from engine.preflight.memory import check_memory, check_model, check_probe, estimate_memory, fastest_fit
from engine.preflight.system import check_bf16, check_system
from engine.util import UsageError, printable, printable_lines, shell_join, shell_quote

__all__ = ["Report", "preflight", "render", "launch_command", "check_system", "check_bf16", "check_data",
           "check_plan", "check_model", "check_memory", "check_probe", "estimate_memory", "fastest_fit"]

LEVELS = ("ok", "info", "warn", "fail")


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []

    def add(self, area: str, name: str, level: str, message: str, **extra) -> None:
        self.checks.append({"area": area, "name": name, "level": level, "message": message, **extra})

    @property
    def verdict(self) -> str:
        levels = {c["level"] for c in self.checks}
        return "no-go" if "fail" in levels else "warn" if "warn" in levels else "go"


def launch_command(cfg: TrainConfig, config_path: str | None = None, written: bool = False,
                   resume: bool = False) -> str:
    """The worker's command for ``cfg``: every field that is not its default as a flag, or with
    ``config_path`` (the file ``cfg`` was read from) that file and the flags that override it (a flag given
    beside ``--config``, a batch preflight rescaled); ``written``: the file will hold ``cfg`` itself (a run's
    config.toml), so the file alone; ``resume``: the run in ``cfg.output_dir`` continued (``--resume RUN``:
    its config.toml, written, holds ``cfg``)."""
    head = ["torchrun", "--standalone", "--nproc_per_node", str(cfg.nproc), "-m", "engine.train"]
    if resume:
        return shell_join(head + ["--resume", cfg.output_dir])
    base = TrainConfig()
    if config_path:
        head += ["--config", config_path]
        if written:
            return shell_join(head)
        try:
            base = msgspec.convert({**msgspec.structs.asdict(base), **read_toml(config_path)}, TrainConfig)
        except (UsageError, msgspec.ValidationError):
            pass  # the file as it is now does not read: every field as a flag, beside it
    flags = []
    for k in cfg.__struct_fields__:
        v, d = getattr(cfg, k), getattr(base, k)
        if v == d or k in ("engine", "nproc"):
            continue
        if isinstance(v, bool):
            flags.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, list):
            flags += [f"--{k}", ",".join(v)]
        else:
            flags += [f"--{k}", str(v)]
    return shell_join(head + flags)


def preflight(cfg: TrainConfig, config_path: str | None = None, probe: bool = False, written: bool = False,
              resume: bool = False) -> dict:
    """Every check on ``cfg``, the verdict, and the command that launches it (``launch_command``; ``resume``:
    a resume of the run in ``cfg.output_dir``, so ``--resume RUN``)."""
    r = Report()
    if not written and cfg.output_dir and (Path(cfg.output_dir) / "events.jsonl").exists():
        # what `voxtui run` refuses: a new run in a folder that holds one (a resume's preflight is ``written``)
        r.add("system", "output_dir", "fail", f"--output_dir {cfg.output_dir} already holds a run: continue it with "
                                              f"voxtui run --resume {shell_quote(cfg.output_dir)}, or give another --output_dir")
    system = check_system(cfg, r)
    lengths, toks = check_data(cfg, r)  # each file tokenised once, into the worker's cache
    tok = check_plan(cfg, r, toks.get("train"))
    m = check_model(cfg, r)
    check_memory(cfg, r, m, system, lengths)
    if probe and r.verdict != "no-go":
        batch = (cfg.per_device_bsz, cfg.grad_accum)
        check_probe(cfg, r, lengths)  # rescales the batch in cfg, so the command below uses it
        if (cfg.per_device_bsz, cfg.grad_accum) != batch and tok is not None:
            check_plan(cfg, r, tok)  # the plan of the batch the command launches
    return {"verdict": r.verdict, "checks": r.checks, "command": launch_command(cfg, config_path, written, resume),
            "config": to_toml(cfg)}


def render(report: dict, launch: bool = True) -> str:
    """The checks, the verdict and (``launch``) the command that starts the run."""
    marks = {"ok": "  ok ", "info": " info", "warn": " WARN", "fail": " FAIL"}
    # (paths and a file's text in them escaped: what a run folder's or data file's name holds reaches no terminal)
    out = [f"{marks[c['level']]}  {c['area']:<7} {printable_lines(c['message'])}" for c in report["checks"]]
    out.append(f"\nverdict: {report['verdict'].upper()}")
    if launch:
        out.append(f"launch:  {printable(report['command'])}")
    return "\n".join(out)
