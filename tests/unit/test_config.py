from __future__ import annotations

from pathlib import Path

import pytest

from proxy.api import Deps
from proxy.config import DEFAULT_CONFIG, ConfigError, load_config, parse_config
from proxy.process import make_deps
from proxy.registry import build_filters

BASE = {
    "upstreams": {"up": {"endpoints": [{"address": "127.0.0.1", "port": 8000}]}},
    "routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "up"}],
}


def test_shipped_local_config_loads() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.listener.address == "127.0.0.1" and cfg.listener.port == 8080
    assert cfg.triton is not None and cfg.triton.model_repository.is_dir()
    assert [f.type for f in cfg.filters][:1] == ["auth"]
    build_filters(cfg.filters, make_deps(cfg))


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"listener": {"port": 70000}}, "listener.port"),
        ({"listener": {"prot": 1}}, "listener.prot"),
        ({"processor": {"transport": "carrier-pigeon"}}, "processor.transport"),
        ({"routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "nope"}]}, "nope"),
        ({"routes": [{"name": "r", "match": {}, "upstream": "up"}]}, "exactly one"),
        (
            {"routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "up"}] * 2},
            "duplicate",
        ),
        ({"filters": [{"name": "a", "type": "auth", "routes": ["zzz"]}]}, "zzz"),
        ({"upstreams": {"up": {"endpoints": []}}}, "upstreams.up.endpoints"),
        (
            {"upstreams": {"up": {"lb_policy": "ring_hash",
                                  "endpoints": [{"address": "a", "port": 1}]}}},
            "hash_header",
        ),
    ],
)  # fmt: skip
def test_bad_config_names_the_field(patch: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, **patch}, "test.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("test.yaml")


def test_unknown_filter_type_and_bad_params_name_the_filter() -> None:
    cfg = parse_config({**BASE, "filters": [{"name": "f1", "type": "nope"}]})
    with pytest.raises(ConfigError, match=r"filters\[0\] \(f1\): unknown type 'nope'"):
        build_filters(cfg.filters, Deps())
    cfg = parse_config({**BASE, "filters": [{"name": "a", "type": "auth", "params": {"keys": [
        {"id": "x", "sha256": "not-hex", "tenant": "t"}]}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"filters\[0\] \(a\): params.keys\[0\].sha256"):
        build_filters(cfg.filters, Deps())
    cfg = parse_config({**BASE, "filters": [{"name": "a", "type": "auth", "params": {"kyes": 1}}]})
    with pytest.raises(ConfigError, match="kyes"):
        build_filters(cfg.filters, Deps())


def test_env_expansion_and_missing_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("listener: {port: ${FW_PORT:-8181}}\n")
    assert load_config(p).listener.port == 8181
    monkeypatch.setenv("FW_PORT", "8282")
    assert load_config(p).listener.port == 8282
    p.write_text("listener: {port: ${FW_NOPE}}\n")
    with pytest.raises(ConfigError, match="FW_NOPE"):
        load_config(p)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("listener: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_third_party_filter_registers_through_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata as md
    import sys
    import types

    from proxy import registry
    from proxy.api import Filter

    mod = types.ModuleType("fw_thirdparty")

    class Hello(Filter):
        pass

    mod.Hello = Hello  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fw_thirdparty", mod)
    ep = md.EntryPoint(name="hello", value="fw_thirdparty:Hello", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    cfg = parse_config({**BASE, "filters": [{"name": "hi", "type": "hello"}]})
    (f,) = build_filters(cfg.filters, Deps())
    assert isinstance(f, Hello) and f.name == "hi"
