"""Hot reload of the policy config (the ``filters`` list) in a running processor.

On SIGHUP (or, with ``processor.watch_config_s``, when the file changes) the processor reads
its config file again. The new config is applied only if it is valid and fits the running
Envoy: everything outside ``filters`` unchanged (listener, routes, upstreams... are rendered
into Envoy's bootstrap: changing them needs a restart), no route needing a body phase Envoy
does not send, and no longer holds than Envoy's message timeout allows. Otherwise it is
rejected with a message naming why, and the old chain stays in force.

Applying it swaps the chain atomically for new streams; streams already running finish on the
chain they started with. Filters whose config entry did not change are carried over as they
are (their state, e.g. a breaker's window or admission's limit, survives); changed or new
ones are built and started first, and the ones left out are stopped once no chain that still
has streams uses them. Every attempt is written to the audit log (logger ``floodwall.audit``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from proxy.api import Deps, Filter
from proxy.chain import Chain
from proxy.config import ConfigError, FloodwallConfig, load_config
from proxy.registry import build_filters, check_route_refs

log = logging.getLogger("floodwall.reload")
audit = logging.getLogger("floodwall.audit")

RELOADS = Counter("floodwall_config_reloads", "Config reload attempts by result", ["result"])
GENERATION = Gauge("floodwall_config_generation", "Reloads applied since the process started")

# Streams end by their route's timeout at the latest (HTTP route timeout, gRPC
# max_stream_duration): an old chain's filters are stopped once its streams are gone, or
# this long past the longest route timeout (a warning then: a stream outlived its bound).
_RETIRE_SLACK_S = 60.0


class Reloader:
    def __init__(
        self,
        path: Path,
        cfg: FloodwallConfig,
        chain: Chain,
        deps: Deps,
        on_swap: Callable[[Chain], None],
    ) -> None:
        self.path = path
        self.cfg = cfg
        self.chain = chain
        self.deps = deps
        self.on_swap = on_swap
        # What Envoy was rendered with at start: a reload must fit inside it.
        self._phases = {r.name: chain.phases_for(r) for r in cfg.routes}
        self._hold_ms = chain.max_hold_ms()
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        # Chains swapped out whose streams may still run: their filters stay in use.
        self._old_chains: list[Chain] = []
        self.generation = 0
        self._stamp = _stamp(path)

    async def reload(self, reason: str) -> bool:
        async with self._lock:
            self._stamp = _stamp(self.path)
            try:
                new_cfg = load_config(self.path)
                # For the audit, read before the swap: a failure after it would skip retiring.
                text = self.path.read_bytes()
                self._check(new_cfg)
                chain, fresh = await self._build(new_cfg)
            except Exception as e:
                # Not only ConfigError: a filter's constructor may raise anything, and an
                # exception escaping here would end the file watch for good.
                error = str(e) if isinstance(e, ConfigError | ValueError) else repr(e)
                RELOADS.labels("rejected").inc()
                log.error(
                    "config reload rejected (%s); the running config stays: %s", reason, error
                )
                audit.warning("config_reload rejected", extra={"reason": reason, "error": error})
                return False
            old, self.chain, self.cfg = self.chain, chain, new_cfg
            self.on_swap(chain)
            self.generation += 1
            GENERATION.set(self.generation)
            RELOADS.labels("applied").inc()
            digest = hashlib.sha256(text).hexdigest()[:16]
            audit.info(
                "config_reload applied",
                extra={
                    "reason": reason,
                    "generation": self.generation,
                    "digest": digest,
                    "rebuilt": [f.name for f in fresh],
                },
            )
            self._old_chains.append(old)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return True

    def _check(self, new: FloodwallConfig) -> None:
        changed = [
            k
            for k in FloodwallConfig.model_fields
            if k != "filters" and getattr(new, k) != getattr(self.cfg, k)
        ]
        if changed:
            raise ConfigError(
                f"only `filters` reload; {', '.join(changed)} changed: restart to apply that"
            )

    async def _build(self, new_cfg: FloodwallConfig) -> tuple[Chain, list[Filter]]:
        old = {fc.name: (fc, f) for fc, f in zip(self.cfg.filters, self.chain.filters, strict=True)}
        filters: list[Filter] = []
        fresh: list[Filter] = []
        for fc in new_cfg.filters:
            prev = old.get(fc.name)
            # A filter is built from its type and params alone (its routes and on_error are
            # the chain's business): while those stay, it is carried over with its state (an
            # open breaker, a learned limit, a rate limiter's local state).
            if prev is not None and (prev[0].type, prev[0].params) == (fc.type, fc.params):
                filters.append(prev[1])
            else:
                (f,) = build_filters([fc], self.deps, index=len(filters))
                filters.append(f)
                fresh.append(f)
        check_route_refs(filters, [r.name for r in new_cfg.routes])
        chain = Chain(new_cfg, filters)
        chain.tracer = self.chain.tracer
        for route in new_cfg.routes:
            extra = chain.phases_for(route) - self._phases[route.name]
            if extra:
                names = ", ".join(sorted(p.value for p in extra))
                raise ConfigError(
                    f"route {route.name} would need {names}, which Envoy was "
                    "started without: restart to apply that"
                )
        if chain.max_hold_ms() > self._hold_ms:
            raise ConfigError(
                f"filters would hold a phase {chain.max_hold_ms()} ms, longer than "
                f"Envoy's message timeout allows ({self._hold_ms} ms): restart"
            )
        started: list[Filter] = []
        try:
            for f in fresh:
                await f.start()
                started.append(f)
        except Exception as e:
            for f in started:
                await f.stop()
            raise ConfigError(f"filter {f.name} failed to start: {e!r}") from None
        return chain, fresh

    async def _retire(self, old: Chain) -> None:
        """Once no stream uses the old chain, stops its filters that no chain in use has:
        neither the current one nor an older one still running streams (a filter carried
        over A -> B and dropped by C is still A's while A has streams)."""
        longest_s = max((r.timeout_ms for r in old.config.routes), default=0) / 1000
        deadline = asyncio.get_running_loop().time() + longest_s + _RETIRE_SLACK_S
        # Polled: streams end in the server's loop, which has no reason to signal this.
        while old.streams and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if old.streams:
            log.warning("%d stream(s) on a reloaded-away chain outlived the longest route "
                        "timeout; its filters stop anyway", old.streams)  # fmt: skip
        await old.wait_background()
        self._old_chains.remove(old)
        # Decided now, without an await before it: later reloads may have changed the chain.
        in_use = {id(f) for c in (self.chain, *self._old_chains) for f in c.filters}
        for f in [f for f in old.filters if id(f) not in in_use]:
            try:
                await f.stop()
            except Exception as e:
                log.error("filter %s stop failed after reload: %r", f.name, e)

    async def watch(self, interval_s: float) -> None:
        """Reloads when the file's modification time or size changes."""
        while True:
            await asyncio.sleep(interval_s)
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                self._stamp = stamp
                await self.reload("file changed")

    async def stop(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def _stamp(path: Path) -> tuple[int, int, int]:
    # Through symlinks: a swapped ConfigMap is a new file (inode), whatever its time and size.
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
