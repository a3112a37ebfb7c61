"""The run folder's one owner: where a run lives and what its files say (docs/engine.md).

``runs/<run>/`` holds config.toml, engine.json (0600), events.jsonl, spool/, checkpoints/, lora_final/,
infer/. Finding a run, naming a new one, merging a resumed run's saved config into flags, reading and
writing engine.json, whether its engine lives, the state a run is in (from the process and the files,
never from a window of recent lines), complete checkpoints and inference results: all here, and none of
it imports torch, so the engine's loop, ``voxtui engine list`` and the dashboard stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path

from engine.eventlog import (
    cut_torn_tail,
    decode_event,
    last_seq,
    lines_backwards,
    read_spool,
    spool_worker_pid,
    spooled_events,
)
from engine.util import UsageError, shell_quote

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
RUNS = Path("runs")
FINAL = ("finished", "failed")


def new_run_dir() -> Path:
    """Where a run without ``--output_dir`` goes: ``runs/<YYYYmmdd-HHMMSS>``."""
    return RUNS / time.strftime("%Y%m%d-%H%M%S")


def find_run(name: str, checkpoint_flag: bool = False) -> Path:
    """A run folder by path, or by name under ``runs/``. When there is none, the error says what ``name``
    is instead: missing, a file, a folder that is no run, or a folder inside a run (a checkpoint: then the
    run folder to give, and with ``checkpoint_flag`` the ``--checkpoint N`` that picks it)."""
    def is_run(path: Path) -> bool:
        return (path / "config.toml").is_file() or (path / "events.jsonl").is_file()

    p = Path(name)
    for cand in (p, RUNS / name):
        if is_run(cand):
            return cand
    found = next((c for c in (p, RUNS / name) if c.exists()), None)
    if found is None:
        raise UsageError(f"{name}: no such run (looked in . and {RUNS}/)")
    if not found.is_dir():
        raise UsageError(f"{name}: a file, not a run folder")
    run = next((r for r in list(found.absolute().parents)[:3] if is_run(r)), None)
    if run is not None:
        shown = run if found.is_absolute() else Path(os.path.relpath(run))
        m = CKPT_RE.match(found.name)
        if m:
            how = f"--run {shown} --checkpoint {m.group(1)}" if checkpoint_flag else f"the run folder, {shown}"
            raise UsageError(f"{name}: a checkpoint of the run {shown}, not a run: give {how}")
        raise UsageError(f"{name}: a folder inside the run {shown}, not a run: give the run folder, {shown}")
    raise UsageError(f"{name}: a folder, but not a run (no config.toml or events.jsonl)")


def trained_in(run_dir: Path) -> str:
    """What in ``run_dir`` shows that a run has trained there, in words ("" when nothing does): a checkpoint,
    the final adapter, or a step event in events.jsonl or the spool. A folder the engine has just made for a
    new run (config.toml, engine.json, preflight.json, events.jsonl with the engine's own first statuses)
    shows none, so the worker it starts there runs."""
    run_dir = Path(run_dir)
    try:
        ckpts = [p.name for p in sorted((run_dir / "checkpoints").iterdir(), key=lambda p: (len(p.name), p.name))
                 if CKPT_RE.match(p.name)]  # by step: checkpoint-9 before checkpoint-10
    except OSError:
        ckpts = []
    if ckpts:
        return ", ".join(ckpts[-3:]) if len(ckpts) <= 3 else f"{len(ckpts)} checkpoints, the latest {ckpts[-1]}"
    if (run_dir / "lora_final").exists():
        return "lora_final"
    step = last_event(run_dir, "step")
    if step is not None:
        return f"events up to step {step.get('step')}"
    if any(getattr(e, "type", None) == "step" for e in spooled(run_dir)):
        return "spooled step events"
    return ""


def already_holds_run(run_dir: Path, what: str = "") -> UsageError:
    """The one line a new run in a folder that holds one gets (``voxtui run``, the worker alone), with how to
    continue that run instead."""
    held = f" ({what})" if what else ""
    return UsageError(f"{run_dir}: already holds a run{held}; continue it with --resume {shell_quote(run_dir)}, "
                      "or give another --output_dir")


def merge_saved_config(args, run_dir: Path) -> None:
    """A resumed run: the fields saved in its config.toml fill every flag not given again (and
    ``args.config_sources`` lists them, so that a problem with one names the file, not a flag)."""
    from engine.config import read_toml

    path = run_dir / "config.toml"
    saved = read_toml(path)
    # a --quant fp8 run from before --fp8_products multiplied every product in FP8: resumed, it still does
    if saved.get("quant") == "fp8" and "fp8_products" not in saved:
        saved["fp8_products"] = "all"
    refuse_changed_shape(args, saved, run_dir)
    sources = dict(getattr(args, "config_sources", None) or {})
    for name, value in saved.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
            sources[name] = str(path)
    args.config_sources = sources
    args.output_dir = str(run_dir)


# what a resumed run cannot change: the base model and the adapters' shape (its checkpoints hold adapters of
# that shape: loading them into another fails), and its folder
FIXED_ON_RESUME = ("model_id", "lora_r", "lora_targets")


def refuse_changed_shape(args, saved: dict, run_dir: Path) -> None:
    """Flags given again with ``--resume`` that would change what the run's checkpoints are (FIXED_ON_RESUME)
    or move it (``--output_dir``): one line, before anything is written (such a resume used to save the new
    value into config.toml, then fail to load the checkpoint, and every resume after it too)."""
    problems = []
    for name in FIXED_ON_RESUME:
        given, was = getattr(args, name, None), saved.get(name)
        if given is None or was is None or _same_setting(name, given, was):
            continue
        shown = ",".join(given) if isinstance(given, list) else given
        kept = ",".join(was) if isinstance(was, list) else was
        problems.append(f"--{name} {shown}: a resumed run keeps its {name} ({kept}), the one its checkpoints were "
                        "trained with; start a new run to change it")
    out = getattr(args, "output_dir", None)
    if out and Path(out).resolve() != Path(run_dir).resolve():
        problems.append(f"--output_dir {out}: a resumed run stays in its folder ({run_dir})")
    if problems:
        raise UsageError("; ".join(problems))


def _same_setting(name: str, given, was) -> bool:
    if name == "lora_targets":
        return sorted(given) == sorted(was)
    if name == "model_id" and Path(str(given)).exists() and Path(str(was)).exists():
        return Path(str(given)).resolve() == Path(str(was)).resolve()
    return given == was


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (a ``checkpoint-<step>`` folder exists only
    once it is complete: it is written under a temp name and renamed)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file() and (p / "adapter_model.safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1][1] if done else None


# A checkpoint in use: ``.in-use-<pid>`` in its folder, written by the process that reads it (an inference
# job, or the engine for the job it starts). The worker's pruning (save_total_limit) keeps a checkpoint marked
# by a live process; a marker whose process has ended counts for nothing and is removed when found.
IN_USE_RE = re.compile(r"^\.in-use-(\d+)$")


def mark_in_use(ckpt: Path, pid: int | None = None, what: str = "voxtui infer") -> Path:
    """Mark the checkpoint folder ``ckpt`` as read by process ``pid`` (this one when None); returns the marker.
    Written under a temp name and renamed, so a reader never sees half of it; a folder that is gone is not
    made again (FileNotFoundError): the caller then checks the checkpoint is still there and complete."""
    import psutil

    pid = pid or os.getpid()
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None
    marker = Path(ckpt) / f".in-use-{pid}"
    tmp = Path(ckpt) / f".in-use-{pid}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": pid, "started": started, "what": what}, f)
        os.replace(tmp, marker)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return marker


def unmark_in_use(marker: Path) -> None:
    """Remove a marker ``mark_in_use`` wrote (one already gone, with its checkpoint, is fine)."""
    with contextlib.suppress(OSError):
        os.unlink(marker)


def checkpoint_users(ckpt: Path, clean: bool = True) -> list[int]:
    """The pids of live processes that marked ``ckpt`` in use. A marker whose process has ended (or whose pid
    now names a younger process) counts for nothing; with ``clean`` it is removed."""
    import psutil

    try:
        names = os.listdir(ckpt)
    except OSError:
        return []
    live = []
    for n in names:
        m = IN_USE_RE.match(n)
        if not m:
            continue
        pid, marker = int(m.group(1)), Path(ckpt) / n
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
        started = info.get("started") if isinstance(info, dict) else None
        try:
            proc = psutil.Process(pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE and not (
                isinstance(started, (int, float)) and proc.create_time() > started + 1.0)
        except psutil.Error:
            alive = False
        if alive:
            live.append(pid)
        elif clean:
            unmark_in_use(marker)
    return sorted(live)


# trainer_state.json: what a resume takes from it, and of what type (step, epoch and micro it cannot do without)
_STATE_FIELDS = {"step": int, "epoch": int, "micro": int, "best_step": int, "bad_evals": int, "world_size": int,
                 "total_steps": (int, type(None)), "best_loss": (int, float, type(None)), "schedule": dict,
                 "preview": dict}
_STATE_NEEDS = ("step", "epoch", "micro")


def damaged_checkpoint(path: Path, what: str) -> UsageError:
    """One line for a file of a checkpoint (``path``, directly inside it or in its rng/) that a resume cannot
    load: the file, what is wrong, and what to do — move the checkpoint aside, to resume from the one before."""
    ckpt = next(p for p in Path(path).parents if CKPT_RE.match(p.name) or p == Path(p.anchor))
    earlier = [p for _, p in complete_checkpoints(ckpt.parent) if p.name != ckpt.name]
    instead = f"resume from {earlier[-1].name}" if earlier else "start the run over from step 0"
    return UsageError(f"{path}: {what}; the checkpoint is damaged: move {ckpt.name} out of {ckpt.parent} to {instead}")


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's ``trainer_state.json``, as a resume needs it; a UsageError naming the file and what is
    wrong with it (unreadable, not UTF-8, not JSON, a field missing or of another type) otherwise, and which
    checkpoint a resume would take instead once this one is moved aside."""
    path = Path(ckpt) / "trainer_state.json"

    def damaged(what: str) -> UsageError:
        return damaged_checkpoint(path, what)

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise damaged(f"unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise damaged(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise damaged(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise damaged("not JSON (nested too deeply)") from None
    if not isinstance(state, dict):
        raise damaged(f"not a JSON object (a {type(state).__name__})")
    for name, kind in _STATE_FIELDS.items():
        if name not in state:
            if name in _STATE_NEEDS:
                raise damaged(f"no {name!r}")
            continue
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            raise damaged(f"{name!r} is {json.dumps(value)[:40]}, not "
                          f"{'a whole number of 0 or more' if kind is int else 'what a resume can use'}")
    return state


# what decides how many steps an epoch-based run has (engine.worker.batching.plan_run), besides its data
PLAN_FIELDS = ("model_id", "train_jsonl", "per_device_bsz", "grad_accum", "max_len", "long", "packing",
               "group_by_length", "seed", "epochs", "max_steps")


def resume_steps(run_dir: Path, cfg, world: int) -> tuple[int, int | None]:
    """A resume of ``run_dir`` with ``cfg`` (the saved config under the flags given again) on ``world``
    ranks: (the step its latest complete checkpoint holds, 0 without one; the steps the resumed run trains
    to, None when that needs the data read). With ``--max_steps`` that is it; an epoch-based run keeps its
    total (the checkpoint's ``total_steps``) when nothing that decides the plan changed (PLAN_FIELDS, the
    ranks); with other epochs or batches it is the plan's (preflight's) to say. A damaged trainer_state.json in
    that checkpoint is a UsageError that names it."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        return 0, cfg.max_steps or None
    state = read_trainer_state(ckpt)  # a damaged one is refused here, naming it, before anything starts
    step = state.get("step")
    done = step if isinstance(step, int) and step >= 0 else int(CKPT_RE.match(ckpt.name).group(1))
    if cfg.max_steps:
        return done, cfg.max_steps
    saved, total = state.get("config"), state.get("total_steps")
    same = (isinstance(saved, dict) and isinstance(total, int) and state.get("world_size") == world
            and all(saved.get(k) == getattr(cfg, k) for k in PLAN_FIELDS))
    return done, total if same else None


def refuse_nothing_to_resume(run_dir: Path, cfg, done: int, total: int | None, per_epoch: int = 0) -> None:
    """A resume that would train no step (its latest checkpoint, at step ``done``, is at or past the
    ``total`` steps the run has with ``cfg``) is refused before anything starts: it would only evaluate and
    save that checkpoint again. So is one of a finished run whose rate has decayed to 0, resumed with a floor
    of 0, even where ``total`` is None (not known without the data planned): any step it trains is at 0. A larger ``--max_steps`` resumes it (or larger ``--epochs``, for a run
    without ``--max_steps``; ``per_epoch``: its steps per epoch, when known). A run stopped partway (its
    checkpoint's ``total_steps`` above ``done``) is told the flags given leave it no step, and how to go on.
    A run with no complete checkpoint (``done`` 0) is never refused: its resume starts it over from step 0
    (see ``starts_over``), and every step it trains is on the schedule from its start."""
    if not done:
        return
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    state = _read_json(ckpt / "trainer_state.json") if ckpt else {}
    planned = state.get("total_steps")
    partway = isinstance(planned, int) and planned > done  # its schedule had not run out
    if total is None:  # the steps it would train to need the data planned; from a rate of 0 none would train
        if not isinstance(planned, int) or partway or not _decayed_to_0(state, cfg):
            return
        total = done
    if done < total and (partway or not _decayed_to_0(state, cfg)):
        return
    status = last_event(run_dir, "status") or {}
    outcome = status.get("outcome") if status.get("state") == "finished" else ""
    if done < total:  # a finished run extended: from a rate of 0 to a floor of 0, its steps would not train
        said = f"finished all its {done} steps ({outcome})" if outcome else f"has trained all its {done} steps"
        n = total - done
        more = f"the {n} more step{'s' if n != 1 else ''}" + (
            f" of --max_steps {total}" if cfg.max_steps else " these settings give it")
        raise UsageError(f"{run_dir} {said}; nothing to resume — its learning rate has decayed to 0 (--min_lr_ratio "
                         f"0), so {more} would change nothing: start a new run (or give --min_lr_ratio above 0 too)")
    if done == total and not partway:
        said = f"finished all its {total} steps ({outcome})" if outcome else f"has trained all its {total} steps"
        if cfg.min_lr_ratio == 0:
            # its schedule has decayed to 0 and an extended run goes on from there: more steps would not train
            raise UsageError(f"{run_dir} {said}; nothing to resume — its learning rate has decayed to 0 "
                             "(--min_lr_ratio 0), so more steps would change nothing: start a new run (or give it "
                             "more steps and --min_lr_ratio above 0)")
    elif partway:
        said = f"has trained {done} of its {planned} steps" + (f" ({outcome})" if outcome else "")
        said += (f", and --max_steps {total} leaves no step to train beyond those" if cfg.max_steps else
                 f", and these settings give it {total} in all")
    else:
        said = f"has trained {done} step(s), and these settings give it {total} in all"
    epochs = done / per_epoch if per_epoch else cfg.epochs
    more = f"--max_steps N (N above {done})" if cfg.max_steps else \
        f"--epochs E (E above {epochs:.3g}) or --max_steps N (N above {done})"
    if partway and cfg.max_steps:
        raise UsageError(f"{run_dir} {said}; nothing to resume — give it more steps: voxtui run --resume {shell_quote(run_dir)} "
                         f"{more}, or leave out --max_steps to train on to its {planned}")
    raise UsageError(f"{run_dir} {said}; nothing to resume — start a new run, or give it more steps: "
                     f"voxtui run --resume {shell_quote(run_dir)} {more}")


def starts_over(run_dir: Path, cfg) -> str:
    """What a resume of ``run_dir`` with no complete checkpoint does, in one line ("" when it has one): the
    workers start it over from step 0, in the same folder, with its settings (engine.worker.saving.restore);
    the line says where the run got to before (its last state and step) and when ``cfg`` saves first."""
    run_dir = Path(run_dir)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return ""
    s = summary(run_dir)
    state, step = s.get("state") or "new", s.get("step") or 0
    if state == "new":
        before = "it has not trained a step"
    else:
        before = f"it {state} at step {step}" if step else f"it {state} before its first step"
        if step and cfg.save_steps > step:
            before += f", before its first save at step {cfg.save_steps}"
    return f"{run_dir} has no checkpoint to resume from ({before}): the resume starts it over from step 0"


def _decayed_to_0(state: dict, cfg) -> bool:
    """A checkpoint at the end of its run's schedule (``state``: its trainer_state.json) whose rate is 0 there
    (the run's --min_lr_ratio was 0), resumed with --min_lr_ratio 0: a resume goes on from that rate to that
    floor, so every step it trains is at a learning rate of 0 (engine.worker.schedule.resumed)."""
    saved = state.get("config")
    was = saved.get("min_lr_ratio", cfg.min_lr_ratio) if isinstance(saved, dict) else cfg.min_lr_ratio
    return was == 0 and cfg.min_lr_ratio == 0


def refuse_out_of_patience(run_dir: Path, cfg) -> None:
    """A run that ended by early stopping (its latest checkpoint has run out of --early_stopping_patience:
    that many evaluations without an improvement) would stop again at its next evaluation that does not
    improve, having trained one more evaluation period: refused before anything starts, with the way on — a
    larger patience, or 0 to turn early stopping off."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        return
    state = read_trainer_state(ckpt)
    bad, patience = state.get("bad_evals", 0), cfg.early_stopping_patience
    if not patience or bad < patience:
        return
    run = shell_quote(run_dir)
    raise UsageError(f"{run_dir} stopped early at step {state['step']} ({bad} evaluations without an improvement, "
                     f"--early_stopping_patience {patience}); nothing to resume — it would stop again at its next "
                     f"evaluation: give it more patience (voxtui run --resume {run} --early_stopping_patience N, N "
                     f"above {bad}; 0 turns early stopping off), or start a new run")


def engine_info(run_dir: Path) -> dict:
    """``engine.json`` (pid, endpoints, key, …), or {} when missing or unreadable."""
    return read_engine_info(Path(run_dir) / "engine.json")


def read_engine_info(path: Path) -> dict:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


def engine_json_problem(run_dir: Path) -> str:
    """Why engine.json names no engine: "" when it is missing or names one (a pid), else one line that
    says where it goes wrong (``engine.json unreadable (line 1 column 17)``)."""
    try:
        text = (Path(run_dir) / "engine.json").read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as e:
        return f"engine.json unreadable: {e.strerror or e}"
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        return f"engine.json unreadable (line {e.lineno} column {e.colno})"
    except ValueError:
        return "engine.json unreadable (not UTF-8)"
    except RecursionError:
        return "engine.json unreadable (nested too deeply)"
    if not isinstance(info, dict):
        return "engine.json unreadable (not a JSON object)"
    pid = info.get("pid")
    return "" if type(pid) is int and pid > 0 else "engine.json unreadable (no engine pid in it)"


def log_held(run_dir: Path) -> bool | None:
    """Whether a process holds the run's event-log lock now, as its engine does for its whole life (None:
    it cannot be told here, a filesystem without locks). Taken shared for an instant, never created."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no engine ever ran here: an engine makes it before anything else
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # and with it the shared lock


def engine_unsure(run_dir: Path, info: dict) -> str:
    """Where engine.json names no engine (unreadable, or removed) while a process holds the run's event
    log — its engine, still running: one line saying so (the run is not to be called crashed, nor its
    workers orphans); "" otherwise."""
    if type(info.get("pid")) is int:
        return ""  # it names an engine: whether that one lives decides
    what = engine_json_problem(run_dir) or "engine.json missing"
    if log_held(run_dir) is False:
        return ""
    return f"{what} — the engine may still be running"


def engine_processes(run_dir: Path) -> list[int]:
    """The pids of this machine's engines of the run, by their command line (``python -m engine.daemon
    RUN_DIR …``): for a person to be told, where engine.json cannot name them."""
    import psutil

    want, out = Path(run_dir).resolve(), []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        i = next((i for i in range(1, len(cmd) - 1) if cmd[i] == "engine.daemon" and cmd[i - 1] == "-m"), None)
        if i is None:
            continue
        try:
            arg = Path(cmd[i + 1])
            if (arg if arg.is_absolute() else Path(proc.cwd()) / arg).resolve() == want:
                out.append(proc.pid)
        except (psutil.Error, OSError, ValueError):
            continue
    return out


def write_engine_info(run_dir: Path, info: dict) -> None:
    """engine.json, atomically and readable by this user only (it holds the key)."""
    path = Path(run_dir) / "engine.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)


def engine_alive(info: dict) -> bool:
    """Whether the engine that wrote ``info`` (engine.json) runs: its pid exists, is not a zombie, and
    is the same process (started before it wrote the file, so a reused pid does not count)."""
    import psutil

    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or "stopped" in info:
        return False
    try:
        proc = psutil.Process(pid)
        started = info.get("started")
        if isinstance(started, (int, float)) and proc.create_time() > started + 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid runs (a zombie does not)."""
    import psutil

    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def orphan_workers(run_dir: Path, info: dict | None = None) -> list[int]:
    """The pids of workers that outlive their engine, on this machine, rank 0 first: they train on until
    they miss the engine's heartbeat (``--engine_timeout``, 30 s), then save and stop. Rank 0 is known by
    the spool it writes its events to; the other ranks are its siblings under the same torchrun that run
    the same command line. A pid that was reused since (a process younger than the worker's id) does not
    count."""
    import psutil

    from engine.eventlog import read_spool, spool_worker_pid

    info = engine_info(run_dir) if info is None else info
    spool = read_spool(Path(run_dir) / "spool")
    if not spool or engine_alive(info) or not this_host_runs(info, spool) or engine_unsure(run_dir, info):
        return []  # (an engine that engine.json no longer names, holding the run's event log: its workers)
    pids: list[int] = []
    for worker in spool:
        pid, started = spool_worker_pid(worker), worker.rsplit("-", 1)[-1]
        try:
            proc = psutil.Process(pid) if pid else None
            if proc is None or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.create_time() > int(started, 16) / 1000 + 1.0:
                continue  # the pid of a process that began after this worker named itself: not it
        except (psutil.Error, ValueError):
            continue
        pids += [p for p in [pid, *_sibling_ranks(proc)] if p not in pids]
    return pids


def _sibling_ranks(rank0) -> list[int]:
    """The other live ranks of ``rank0``'s launch (a ``psutil.Process``): the processes its parent started
    with the same command line, in rank order ([] where it has no parent left, or none)."""
    import psutil

    try:
        cmdline, parent = rank0.cmdline(), rank0.parent()
        if parent is None or parent.pid == 1:
            return []
        siblings = [c for c in parent.children() if c.pid != rank0.pid and c.cmdline() == cmdline
                    and c.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []

    def rank(proc) -> int:
        try:
            return int(proc.environ().get("RANK", ""))
        except (psutil.Error, ValueError):
            return 1 << 30

    return [c.pid for c in sorted(siblings, key=lambda c: (rank(c), c.pid))]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def checkpoint_states(ckpt_root: Path) -> list[dict]:
    """The complete checkpoints on disk now, oldest first, each with what its ``trainer_state.json`` says:
    ``{"step", "name", "path", "best_step", "best_loss", "reason", "time"}`` (None where unreadable)."""
    out = []
    for step, path in complete_checkpoints(ckpt_root):
        state = _read_json(path / "trainer_state.json")
        out.append({"step": step, "name": path.name, "path": str(path), "best_step": state.get("best_step"),
                    "best_loss": state.get("best_loss"), "reason": state.get("reason", ""),
                    "time": state.get("time")})
    return out


def final_adapter(run_dir: Path) -> Path | None:
    """``lora_final/`` when it holds a complete adapter (it is written under a temp name and renamed)."""
    path = Path(run_dir) / "lora_final"
    return path if (path / "adapter_model.safetensors").is_file() else None


def inference_results(run_dir: Path) -> dict[str, dict]:
    """The inference jobs under ``runs/<run>/infer/``, by name. A finished one: its ``metrics.json`` with
    ``"state": "finished"``; one without metrics yet (running, or interrupted): ``"state": "incomplete"``,
    ``"done"`` (rows generated so far) and its ``params``."""
    root = Path(run_dir) / "infer"
    out: dict[str, dict] = {}
    if not root.is_dir():
        return out
    for job in sorted(root.iterdir()):
        if not job.is_dir() or job.name.startswith("."):
            continue
        metrics = _read_json(job / "metrics.json")
        if metrics:
            out[job.name] = {**metrics, "state": "finished", "path": str(job)}
            continue
        params = _read_json(job / "params.json")
        if not params:
            continue
        try:
            with open(job / "generations.jsonl", "rb") as f:
                done = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except OSError:
            done = 0
        out[job.name] = {"state": "incomplete", "done": done, "params": params,
                         "checkpoint": params.get("checkpoint", ""), "path": str(job)}
    return out


def _json_lines(path: Path):
    """The JSON objects of a JSONL file another process wrote, skipping whatever is not one."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                yield value


def inference_samples(job_dir: Path, n: int = 5) -> list[dict]:
    """The first ``n`` rows of a finished job (by input order), as the engine's ``inference`` event carries
    them: ``{line, prompt, prediction, reference, rougeL}``."""
    job_dir = Path(job_dir)
    rows: dict[int, dict] = {}
    try:
        for r in _json_lines(job_dir / "generations.jsonl"):
            index = r.get("index")
            if isinstance(index, int) and 0 <= index < n:
                rows[index] = r
                if len(rows) == n:
                    break
    except OSError:
        return []
    scores: dict[int, float] = {}
    try:
        for _, p in zip(range(n), _json_lines(job_dir / "per_row.jsonl")):
            score = p.get("rougeL")
            if isinstance(p.get("index"), int) and isinstance(score, (int, float)):
                scores[p["index"]] = score
    except OSError:
        pass
    return [{"line": r.get("line"), "prompt": str(r.get("prompt", ""))[:300],
             "prediction": str(r.get("prediction", ""))[:500], "reference": str(r.get("output", ""))[:500],
             "rougeL": scores.get(i)} for i, r in sorted(rows.items())]


# ---------------------------------------------------------------------------- a run's state


# (events.jsonl, type) → (the file's (device, inode) and the bytes just before the point read to, that
# point: the end of the last complete line, the last event of that type before it): a picker refreshing
# every few seconds reads only what was appended (a file replaced by one that got the same inode is told
# by those bytes)
_LAST_EVENT: dict[tuple[str, str], tuple[tuple, int, dict | None]] = {}
_MARK = 64  # bytes before the point read to, kept to recognise the file
_LAST_EVENT_MAX = 4096  # entries (two per run listed): past it, the cache starts afresh


def _event_of(line: bytes, kind: str) -> dict | None:
    try:
        ev = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return ev if isinstance(ev, dict) and ev.get("type") == kind else None


def last_event(run_dir: Path, kind: str) -> dict | None:
    """The last event of one type in events.jsonl: read backwards the first time (however many others
    follow it), then only the lines appended since (events.jsonl only grows; a file replaced or cut
    shorter is read backwards again)."""
    path = run_dir / "events.jsonl"
    try:
        st = path.stat()
    except OSError:
        return None
    needle = f'"type":"{kind}"'.encode()  # the tag comes first; inside a JSON string a quote is escaped
    key = (str(path), kind)
    hit = _LAST_EVENT.get(key)
    try:
        if hit is not None and hit[0][:2] == (st.st_dev, st.st_ino) and hit[1] <= st.st_size \
                and _mark(path, hit[1]) == hit[0][2]:
            _, done, found = hit
            with open(path, "rb") as f:
                f.seek(done)
                while True:
                    block = f.read(1 << 20)
                    end = block.rfind(b"\n")
                    if end < 0:  # nothing complete (a torn line waits for its newline)
                        if len(block) == 1 << 20:  # a line of over 1 MiB: start afresh, backwards
                            _LAST_EVENT.pop(key, None)
                            return last_event(run_dir, kind)
                        break
                    for line in block[:end].split(b"\n"):
                        if needle in line:
                            found = _event_of(line, kind) or found
                    done += end + 1
                    f.seek(done)
        else:
            found = None
            for line in lines_backwards(path):
                if needle in line:
                    found = _event_of(line, kind)
                    if found is not None:
                        break
            with open(path, "rb") as f:  # where the complete lines end: the next call reads on from there
                f.seek(max(st.st_size - (1 << 16), 0))
                tail = f.read(1 << 16)
            cut = tail.rfind(b"\n")
            done = st.st_size - len(tail) + cut + 1 if cut >= 0 else (0 if st.st_size <= 1 << 16 else -1)
            if done < 0:  # a last line of over 64 KiB still torn: read backwards again next time
                return found
        ident = (st.st_dev, st.st_ino, _mark(path, done))
    except OSError:
        return None
    if len(_LAST_EVENT) >= _LAST_EVENT_MAX:
        _LAST_EVENT.clear()
    _LAST_EVENT[key] = (ident, done, found)
    return found


def _mark(path: Path, end: int) -> bytes:
    """The bytes just before ``end`` (how the cache of ``last_event`` knows the file it read)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), min(end, _MARK), max(end - _MARK, 0))


LOCK_FILE = ".events.lock"


def lock_events(run_dir: Path, wait_s: float = 0.0, need_lock: bool = False) -> int | None:
    """The run's event-log lock (``flock`` on ``runs/<run>/.events.lock``): an open descriptor holding it
    (closing it lets go; so does the process's death), or None when another process holds it for longer
    than ``wait_s``. An engine holds it for its life; a fold of the spool takes it only when it is free.
    A filesystem without locks: a descriptor without one for an engine (its pid checks still guard),
    None with ``need_lock`` (a fold is not done without the lock)."""
    import fcntl

    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                if wait_s:
                    raise UsageError(f"{run_dir}: another process holds its event log (another engine?) "
                                     f"after {wait_s:.0f} s") from None
                return None
            time.sleep(0.05)
        except OSError:  # no locks here (some network filesystems)
            if need_lock:
                os.close(fd)
                return None
            return fd


_FOLDING = threading.Lock()  # one fold at a time in this process (flock may not exclude threads everywhere)


def this_host_runs(info: dict, workers) -> bool:
    """Whether the engine of ``info`` and the spooling ``workers`` ran on this machine: only then does a
    pid that is not alive here mean the process is gone (a rank on another node of a shared filesystem
    may still be writing its spool)."""
    import socket

    from engine.eventlog import host_tag, worker_host

    if info.get("host") not in (None, socket.gethostname()):
        return False
    return all(worker_host(w) == host_tag() for w in workers)


def fold_spool(run_dir: Path) -> int:
    """Store in events.jsonl what the workers spooled and no engine stored, once the engine and those
    workers are gone — as the next engine would on resume, for a run that gets none (its workers finished
    it after their engine was killed): ``engine list``, the dashboard and every reader of events.jsonl
    then see the run's last steps and its real end. Under the event-log lock, so never beside an engine;
    each event once (a worker's count, ``wseq``, says what is stored). Only for an engine and workers of
    this machine (elsewhere a pid says nothing here). Returns how many were stored; 0 when there is nothing
    to do or it cannot be done now (an engine or a worker runs, the folder is not writable, no locks):
    readers then go on as before."""
    spool_dir = Path(run_dir) / "spool"
    if not spool_dir.is_dir():
        return 0
    spool = read_spool(spool_dir)
    info = engine_info(run_dir)
    if not this_host_runs(info, spool) or engine_alive(info) \
            or any(pid_alive(spool_worker_pid(w)) for w in spool):
        return 0
    with _FOLDING:
        try:
            fd = lock_events(run_dir, need_lock=True)
        except OSError:
            return 0
        if fd is None:
            return 0
        try:
            return _fold(Path(run_dir), spool_dir)
        except OSError:
            return 0
        finally:
            os.close(fd)


def _fold(run_dir: Path, spool_dir: Path) -> int:
    from engine.protocol import Alert, event_encoder, stamp

    info = engine_info(run_dir)
    if engine_alive(info):  # one started meanwhile (and waits for the lock)
        return 0
    path = run_dir / "events.jsonl"
    spool = read_spool(spool_dir)
    cut_torn_tail(path)
    stored: dict[str, int] = {}
    pending = spooled_events(path, spool, stored)
    if pending:
        seq, run = last_seq(path), run_dir.name
        crashed = isinstance(info.get("pid"), int) and "stopped" not in info and "folded" not in info
        events = list(pending)
        if crashed:  # the record says what happened, as the next engine would have
            events.insert(0, Alert(level="error", kind="engine_lost", message=(
                f"the engine (pid {info['pid']}) ended without closing (killed?) after event {seq}; "
                f"{len(pending)} event(s) its workers kept are stored below")))
        with open(path, "ab") as f:
            for ev in events:
                seq += 1
                f.write(event_encoder.encode(stamp(ev, seq, run)) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        for ev in pending:
            stored[ev.worker] = max(stored.get(ev.worker, 0), ev.wseq)
        if crashed:  # said once: the next engine does not say it again
            write_engine_info(run_dir, {**info, "folded": seq})
    for worker, files in spool.items():  # a file goes once every event in it is stored (one not read stays)
        for _, p in files:
            try:
                wseqs = [ev.wseq for ev in map(decode_event, p.read_bytes().split(b"\n"))
                         if ev is not None and ev.worker == worker]
            except OSError:
                continue
            if all(w <= stored.get(worker, 0) for w in wseqs):
                p.unlink(missing_ok=True)
    try:
        spool_dir.rmdir()
    except OSError:
        pass  # a file left (unread now, or not a spool file): the next fold looks again
    return len(pending) + (1 if pending and crashed else 0)


def spooled(run_dir: Path) -> list:
    """Events the workers kept while no engine stored them (replayed by the next engine)."""
    spool = read_spool(run_dir / "spool")
    return spooled_events(run_dir / "events.jsonl", spool, {}) if spool else []


def events_problem(run_dir: Path) -> str:
    """What keeps ``events.jsonl`` from saying anything: "" when it is a file that can be read, else one
    line (missing, empty, unreadable and why)."""
    try:
        with open(Path(run_dir) / "events.jsonl", "rb") as f:
            st = os.fstat(f.fileno())
            f.read(1)
    except FileNotFoundError:
        return "events.jsonl missing"
    except OSError as e:
        return f"events.jsonl unreadable: {e.strerror or e}"
    return "events.jsonl empty" if st.st_size == 0 else ""


def previewing(run_dir: Path, status: dict | None, step: dict | None, pausing: bool) -> str:
    """What a running run waits for while its workers generate previews (a preview_start event, no preview,
    step or other status after it; a pause's pending status may follow it): "" when it does not."""
    start = last_event(run_dir, "preview_start")
    if not isinstance(start, dict) or not isinstance(start.get("seq"), int):
        return ""
    after = [ev.get("seq") for ev in (step, last_event(run_dir, "preview")) if isinstance(ev, dict)]
    if isinstance(status, dict) and not status.get("pending"):
        after.append(status.get("seq"))
    if any(isinstance(seq, int) and seq > start["seq"] for seq in after):
        return ""
    then = "; the pause follows" if pausing else ""
    at, count, most = (v if isinstance(v, int) else "?" for v in (start.get(k) for k in ("step", "count", "max_new_tokens")))
    return (f"previewing… (step {at}: {count} prompt(s), up to {most} new tokens; training and commands wait "
            f"for it{then})")


def summary(run_dir: Path, ask=None, lagging: bool = False) -> dict:
    """One run's state as it is: the engine process (alive or not) and the run folder decide, not a
    window of recent events. States: new, starting, running, pausing, paused, stopping, finished (all steps, or
    early stopping), stopped (on request), failed, crashed (the engine died before the run ended; resume
    continues it). ``ask(run_dir)``: the live engine's status reply (None: no answer). Where events.jsonl
    cannot say (gone, emptied, replaced by a folder while the engine runs), the state, step, loss and total
    steps are the engine's, and ``problem`` says what became of the file. An engine alive that does not answer
    (stopped with SIGSTOP, hung) stores nothing meanwhile: what its workers' spool holds since (their steps;
    their own save and stop once they gave up on it, outcome engine_lost: crashed) is told, and the message
    says so. Without ``ask``, a live engine is taken to serve its run. Where
    engine.json names no engine (unreadable, removed) but a process holds the run's event log, as its engine
    does while it lives, the run is not called crashed: ``problem`` (and the message) say the engine may still
    be running. A run with no engine whose events.jsonl ends before its final status (a torn last line) but
    whose every step was trained and whose lora_final/ was saved is finished, the message says how it was
    known (there is nothing to resume). ``lagging`` (``engine status``): where the engine has numbered
    events the file does not hold yet (a full disk: they wait in its memory), its state is the run's."""
    from engine.config import read_toml
    from engine.protocol import shown_state

    fold_spool(run_dir)  # the workers' last events, when their engine is gone and nobody stored them
    info = engine_info(run_dir)
    alive = engine_alive(info)
    status, step = last_event(run_dir, "status"), last_event(run_dir, "step")
    run_info = last_event(run_dir, "run_info") or {}
    problem = "" if alive else engine_unsure(run_dir, info)  # engine.json unreadable, the engine maybe running
    live = alive or bool(problem)
    reply = ask(run_dir) if alive and ask is not None else None
    # alive, asked, and no answer (stopped with SIGSTOP, hung): it stores nothing meanwhile, while its workers
    # train on (then, past --engine_timeout, save and stop) and keep what they send in their spool
    silent = alive and ask is not None and (reply is None or reply.status != "ok")
    if alive and status is None:  # the file says nothing (yet?): the engine knows
        problem = events_problem(run_dir)
        answered = reply is not None and reply.status == "ok" and bool(reply.state)
        if problem == "events.jsonl empty" and not (answered and reply.last):
            problem = ""  # nothing stored yet, as far as anyone knows: a run just started
        if answered:
            status = {"state": reply.state, "outcome": reply.outcome, "pending": reply.pending,
                      "message": f"{problem}; state and step from the engine" if problem else ""}
            step = {"step": reply.step or 0, "loss": reply.loss}
            run_info = {"total_steps": reply.total_steps}
        elif problem:
            status = {"state": "starting", "message": f"{problem}; the engine was not asked, or did not answer"}
    elif alive and lagging and reply is not None and reply.status == "ok" and reply.state:
        try:
            stored = last_seq(run_dir / "events.jsonl")
        except OSError:  # (a folder now, unreadable: what the file said is what there is)
            stored = None
        if stored is not None and reply.last > stored:
            # events the file could not take (a full disk) wait in the engine: the engine's state is the run's
            status = {"state": reply.state, "outcome": reply.outcome, "pending": reply.pending,
                      "message": f"{reply.message + '; ' if reply.message else ''}events.jsonl holds events up to "
                                 f"{stored}, the engine {reply.last}: state and step from the engine"}
            step = {"step": reply.step or 0, "loss": reply.loss}
    kept = spooled(run_dir) if not live or silent else []
    for ev in kept:  # what the workers did after their engine went away, or while it does not answer
        if ev.type == "status":
            status = {"state": ev.state, "message": ev.message, "outcome": ev.outcome}
        elif ev.type == "step":
            step = {"step": ev.step, "loss": ev.loss}
    state = status.get("state", "new") if status else "new"
    outcome = status.get("outcome", "") if status else ""
    pending = status.get("pending", "") if status else ""
    orphans = [] if live else orphan_workers(run_dir, info)
    message = problem if problem and not alive else (status or {}).get("message", "")
    if shown_state(state, outcome) == "stopped":
        state = "stopped"
    elif (state == "finished" and outcome == "engine_lost") or (not live and state not in FINAL
                                                                and (state != "new" or info)):
        doing = "are paused" if state == "paused" else "are still training"
        state = "crashed"  # the engine died before the run ended
        if orphans:
            message = (f"the engine went away; its workers (pid {', '.join(map(str, orphans))}) {doing}, "
                       "unseen by any engine, until they miss its heartbeat (--engine_timeout, 30 s by default), then "
                       f"save and stop; to stop them now: voxtui engine stop {shell_quote(run_dir)}")
    elif state == "new" and live:
        state = "starting"
    elif shown_state(state, outcome, pending) == "pausing":  # a pause requested, the workers not paused yet
        state = "pausing"
    total = run_info.get("total_steps")
    if state == "crashed" and not orphans and type(total) is int and total > 0 \
            and (step or {}).get("step") == total and final_adapter(run_dir):
        state = "finished"  # its final status was lost (a torn last line): what `--resume` finds, it refuses
        message = (f"events.jsonl holds no final status (its last line cut?), but all {total} steps were trained "
                   "and lora_final/ was saved")
    if alive and state in ("running", "pausing"):
        message = previewing(run_dir, status, step, state == "pausing") or message
    if silent and kept:
        said = [ev for ev in kept if ev.type == "status"]
        message = (f"the engine does not answer: its workers' own record (their spool, not yet stored) says step "
                   f"{(step or {}).get('step', 0)}" + (f", {state}: {said[-1].message}" if said else ""))
    cfg = {}
    try:
        cfg = read_toml(run_dir / "config.toml")
    except UsageError:
        pass
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    mtime = max((p.stat().st_mtime for p in (run_dir / "events.jsonl", run_dir / "config.toml") if p.exists()), default=0)
    return {"run": run_dir.name, "path": str(run_dir), "state": state, "outcome": outcome,
            "message": message, "problem": problem, "engine_pid": info.get("pid") if alive else None,
            "worker_pids": orphans, "engine_silent": bool(silent),
            "step": (step or {}).get("step", 0), "total_steps": run_info.get("total_steps"),
            "loss": (step or {}).get("loss"), "model": cfg.get("model_id", ""),
            "checkpoint": str(ckpt) if ckpt else None,
            "age_s": round(time.time() - mtime, 1) if mtime else None}


def list_runs(root: str | os.PathLike = RUNS, ask=None) -> list[dict]:
    """The runs under ``root`` (state, step, loss, model, age), newest first: for pickers and listings
    (``ask``: as ``summary`` takes it)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
            and ((p / "config.toml").exists() or (p / "events.jsonl").exists())]
    return sorted((summary(p, ask) for p in runs), key=lambda s: s["age_s"] if s["age_s"] is not None else 1e18)


# ---------------------------------------------------------------------------- a run's events, read from its folder


def read_events(run_dir: Path, offset: int = 0, types: tuple[str, ...] | None = None,
                max_bytes: int | None = None) -> tuple[list, int]:
    """The events of ``runs/<run>/events.jsonl`` from byte ``offset`` on, decoded and in order, and the
    offset after the last complete line: call again with it to read only what was appended since (a
    torn last line, still being written, is left for that call). A line that is not an event is passed
    over. ``types``: only events of these types (the others are skipped before decoding: the engine
    writes the type tag first on a line). ``max_bytes``: stop after about this much (at least one whole
    line), so a big file can be read a piece at a time; the offset returned says where to go on. A file
    shorter than ``offset`` (replaced) is read from the start. No engine is needed: a finished or
    crashed run is read the same way as a running one."""
    path = Path(run_dir) / "events.jsonl"
    try:
        f = open(path, "rb")
    except OSError:
        return [], 0
    wanted = set(types) if types is not None else None
    needles = tuple(f'{{"type":"{t}"'.encode() for t in types) if types is not None else ()
    out, rest = [], b""
    budget = max_bytes if max_bytes is not None else 1 << 62
    with f:
        if os.fstat(f.fileno()).st_size < offset:
            offset = 0
        f.seek(offset)
        start = offset
        while budget > 0 or offset == start:  # past the budget, only until one whole line is read
            block = f.read(min(max(budget, 1 << 16), 1 << 23))
            if not block:
                break
            budget -= len(block)
            parts = (rest + block).split(b"\n")
            rest = parts.pop()  # not a line until its newline is written
            for line in parts:
                offset += len(line) + 1
                if not line.strip() or (wanted is not None and line.startswith(b'{"type":"')
                                        and not line.startswith(needles)):
                    continue
                ev = decode_event(line)
                if ev is not None and (wanted is None or ev.type in wanted):
                    out.append(ev)
    return out, offset


def run_config(run_dir: Path) -> dict:
    """The run's ``config.toml`` as a dict ({} when missing or unreadable)."""
    from engine.config import read_toml

    try:
        return read_toml(Path(run_dir) / "config.toml")
    except UsageError:
        return {}
