from __future__ import annotations

from pathlib import Path

import pytest

from proxy.api import Deps
from proxy.config import DEFAULT_CONFIG, ConfigError, load_config, parse_config
from proxy.process import build_chain, make_deps
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
    # Every error of a filter's params says where (the second had lost its "params."), and
    # a key typed as anything at all stays on the one line the error is printed as.
    key = {"id": "x", "sha256": "0" * 64, "tenant": "t"}
    cfg = parse_config({**BASE, "filters": [{"name": "a", "type": "auth", "params": {
        "keys": [key], "a\nb": 1, "c": 2}}]})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        build_filters(cfg.filters, Deps())
    assert str(e.value) == (
        "filters[0] (a): params.'a\\nb': Extra inputs are not permitted; "
        "params.c: Extra inputs are not permitted"
    )


def test_a_filter_refusing_its_params_at_construction_is_a_config_error() -> None:
    # Checks a filter makes while it is built (its params against the config's upstreams,
    # two keys with one digest) name the filter, as its params' own errors do.
    cache = {
        "name": "c",
        "type": "cache",
        "params": {
            "routes": {"r": {"ttl_s": 60, "semantic": True}},
            "semantic": {"upstream": "nope"},
        },
    }
    cfg = parse_config({**BASE, "filters": [cache]})
    with pytest.raises(ConfigError, match=r"filters\[0\] \(c\): .*'nope' is not an upstream"):
        build_filters(cfg.filters, Deps(upstreams={"up": "http://127.0.0.1:8000"}))
    key = {"id": "a", "sha256": "0" * 64, "tenant": "t"}
    cfg = parse_config({**BASE, "filters": [{"name": "a", "type": "auth", "params": {
        "keys": [key, {**key, "id": "b"}]}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"filters\[0\] \(a\): two keys share one digest"):
        build_filters(cfg.filters, Deps())


def test_a_filter_constructor_bug_names_the_filter() -> None:
    from proxy.api import Filter

    class Broken(Filter):
        def __init__(self, params: object, deps: Deps) -> None:
            raise KeyError("boom")

    cfg = parse_config({**BASE, "filters": [{"name": "b", "type": "broken"}]})
    with pytest.raises(ConfigError, match=r"filters\[0\] \(b\): cannot build: KeyError"):
        build_filters(cfg.filters, Deps(), extra={"broken": Broken})


@pytest.mark.parametrize("value", [None, True, [], {}, float("inf"), "1y"])
def test_a_duration_that_is_not_one_is_refused_naming_the_field(value: object) -> None:
    # A boolean was 1 second and null a traceback; infinity failed at the first request.
    cfg = parse_config({**BASE, "filters": [{"name": "j", "type": "jobs", "params": {
        "result_ttl_s": value}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"filters\[0\] \(j\): params.result_ttl_s"):
        build_filters(cfg.filters, Deps())


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_no_number_in_the_config_is_infinite_or_nan(value: float) -> None:
    # Infinity in max_queue_ms was accepted, then crashed rendering Envoy's bootstrap.
    cfg = parse_config({**BASE, "filters": [{"name": "a", "type": "admission", "params": {
        "max_queue_ms": value}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"params\.max_queue_ms"):
        build_filters(cfg.filters, Deps())
    with pytest.raises(ConfigError, match=r"processor\.shed_lag_ms"):
        parse_config({**BASE, "processor": {"shed_lag_ms": value}})


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


def test_a_filter_class_the_chain_cannot_use_is_refused_at_start() -> None:
    from pydantic import BaseModel

    from proxy.api import CONTINUE, Decision, Filter, Headers, RequestContext

    class SyncHook(Filter):
        def on_request_headers(self, ctx: RequestContext, headers: Headers) -> Decision:  # type: ignore[override]
            return CONTINUE

    class LooseParams(Filter):
        class Params(BaseModel):  # ignores unknown keys: a misspelt param would pass unseen
            open_hour: int = 9

    for cls, needle in [
        (SyncHook, r"SyncHook.on_request_headers must be an `async def`"),
        (LooseParams, r"LooseParams.Params must subclass proxy.api.FilterParams"),
    ]:
        cfg = parse_config({**BASE, "filters": [{"name": "x", "type": "t"}]})
        with pytest.raises(ConfigError, match=r"filters\[0\] \(x\): type 't': " + needle):
            build_filters(cfg.filters, Deps(), extra={"t": cls})


def test_an_unknown_route_in_a_filters_params_names_the_filter_as_params_errors_do() -> None:
    cfg = parse_config({**BASE, "filters": [
        {"name": "b", "type": "breaker"},
        {"name": "c", "type": "cache", "params": {"routes": {"rr": {"ttl_s": 60}}}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"filters\[1\] \(c\): params name unknown route"):
        build_chain(cfg)


def _routes(*routes: dict[str, object]) -> dict[str, object]:
    """A config with an http1 upstream and a grpc one (for kserve_grpc routes) and ``routes``."""
    return {
        "upstreams": {
            "up": {"endpoints": [{"address": "127.0.0.1", "port": 8000}]},
            "g": {"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": 8001}]},
        },
        "routes": [{"upstream": "g" if r.get("api") == "kserve_grpc" else "up", **r}
                   for r in routes],
    }  # fmt: skip


GRPC_ROUTE = {"name": "kgrpc", "match": {"prefix": "/inference.GRPCInferenceService/"},
              "api": "kserve_grpc"}  # fmt: skip


@pytest.mark.parametrize(
    ("content_type", "route", "grpc"),
    [
        ("application/grpc", "kgrpc", True),
        ("application/grpc+proto", "kgrpc", True),
        # Envoy's `grpc: {}` match takes neither: it goes on to the next route, so must we.
        ("application/json", "other", False),
        ("application/grpc-web", "other", False),
        ("", "other", False),
    ],
)
def test_processor_chooses_the_route_envoy_chooses(
    content_type: str, route: str, grpc: bool
) -> None:
    # A non-gRPC request on a gRPC route's path reaches `other` in Envoy: run on the gRPC
    # route here, it skipped `other`'s filters (auth: a bypass).
    cfg = parse_config(_routes(GRPC_ROUTE, {"name": "other", "match": {"prefix": "/"}}))
    chain = build_chain(cfg, Deps())
    headers = {":path": "/inference.GRPCInferenceService/ModelInfer", ":method": "POST"}
    ctx, plan = chain.context({**headers, "content-type": content_type})
    assert (ctx.route_name, ctx.grpc) == (route, grpc)
    assert plan.route is not None and plan.route.name == route
    assert cfg.route_for("/inference.GRPCInferenceService/ModelInfer?x", grpc=grpc) is plan.route


@pytest.mark.parametrize(
    ("routes", "needle"),
    [
        (  # the same match twice
            [{"name": "a", "match": {"path": "/v1/x"}}, {"name": "b", "match": {"path": "/v1/x"}}],
            "routes[1] (b) is never chosen: routes[0] (a) has the same match",
        ),
        (  # a catch-all first
            [{"name": "all", "match": {"prefix": "/"}}, {"name": "x", "match": {"path": "/v1/x"}}],
            "routes[1] (x) is never chosen: routes[0] (all) has a match covering it",
        ),
        (
            [{"name": "v2", "match": {"prefix": "/v2"}},
             {"name": "models", "match": {"prefix": "/v2/models"}}],
            "routes[1] (models) is never chosen: routes[0] (v2)",
        ),
        (  # a route without `grpc: {}` matches gRPC requests too
            [{"name": "all", "match": {"prefix": "/"}}, GRPC_ROUTE],
            "routes[1] (kgrpc) is never chosen: routes[0] (all)",
        ),
        ([{"name": "x", "match": {"path": "v1/x"}}], "routes[0].match.path: Value error, 'v1/x'"),
        ([{"name": "x", "match": {"path": ""}}], "routes[0].match.path"),
        ([{"name": "x", "match": {"prefix": "v2"}}], "routes[0].match.prefix"),
        ([{"name": "x", "match": {"path": "/v1/x?y=1"}}], "can match no request"),
        ([{"name": "x", "match": {"prefix": "/v1#x"}}], "can match no request"),
    ],
)  # fmt: skip
def test_unreachable_routes_are_refused(routes: list[dict[str, object]], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_routes(*routes), "test.yaml")
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "routes",
    [
        # the narrower route first: both are reachable
        [{"name": "x", "match": {"path": "/v2/x"}}, {"name": "v2", "match": {"prefix": "/v2"}}],
        # /v2x is not under the path /v2
        [{"name": "v2", "match": {"path": "/v2"}}, {"name": "x", "match": {"prefix": "/v2x"}}],
        # a gRPC route leaves non-gRPC requests on its path to the routes after it
        [GRPC_ROUTE, {"name": "all", "match": {"prefix": "/"}}],
        [GRPC_ROUTE, {"name": "json", "match": {"prefix": "/inference.GRPCInferenceService/"}}],
    ],
)  # fmt: skip
def test_routes_that_can_each_be_chosen_load(routes: list[dict[str, object]]) -> None:
    parse_config(_routes(*routes))


def _ports(**patch: dict[str, object]) -> dict[str, object]:
    ports: dict[str, dict[str, object]] = {
        "listener": {"port": 8080}, "admin": {"port": 9901},
        "processor": {"port": 9100, "admin_port": 9090},
    }  # fmt: skip
    for key, value in patch.items():
        ports[key] = {**ports.get(key, {}), **value}
    return {**BASE, **ports}


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"admin": {"port": 8080}}, "admin.port and listener.port are both 127.0.0.1:8080"),
        ({"processor": {"transport": "tcp", "port": 9090}},
         "processor.port and processor.admin_port are both 127.0.0.1:9090"),
        ({"processor": {"transport": "tcp", "processes": 3, "port": 9092}},
         "processor.admin_port + 2 and processor.port are both 127.0.0.1:9092"),
        ({"processor": {"processes": 2, "admin_port": 8079}},
         "processor.admin_port + 1 and listener.port are both 127.0.0.1:8080"),
        ({"processor": {"transport": "tcp", "processes": 2, "port": 65535}},
         "processor.port + 1 is 65536, past 65535"),
        ({"processor": {"processes": 3, "admin_port": 65534}},
         "processor.admin_port + 2 is 65536, past 65535"),
        ({"triton": {"http_port": 8000, "grpc_port": 8001, "metrics_port": 9901}},
         "triton.metrics_port and admin.port are both 127.0.0.1:9901"),
        ({"listener": {"address": "0.0.0.0", "port": 9901}},
         "admin.port and listener.port are both port 9901 (0.0.0.0 and 127.0.0.1)"),
    ],
)  # fmt: skip
def test_ports_that_clash_are_refused(patch: dict[str, dict[str, object]], needle: str) -> None:
    # Each passed before, then a child of `floodwall up` died binding its port.
    with pytest.raises(ConfigError) as e:
        parse_config(_ports(**patch), "test.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "patch",
    [
        {"admin": {"address": "127.0.0.2", "port": 8080}},  # another address
        {"processor": {"transport": "uds", "port": 9090}},  # unix sockets: port unused
        {"triton": {"enabled": False, "http_port": 8080}},  # not started
        {"processor": {"transport": "tcp", "processes": 10}},  # 9090..9099, 9100..9109
    ],
)
def test_ports_apart_load(patch: dict[str, dict[str, object]]) -> None:
    parse_config(_ports(**patch))


def test_methods_are_upper_cased_and_checked() -> None:
    route = {"name": "r", "match": {"prefix": "/"}, "methods": ["post", "Get"]}
    cfg = parse_config(_routes(route))
    assert cfg.routes[0].methods == ["POST", "GET"]  # `post` refused every POST with 405
    for methods, needle in ((["PSOT"], "unknown HTTP method(s) ['PSOT']"), ([], "at least 1")):
        with pytest.raises(ConfigError) as e:
            parse_config(_routes({**route, "methods": methods}), "test.yaml")
        assert "routes[0].methods" in str(e.value) and needle in str(e.value)


def test_retry_conditions_are_envoys() -> None:
    def retry_on(value: str) -> str:
        route = {"name": "r", "match": {"prefix": "/"}, "retries": {"retry_on": value}}
        retries = parse_config(_routes(route), "test.yaml").routes[0].retries
        assert retries is not None
        return retries.retry_on

    # Envoy skips names it does not know: with a typo the route never retried.
    for value, bad in (
        ("connect_failure", "'connect_failure'"),
        ("5xx,,reset", "''"),
        ("", "''"),
        ("retriable-status-codes", "'retriable-status-codes'"),
    ):
        with pytest.raises(ConfigError) as e:
            retry_on(value)
        assert (
            f"routes[0].retries.retry_on: Value error, unknown retry condition(s) [{bad}]"
            in str(e.value)
        )
    assert retry_on("5xx, reset,unavailable") == "5xx,reset,unavailable"


def test_trace_attribute_of_the_model_is_bounded() -> None:
    from proxy.tracing import Tracer

    cfg = parse_config(_routes({"name": "k", "match": {"prefix": "/v2"}}))
    chain = build_chain(cfg, Deps())
    chain.tracer = Tracer("127.0.0.1:1", "t")
    model = "m" * 20000  # the path segment is the client's, the request refused or not
    ctx, plan = chain.context({":method": "POST", ":path": f"/v2/models/{model}/infer"})
    assert ctx.model == model  # filters still see the whole name
    chain.finish(ctx, plan, "auth", 401, True)
    (span,) = chain.tracer._queue
    assert span.attrs["gen_ai.request.model"] == "m" * 128


def test_admin_apis_is_for_kserve_routes_only() -> None:
    route = {"name": "r", "match": {"prefix": "/"}, "admin_apis": True}
    assert parse_config(_routes({**route, "api": "kserve_grpc"})).routes[0].admin_apis
    with pytest.raises(ConfigError) as e:
        parse_config(_routes({**route, "api": "openai_chat"}), "test.yaml")
    assert "admin_apis applies to KServe routes only" in str(e.value)
