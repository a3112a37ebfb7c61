"""The engine: one headless daemon per run.

It spawns torchrun (its workers in sessions of their own), numbers every event the workers push,
appends it to ``events.jsonl`` (flushed) and publishes it to any number of clients; it answers
history requests and authenticated commands on a ROUTER; it watches the worker processes and the
health of the run. It never imports Textual.

    python -m engine.daemon RUN_DIR [--nproc N] [--resume]     (``voxtui run`` starts it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict, deque
from pathlib import Path

import msgspec
import zmq

from engine.eventlog import last_seq, spooled_events
from engine.protocol import (
    CLIENT_COMMANDS,
    PROTOCOL_VERSION,
    Alert,
    AnyCommand,
    Heartbeat,
    Pause,
    Reply,
    Resume,
    RunInference,
    SaveCheckpoint,
    SetPreviewParams,
    Status,
    Stop,
    decode,
    event_decoder,
    event_encoder,
    stamp,
)
from engine.runs import engine_info, pid_alive, write_engine_info
from engine.session import Session

HEARTBEAT_S = 1.0
MAX_CLIENT_MSG = 1 << 20
MAX_WORKER_MSG = 16 << 20
SOCKET_BASES = ("/tmp", tempfile.gettempdir())


def socket_dir(run_dir: Path) -> Path:
    """A private folder (0700, owned by this user) with a short path for this engine's Unix sockets:
    ``/tmp/voxtui-<uid>/<pid>-XXXX/``. Other users can neither connect nor read the sockets, whatever the
    run folder's path; the folder is removed when the engine closes, and stale ones of dead engines at
    start. (Not $XDG_RUNTIME_DIR: logind removes it when the SSH session that started the engine ends.)"""
    import stat

    uid = os.getuid()
    bases = [Path(b) / f"voxtui-{uid}" for b in dict.fromkeys(SOCKET_BASES)] + [run_dir / ".sockets"]
    for base in bases:
        try:
            base.mkdir(mode=0o700, parents=False, exist_ok=True)
            st = os.lstat(base)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue  # a symlink or someone else's folder: not ours to trust
            if st.st_mode & 0o077:
                os.chmod(base, 0o700)
            _remove_stale_socket_dirs(base)
            path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))  # mkdtemp makes it 0700
            if len(str(path / "worker_control.sock")) < 100:  # the longest name, within sun_path's 108 bytes
                return path
            os.rmdir(path)
        except OSError:
            continue
    raise RuntimeError("no private folder with a short path for the engine's sockets (tried "
                       + ", ".join(map(str, bases)) + ")")


def _remove_stale_socket_dirs(base: Path) -> None:
    import psutil

    for d in base.iterdir():
        pid = d.name.split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _cut_torn_tail(path: Path) -> None:
    """A line cut short when the last writer was killed was never stored nor published: drop it, so
    the next event starts on a line of its own."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                f.truncate(pos + nl + 1)
                return
        f.truncate(0)


def _printable(text: str) -> str:
    """Text from a run, safe to print on a terminal: control characters (ANSI escapes among them) shown
    as escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _one_line(ev) -> str | None:
    line = _describe(ev)
    return _printable(line) if line is not None else None


def _describe(ev) -> str | None:
    match ev.type:
        case "status":
            return f"[{ev.state}] {ev.message}".rstrip()
        case "step" if ev.step % 10 == 0 or ev.step == 1 or ev.skipped:
            loss = f"{ev.loss:.4f}" if ev.loss is not None else "non-finite"
            return f"step {ev.step}: loss {loss}, lr {ev.lr:.2e}, {ev.tokens_per_s:,.0f} tokens/s"
        case "eval":
            return f"eval step {ev.step}: loss {ev.loss:.4f}, ppl {ev.ppl:.2f}" + (" (best)" if ev.improved else "")
        case "checkpoint":
            return f"checkpoint {ev.path}"
        case "alert":
            return f"[{ev.level}] {ev.kind}: {ev.message}"
    return None


class Health:
    """Alerts from the step stream: loss spike, grad-norm blow-up, throughput drop; rate-limited."""

    def __init__(self) -> None:
        self.loss: deque = deque(maxlen=50)
        self.gnorm: deque = deque(maxlen=50)
        self.tps: deque = deque(maxlen=50)
        self.last_alert: dict[str, float] = {}

    def _once(self, kind: str, every: float = 300.0) -> bool:
        now = time.monotonic()
        if now - self.last_alert.get(kind, -1e9) < every:
            return False
        self.last_alert[kind] = now
        return True

    def step(self, ev) -> list[Alert]:
        import statistics

        out = []
        if ev.loss is not None and len(self.loss) >= 20:
            med = statistics.median(self.loss)
            if ev.loss > 3 * med and self._once("loss_spike"):
                out.append(Alert(level="warning", kind="loss_spike", step=ev.step,
                                 message=f"loss {ev.loss:.3f} at step {ev.step} is over 3× the recent median {med:.3f}"))
        if ev.grad_norm is not None and len(self.gnorm) >= 20:
            med = statistics.median(self.gnorm)
            if med > 0 and ev.grad_norm > 10 * med and self._once("grad_norm_blowup"):
                out.append(Alert(level="warning", kind="grad_norm_blowup", step=ev.step,
                                 message=f"grad norm {ev.grad_norm:.3g} at step {ev.step} is over 10× the recent median {med:.3g}"))
        if len(self.tps) >= 20:
            med = statistics.median(self.tps)
            if ev.tokens_per_s < 0.5 * med and self._once("throughput_drop"):
                out.append(Alert(level="warning", kind="throughput_drop", step=ev.step,
                                 message=f"{ev.tokens_per_s:,.0f} tokens/s at step {ev.step}, under half the recent median {med:,.0f}"))
        if ev.loss is not None:
            self.loss.append(ev.loss)
        if ev.grad_norm is not None:
            self.gnorm.append(ev.grad_norm)
        self.tps.append(ev.tokens_per_s)
        return out

    def telemetry(self, ev) -> list[Alert]:
        out = []
        for g in ev.gpus:
            hot = [t for t in g.throttle if t in ("hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")]
            if hot and self._once(f"throttle-{g.index}"):
                out.append(Alert(level="warning", kind="gpu_throttle",
                                 message=f"GPU {g.index} is throttling ({', '.join(hot)}) at {g.temp:.0f}°C, {g.power:.0f} W"))
        return out


class Engine:
    def __init__(self, run_dir: Path, nproc: int = 1, resume: bool = False, stall_timeout: float = 600.0,
                 alert_action: str = "warn", worker_cmd: list[str] | None = None, nnodes: int = 1,
                 rdzv_endpoint: str = "", listen: str = "") -> None:
        self.nnodes, self.rdzv_endpoint, self.listen = nnodes, rdzv_endpoint, listen
        self.run_dir = Path(run_dir).resolve()
        self.run = self.run_dir.name
        self.nproc = nproc
        self.resume = resume
        self.stall_timeout = stall_timeout
        self.alert_action = alert_action
        self.worker_cmd = worker_cmd
        self.key = secrets.token_bytes(32)
        self.state = "starting"
        self.proc: subprocess.Popen | None = None
        self.ranks: dict[int, int] = {}  # rank → pid
        self.gone: dict[int, float] = {}  # rank → when its process was first seen gone
        self.killed: dict[int, int | None] = {}  # rank → the signal that ended it (0: it exited; None: unknown)
        self.rank_alerted = False
        self.stopping = False
        self.stop_deadline = 0.0
        self.replies: OrderedDict[str, Reply] = OrderedDict()
        self.unacked: dict[str, tuple[bytes, float]] = {}
        self.session = Session(self.key)
        self.health = Health()
        self.last_step_time = time.monotonic()
        self.exit_code = 0
        self.echo = False  # print a line per notable event (foreground `voxtui run`)
        self.infer_procs: list[subprocess.Popen] = []
        self.relayed: dict[str, int] = {}  # worker id → the highest wseq stored from it
        self.bad_worker_messages = 0
        self.kill_at: float | None = None  # SIGTERM sent to the workers: SIGKILL what is left at this time
        self.dying: list = []
        self.final_status: Status | None = None  # the workers' finished / failed status
        self.final_at = float("inf")
        self.failed_message = ""  # set when the engine itself calls the run failed (a rank died)
        self._watcher = None
        self.auth = None
        self.sockets: Path | None = None
        self._gpu_count: int | None = None
        self.events_file = None
        self.pull = self.wpub = self.pub = self.router = self.remote_pub = self.remote_router = None

    # ---- setup
    def open(self) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        previous = engine_info(self.run_dir)
        self.events_path = self.run_dir / "events.jsonl"
        _cut_torn_tail(self.events_path)
        self.seq = last_seq(self.events_path)
        self.offsets = self._index()
        self.events_file = open(self.events_path, "ab")
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_MSG)
        self.wpub = ctx.socket(zmq.PUB)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)  # a slow client drops messages, never slows the engine
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MSG)
        for s in (self.pull, self.wpub, self.pub, self.router):
            s.setsockopt(zmq.LINGER, 0)
        self.sockets = socket_dir(self.run_dir)
        self.endpoints = {name: _bind(sock, f"ipc://{self.sockets / name}.sock") for name, sock in (
            ("events", self.pub), ("control", self.router), ("worker_events", self.pull),
            ("worker_control", self.wpub))}
        info = {"pid": os.getpid(), "run": self.run, "host": socket.gethostname(), "version": PROTOCOL_VERSION,
                "started": time.time(), "key": self.key.hex(), "endpoints": self.endpoints, "nproc": self.nproc}
        if self.listen:
            info["remote"] = self._listen_remote(ctx)
        self._recover(previous)
        write_engine_info(self.run_dir, info)

    def _recover(self, previous: dict) -> None:
        """After an engine that ended without closing (killed, machine lost): record that, then store the
        events its workers kept in their spool and it never stored, in their order."""
        from engine.eventlog import read_spool

        crashed = previous.get("pid") and "stopped" not in previous and previous.get("pid") != os.getpid()
        pending = self._spooled(read_spool(self.spool_dir))
        if crashed:
            self.emit(Alert(level="error", kind="engine_lost",
                            message=f"the previous engine (pid {previous['pid']}) ended without closing (killed?) "
                                    f"after event {self.seq}; {len(pending)} event(s) its workers kept are stored "
                                    "below"))
        for ev in pending:
            self.emit(ev, relay=True)
        if pending:
            os.fsync(self.events_file.fileno())
        self._prune_spool(final=True)

    @property
    def spool_dir(self) -> Path:
        return self.run_dir / "spool"

    def _spooled(self, spool: dict) -> list:
        return spooled_events(self.events_path, spool, self.relayed)

    def _prune_spool(self, final: bool = False) -> None:
        """Delete spool files whose events are all stored: every file but a worker's newest while it
        runs; at the end (``final``), the newest too, once its events are stored (or stored now)."""
        from engine.eventlog import read_spool, spool_worker_pid

        spool = read_spool(self.spool_dir)
        if final:
            for ev in self._spooled({w: f for w, f in spool.items() if not pid_alive(spool_worker_pid(w))}):
                self.on_worker_message(ev)  # sent while nobody read, or dropped in transit: stored now
        for worker, files in spool.items():
            stored = self.relayed.get(worker, 0)
            done_with = not pid_alive(spool_worker_pid(worker)) and final
            for (_, path), nxt in zip(files, [f for f, _ in files[1:]] + [None]):
                if (nxt is not None and nxt - 1 <= stored) or done_with:
                    with contextlib.suppress(OSError):
                        path.unlink()
        with contextlib.suppress(OSError):
            self.spool_dir.rmdir()  # only when empty

    def _listen_remote(self, ctx) -> dict:
        """Client sockets on ``--listen tcp://HOST:PORT`` (PORT for events, PORT+1 for control), always
        with CURVE: encrypted, and only the client key written to engine.json may connect."""
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if not self.listen.startswith("tcp://") or ":" not in self.listen[6:]:
            raise ValueError(f"--listen {self.listen}: expected tcp://HOST:PORT")
        host, port = self.listen[6:].rsplit(":", 1)
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=_AllowKeys({client_public}))
        socks = []
        for kind in (zmq.PUB, zmq.ROUTER):
            sk = ctx.socket(kind)
            sk.setsockopt(zmq.LINGER, 0)
            sk.curve_server = True
            sk.curve_publickey = server_public
            sk.curve_secretkey = server_secret
            socks.append(sk)
        self.remote_pub, self.remote_router = socks
        self.remote_pub.setsockopt(zmq.SNDHWM, 10_000)
        self.remote_router.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MSG)
        events = _bind(self.remote_pub, f"tcp://{host}:{port}")
        control = _bind(self.remote_router, f"tcp://{host}:{int(port) + 1 if port != '*' else '*'}")
        return {"events": events, "control": control, "server_public": server_public.decode(),
                "client_public": client_public.decode(), "client_secret": client_secret.decode()}

    def _index(self) -> list[int]:
        """Byte offset of each event line (index seq-1), so history is served from the file."""
        offsets = []
        if self.events_path.exists():
            pos = 0
            with open(self.events_path, "rb") as f:
                for line in f:
                    if line.strip() and line.endswith(b"\n"):
                        offsets.append(pos)
                    pos += len(line)
        return offsets[: self.seq]

    def spawn(self) -> None:
        cmd = self.worker_cmd or [
            sys.executable, "-m", "torch.distributed.run", *launch_args(self.run, self.nproc, self.nnodes, 0,
                                                                       self.rdzv_endpoint),
            "-m", "engine.train", "--engine", str(self.run_dir / "engine.json"),
        ] + (["--resume", str(self.run_dir)] if self.resume else ["--config", str(self.run_dir / "config.toml")])
        log = open(self.run_dir / "worker.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     cwd=os.getcwd())
        log.close()
        if self.worker_cmd is None:  # a stand-in worker (a replay, a benchmark) speaks for itself
            self.emit(Status(state="starting", message=f"engine {os.getpid()} started torchrun {self.proc.pid} "
                                                       f"with {self.nproc} rank(s)"))

    # ---- events
    def emit(self, event, relay: bool = False) -> None:
        """Number, store (flushed) and publish one event (``relay``: one a worker sent, whose worker id and
        count are kept so that its spool is replayed once)."""
        if relay and event.worker:
            self.relayed[event.worker] = max(self.relayed.get(event.worker, 0), event.wseq)
        elif not relay:
            event.worker, event.wseq = "", 0
        self.seq += 1
        data = event_encoder.encode(stamp(event, self.seq, self.run))
        self.offsets.append(self.events_file.tell())
        self.events_file.write(data + b"\n")
        self.events_file.flush()
        self._publish([b"ev", data])
        if isinstance(event, Status):
            self.state = event.state
        if self.echo:
            line = _one_line(event)
            if line:
                print(line, flush=True)

    def _publish(self, frames: list[bytes]) -> None:
        for pub in (self.pub, self.remote_pub):
            if pub is not None:
                try:
                    pub.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def on_worker_event(self, raw: bytes) -> None:
        ev, why = decode(event_decoder, raw)
        if ev is None:
            self.bad_worker_messages += 1
            if self.bad_worker_messages <= 10 or self.bad_worker_messages % 1000 == 0:
                print(f"engine: dropped an undecodable worker message ({self.bad_worker_messages} so far): {why}",
                      file=sys.stderr, flush=True)
            return
        self.on_worker_message(ev)

    def on_worker_message(self, ev) -> None:
        """A worker's event, from its socket or (sent while nobody read) from its spool."""
        if ev.worker and ev.wseq <= self.relayed.get(ev.worker, 0):
            return  # already stored (replayed from the worker's spool)
        ev.time = ev.time if ev.time > 0 else time.time()
        if ev.type == "ack":
            self.unacked.pop(ev.id, None)
        if ev.type == "step":
            self.last_step_time = time.monotonic()
        if ev.type == "status" and ev.state in ("finished", "failed"):
            self.final_status = ev  # the run's outcome, checked again once torchrun has exited
            self.final_at = time.monotonic()
        self.emit(ev, relay=True)
        alerts = self.health.step(ev) if ev.type == "step" else self.health.telemetry(ev) if ev.type == "telemetry" else []
        for a in alerts:
            self.emit(a)
            self._act_on_alert()

    def _act_on_alert(self) -> None:
        if self.alert_action == "save":
            self.forward(SaveCheckpoint(id=f"alert-save-{self.seq}"))
        elif self.alert_action == "stop":
            self.request_stop("stopping on an alert (alert_action = stop)")

    # ---- commands
    def forward(self, cmd) -> None:
        data = msgspec.json.encode(cmd)
        self.wpub.send(data)
        if cmd.id:
            self.unacked[cmd.id] = (data, time.monotonic())

    def request_stop(self, message: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + 120.0
        self.emit(Status(state="stopping", message=message))
        self.forward(Stop(id=f"engine-stop-{self.seq}"))

    def on_request(self, frames: list[bytes], router=None) -> None:
        router = router or self.router
        ident = frames[0]
        body = frames[2:] if len(frames) > 2 and frames[1] == b"" else frames[1:]

        def reply(r: Reply, extra: list[bytes] = ()) -> None:
            router.send_multipart([ident, b"", msgspec.json.encode(r), *extra])

        req, problem = self.session.verify(body)
        if req is None:
            return reply(Reply(status="error", reason=problem))
        match req.op:
            case "history":
                limit = max(1, min(req.limit, 5000))
                after = max(0, req.after)
                lines = self._read_events(after, limit)
                last = min(after, self.seq) + len(lines)
                reply(Reply(status="ok", last=last, more=last < self.seq, state=self.state), lines)
            case "status":
                reply(Reply(status="ok", last=self.seq, state=self.state))
            case "command":
                reply(self.on_command(req.command))
            case _:
                reply(Reply(status="error", reason=f"unknown op {req.op!r}"))

    def _read_events(self, after: int, limit: int) -> list[bytes]:
        if after >= self.seq:
            return []
        out = []
        with open(self.events_path, "rb") as f:
            f.seek(self.offsets[after])
            for _ in range(min(limit, self.seq - after)):
                out.append(f.readline().rstrip(b"\n"))
        return out

    def on_command(self, cmd: AnyCommand | None) -> Reply:
        if cmd is None or cmd.type not in CLIENT_COMMANDS:
            return Reply(status="error", reason="no command, or not one a client may send")
        if not cmd.id:
            return Reply(status="error", reason="a command needs an id (for replies and retries)")
        if cmd.id in self.replies:  # a retry: applied once, same answer
            return self.replies[cmd.id]
        r = self._apply(cmd)
        r.id = cmd.id
        self.replies[cmd.id] = r
        while len(self.replies) > 4096:
            self.replies.popitem(last=False)
        return r

    def _apply(self, cmd) -> Reply:
        worker_alive = self.proc is not None and self.proc.poll() is None
        if self.state in ("finished", "failed") and not (isinstance(cmd, Stop) and worker_alive) \
                and not isinstance(cmd, RunInference):  # a checkpoint can be evaluated while the engine is here
            return Reply(status="error", reason=f"the run has {self.state}", state=self.state)
        match cmd:
            case SetPreviewParams():
                problems = cmd.problems()
                if problems:
                    return Reply(status="error", reason="; ".join(problems), state=self.state)
            case Pause() if self.state == "paused":
                return Reply(status="error", reason="already paused", state=self.state)
            case Resume() if self.state != "paused":
                return Reply(status="error", reason=f"not paused ({self.state})", state=self.state)
            case Stop():
                self.request_stop(f"stop requested by a client ({cmd.id})")
                return Reply(status="ok", state=self.state)
        if cmd.type == "run_inference":
            return self.start_inference(cmd)
        self.forward(cmd)
        return Reply(status="ok", state=self.state)

    def start_inference(self, cmd) -> Reply:
        """``voxtui infer`` as its own process; its progress and results come back as events."""
        from engine.runs import complete_checkpoints

        try:
            from engine.config import read_toml

            cfg = read_toml(self.run_dir / "config.toml")
        except Exception:
            cfg = {}
        data = cmd.data or cfg.get("val_jsonl", "")
        if not data or not Path(data).is_file():
            return Reply(status="error", reason=f"no data file to run inference on ({data or 'none given, no val_jsonl'})",
                         state=self.state)
        done = dict(complete_checkpoints(self.run_dir / "checkpoints"))
        if cmd.checkpoint is not None and cmd.checkpoint not in done:
            return Reply(status="error", reason=f"no complete checkpoint-{cmd.checkpoint}", state=self.state)
        if cmd.checkpoint is None and not done and not (self.run_dir / "lora_final").is_dir():
            return Reply(status="error", reason="no checkpoint yet", state=self.state)
        argv = [sys.executable, "-m", "engine", "infer", "--run", str(self.run_dir), "--data", data,
                "--events", self.endpoints["worker_events"], "--device", self.inference_device(), "--json", "-"]
        if cmd.checkpoint is not None:
            argv += ["--checkpoint", str(cmd.checkpoint)]
        log = open(self.run_dir / "infer.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
        log.close()
        self.infer_procs.append(proc)
        return Reply(status="ok", reason=f"inference started (pid {proc.pid})", state=self.state)

    def inference_device(self) -> str:
        """A GPU that training does not use, else the CPU (so inference never starves training). NVML is
        asked once."""
        if self._gpu_count is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._gpu_count = pynvml.nvmlDeviceGetCount()
                pynvml.nvmlShutdown()
            except Exception:
                self._gpu_count = 0
        return f"cuda:{self.nproc}" if self._gpu_count > self.nproc else "cpu"

    # ---- supervision
    def _descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def supervise(self) -> bool:
        """Watch torchrun and its ranks; returns False once the run is over."""
        import psutil

        rc = self.proc.poll()
        if rc is None:
            for p in self._descendants():
                if p.pid in self.ranks.values():
                    continue
                try:
                    env = p.environ()
                except psutil.Error:
                    continue
                if "RANK" in env and p.ppid() == self.proc.pid:
                    self.ranks[int(env["RANK"])] = p.pid
            final = self.final_status
            if not self.stopping and not self.rank_alerted and (final is None or final.state == "failed"):
                now = time.monotonic()
                self._watch_ranks()
                if self.gone:
                    # the rank that went first is at fault; a rank that ends normally is followed at once
                    # by the run's final status, so wait briefly for one before calling it a death.
                    # A rank killed by a signal died, whatever followed; one that exited after the workers
                    # reported their failure (with its reason) did not.
                    rank = min(self.gone, key=lambda r: (self.gone[r], r))
                    died = self.killed.get(rank) or (final is None and now - self.gone[rank] > 3.0) or (
                        final is not None and self.killed.get(rank) is None and self.gone[rank] < self.final_at)
                    if died:
                        self.rank_alerted = True
                        self.emit(Alert(level="error", kind="rank_died", rank=rank,
                                        message=f"rank {rank} (pid {self.ranks[rank]}) exited unexpectedly; "
                                                "stopping the other ranks"))
                        self.failed_message = f"rank {rank} died"
                        self.kill_workers(wait=False)
            self._reap()
            if self.stopping and time.monotonic() > self.stop_deadline:
                self.stop_deadline = float("inf")
                self.emit(Alert(level="warning", kind="stop_timeout", message="workers did not stop in time: killing them"))
                self.kill_workers(wait=False)
            if (not self.stopping and self.state == "running"
                    and time.monotonic() - self.last_step_time > self.stall_timeout):
                self.last_step_time = time.monotonic()
                self.emit(Alert(level="warning", kind="stall",
                                message=f"no optimizer step for {self.stall_timeout:.0f} s"))
            return True
        self.kill_workers()  # leave nothing behind
        self.infer_procs = [p for p in self.infer_procs if p.poll() is None]
        if self.infer_procs:
            return True  # inference jobs started from this run finish before the engine leaves
        self._drain()
        self._prune_spool(final=True)  # events that never reached this engine are stored now, in order
        final = self.final_status
        failed = self.failed_message
        if failed:
            self.emit(Status(state="failed", message=failed))
            self.exit_code = 1
        elif final is not None:
            self.state = final.state  # already stored and published when it arrived
            self.exit_code = 0 if final.state == "finished" else 1
        else:
            self.emit(Status(state="failed", message=f"workers exited with code {rc} (see worker.log)"))
            self.exit_code = 1
        return False

    def _watch_ranks(self) -> None:
        """A thread that notes, every 20 ms, when each rank's process ends: the first to go is at fault
        (the others fail a moment later, when a collective finds their peer gone)."""
        import threading

        import psutil

        if self._watcher is not None or len(self.ranks) < self.nproc:
            return

        def watch():
            procs = {}
            for rank, pid in self.ranks.items():
                try:
                    procs[rank] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    self.gone.setdefault(rank, time.monotonic())
            while len(self.gone) < len(self.ranks) and not self._watch_stop.is_set():
                for rank, p in procs.items():
                    if rank in self.gone:
                        continue
                    try:
                        alive = p.status() != psutil.STATUS_ZOMBIE
                    except psutil.NoSuchProcess:
                        alive = False
                    if not alive:
                        self.killed[rank] = _exit_signal(p.pid)  # readable while torchrun has not reaped it
                        self.gone[rank] = time.monotonic()
                time.sleep(0.02)

        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=watch, name="voxtui-rank-watch", daemon=True)
        self._watcher.start()

    def kill_workers(self, grace: float = 5.0, wait: bool = True) -> None:
        """SIGTERM torchrun, every descendant and every rank seen, then SIGKILL what is left after ``grace``:
        here (``wait``), or from the loop (``_reap``), which never blocks on it."""
        import psutil

        procs = self._descendants()
        for pid in [self.proc.pid, *self.ranks.values()]:
            with contextlib.suppress(psutil.Error):
                if all(p.pid != pid for p in procs):
                    procs.append(psutil.Process(pid))
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        self.dying, self.kill_at = procs, time.monotonic() + grace
        if wait:
            _, alive = psutil.wait_procs(procs, timeout=grace)
            self.kill_at = time.monotonic()
            self._reap()
            psutil.wait_procs(alive, timeout=grace)
            if self.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)

    def _reap(self) -> None:
        """SIGKILL the processes told to end that are still there past their grace."""
        import psutil

        if self.kill_at is None or time.monotonic() < self.kill_at:
            return
        for p in self.dying:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
        self.kill_at = None

    # ---- main loop
    def serve(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop("engine received SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.request_stop("engine received SIGINT"))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # survive the SSH session that started it
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        if self.remote_router is not None:
            poller.register(self.remote_router, zmq.POLLIN)
        next_tick = 0.0
        next_check = 0.0
        running = True
        disk_check = 0.0
        spool_check = 0.0
        while running:
            for sock, _ in poller.poll(100):
                if sock is self.pull:
                    for _ in range(1000):
                        try:
                            raw = self.pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._guarded(self.on_worker_event, raw)
                else:  # the local or the remote (CURVE) ROUTER
                    for _ in range(100):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._guarded(self.on_request, frames, sock)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.25
                running = self._guarded(self.supervise, default=True)
            if now >= next_tick:
                next_tick = now + HEARTBEAT_S
                self._publish([b"hb", json.dumps({"seq": self.seq, "state": self.state, "time": time.time()}).encode()])
                self.wpub.send(msgspec.json.encode(Heartbeat()))
                for cid, (data, sent) in list(self.unacked.items()):
                    if now - sent > 60:
                        self.unacked.pop(cid)
                    else:
                        self.wpub.send(data)  # the workers ignore ids they have applied
                if now >= disk_check:
                    disk_check = now + 30
                    self._guarded(self._check_disk)
                if now >= spool_check:
                    spool_check = now + 30
                    self._guarded(self._prune_spool)
                    self._guarded(self._touch_sockets)
        self._publish([b"hb", json.dumps({"seq": self.seq, "state": self.state, "time": time.time(),
                                          "exiting": True}).encode()])
        time.sleep(0.1)
        return self.exit_code

    def _guarded(self, fn, *args, default=None):
        """One message or check that fails unexpectedly is logged (engine.log) and skipped; the engine,
        and with it the run, keeps going."""
        try:
            return fn(*args)
        except Exception:
            import traceback

            print(f"engine: {getattr(fn, '__name__', fn)} failed (the engine keeps serving):", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            return default

    def _drain(self) -> None:
        """Store what the workers sent last."""
        while True:
            try:
                raw = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._guarded(self.on_worker_event, raw)

    def _touch_sockets(self) -> None:
        """Keep /tmp cleaners (systemd-tmpfiles ages files by their times) away from a long run's sockets."""
        for p in [self.sockets, *self.sockets.iterdir()]:
            os.utime(p)

    def _check_disk(self) -> None:
        usage = shutil.disk_usage(self.run_dir)
        if usage.free < max(2 * 2**30, 0.05 * usage.total) and self.health._once("disk_full", 600):
            self.emit(Alert(level="warning", kind="disk_nearly_full",
                            message=f"{usage.free / 2**30:.1f} GiB free on the run's disk"))

    def close(self) -> None:
        if self._watcher is not None:
            self._watch_stop.set()
        if self.events_file is not None:
            self.events_file.close()
        for s in (self.pull, self.wpub, self.pub, self.router, self.remote_pub, self.remote_router):
            if s is not None:
                s.close()
        if self.auth is not None:
            self.auth.stop()
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
        info = engine_info(self.run_dir)
        if info.get("pid") == os.getpid():
            info.update(stopped=time.time(), state=self.state)
            with contextlib.suppress(OSError):
                write_engine_info(self.run_dir, info)


class _AllowKeys:
    """ZAP credentials check: only the listed CURVE client keys may connect."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        import zmq.utils.z85

        return zmq.utils.z85.encode(key) in self.keys if len(key) == 32 else key in self.keys


def _exit_signal(pid: int) -> int | None:
    """The signal that ended a zombie process (0 when it exited by itself), from /proc; None when unknown
    (already reaped, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[49]) & 0x7F  # field 52, exit_code (Linux ≥ 3.5), as waitpid's status
    except (OSError, IndexError, ValueError):
        return None


def launch_args(run: str, nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "") -> list[str]:
    """torchrun's launch flags: standalone on one machine, c10d rendezvous across several."""
    if nnodes <= 1:
        return ["--standalone", "--nproc_per_node", str(nproc)]
    return ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", run]


def run_engine(run_dir: Path, nproc: int, resume: bool, alert_action: str = "warn",
               stall_timeout: float = 600.0, echo: bool = False, nnodes: int = 1, rdzv_endpoint: str = "",
               listen: str = "", worker_cmd: list[str] | None = None) -> int:
    engine = Engine(run_dir, nproc, resume, stall_timeout=stall_timeout, alert_action=alert_action, nnodes=nnodes,
                    rdzv_endpoint=rdzv_endpoint, listen=listen, worker_cmd=worker_cmd)
    engine.echo = echo
    try:
        engine.open()
        engine.spawn()
        return engine.serve()
    finally:
        if engine.proc is not None and engine.proc.poll() is None:
            engine.kill_workers()
        engine.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.daemon", description="voxtui's engine for one run")
    p.add_argument("run_dir")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--alert_action", choices=("warn", "save", "stop"), default="warn")
    p.add_argument("--stall_timeout", type=float, default=600.0)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv_endpoint", default="")
    p.add_argument("--listen", default="", help="tcp://HOST:PORT for clients on other machines (CURVE)")
    p.add_argument("--worker_cmd", default="", help=argparse.SUPPRESS)  # JSON list: a stand-in worker (benchmarks)
    a = p.parse_args(argv)
    return run_engine(Path(a.run_dir), a.nproc, a.resume, a.alert_action, a.stall_timeout, nnodes=a.nnodes,
                      rdzv_endpoint=a.rdzv_endpoint, listen=a.listen,
                      worker_cmd=json.loads(a.worker_cmd) if a.worker_cmd else None)


if __name__ == "__main__":
    sys.exit(main())
