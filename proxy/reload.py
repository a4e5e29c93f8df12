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
ones are built and started first, and the ones left out are stopped once the old chain has no
stream left. Every attempt is written to the audit log (logger ``floodwall.audit``).
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
from proxy.registry import build_filters

log = logging.getLogger("floodwall.reload")
audit = logging.getLogger("floodwall.audit")

RELOADS = Counter("floodwall_config_reloads", "Config reload attempts by result", ["result"])
GENERATION = Gauge("floodwall_config_generation", "Reloads applied since the process started")

_RETIRE_WAIT_S = 300.0


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
        self.generation = 0
        self._stamp = _stamp(path)

    async def reload(self, reason: str) -> bool:
        async with self._lock:
            self._stamp = _stamp(self.path)
            try:
                new_cfg = load_config(self.path)
                self._check(new_cfg)
                chain, fresh, kept = await self._build(new_cfg)
            except (ConfigError, ValueError) as e:
                RELOADS.labels("rejected").inc()
                log.error("config reload rejected (%s); the running config stays: %s", reason, e)
                audit.warning("config_reload rejected", extra={"reason": reason, "error": str(e)})
                return False
            old, self.chain, self.cfg = self.chain, chain, new_cfg
            self.on_swap(chain)
            self.generation += 1
            GENERATION.set(self.generation)
            RELOADS.labels("applied").inc()
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
            audit.info(
                "config_reload applied",
                extra={
                    "reason": reason,
                    "generation": self.generation,
                    "digest": digest,
                    "rebuilt": [f.name for f in fresh],
                },
            )
            task = asyncio.get_running_loop().create_task(self._retire(old, kept))
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

    async def _build(self, new_cfg: FloodwallConfig) -> tuple[Chain, list[Filter], set[int]]:
        old = {fc.name: (fc, f) for fc, f in zip(self.cfg.filters, self.chain.filters, strict=True)}
        filters: list[Filter] = []
        fresh: list[Filter] = []
        for fc in new_cfg.filters:
            prev = old.get(fc.name)
            if prev is not None and prev[0] == fc:
                filters.append(prev[1])  # unchanged: carried over with its state
            else:
                (f,) = build_filters([fc], self.deps)
                filters.append(f)
                fresh.append(f)
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
        return chain, fresh, {id(f) for f in filters}

    async def _retire(self, old: Chain, kept: set[int]) -> None:
        """Stops the filters the new chain dropped, once no stream uses the old chain."""
        deadline = asyncio.get_running_loop().time() + _RETIRE_WAIT_S
        # Polled: streams end in the server's loop, which has no reason to signal this.
        while old.streams and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await old.wait_background()
        for f in old.filters:
            if id(f) not in kept:
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


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)
