"""Chaos on a real run: faults in random order against a 2-rank CPU run of the tiny model, then checks.

Faults: kill -9 a rank; SIGKILL the engine; SIGSTOP the engine briefly, or past the workers' patience;
a graceful stop; commands (save, preview now, preview parameters, pause / resume); clients that come
and go. After each fault the run is resumed if it ended, and the state that ``voxtui engine status``,
``voxtui engine list`` and the engine itself report is compared with the truth (what was done, and
which processes live). At the end: ``events.jsonl`` is gapless and holds every trained step, a client
that followed the run through every fault saw exactly that record, the latest complete checkpoint
loads with PEFT, and no process of the run is left.

    python tests/chaos.py --seeds 0 1 2 3 4 [--faults 8]      # figures for docs/reliability.md
(``tests/test_chaos.py`` runs one seed in the test suite.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from conftest import descendants_of, read_events, start_detached, voxtui, wait_for, write_jsonl  # noqa: E402

FAULTS = ("kill_rank", "kill_engine", "pause_engine", "stall_engine", "graceful_stop", "commands", "clients")
ENGINE_TIMEOUT = 4  # seconds without the engine's heartbeat before the workers save and stop


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Follower(threading.Thread):
    """A client that follows the run through every fault, as the dashboard does: history, then live
    events; after a lost engine it reconnects and continues after the last event it has."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.seqs, self.stop, self.reconnects = run, [], threading.Event(), 0

    def run(self) -> None:  # noqa: D401 (Thread.run)
        from engine.client import EngineClient, EngineLost

        while not self.stop.is_set():
            try:
                with EngineClient(self.run_dir) as client:
                    client.last = self.seqs[-1] if self.seqs else 0
                    while not self.stop.is_set():
                        for ev in client.events(timeout=0.5):
                            self.seqs.append(ev.seq)
                        if not client.live:
                            break  # no engine now: look for the next one
            except (EngineLost, OSError, ValueError):
                self.reconnects += 1
            time.sleep(0.2)


class Chaos:
    def __init__(self, root: Path, model: Path, seed: int, faults: int, max_steps: int, log=print) -> None:
        self.root, self.model, self.rng, self.n_faults, self.max_steps = root, model, random.Random(seed), faults, max_steps
        self.log = log
        self.done: list[str] = []
        self.checked_states = 0
        self.resumes = 0
        self.pids: set[int] = set()

    # ---- what is true
    def info(self) -> dict:
        return json.loads((self.run / "engine.json").read_text())

    def engine_pid(self) -> int:
        return self.info()["pid"]

    def engine_up(self) -> bool:
        from engine.client import engine_alive

        return engine_alive(self.info())

    def ranks(self) -> dict[int, int]:
        import psutil

        out = {}
        for pid in descendants_of(self.engine_pid()):
            try:
                p = psutil.Process(pid)
                env = p.environ()
                if "RANK" in env and "LOCAL_RANK" in env and p.name().startswith("python"):
                    out[int(env["RANK"])] = pid
            except psutil.Error:
                continue
        return out

    def steps(self) -> list[int]:
        return [e["step"] for e in read_events(self.run) if e["type"] == "step"]

    def last_step(self) -> int:
        s = self.steps()
        return s[-1] if s else 0

    def record(self) -> None:
        """Every process of this run, to check at the end that none is left."""
        pid = self.engine_pid()
        self.pids.update([pid, *descendants_of(pid)])

    # ---- what the commands say
    def check_state(self, expected: str) -> None:
        from engine.client import EngineClient

        status = json.loads(voxtui("engine", "status", self.run, "--json", "-", check=True).stdout)
        listed = json.loads(voxtui("engine", "list", "--runs", self.run.parent, "--json", "-", check=True).stdout)
        row = next(r for r in listed if r["path"] == str(self.run))
        statuses = [(e["seq"], e["state"], e.get("outcome"), e["message"]) for e in read_events(self.run)
                    if e["type"] == "status"][-4:]
        assert status["state"] == expected, (f"engine status says {status['state']}, the truth is {expected} "
                                             f"(engine up: {self.engine_up()}; last statuses {statuses})")
        assert row["state"] == expected, f"engine list says {row['state']}, the truth is {expected}"
        if expected in ("running", "paused"):
            with EngineClient(self.run) as c:
                assert c.status().state == expected
        else:
            assert not self.engine_up(), f"{expected}, yet the engine runs"
        self.checked_states += 1

    # ---- getting the run going again
    def ensure_running(self) -> bool:
        """Resume the run when it ended; False once every step is trained."""
        status = json.loads(voxtui("engine", "status", self.run, "--json", "-", check=True).stdout)
        if status["state"] == "finished" and status["outcome"] == "completed":
            return False
        if status["state"] in ("failed", "crashed", "stopped"):
            before = len(read_events(self.run))
            proc = voxtui("run", "--resume", self.run, "--detach", "--skip_preflight")
            assert proc.returncode == 0, proc.stderr
            self.resumes += 1
            self.log(f"    resumed ({status['state']} at step {status['step']})")
            wait_for(lambda: any(e["type"] == "step" for e in read_events(self.run)[before:])
                     or read_events(self.run)[-1].get("outcome") == "completed", timeout=180, what="a step after resume")
        self.record()
        return not (read_events(self.run)[-1].get("outcome") == "completed")

    def wait_for_steps(self, n: int) -> None:
        start = self.last_step()
        wait_for(lambda: self.last_step() >= min(start + n, self.max_steps) or not self.engine_up(), timeout=120,
                 what=f"{n} more steps")

    # ---- faults
    def kill_rank(self) -> str:
        ranks = wait_for(lambda: len(self.ranks()) == 2 and self.ranks(), what="both ranks")
        rank = self.rng.choice(sorted(ranks))
        n = len(read_events(self.run))
        os.kill(ranks[rank], signal.SIGKILL)
        wait_for(lambda: not self.engine_up(), timeout=60, what="the engine to end the run")
        died = [e for e in read_events(self.run)[n:] if e["type"] == "alert" and e["kind"] == "rank_died"]
        assert died and died[0]["rank"] == rank, f"rank_died should name rank {rank}: {died}"
        return self.unless_completed("failed")

    def kill_engine(self) -> str:
        workers = descendants_of(self.engine_pid())
        os.kill(self.engine_pid(), signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in workers), timeout=90, what="the orphaned workers to stop")
        return self.unless_completed("crashed")

    def pause_engine(self) -> str:
        """SIGSTOP the engine for less than the workers' patience: training goes on, the run too."""
        pid = self.engine_pid()
        os.kill(pid, signal.SIGSTOP)
        time.sleep(ENGINE_TIMEOUT / 3)
        os.kill(pid, signal.SIGCONT)
        self.wait_for_steps(2)
        return "running" if self.engine_up() else self.truth_after_end()

    def stall_engine(self) -> str:
        """SIGSTOP the engine past the workers' patience: they save and stop; the engine, woken, stores
        what they spooled and leaves."""
        pid = self.engine_pid()
        workers = descendants_of(pid)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: not any(alive(p) for p in workers if p != pid), timeout=90, what="the workers to stop")
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: not self.engine_up(), timeout=30, what="the engine to leave")
        return self.unless_completed("crashed")

    def graceful_stop(self) -> str:
        proc = voxtui("engine", "stop", self.run)
        assert proc.returncode == 0, proc.stderr
        return "stopped"

    def commands(self) -> str:
        from engine.client import EngineClient
        from engine.protocol import Pause, PreviewNow, Resume, SaveCheckpoint, SetPreviewParams

        with EngineClient(self.run) as c:
            t = round(self.rng.uniform(0, 1.5), 2)
            for cmd in (SaveCheckpoint(), PreviewNow(), SetPreviewParams(temperature=t)):
                assert c.send(cmd).status == "ok", cmd
            assert c.send(Pause()).status == "ok"
            wait_for(lambda: c.status().state == "paused", timeout=60, what="paused")
            self.check_state("paused")
            assert c.send(Resume()).status == "ok"
            wait_for(lambda: c.status().state == "running", timeout=60, what="running again")
        acks = [e for e in read_events(self.run) if e["type"] == "ack" and e["command"] == "set_preview_params"]
        assert acks and acks[-1]["params"]["temperature"] == t
        return "running"

    def clients(self) -> str:
        """Clients that attach, read a little and leave, while the run goes on: each sees a gapless record."""
        from engine.client import EngineClient

        for _ in range(3):
            with EngineClient(self.run) as c:
                seqs = [e.seq for e in c.history()]
                seqs += [e.seq for e, _ in zip(c.events(timeout=0.5), range(20))]
            assert seqs == list(range(1, len(seqs) + 1))
        return "running"

    def unless_completed(self, state: str) -> str:
        """``state``, unless the workers trained the last step before the fault reached them."""
        from engine.runs import latest_checkpoint

        ckpt = latest_checkpoint(self.run / "checkpoints")
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else 0
        return "finished" if step >= self.max_steps and (self.run / "lora_final").is_dir() else state

    def truth_after_end(self) -> str:
        last = [e for e in read_events(self.run) if e["type"] == "status"][-1]
        return {"completed": "finished"}.get(last.get("outcome"), last["state"])

    # ---- the whole thing
    def go(self) -> dict:
        """The whole scenario (VOXTUI_ENGINE_TIMEOUT set for every engine and worker it starts)."""
        saved = os.environ.get("VOXTUI_ENGINE_TIMEOUT")
        os.environ["VOXTUI_ENGINE_TIMEOUT"] = str(ENGINE_TIMEOUT)
        try:
            return self._go()
        finally:
            if saved is None:
                os.environ.pop("VOXTUI_ENGINE_TIMEOUT", None)
            else:
                os.environ["VOXTUI_ENGINE_TIMEOUT"] = saved

    def _go(self) -> dict:
        rows = [{"instruction": f"Question {i} about symptom {i % 7}?", "output": f"Answer {i}: rest and water."}
                for i in range(96)]
        self.root.mkdir(parents=True, exist_ok=True)
        train = write_jsonl(self.root / "train.jsonl", rows)
        self.run = start_detached(self.model, self.root / "runs", "chaos", train, nproc=2,
                                  max_steps=self.max_steps, preview_file=train, preview_count=2,
                                  max_new_tokens=4, preview_steps=0, lr=1e-3,
                                  save_steps=5)
        wait_for(lambda: self.last_step() >= 1, timeout=180, what="the first step")
        self.record()
        follower = Follower(self.run)
        follower.start()
        for _ in range(self.n_faults):
            if not self.ensure_running():
                break
            self.wait_for_steps(1)
            if not self.engine_up():
                continue  # it finished meanwhile
            kind = self.rng.choice(FAULTS)
            self.log(f"  fault {len(self.done) + 1}: {kind} at step {self.last_step()}")
            expected = getattr(self, kind)()
            if expected == "running" and self.truth_after_end() != "running":  # it finished meanwhile
                wait_for(lambda: not self.engine_up(), timeout=60, what="the engine to leave")
                expected = self.truth_after_end()
            try:
                self.check_state(expected)
            except AssertionError:
                if expected != "running" or self.truth_after_end() == "running":
                    raise
                # it finished while the commands were asked (one said running, the next finished): the truth moved
                wait_for(lambda: not self.engine_up(), timeout=60, what="the engine to leave")
                expected = self.truth_after_end()
                self.check_state(expected)
            self.log(f"    → {expected} (reported so by engine status, engine list{' and the engine' if self.engine_up() else ''})")
            self.done.append(kind)
        while self.ensure_running():
            wait_for(lambda: not self.engine_up(), timeout=300, what="the run to end")
        wait_for(lambda: not self.engine_up(), timeout=60, what="the engine to leave")
        self.check_state("finished")
        time.sleep(1.0)
        follower.stop.set()
        follower.join(timeout=10)
        return self.verify(follower)

    def verify(self, follower: Follower) -> dict:
        from engine.runs import latest_checkpoint

        events = read_events(self.run)
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(events) + 1)), "events.jsonl has a gap or a duplicate"
        trained = {e["step"] for e in events if e["type"] == "step"}
        missing = sorted(set(range(1, self.max_steps + 1)) - trained)
        assert not missing, f"trained steps missing from events.jsonl: {missing}"
        assert follower.seqs == seqs, "the following client's record differs from events.jsonl"
        ckpt = latest_checkpoint(self.run / "checkpoints")
        from peft import PeftModel
        from transformers import VoxtralForConditionalGeneration

        PeftModel.from_pretrained(VoxtralForConditionalGeneration.from_pretrained(self.model), ckpt)
        left = [p for p in self.pids if alive(p)]
        assert not left, f"processes left: {left}"
        assert not (self.run / "spool").exists()
        return {"faults": self.done, "resumes": self.resumes, "events": len(events), "steps": self.max_steps,
                "states_checked": self.checked_states, "client_reconnects": follower.reconnects,
                "missing_steps": len(missing), "checkpoint": ckpt.name}


def main() -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--faults", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=1000)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from engine.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        results = []
        for seed in a.seeds:
            print(f"seed {seed}", flush=True)
            t0 = time.time()
            r = Chaos(Path(tmp) / f"s{seed}", model, seed, a.faults, a.max_steps,
                      log=lambda m: print(m, flush=True)).go()
            r.update(seed=seed, seconds=round(time.time() - t0))
            print(json.dumps(r), flush=True)
            results.append(r)
    kinds = {k: sum(r["faults"].count(k) for r in results) for k in FAULTS}
    print(json.dumps({"runs": len(results), "faults": sum(len(r["faults"]) for r in results), "by_kind": kinds,
                      "resumes": sum(r["resumes"] for r in results), "events": sum(r["events"] for r in results),
                      "states_checked": sum(r["states_checked"] for r in results),
                      "missing_steps": sum(r["missing_steps"] for r in results)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
