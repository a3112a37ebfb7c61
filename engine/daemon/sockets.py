"""The engine's ZeroMQ sockets (docs/engine.md, "Sockets").

Four local ones, ``ipc://`` files in a private folder: ``events`` (PUB to clients), ``control``
(ROUTER for clients' requests), ``worker_events`` (PULL from rank 0) and ``worker_control`` (PUB to
rank 0). With ``--listen tcp://HOST:PORT`` two more for clients on other machines, PUB on PORT and
ROUTER on PORT+1, always with CURVE: encrypted, and only the client key written to engine.json may
connect.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import zmq

MAX_CLIENT_MSG = 1 << 20
MAX_WORKER_MSG = 16 << 20
CLIENT_HWM = 10_000  # messages queued for a slow client before it drops them (never slowing the engine)
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


class Sockets:
    """The engine's sockets: ``pull`` (workers' events), ``wpub`` (commands to the workers), ``pub`` and
    ``router`` (clients), and with ``listen`` ``remote_pub`` and ``remote_router``."""

    def __init__(self, run_dir: Path, listen: str = "") -> None:
        self.run_dir = run_dir
        self.listen = listen
        self.folder: Path | None = None
        self.endpoints: dict[str, str] = {}  # local: name → ipc:// endpoint
        self.remote: dict | None = None  # with ``listen``: the endpoints and CURVE keys for engine.json
        self.auth = None
        self.pull = self.wpub = self.pub = self.router = self.remote_pub = self.remote_router = None

    def bind(self) -> None:
        """Create and bind the local sockets in a private folder, and the remote ones with ``listen``."""
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_MSG)
        self.wpub = ctx.socket(zmq.PUB)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, CLIENT_HWM)  # a slow client drops messages, never slows the engine
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MSG)
        for s in (self.pull, self.wpub, self.pub, self.router):
            s.setsockopt(zmq.LINGER, 0)
        self.folder = socket_dir(self.run_dir)
        self.endpoints = {name: _bind(sock, f"ipc://{self.folder / name}.sock") for name, sock in (
            ("events", self.pub), ("control", self.router), ("worker_events", self.pull),
            ("worker_control", self.wpub))}
        if self.listen:
            self.remote = self._listen_remote(ctx)

    def _listen_remote(self, ctx) -> dict:
        """Client sockets on ``--listen tcp://HOST:PORT`` (PORT for events, PORT+1 for control), always
        with CURVE: encrypted, and only the client key written to engine.json may connect."""
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
        self.remote_pub.setsockopt(zmq.SNDHWM, CLIENT_HWM)
        self.remote_router.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MSG)
        events = _bind(self.remote_pub, f"tcp://{host}:{port}")
        control = _bind(self.remote_router, f"tcp://{host}:{int(port) + 1 if port != '*' else '*'}")
        return {"events": events, "control": control, "server_public": server_public.decode(),
                "client_public": client_public.decode(), "client_secret": client_secret.decode()}

    @property
    def routers(self) -> list:
        """The ROUTERs clients send requests to: the local one, and the remote one when listening."""
        return [r for r in (self.router, self.remote_router) if r is not None]

    def publish(self, frames: list[bytes]) -> None:
        """To every client (local and remote); a client too slow to take it loses it (never blocks)."""
        for pub in (self.pub, self.remote_pub):
            if pub is not None:
                try:
                    pub.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def to_workers(self, data: bytes) -> None:
        self.wpub.send(data)

    def touch(self) -> None:
        """Keep /tmp cleaners (systemd-tmpfiles ages files by their times) away from a long run's sockets."""
        for p in [self.folder, *self.folder.iterdir()]:
            os.utime(p)

    def close(self) -> None:
        for s in (self.pull, self.wpub, self.pub, self.router, self.remote_pub, self.remote_router):
            if s is not None:
                s.close()
        if self.auth is not None:
            self.auth.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _AllowKeys:
    """ZAP credentials check: only the listed CURVE client keys may connect."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        import zmq.utils.z85

        return zmq.utils.z85.encode(key) in self.keys if len(key) == 32 else key in self.keys
