"""Hot reload of the policy config: what is applied, what is rejected (and that the running
chain then stays), filters carried over with their state, dropped ones stopped only after the
streams on the old chain ended."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.api import Deps, Phase
from proxy.chain import Chain
from proxy.config import load_config
from proxy.process import build_chain
from proxy.reload import Reloader


def _key(k: str, i: str) -> dict[str, str]:
    return {"id": i, "sha256": hashlib.sha256(k.encode()).hexdigest(), "tenant": i}


def _cfg(keys: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": 1}]}},
        "routes": [
            {"name": "kserve_http", "match": {"prefix": "/v2"}, "upstream": "up"},
            {
                "name": "embeddings",
                "match": {"path": "/v1/embeddings"},
                "api": "openai_embeddings",
                "upstream": "up",
            },
        ],
        "filters": [
            {"name": "auth", "type": "auth", "params": {"keys": keys}},
            {
                "name": "openai",
                "type": "openai",
                "routes": ["embeddings"],
                "params": {"embedding_models": {"m": {"triton_model": "m"}}},
            },
            {"name": "breaker", "type": "breaker", "params": {"models": ["m"]}},
        ],
    }
    cfg.update(extra)
    return cfg


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "fw.yaml"
        self.write(_cfg([_key("k1", "one")]))
        self.cfg = load_config(self.path)
        self.chain = build_chain(self.cfg, Deps())
        self.swapped: list[Chain] = []
        self.reloader = Reloader(self.path, self.cfg, self.chain, Deps(), self.swapped.append)

    def write(self, cfg: dict[str, Any] | str) -> None:
        self.path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))


async def test_applied_keeps_unchanged_filters_and_their_state(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    old = s.chain
    s.write(_cfg([_key("k1", "one"), _key("k2", "two")]))
    assert await s.reloader.reload("test")
    (new,) = s.swapped
    assert s.reloader.chain is new and s.reloader.generation == 1
    assert new.filters[0] is not old.filters[0]  # auth changed: rebuilt
    assert new.filters[1:] == old.filters[1:]  # openai and breaker: the same instances
    await s.reloader.stop()


async def test_a_filter_whose_routes_or_on_error_changed_keeps_its_state(tmp_path: Path) -> None:
    """Routes and on_error are the chain's: an open breaker must not close because its
    on_error was flipped."""
    s = Setup(tmp_path)
    breaker = s.chain.filters[2]
    cfg = _cfg([_key("k1", "one")])
    cfg["filters"][2].update(on_error="open", routes=["embeddings"])
    s.write(cfg)
    assert await s.reloader.reload("test")
    (new,) = s.swapped
    assert new.filters[2] is breaker
    bound = {b.filter.name: b.on_error for b in new.plan(new.config.routes[1]).complete}
    assert bound["breaker"] == "open"  # the new on_error applies all the same
    await s.reloader.stop()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("filters: [", "not valid YAML"),
        (_cfg([{"id": "x", "sha256": "nothex", "tenant": "x"}]), "sha256"),
        (_cfg([_key("k1", "one")], listener={"port": 9999}), "listener changed"),
        (
            {
                **_cfg([_key("k1", "one")]),
                "filters": [
                    {"name": "auth", "type": "auth", "params": {"keys": [_key("k1", "one")]}},
                    {"name": "jobs", "type": "jobs"},  # reads bodies, on every route
                ],
            },
            "kserve_http would need request_body",
        ),
        (
            {
                **_cfg([_key("k1", "one")]),
                "filters": [
                    {"name": "auth", "type": "auth", "params": {"keys": [_key("k1", "one")]}},
                    {"name": "slow", "type": "admission", "params": {"max_queue_ms": 5000}},
                ],
            },
            "message timeout",
        ),
        (
            {
                **_cfg([_key("k1", "one")]),
                "filters": [
                    {"name": "auth", "type": "auth", "params": {"keys": [_key("k1", "one")]}},
                    {"name": "cache", "type": "cache", "params": {"routes": {"embedding": {}}}},
                ],
            },
            "unknown route",
        ),
    ],
)
async def test_rejected_and_the_running_chain_stays(
    tmp_path: Path, change: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path)
    s.write(change)
    assert not await s.reloader.reload("test")
    assert s.swapped == [] and s.reloader.chain is s.chain
    assert why in caplog.text
    # ... and a good config afterwards still applies.
    s.write(_cfg([_key("k1", "one"), _key("k2", "two")]))
    assert await s.reloader.reload("test")


async def test_dropped_filters_stop_after_the_old_streams(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    breaker = s.chain.filters[2]
    stopped: list[str] = []

    async def stop() -> None:
        stopped.append("breaker")

    breaker.stop = stop  # type: ignore[method-assign]
    s.chain.streams = 1  # a request still running on the old chain
    cfg = _cfg([_key("k1", "one")])
    cfg["filters"] = cfg["filters"][:2]
    s.write(cfg)
    assert await s.reloader.reload("test")
    await asyncio.sleep(0.2)
    assert stopped == []
    s.chain.streams = 0
    await s.reloader.stop()
    assert stopped == ["breaker"]
    route = s.reloader.cfg.routes[1]
    assert Phase.REQUEST_BODY in s.reloader.chain.phases_for(route)


async def test_watch_reloads_on_file_change(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    task = asyncio.create_task(s.reloader.watch(0.05))
    try:
        s.write(_cfg([_key("k1", "one"), _key("k3", "three")]))
        for _ in range(100):
            if s.swapped:
                break
            await asyncio.sleep(0.02)
        assert s.swapped
    finally:
        task.cancel()
        await s.reloader.stop()


async def test_filter_carried_over_then_dropped_stops_after_every_chain_using_it(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    first = s.chain
    breaker = first.filters[2]
    stopped: list[str] = []

    async def stop() -> None:
        stopped.append("breaker")

    breaker.stop = stop  # type: ignore[method-assign]
    first.streams = 1  # a long request (SSE) still running on the first chain
    s.write(_cfg([_key("k1", "one"), _key("k2", "two")]))  # breaker carried over
    assert await s.reloader.reload("one")
    assert s.reloader.chain.filters[2] is breaker
    cfg = _cfg([_key("k1", "one"), _key("k2", "two")])
    cfg["filters"] = cfg["filters"][:2]  # breaker dropped; the second chain has no stream
    s.write(cfg)
    assert await s.reloader.reload("two")
    await asyncio.sleep(0.2)
    assert stopped == []  # the first chain still runs a stream with it
    first.streams = 0
    await s.reloader.stop()
    assert stopped == ["breaker"]


async def test_a_filter_constructor_raising_is_a_rejected_reload_and_the_watch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from filters.auth.filter import AuthFilter

    s = Setup(tmp_path)

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(AuthFilter, "__init__", broken)
    task = asyncio.create_task(s.reloader.watch(0.02))
    try:
        s.write(_cfg([_key("k1", "one"), _key("k2", "two")]))  # auth changed: rebuilt
        for _ in range(100):
            if "rejected" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "filters[0] (auth): cannot build: RuntimeError: boom" in caplog.text
        assert s.swapped == [] and not task.done()
        monkeypatch.undo()
        s.write(_cfg([_key("k1", "one"), _key("k3", "three")]))
        for _ in range(100):
            if s.swapped:
                break
            await asyncio.sleep(0.02)
        assert s.swapped  # the watch still runs
    finally:
        task.cancel()
        await s.reloader.stop()


async def test_shutdown_after_a_reload_settles_the_old_chain_before_stopping(
    tmp_path: Path,
) -> None:
    """A filter carried over by a reload is the current chain's too: the drain must not stop
    it while a settlement of a request that ran on the old chain still has to use it."""
    from proxy.server import ProcessorServer

    s = Setup(tmp_path)
    old = s.chain
    breaker = old.filters[2]
    events: list[str] = []

    async def stop() -> None:
        events.append("breaker stopped")

    breaker.stop = stop  # type: ignore[method-assign]
    server = ProcessorServer(old, f"unix:{tmp_path / 'p.sock'}", kind="h2")
    await server.start()
    s.write(_cfg([_key("k1", "one"), _key("k2", "two")]))  # breaker carried over
    reloader = Reloader(s.path, s.cfg, old, Deps(), server.swap_chain)
    assert await reloader.reload("test")
    assert server.chain.filters[2] is breaker

    async def settlement() -> None:  # an on_complete of a request that ran on the old chain
        await asyncio.sleep(0.2)
        events.append("old settlement")

    task = asyncio.ensure_future(settlement())
    old._background.add(task)
    task.add_done_callback(old._background.discard)
    await server.drain_and_stop(0.0, 0.0, before_stop=reloader.stop)
    assert events == ["old settlement", "breaker stopped"]


async def test_watch_follows_a_kubernetes_configmap_update(tmp_path: Path) -> None:
    # A ConfigMap volume: floodwall.yaml -> ..data/floodwall.yaml, ..data -> ..<timestamp>;
    # an update writes a new timestamped directory, swaps ..data and deletes the old one.
    # The processor watched the resolved path, which the first update deleted.
    import os
    import shutil

    from proxy.cli import watched_path

    def publish(name: str, cfg: dict[str, Any]) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "floodwall.yaml").write_text(yaml.safe_dump(cfg))
        (tmp_path / "..data_tmp").symlink_to(name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # atomic, as kubelet does

    publish("..v1", _cfg([_key("k1", "one")]))
    link = tmp_path / "floodwall.yaml"
    link.symlink_to("..data/floodwall.yaml")
    path = watched_path(link)
    cfg = load_config(path)
    swapped: list[Chain] = []
    reloader = Reloader(path, cfg, build_chain(cfg, Deps()), Deps(), swapped.append)
    task = asyncio.create_task(reloader.watch(0.05))
    try:
        for n, version in enumerate(("..v2", "..v3"), start=1):
            old = os.readlink(tmp_path / "..data")
            publish(version, _cfg([_key("k1", "one"), _key(f"k{n + 1}", version[2:])]))
            shutil.rmtree(tmp_path / old)
            for _ in range(100):
                if len(swapped) == n:
                    break
                await asyncio.sleep(0.02)
            assert len(swapped) == n, f"update {n} not applied"
    finally:
        task.cancel()
        await reloader.stop()
