"""One processor process: the filter chain behind a grpc.aio server, plus its admin endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from proxy.admin import AdminServer
from proxy.api import Deps
from proxy.chain import Chain
from proxy.config import FloodwallConfig
from proxy.guard import LagGuard
from proxy.registry import build_filters, check_route_refs
from proxy.reload import Reloader
from proxy.server import ProcessorServer

log = logging.getLogger("floodwall.process")

_MAX_CONNECTIONS = 128


def processor_address(cfg: FloodwallConfig, index: int, runtime_dir: Path) -> str:
    """gRPC listen address of processor ``index`` (the Envoy renderer uses the same)."""
    p = cfg.processor
    if p.transport == "uds":
        return f"unix:{processor_socket(runtime_dir, index)}"
    return f"{p.address}:{p.port + index}"


def processor_socket(runtime_dir: Path, index: int) -> Path:
    return runtime_dir / f"processor-{index}.sock"


def make_redis(url: str | None, timeout_ms: int, cluster: bool = False) -> Any:
    if url is None:
        return None
    import redis.asyncio as aioredis

    t = timeout_ms / 1000
    if cluster:
        from proxy.rediscluster import Cluster

        return Cluster.from_urls(
            url, max_connections=_MAX_CONNECTIONS, socket_timeout=t, socket_connect_timeout=t
        )
    # A burst beyond the pool's connections waits for one (bounded by each filter's own
    # budget) instead of failing at once with MaxConnectionsError, the plain pool's answer.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=_MAX_CONNECTIONS, timeout=t, socket_timeout=t,
        socket_connect_timeout=t,
    )  # fmt: skip
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


def make_deps(cfg: FloodwallConfig, redis_url: str | None = None) -> Deps:
    r = cfg.redis
    return Deps(
        redis=make_redis(redis_url, r.timeout_ms if r else 50, r.cluster if r else False),
        upstreams={name: up.base_url for name, up in cfg.upstreams.items()},
    )


def build_chain(cfg: FloodwallConfig, deps: Deps | None = None) -> Chain:
    filters = build_filters(cfg.filters, deps or make_deps(cfg))
    check_route_refs(filters, [r.name for r in cfg.routes])
    return Chain(cfg, filters)


async def serve(
    cfg: FloodwallConfig,
    *,
    index: int,
    runtime_dir: Path,
    redis_url: str | None,
    config_path: Path | None = None,
) -> None:
    deps = make_deps(cfg, redis_url)
    chain = build_chain(cfg, deps)
    tracer = None
    if cfg.tracing is not None:
        from proxy.tracing import Tracer, require_otlp

        require_otlp()
        tc = cfg.tracing
        tracer = Tracer(tc.otlp_endpoint, tc.service_name, tc.sample_ratio)
        tracer.start()
        chain.tracer = tracer
    address = processor_address(cfg, index, runtime_dir)
    if cfg.processor.transport == "uds":
        processor_socket(runtime_dir, index).unlink(missing_ok=True)
    lag = cfg.processor.shed_lag_ms
    guard = LagGuard(lag / 1000) if lag is not None else None
    server = ProcessorServer(chain, address, guard, kind=cfg.processor.server)
    admin = AdminServer(
        cfg.processor.admin_address,
        cfg.processor.admin_port + index,
        lambda: server.ready,
        _admin_routes(chain),
    )

    def swap(new: Chain) -> None:
        server.swap_chain(new)
        admin.routes = _admin_routes(new)

    reloader = Reloader(config_path, cfg, chain, deps, swap) if config_path else None
    await admin.start()
    await server.start()
    log.info("processor %d listening on %s", index, address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: list[asyncio.Task[Any]] = []
    if reloader is not None:
        r = reloader
        loop.add_signal_handler(
            signal.SIGHUP, lambda: background.append(loop.create_task(r.reload("SIGHUP")))
        )
        if cfg.processor.watch_config_s is not None:
            background.append(loop.create_task(r.watch(cfg.processor.watch_config_s)))
    await stop.wait()
    # No reload during the drain: one could swap in a chain after the current one stopped.
    loop.remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for t in background:
        t.cancel()
    await asyncio.gather(*background, return_exceptions=True)  # a reload in flight ends
    log.info("processor %d draining", index)
    # Envoy checks processor health every second: wait two checks before refusing streams.
    # After the drain no stream holds a reloaded-away chain: the reloader's older chains
    # settle and stop what is theirs alone before the current chain (filters carried over
    # from them are in it) stops.
    await server.drain_and_stop(
        cfg.processor.drain_seconds,
        health_wait_s=2.0,
        before_stop=reloader.stop if reloader is not None else None,
    )
    await admin.stop()
    if tracer is not None:
        await tracer.stop()
    if guard is not None:
        await guard.stop()
    if deps.redis is not None:
        await deps.redis.aclose()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_large_buffers(mmap_below: int = 32 << 20, trim_above: int = 64 << 20) -> bool:
    """Serve buffers up to ``mmap_below`` bytes from the heap and keep up to ``trim_above``
    bytes of freed heap, instead of glibc's default of a fresh mmap for each buffer over its
    threshold (128 KiB, rising with use) and returning heap tops eagerly: every body the
    processor reads is copied a few times (HTTP/2 frames, the ext_proc message, the filters),
    and each copy into fresh pages paid a page fault per 4 KiB, slow on virtual machines.
    A 512 KiB KServe gRPC message read for its model added 4.4 ms at p50 over a per-route
    policy, ~1 ms with this (bench/grpc_policies.py). The cost: up to ``trim_above`` of freed
    memory per malloc arena stays with the process after a burst. No-op off glibc (returns
    False)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process' own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_below) and mallopt(_M_TRIM_THRESHOLD, trim_above))


def _admin_routes(chain: Chain) -> dict[str, Any]:
    return {path: h for f in chain.filters for path, h in f.admin_routes().items()}


def run(
    cfg: FloodwallConfig,
    *,
    index: int,
    runtime_dir: Path,
    redis_url: str | None,
    config_path: Path | None = None,
) -> None:
    import gc

    import uvloop

    # Start-up objects (config, protos, modules) never die: keep them out of every collection,
    # and collect young objects less often; full collections were p99 spikes under load.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    if not keep_large_buffers():
        log.info("malloc thresholds left as they are (not glibc)")

    uvloop.run(
        serve(cfg, index=index, runtime_dir=runtime_dir, redis_url=redis_url,
              config_path=config_path)
    )  # fmt: skip
