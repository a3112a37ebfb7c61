"""The engine: one headless daemon per run.

It spawns torchrun (its workers in sessions of their own), numbers every event the workers push,
appends it to ``events.jsonl`` (flushed) and publishes it to any number of clients; it answers
history requests and authenticated commands on a ROUTER; it watches the worker processes and the
health of the run. It never imports Textual.

    python -m engine.daemon RUN_DIR [--nproc N] [--resume]     (``voxtui run`` starts it)
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path

import msgspec
import zmq

from engine.events import last_seq
from engine.protocol import (
    CLIENT_COMMANDS,
    PROTOCOL_VERSION,
    Alert,
    AnyCommand,
    Heartbeat,
    Pause,
    Reply,
    Resume,
    SaveCheckpoint,
    SetPreviewParams,
    Status,
    Stop,
    event_decoder,
    event_encoder,
    request_decoder,
    stamp,
)

HEARTBEAT_S = 1.0
MAX_CLIENT_MSG = 1 << 20
MAX_WORKER_MSG = 16 << 20
REPLAY_WINDOW_S = 300.0


def sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, "sha256").hexdigest().encode()


def _endpoint(run_dir: Path, name: str) -> str:
    path = (run_dir / f"{name}.sock").resolve()
    return f"ipc://{path}" if len(str(path)) < 100 else "tcp://127.0.0.1:*"


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _one_line(ev) -> str | None:
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
        self.rank_alerted = False
        self.stopping = False
        self.stop_deadline = 0.0
        self.replies: OrderedDict[str, Reply] = OrderedDict()
        self.unacked: dict[str, tuple[bytes, float]] = {}
        self.nonces: OrderedDict[str, float] = OrderedDict()
        self.health = Health()
        self.last_step_time = time.monotonic()
        self.exit_code = 0
        self.echo = False  # print a line per notable event (foreground `voxtui run`)
        self.infer_procs: list[subprocess.Popen] = []

    # ---- setup
    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self.events_path = self.run_dir / "events.jsonl"
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
        self.endpoints = {
            "events": _bind(self.pub, _endpoint(self.run_dir, "events")),
            "control": _bind(self.router, _endpoint(self.run_dir, "control")),
            "worker_events": _bind(self.pull, _endpoint(self.run_dir, "w-events")),
            "worker_control": _bind(self.wpub, _endpoint(self.run_dir, "w-control")),
        }
        self.remote_pub = self.remote_router = None
        info = {"pid": os.getpid(), "run": self.run, "host": socket.gethostname(), "version": PROTOCOL_VERSION,
                "started": time.time(), "key": self.key.hex(), "endpoints": self.endpoints, "nproc": self.nproc}
        if self.listen:
            info["remote"] = self._listen_remote(ctx)
        tmp = self.run_dir / ".engine.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, self.run_dir / "engine.json")

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
    def emit(self, event) -> None:
        """Number, store (flushed) and publish one event."""
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
        try:
            ev = event_decoder.decode(raw)
        except msgspec.DecodeError:
            return
        ev.time = ev.time or time.time()
        if ev.type == "ack":
            self.unacked.pop(ev.id, None)
        if ev.type == "step":
            self.last_step_time = time.monotonic()
        if ev.type == "status" and ev.state in ("finished", "failed"):
            self.final_status = ev  # the run's outcome, checked again once torchrun has exited
        self.emit(ev)
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

        if len(body) != 2:
            return reply(Reply(status="error", reason="expected two frames: request and signature"))
        payload, signature = body
        if not hmac.compare_digest(sign(self.key, payload), signature):
            return reply(Reply(status="error", reason="unauthenticated: bad signature"))
        try:
            req = request_decoder.decode(payload)
        except msgspec.DecodeError as e:
            return reply(Reply(status="error", reason=f"malformed request: {e}"))
        if abs(time.time() - req.time) > REPLAY_WINDOW_S:
            return reply(Reply(status="error", reason="stale request (clock skew or replay)"))
        if req.nonce:
            if req.nonce in self.nonces and req.op != "command":
                return reply(Reply(status="error", reason="replayed request"))
            self.nonces[req.nonce] = time.time()
            while len(self.nonces) > 10_000:
                self.nonces.popitem(last=False)
        match req.op:
            case "history":
                limit = max(1, min(req.limit, 5000))
                after = max(0, req.after)
                lines = self._read_events(after, limit)
                last = after + len(lines)
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
        if self.state in ("finished", "failed") and not (isinstance(cmd, Stop) and worker_alive):
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
        from engine.runfolder import complete_checkpoints

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
        """A GPU that training does not use, else the CPU (so inference never starves training)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            pynvml.nvmlShutdown()
        except Exception:
            count = 0
        return f"cuda:{self.nproc}" if count > self.nproc else "cpu"

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
            final = getattr(self, "final_status", None)
            if not self.stopping and not self.rank_alerted and (final is None or final.state == "failed"):
                now = time.monotonic()
                self._watch_ranks()
                if self.gone:
                    # the rank that went first is at fault; a rank that ends normally is followed at once
                    # by the run's final status, so wait briefly for one before calling it a death
                    rank = min(self.gone, key=lambda r: (self.gone[r], r))
                    if now - self.gone[rank] > 3.0 or (final is not None and final.state == "failed"):
                        self.rank_alerted = True
                        self.emit(Alert(level="error", kind="rank_died", rank=rank,
                                        message=f"rank {rank} (pid {self.ranks[rank]}) exited unexpectedly; "
                                                "stopping the other ranks"))
                        self.failed_message = f"rank {rank} died"
                        self.kill_workers()
            if self.stopping and time.monotonic() > self.stop_deadline:
                self.emit(Alert(level="warning", kind="stop_timeout", message="workers did not stop in time: killing them"))
                self.kill_workers()
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
        final = getattr(self, "final_status", None)
        failed = getattr(self, "failed_message", None)
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

        if getattr(self, "_watcher", None) is not None or len(self.ranks) < self.nproc:
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
                        self.gone[rank] = time.monotonic()
                time.sleep(0.02)

        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=watch, name="voxtui-rank-watch", daemon=True)
        self._watcher.start()

    def kill_workers(self, grace: float = 5.0) -> None:
        """SIGTERM torchrun and every descendant, then SIGKILL what is left after ``grace``."""
        import psutil

        procs = self._descendants()
        try:
            procs.append(psutil.Process(self.proc.pid))
        except psutil.Error:
            pass
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace)
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

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
        while running:
            for sock, _ in poller.poll(100):
                if sock is self.pull:
                    for _ in range(1000):
                        try:
                            self.on_worker_event(self.pull.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                else:  # the local or the remote (CURVE) ROUTER
                    for _ in range(100):
                        try:
                            self.on_request(sock.recv_multipart(zmq.NOBLOCK), sock)
                        except zmq.Again:
                            break
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.25
                running = self.supervise()
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
                    self._check_disk()
        # drain what the workers sent last, then say goodbye
        while True:
            try:
                self.on_worker_event(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        self._publish([b"hb", json.dumps({"seq": self.seq, "state": self.state, "time": time.time(),
                                          "exiting": True}).encode()])
        time.sleep(0.3)
        return self.exit_code

    def _check_disk(self) -> None:
        usage = shutil.disk_usage(self.run_dir)
        if usage.free < max(2 * 2**30, 0.05 * usage.total) and self.health._once("disk_full", 600):
            self.emit(Alert(level="warning", kind="disk_nearly_full",
                            message=f"{usage.free / 2**30:.1f} GiB free on the run's disk"))

    def close(self) -> None:
        if getattr(self, "_watcher", None) is not None:
            self._watch_stop.set()
        self.events_file.close()
        for s in (self.pull, self.wpub, self.pub, self.router, self.remote_pub, self.remote_router):
            if s is not None:
                s.close()
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        try:
            info = json.loads((self.run_dir / "engine.json").read_text())
            info["stopped"] = time.time()
            info["state"] = self.state
            tmp = self.run_dir / ".engine.json.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f, indent=2)
            os.replace(tmp, self.run_dir / "engine.json")
        except (OSError, ValueError):
            pass


class _AllowKeys:
    """ZAP credentials check: only the listed CURVE client keys may connect."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        import zmq.utils.z85

        return zmq.utils.z85.encode(key) in self.keys if len(key) == 32 else key in self.keys


def launch_args(run: str, nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "") -> list[str]:
    """torchrun's launch flags: standalone on one machine, c10d rendezvous across several."""
    if nnodes <= 1:
        return ["--standalone", "--nproc_per_node", str(nproc)]
    return ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", run]


def run_engine(run_dir: Path, nproc: int, resume: bool, alert_action: str = "warn",
               stall_timeout: float = 600.0, echo: bool = False, nnodes: int = 1, rdzv_endpoint: str = "",
               listen: str = "") -> int:
    engine = Engine(run_dir, nproc, resume, stall_timeout=stall_timeout, alert_action=alert_action, nnodes=nnodes,
                    rdzv_endpoint=rdzv_endpoint, listen=listen)
    engine.echo = echo
    engine.open()
    try:
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
    if a.worker_cmd:
        engine = Engine(Path(a.run_dir), a.nproc, worker_cmd=json.loads(a.worker_cmd))
        engine.open()
        try:
            engine.spawn()
            return engine.serve()
        finally:
            engine.close()
    return run_engine(Path(a.run_dir), a.nproc, a.resume, a.alert_action, a.stall_timeout, nnodes=a.nnodes,
                      rdzv_endpoint=a.rdzv_endpoint, listen=a.listen)


if __name__ == "__main__":
    sys.exit(main())
