"""KServe gRPC calls on routes whose filters read bodies: the chain reads each unary call's
model from its protobuf message as Triton does, so per-model rate limits, admission and
breakers apply to gRPC; streams are refused there; bad messages are refused before any
filter runs."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import pytest
from tritonclient.grpc import service_pb2 as kserve

from filters.admission.filter import AdmissionFilter
from filters.breaker.filter import BreakerFilter
from filters.rate_limit.filter import RateLimitFilter
from proxy.api import Deps, Filter, NoParams, Phase
from proxy.kserve_grpc import SERVICE, GrpcCall, call_model
from proxy.testing import FakeClock, Harness, UpstreamReply
from tests.unit.test_chain import grpc_config

INFER = SERVICE + "ModelInfer"
STREAM = SERVICE + "ModelStreamInfer"
LIMIT = 1 << 20


def frame(message: bytes, *, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(message).to_bytes(4, "big") + message


def infer(model: str, payload: bytes = b"\x05\x00\x00\x00hello") -> bytes:
    r = kserve.ModelInferRequest(model_name=model)
    t = r.inputs.add(name="TEXT", datatype="BYTES")
    t.shape.extend([1, 1])
    r.raw_input_contents.append(payload)
    return r.SerializeToString()


def field1(value: bytes) -> bytes:
    """Field 1 as a length-delimited value (what model_name is)."""
    return b"\x0a" + bytes([len(value)]) + value


def model_of(body: bytes, path: str = INFER, encoding: str | None = None) -> Any:
    return call_model(GrpcCall(encoding=encoding), path, body, LIMIT)


def refused(result: Any) -> tuple[int, int | None, str]:
    assert not isinstance(result, str | None), result
    return result.status, result.grpc_status, result.headers["x-floodwall-error"]


def test_the_model_is_the_one_triton_would_run() -> None:
    assert model_of(frame(infer("embedder"))) == "embedder"
    # The last model_name wins (protobuf's rule for a repeated singular field): a caller
    # naming a permitted model first and another one last is counted for the last.
    assert model_of(frame(field1(b"cheap") + infer("embedder"))) == "embedder"
    # A field 1 of another wire type (varint here) is an unknown field to Triton's parser,
    # not the model: Envoy's grpc_field_extraction read it as the model.
    assert model_of(frame(b"\x08\x05" + infer("embedder"))) == "embedder"
    assert model_of(frame(infer("embedder") + b"\x08\x05")) == "embedder"
    # Each model method names its model in field 1; server-wide calls name none.
    assert model_of(frame(field1(b"m")), SERVICE + "ModelMetadata") == "m"
    assert model_of(frame(field1(b"m")), SERVICE + "ModelReady") == "m"
    assert model_of(frame(b""), SERVICE + "ModelStatistics") is None  # all models
    assert model_of(frame(b""), SERVICE + "ServerLive") is None
    assert model_of(frame(infer(""))) is None  # Triton refuses it (no such model)


def test_messages_triton_could_not_parse_are_refused() -> None:
    good = frame(infer("embedder"))
    cases = {
        "empty": b"",
        "no frame": b"\x00\x00\x00",
        "cut short": good[:-1],
        "two messages": good + good,
        "bad flag": b"\x02" + good[1:],
        "not protobuf": frame(b"\xff\xff\xff"),
        "invalid UTF-8 name": frame(field1(b"\xff\xfe")),
        "a field cut short": frame(b"\x0a\x10abc"),
    }
    for name, body in cases.items():
        assert refused(model_of(body)) == (400, 3, "invalid_request_error"), name


def test_compressed_messages_are_read_after_inflating_them() -> None:
    message = infer("embedder")
    assert model_of(frame(gzip.compress(message), compressed=True), encoding="gzip") == "embedder"
    deflated = zlib.compress(message)  # gRPC's "deflate" is the zlib format
    assert model_of(frame(deflated, compressed=True), encoding="deflate") == "embedder"
    # Flagged compressed without an encoding; garbage; trailing bytes after the stream.
    assert refused(model_of(frame(deflated, compressed=True)))[0] == 400
    assert refused(model_of(frame(b"junk", compressed=True), encoding="gzip"))[0] == 400
    trailing = frame(gzip.compress(message) + b"x", compressed=True)
    assert refused(model_of(trailing, encoding="gzip"))[0] == 400
    # An encoding Triton does not serve: UNIMPLEMENTED with the accepted ones, as gRPC says.
    # Names are exact, as grpc core reads them ("GZIP" is not gzip to Triton).
    r = model_of(frame(deflated, compressed=True), encoding="snappy")
    assert refused(r) == (501, 12, "unsupported_encoding")
    upper = model_of(frame(gzip.compress(message), compressed=True), encoding="GZIP")
    assert refused(upper) == (501, 12, "unsupported_encoding")
    assert r.headers["grpc-accept-encoding"] == "identity,deflate,gzip"


def test_the_size_limit_holds_as_sent_and_once_inflated() -> None:
    big = frame(infer("embedder", b"x" * LIMIT))
    assert refused(model_of(big)) == (413, 8, "request_too_large")
    bomb = frame(gzip.compress(infer("embedder", b"\x00" * (4 * LIMIT))), compressed=True)
    assert len(bomb) < 64 * 1024
    assert refused(model_of(bomb, encoding="gzip")) == (413, 8, "request_too_large")


def harness(filters: list[Filter]) -> Harness:
    """``filters`` on both routes of grpc_config, named in their ``routes`` (a filter for all
    routes may not read a gRPC route's messages)."""
    from proxy.config import FilterConfig

    cfg = grpc_config({"name": "http", "match": {"prefix": "/v2"}})
    named = [FilterConfig(name=f.name, type="_test", routes=["grpc", "http"]) for f in filters]
    return Harness.for_filters(filters, cfg.model_copy(update={"filters": named}))


def _policies(clock: FakeClock) -> list[Filter]:
    limits = {"limits": [{"name": "per_model", "key": ["model"], "rate": 2, "burst": 2,
                          "period": 60, "when": {"models": ["limited"]}}]}  # fmt: skip
    out: list[Filter] = [
        BreakerFilter(BreakerFilter.Params(models=["m"], min_calls=2), Deps(clock=clock)),
        AdmissionFilter(AdmissionFilter.Params(models=["m"]), Deps(clock=clock)),
        RateLimitFilter(RateLimitFilter.Params.model_validate(limits), Deps(clock=clock)),
    ]
    for f, name in zip(out, ("breaker", "admission", "rate_limit"), strict=True):
        f.name = name
    return out


async def call(h: Harness, model: str, up: Any = None, path: str = INFER) -> Any:
    return await h.request(
        "POST", path, body=frame(infer(model)), grpc=True,
        upstream=up or UpstreamReply(200, {"content-type": "application/grpc"}),
    )  # fmt: skip


async def test_per_model_policies_apply_to_grpc_calls() -> None:
    # Refused at start before: the model was never known on a gRPC route.
    clock = FakeClock()
    breaker, admission, _ = policies = _policies(clock)
    h = harness(policies)
    grpc_route = h.chain.config.routes[0]
    assert Phase.REQUEST_BODY in h.chain.phases_for(grpc_route)

    # A per-model rate limit: 2 calls for "limited", then 429 (RESOURCE_EXHAUSTED); other
    # models are not counted against it.
    for _ in range(2):
        assert (await call(h, "limited")).status == 200
    r = await call(h, "limited")
    assert r.status == 429 and not r.upstream_called
    assert r.decisions[Phase.REQUEST_BODY].grpc_status == 8  # type: ignore[attr-defined]
    assert (await call(h, "other")).status == 200

    # Per-model admission and breaker watch model "m" only.
    assert set(admission.limiters) == set()
    failing = UpstreamReply(200, {"content-type": "application/grpc", "grpc-status": "14"})
    for _ in range(2):
        await call(h, "m", failing)
    assert set(admission.limiters) == {"m"}
    assert set(breaker.breakers) == {"m"}
    r = await call(h, "m")
    assert r.status == 503 and r.json()["error"]["type"] == "circuit_open"
    assert (await call(h, "other")).status == 200  # another model: its own fate

    # Metadata calls name the model too, and pass uncounted as on KServe HTTP.
    r = await call(h, "m", path=SERVICE + "ModelMetadata")
    assert r.status == 200 and r.upstream_called


async def test_streams_are_refused_where_bodies_are_read_and_pass_elsewhere() -> None:
    policies = _policies(FakeClock())
    h = harness(policies)
    r = await h.request("POST", STREAM, body=frame(infer("m")), grpc=True)
    assert r.status == 501 and not r.upstream_called
    assert r.json()["error"]["type"] == "not_implemented"
    assert r.decisions[Phase.REQUEST_HEADERS].grpc_status == 12  # type: ignore[attr-defined]
    empty = await h.request("POST", STREAM, grpc=True)  # opened and closed without a message
    assert empty.status == 501 and empty.json()["error"]["type"] == "not_implemented"
    # A gRPC route no filter reads bodies on: streams pass unread, as before.
    plain = Harness.for_filters([], grpc_config({"name": "http", "match": {"prefix": "/v2"}}))
    assert Phase.REQUEST_BODY not in plain.chain.phases_for(plain.chain.config.routes[0])
    assert (await plain.request("POST", STREAM, body=frame(infer("m")), grpc=True)).status == 200


async def test_a_bad_message_is_refused_before_any_filter_reads_it() -> None:
    seen: list[bytes] = []

    class Reader(Filter):
        def phases(self, route: Any) -> frozenset[Phase]:
            return frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})

        async def on_request_body(self, ctx: Any, body: bytes) -> Any:
            seen.append(body)
            return await super().on_request_body(ctx, body)

    reader = Reader(NoParams(), Deps())
    reader.name = "reader"
    h = harness([reader])
    r = await h.request("POST", INFER, body=b"\x00\x00\x00\x00\x09abc", grpc=True)
    assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert not seen and not r.upstream_called
    body = frame(infer("m"))
    assert (await h.request("POST", INFER, body=body, grpc=True)).status == 200
    assert seen == [body]


@pytest.mark.parametrize("path", [SERVICE + "ServerLive", SERVICE + "ModelStatistics"])
async def test_calls_naming_no_model_pass_per_model_policies(path: str) -> None:
    h = harness(_policies(FakeClock()))
    r = await h.request("POST", path, body=frame(b""), grpc=True)
    assert r.status == 200 and r.upstream_called


async def test_streams_keep_a_route_of_their_own_before_the_per_model_one() -> None:
    # The README's layout: ModelStreamInfer first, on a route the per-model filter skips.
    from proxy.config import parse_config

    grpc_up = {"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": 2}]}
    cfg = parse_config({
        "upstreams": {"g": grpc_up},
        "routes": [
            {"name": "streams", "match": {"path": STREAM}, "api": "kserve_grpc", "upstream": "g"},
            {"name": "unary", "match": {"prefix": SERVICE}, "api": "kserve_grpc", "upstream": "g"},
        ],
        "filters": [{"name": "breaker", "type": "breaker", "routes": ["unary"]}],
    })  # fmt: skip
    breaker = BreakerFilter(BreakerFilter.Params(models=["m"]), Deps())
    breaker.name = "breaker"
    h = Harness.for_filters([breaker], cfg)
    streams, unary = cfg.routes
    assert Phase.REQUEST_BODY not in h.chain.phases_for(streams)
    assert Phase.REQUEST_BODY in h.chain.phases_for(unary)
    assert (await h.request("POST", STREAM, body=frame(infer("m")), grpc=True)).status == 200
    assert (await call(h, "m")).status == 200
    assert set(breaker.breakers) == {"m"}


async def test_degrade_and_canary_rewrite_the_message_on_grpc() -> None:
    # Before: they left gRPC calls alone (the model is inside the protobuf message).
    from filters.canary.filter import CanaryFilter
    from filters.degrade.filter import DegradeFilter

    clock = FakeClock()
    deps = Deps(clock=clock)
    canary = CanaryFilter(CanaryFilter.Params.model_validate(
        {"splits": {"asked": {"sticky": "none", "targets": [{"model": "m", "weight": 1}]}}}),
        deps)  # fmt: skip
    degrade = DegradeFilter(DegradeFilter.Params(lighter={"m": "m_lite"}), deps)
    breaker = BreakerFilter(BreakerFilter.Params(models=["m", "m_lite"], min_calls=2), deps)
    for f, name in ((canary, "canary"), (degrade, "degrade"), (breaker, "breaker")):
        f.name = name
    h = harness([canary, degrade, breaker])

    def upstream(headers: Any, body: bytes) -> UpstreamReply:
        model = kserve.ModelInferRequest.FromString(body[5:]).model_name
        status = "14" if model == "m" else "0"  # "m" is down; its lighter twin works
        return UpstreamReply(200, {"content-type": "application/grpc", "grpc-status": status})

    def sent(r: Any) -> kserve.ModelInferRequest:
        assert r.upstream_body is not None and r.upstream_body[0] == 0
        assert int.from_bytes(r.upstream_body[1:5], "big") == len(r.upstream_body) - 5
        return kserve.ModelInferRequest.FromString(r.upstream_body[5:])

    # The canary sends "asked" to "m" (all of it): the message names "m", inputs intact.
    r = await call(h, "asked", upstream)
    assert sent(r).model_name == "m" and sent(r).raw_input_contents == [b"\x05\x00\x00\x00hello"]
    assert r.headers["x-floodwall-canary"] == "m"
    await call(h, "asked", upstream)
    assert breaker.breakers["m"].state.name == "OPEN"  # judged as "m", the model it ran
    # Now degrade sends "m"'s calls to its lighter twin, compressed ones too (sent inflated).
    r = await call(h, "asked", upstream)
    assert sent(r).model_name == "m_lite" and r.headers["x-floodwall-degraded"] == "m_lite"
    zipped = frame(gzip.compress(infer("m")), compressed=True)
    r = await h.request("POST", INFER, body=zipped, grpc=True, upstream=upstream,
                        headers={"grpc-encoding": "gzip"})  # fmt: skip
    assert r.status == 200 and sent(r).model_name == "m_lite"
    # A call for another model is sent as it came, byte for byte.
    body = frame(infer("other"))
    r = await h.request("POST", INFER, body=body, grpc=True, upstream=upstream)
    assert r.upstream_body == body


async def test_a_call_without_a_message_is_refused_where_messages_are_read() -> None:
    # No body phase would come: the per-model policies would never have run for it.
    h = harness(_policies(FakeClock()))
    r = await h.request("POST", INFER, grpc=True)
    assert r.status == 400 and not r.upstream_called
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_a_grpc_content_type_on_a_kserve_http_path_meets_the_http_routes_policies() -> None:
    # Envoy routes it to the HTTP route, where the model is in the path: the canary split
    # it by path before the gRPC rewrite, and must still (it stopped, reading the content-type).
    from filters.canary.filter import CanaryFilter

    canary = CanaryFilter(CanaryFilter.Params.model_validate(
        {"splits": {"asked": {"sticky": "none", "targets": [{"model": "m", "weight": 1}]}}}),
        Deps())  # fmt: skip
    canary.name = "canary"
    h = harness([canary])
    r = await h.request("POST", "/v2/models/asked/infer", body=b"{}", grpc=True)
    assert r.upstream_headers is not None
    assert r.upstream_headers[":path"] == "/v2/models/m/infer"


def test_reading_a_grpc_routes_messages_needs_the_route_named() -> None:
    # A filter for all routes that did not apply to gRPC before (degrade, canary) must not
    # start refusing the route's streams on an upgrade: the route must be named.
    from filters.degrade.filter import DegradeFilter
    from proxy.config import ConfigError, parse_config

    def config(filter_routes: list[str] | None) -> Any:
        cfg = grpc_config({"name": "http", "match": {"prefix": "/v2"}}).model_dump()
        cfg["filters"] = [{"name": "f", "type": "degrade", "routes": filter_routes}]
        return parse_config(cfg)

    def build(cfg: Any) -> None:
        f = DegradeFilter(DegradeFilter.Params(lighter={"m": "m_lite"}), Deps())
        f.name = "f"
        Harness.for_filters([f], cfg)

    with pytest.raises(ConfigError, match=r"'f' would read the messages of gRPC route 'grpc'"):
        build(config(None))
    build(config(["grpc", "http"]))  # named: it applies there, and streams are refused
    build(config(["http"]))  # left out
    # A rate limit naming the route in a limit's when.routes names it too.
    limits = {"limits": [{"name": "l", "key": ["model"], "rate": 5, "when": {"routes": ["grpc"]}}]}
    cfg = grpc_config({"name": "http", "match": {"prefix": "/v2"}}).model_dump()
    cfg["filters"] = [{"name": "rl", "type": "rate_limit"}]
    rl = RateLimitFilter(RateLimitFilter.Params.model_validate(limits), Deps())
    rl.name = "rl"
    Harness.for_filters([rl], parse_config(cfg))
