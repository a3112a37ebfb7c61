"""``voxtui run`` and ``voxtui engine list | status | stop | pause | resume | save | eval | preview``."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.config import TrainConfig, absolute_paths, resolve, write_config
from engine.runs import (
    FINAL,
    already_holds_run,
    engine_info,
    engine_processes,
    engine_unsure,
    find_run,
    last_event,
    list_runs,
    merge_saved_config,
    new_run_dir,
    orphan_workers,
    refuse_nothing_to_resume,
    refuse_out_of_patience,
    resume_steps,
    run_config,
    starts_over,
    summary,
)
from engine.util import UsageError, cell_fit, printable, shell_quote, write_json


class LaunchLock:
    """One ``voxtui run`` at a time starts an engine on a run folder: an ``flock`` on the folder itself (no
    file is made: a no-go leaves a folder as it was), taken before anything is written there (config.toml,
    preflight.json) and let go once the engine it starts holds the run's event log (engine.json names it). A
    second launcher finding it held is refused at once."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.run_dir, self.resume = run_dir, resume
        self.fd: int | None = None
        self.held = False

    def take(self) -> None:
        import fcntl

        self.fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            what = "`voxtui run --resume` is starting it" if self.resume else "`voxtui run` is starting a run in it"
            raise UsageError(f"{self.run_dir}: another {what}") from None
        except OSError:  # no locks on this filesystem: the engine's event-log lock still refuses a second engine
            pass
        self.held = True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def launch_detached(run_dir: Path, daemon_args: list[str]) -> int:
    """Start ``python -m engine.daemon RUN_DIR …`` in a session of its own (it survives the SSH
    session), logging to engine.log the lines a foreground engine prints (``--echo``, each flushed: ``tail
    -f`` follows them) and its diagnostics; returns its pid once it has written engine.json."""
    old_pid = engine_info(run_dir).get("pid")
    log = open(run_dir / "engine.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "engine.daemon", str(run_dir), "--echo", *daemon_args],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=os.getcwd())
    log.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        info = engine_info(run_dir)
        if info.get("pid") == proc.pid and info.get("pid") != old_pid:
            break
        if proc.poll() is not None:
            raise UsageError(f"the engine exited at once (code {proc.returncode}); see {run_dir / 'engine.log'}")
        time.sleep(0.1)
    return proc.pid


def start(cfg: TrainConfig, detach: bool, report: dict | None = None, resume_dir: Path | None = None,
          skip_preflight: bool = False, nnodes: int = 1, rdzv_endpoint: str = "", listen: str = "") -> int:
    """Run preflight, then create (or reopen) the run folder and start the engine. A no-go creates
    nothing; an existing folder keeps its permissions (a new one is made 0700)."""

    run_dir = resume_dir or Path(cfg.output_dir or new_run_dir())
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes above 1 needs --rdzv_endpoint HOST:PORT (reachable from every node)")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a folder")
    lock = LaunchLock(run_dir, resume_dir is not None)
    if run_dir.is_dir():  # a folder that exists is locked before anything is checked or written (a new one: once made)
        lock.take()
    try:
        return _start(cfg, run_dir, lock, detach, report, resume_dir, skip_preflight, nnodes, rdzv_endpoint, listen)
    finally:
        lock.release()


def _start(cfg: TrainConfig, run_dir: Path, lock: LaunchLock, detach: bool, report: dict | None,
           resume_dir: Path | None, skip_preflight: bool, nnodes: int, rdzv_endpoint: str, listen: str) -> int:
    from engine.preflight import preflight, render

    if resume_dir is None and (run_dir / "events.jsonl").exists():
        raise already_holds_run(run_dir)
    wait_for_previous(run_dir)
    if resume_dir is None:
        absolute_paths(cfg)
    # absolute, as a resumed run's is: the checkpoints' paths it reports read the same before and after
    cfg.output_dir = os.path.abspath(run_dir)
    cfg.engine = ""
    if not skip_preflight:
        report = report or preflight(cfg, str(run_dir / "config.toml"), written=True, resume=resume_dir is not None)
        if report["verdict"] == "no-go":
            print(render(report, launch=resume_dir is not None), file=sys.stderr)  # a new run's config.toml is not made
            print("voxtui: preflight says no-go; nothing started" + (
                "" if resume_dir else f", no run folder made ({run_dir})"), file=sys.stderr)
            if resume_dir:
                write_json(run_dir / "preflight.json", report)
            return 1
        if resume_dir is not None:  # an epoch-based run whose plan changed: the plan says how many steps
            plan = next((c.get("plan") for c in report["checks"] if c.get("name") == "plan"), None) or {}
            if isinstance(plan.get("total_steps"), int) and plan["total_steps"] > 0:
                done, _ = resume_steps(run_dir, cfg, cfg.nproc * nnodes)
                refuse_nothing_to_resume(run_dir, cfg, done, plan["total_steps"], plan.get("steps_per_epoch") or 0)
        for c in report["checks"]:
            if c["level"] in ("warn", "fail"):
                print(printable(f"preflight {c['level']}: {c['message']}"), file=sys.stderr)
    if not run_dir.exists():
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # (another launcher may have made it meanwhile)
    if not lock.held:
        lock.take()
        if (run_dir / "events.jsonl").exists():  # another launcher's run, started in it meanwhile
            raise already_holds_run(run_dir)
    elif resume_dir is None and run_dir.stat().st_mode & 0o077:
        print(printable(f"note: {run_dir} is open to other users (mode {run_dir.stat().st_mode & 0o777:o}), and so "
                        f"are the events and checkpoints written in it (engine.json is 0600 and the sockets live in a "
                        f"private folder); `chmod 700 {shell_quote(run_dir)}` keeps them private"), file=sys.stderr)
    if resume_dir is not None and (over := starts_over(run_dir, cfg)):
        print(printable(f"note: {over}"), file=sys.stderr)
    write_config(cfg, run_dir / "config.toml")
    if report is not None:
        write_json(run_dir / "preflight.json", report)
    args = ["--nproc", str(cfg.nproc), "--alert_action", cfg.alert_action] + (["--resume"] if resume_dir else [])
    if listen:
        args += ["--listen", listen]
    if nnodes > 1:
        from engine.daemon.supervisor import launch_args

        args += ["--nnodes", str(nnodes), "--rdzv_endpoint", rdzv_endpoint]
        print("on each other node k = 1 … {n}, with the same files at the same paths (a shared filesystem):\n  "
              "torchrun {a} -m engine.train {b}".format(
                  n=nnodes - 1, a=printable(" ".join(launch_args(run_dir.name, cfg.nproc, nnodes, 1, rdzv_endpoint))
                                            .replace("--node_rank 1", "--node_rank k")),
                  b=printable(f"--resume {run_dir}" if resume_dir else f"--config {run_dir / 'config.toml'}")),
              file=sys.stderr)
    if detach:
        pid = launch_detached(run_dir, args)
        lock.release()  # its engine holds the event log now (engine.json names it)
        print(printable(run_dir))
        print(printable(f"engine {pid} runs detached; watch it with: voxtui attach {shell_quote(run_dir)}"),
              file=sys.stderr)
        return 0
    from engine.daemon.engine import run_engine

    print(printable(f"{run_dir}: engine in the foreground (Ctrl-C stops the run gracefully)"), file=sys.stderr)
    return run_engine(run_dir, cfg.nproc, resume_dir is not None, cfg.alert_action, echo=True, nnodes=nnodes,
                      rdzv_endpoint=rdzv_endpoint, listen=listen, foreground=True, opened=lock.release)


def wait_for_previous(run_dir: Path, timeout: float = 60.0) -> None:
    """Before a run folder gets a new engine: its old engine must be gone (one that is only finishing is
    waited for), and so must workers that outlived it (they save and stop within about 30 s of losing it)."""
    from engine.client import engine_alive

    def busy() -> str:
        info = engine_info(run_dir)
        if engine_alive(info):
            return f"its engine (pid {info['pid']})"
        unsure = engine_unsure(run_dir, info)
        if unsure:  # its workers are no orphans to wait for: a second engine would wait for the lock, then fail
            raise UsageError(f"{run_dir}: {unsure}; {stop_it(run_dir)}, then resume")
        pids = orphan_workers(run_dir, info)
        return f"workers of its last engine (pid {', '.join(map(str, pids))})" if pids else ""

    what = busy()
    if not what:
        return
    last = last_event(run_dir, "status")
    info = engine_info(run_dir)
    # an engine that is only finishing has recorded the run's end; one started since (another launcher's, whose
    # first status is not written yet) has not
    new_engine = isinstance(info.get("started"), (int, float)) and isinstance((last or {}).get("time"), (int, float)) \
        and info["started"] > last["time"]
    if what.startswith("its engine") and (new_engine or not (last and last.get("state") in FINAL)):
        raise UsageError(f"{run_dir}: {what} is running (stop it first: voxtui engine stop {shell_quote(run_dir)})")
    print(printable(f"{run_dir}: waiting for {what} to exit…"), file=sys.stderr)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        what = busy()
        if not what:
            return
    raise UsageError(f"{run_dir}: {what} still running after {timeout:.0f} s")


def cmd_preflight(args) -> int:
    """``voxtui preflight``: the report (``--json`` too), and with ``--autorun`` on go or warn the run."""
    from engine.preflight import preflight, render

    cfg = resolve(args)
    report = preflight(cfg, None if args.probe else args.config, probe=args.probe)
    if args.json:
        write_json(args.json, report)
    if args.json != "-":
        print(render(report))
    if args.autorun and report["verdict"] in ("go", "warn"):
        return start(cfg, detach=True, report=report)
    return 0 if report["verdict"] != "no-go" else 1


def cmd_run(args) -> int:
    if args.resume:
        run_dir = find_run(args.resume)
        merge_saved_config(args, run_dir)
        args.config = None
        cfg = resolve(args)
        refuse_out_of_patience(run_dir, cfg)
        done, total = resume_steps(run_dir, cfg, cfg.nproc * args.nnodes)
        if total is not None:
            refuse_nothing_to_resume(run_dir, cfg, done, total)
        return start(cfg, args.detach, resume_dir=run_dir, skip_preflight=args.skip_preflight,
                     nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, listen=args.listen)
    return start(resolve(args), args.detach, skip_preflight=args.skip_preflight, nnodes=args.nnodes,
                 rdzv_endpoint=args.rdzv_endpoint, listen=args.listen)


def cmd_engine(args) -> int:
    from engine.client import age_text, status_reply

    match args.engine_command:
        case "list":
            runs = list_runs(Path(args.runs), ask=status_reply)
            if args.json:
                write_json(args.json, runs)
                return 0
            if not runs:
                print(printable(f"no runs under {args.runs}/"))
                return 0
            print(f"{'run':<28}{'state':<10}{'step':>13}{'loss':>9}  {'age':>5}  model")
            for s in runs:  # what the run's files say is printed safe (its folder's name too): no escape reaches the terminal
                loss = f"{s['loss']:.4f}" if isinstance(s["loss"], (int, float)) else "-"
                step = printable(f"{s['step']}/{s['total_steps']}" if s.get("total_steps") else s["step"])
                # each cut to its column in terminal cells (a Korean letter or an emoji is two), a space after it
                print(f"{cell_fit(printable(s['run']), 27)} {cell_fit(printable(s['state']), 9)} {step:>13} {loss:>8}  "
                      f"{age_text(s['age_s']):>5}  {printable(s['model'])}")
            for s in runs:
                if s["problem"]:
                    print(printable(f"note: {s['run']}: {s['message']}"), file=sys.stderr)
                elif s.get("engine_silent"):  # alive, asked, no answer: its state is what its files say
                    print(printable(f"note: {s['run']}: its engine (pid {s['engine_pid']}) does not answer (stopped "
                                    f"with SIGSTOP? kill -CONT {s['engine_pid']}; hung?): shown is what its files "
                                    "say"), file=sys.stderr)
            return 0
        case "status":
            run = find_run(args.run)
            ask = functools.cache(status_reply)  # asked once: by summary, and for answers
            s = summary(run, ask=ask, lagging=True)
            s["engine_answers"] = None if not s["engine_pid"] else ask(run) is not None and ask(run).status == "ok"
            if args.json:
                write_json(args.json, s)
            else:
                for k, v in s.items():
                    if k in ("problem", "engine_silent"):
                        continue  # the message says it; `answers` says the other
                    v = ", ".join(map(str, v)) if isinstance(v, list) else v
                    if k == "engine_answers" and v is not None:
                        v = "yes" if v else "no: its process is alive but did not answer in 2 s (stopped, hung?)"
                    k = "answers" if k == "engine_answers" else k
                    shown = "-" if v in (None, "") else f"{v:.4f}" if isinstance(v, float) and k == "loss" else v
                    print(f"{k:>11}: {printable(shown)}")
            return 0
        case "stop":
            return stop_run(find_run(args.run), args.wait)
        case "pause" | "resume" | "save" | "eval" | "preview":
            return command_run(find_run(args.run), args.engine_command, getattr(args, "wait", 0.0))
    return 2


# `voxtui engine pause | resume | save | eval | preview RUN`: the command sent, and what then happens
RUN_COMMANDS = {
    "pause": ("Pause", "the workers pause at their next step boundary, once what falls due there is done"),
    "resume": ("Resume", "the workers run again at their next step boundary"),
    "save": ("SaveCheckpoint", "the workers save a checkpoint at their next step boundary"),
    "eval": ("EvalNow", "the workers evaluate on the validation rows at their next step boundary"),
    "preview": ("PreviewNow", "the workers generate the previews at their next step boundary"),
}


def command_run(run_dir: Path, what: str, wait: float = 0.0) -> int:
    """Send ``what`` (pause, resume, save, eval, preview) through the run's engine, as the dashboard's keys do
    (a fresh id; the engine retries it to the workers until they acknowledge it), and say in one line what
    happened: 0 sent, 1 refused or no engine to take it. ``wait`` (pause, resume): seconds to wait for the run
    to show paused (running again), said too; 1 when it does not in that time."""
    import secrets

    from engine import protocol
    from engine.client import EngineClient, EngineLost

    name = printable(run_dir)

    def refused(reason: str) -> int:
        print(printable(f"voxtui: error: {run_dir}: {what}: {reason}"), file=sys.stderr)
        return 1

    try:
        client = EngineClient(run_dir)
    except (ValueError, KeyError, TypeError) as e:  # an engine.json that reads but cannot be used
        return refused(f"the engine cannot be reached ({e})")
    with client:
        if not client.live:
            reason = client.not_live()  # engine.json unreadable (the engine may run still), or no engine
            state = summary(run_dir).get("state", "") if reason == "the engine is not running" else ""
            if state in ("finished", "stopped", "failed"):
                reason += f": the run has ended ({state})"
            elif state == "crashed":
                reason += f" (crashed: voxtui run --resume {shell_quote(run_dir)} continues it)"
            return refused(reason)
        command = getattr(protocol, RUN_COMMANDS[what][0])(id=secrets.token_hex(8))
        try:
            reply = client.send(command)
        except EngineLost as e:
            return refused(f"{e} (it may still apply it: id {command.id})")
        if reply.status != "ok":
            return refused(reply.reason or "refused")
        if what == "eval" and not run_config(run_dir).get("val_jsonl"):
            print(f"{name}: eval sent — but this run has no validation rows (val_jsonl): nothing to evaluate")
            return 0
        print(f"{name}: {what} sent — {RUN_COMMANDS[what][1]}")
        if what not in ("pause", "resume") or wait <= 0:
            return 0
        return _wait_for_toggle(client, name, what, wait)


def _wait_for_toggle(client, name: str, what: str, wait: float) -> int:
    """After a pause (resume) sent: until the engine's status says paused (running), or ``wait`` seconds."""
    from engine.client import EngineLost
    from engine.protocol import with_pending

    goal = "paused" if what == "pause" else "running"
    deadline = time.monotonic() + wait
    while True:
        try:
            reply = client.status()
        except EngineLost as e:
            print(printable(f"voxtui: error: {name}: {e} while waiting for it to be {goal}"), file=sys.stderr)
            return 1
        if reply.status != "ok":
            print(printable(f"voxtui: error: {name}: {reply.reason}"), file=sys.stderr)
            return 1
        shown = with_pending(reply.state, reply.pending)
        if shown == goal:
            print(f"{name}: {'paused' if goal == 'paused' else 'running again'}"
                  + (f" at step {reply.step}" if reply.step is not None else ""))
            return 0
        if shown in ("stopping", "finished", "failed") or (what == "pause" and shown == "running"):
            # overtaken by a stop or the run's end, or a pause the workers never took (given up)
            print(printable(f"voxtui: error: {name}: not {goal}: the run is {shown}"), file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            print(printable(f"voxtui: error: {name}: not {goal} after {wait:g} s (the run is {shown}; "
                            f"the {what} stands)"), file=sys.stderr)
            return 1
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.05)))


def stop_it(run_dir: Path, pids: list[int] | None = None) -> str:
    """What stops an engine that engine stop cannot reach (engine.json no longer names it: its processes found
    by their command line; or ``pids``, one that does not answer): SIGTERM to it (a graceful stop, as engine
    stop's). A process stopped with SIGSTOP takes it only once continued: said, with what continues it."""
    import psutil

    pids = engine_processes(run_dir) if pids is None else pids
    if not pids:
        return "stop it with SIGTERM (the workers save first): kill PID, its pid from ps -ef | grep engine.daemon"
    line = f"stop it with SIGTERM (the workers save first): kill {' '.join(map(str, pids))}"
    stopped = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                stopped.append(pid)
    if stopped:
        line += f" (it is stopped, SIGSTOP: it takes that once continued: kill -CONT {' '.join(map(str, stopped))})"
    return line


def stop_orphans(run_dir: Path, pids: list[int], wait: float) -> int:
    """Workers whose engine went away get what a stop from the engine would give them: SIGTERM (at the next
    step boundary every rank saves a checkpoint, then they exit); their last events are stored in
    events.jsonl once they are gone (``summary`` folds the spool)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    print(printable(f"{run_dir}: the engine is gone; its workers (pid {', '.join(map(str, pids))}) are stopping "
                    "(they save a checkpoint first)"), file=sys.stderr)
    if wait == 0:
        return 0
    deadline = time.time() + wait
    while time.time() < deadline:
        if not orphan_workers(run_dir):
            print(printable(f"{run_dir}: stopped ({summary(run_dir).get('state', '')})"))
            return 0
        time.sleep(0.5)
    print(printable(f"{run_dir}: still stopping after {wait:.0f} s"), file=sys.stderr)
    return 1


def stop_run(run_dir: Path, wait: float) -> int:
    """`voxtui engine stop RUN`: the stop delivered to the run's engine (or SIGTERM to workers that outlive
    it), then up to ``wait`` seconds, the delivery's included, for the engine to exit. 0 stopped (or delivered,
    with ``wait`` 0); 1 otherwise, said in one line."""
    import secrets

    from engine.client import EngineClient, EngineLost, engine_alive
    from engine.protocol import Stop

    info = engine_info(run_dir)
    if not engine_alive(info):
        unsure = engine_unsure(run_dir, info)
        if unsure:  # its workers are the engine's, not orphans: nothing here goes around it
            print(printable(f"voxtui: error: {run_dir}: {unsure}, and engine stop cannot reach it without "
                            f"engine.json; {stop_it(run_dir)}"), file=sys.stderr)
            return 1
        orphans = orphan_workers(run_dir, info)
        if orphans:
            return stop_orphans(run_dir, orphans, wait)
        state = summary(run_dir).get("state", "")
        ended = f": the run has ended ({state})" if state in ("finished", "stopped", "failed", "crashed") else ""
        print(printable(f"{run_dir}: no engine is running{ended}"), file=sys.stderr)
        return 1
    # the stop's delivery counts against --wait: an engine alive that does not answer (stopped, hung) is
    # reported after about the wait asked for (3 s at least, 15 at most: three tries of a third of it)
    started = time.time()
    with EngineClient(run_dir, request_timeout=min(max(wait / 3, 1.0), 5.0)) as c:
        stop = Stop(id=secrets.token_hex(8))
        try:
            reply = c.send(stop)
        except EngineLost as e:
            print(printable(f"voxtui: error: {run_dir}: stop: {e} (it may still apply it: id {stop.id}); "
                            f"{stop_it(run_dir, [info['pid']])}"), file=sys.stderr)
            return 1
    if reply.status != "ok":
        print(printable(f"voxtui: error: {reply.reason}"), file=sys.stderr)
        return 1
    saves = "a replay: nothing trains, nothing to save" if info.get("stand_in") else "the workers save a checkpoint first"
    print(printable(f"{run_dir}: stopping ({saves})"), file=sys.stderr)
    if wait == 0:  # asked not to wait: the stop is delivered, and that is what was asked
        return 0
    deadline = started + wait
    while time.time() < deadline:
        # engine.json says stopped as the engine closes, a moment before its process exits: both
        if not engine_alive(engine_info(run_dir)) and not engine_alive(info):
            print(printable(f"{run_dir}: {summary(run_dir).get('state') or 'stopped'}"))  # stopped, or as recorded
            return 0
        time.sleep(0.5)
    print(printable(f"{run_dir}: still stopping after {wait:.0f} s"), file=sys.stderr)
    return 1
