"""Edges of the rendered Envoy bootstrap, on a real stack (Envoy, processor, Redis; no Triton):
the body size limit on every HTTP route, Envoy's own refusals in the error format, the access
log without queries, the route timeout on gRPC calls without a deadline, circuit_breakers
.max_retries, and Triton's admin APIs kept out of reach (unrouted, and refused on KServe routes
unless the route says admin_apis)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import access_log_record
from tests.helpers import AUTH, DEMO_KEY, free_ports, stack_config, start_stack

pytestmark = pytest.mark.e2e

SLOW_GRPC = "/slow.Service/Call"
UPSTREAM_S = 3.0  # the slow gRPC upstream's answer time
ADMIN_ROUTED = "/v2/repository/index"  # on a route with admin_apis: true
GRPC_TIMEOUT_MS = 1000  # its route's timeout


@pytest.fixture(scope="module")
def slow_grpc_port() -> Iterator[int]:
    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(UPSTREAM_S)
        return b"late"

    service, method = SLOW_GRPC.strip("/").split("/")
    generic = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(handler)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def edges(
    tmp_path_factory: pytest.TempPathFactory, echo_port: int, slow_grpc_port: int
) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("edges")
    cfg = stack_config(d / "run", echo_port, triton=False)
    (dead,) = free_ports(1)
    cfg["upstreams"]["slow_grpc"] = {
        "protocol": "grpc",
        "endpoints": [{"address": "127.0.0.1", "port": slow_grpc_port}],
        "health_check": None,
    }
    cfg["upstreams"]["dead"] = {
        "endpoints": [{"address": "127.0.0.1", "port": dead}],
        "health_check": None,
        "outlier_detection": None,
        "circuit_breakers": {"max_retries": 0},
    }
    cfg["routes"][:0] = [
        {"name": "slow_grpc", "match": {"prefix": "/slow.Service/"}, "api": "kserve_grpc",
         "upstream": "slow_grpc", "timeout_ms": GRPC_TIMEOUT_MS, "retries": None},
        {"name": "dead", "match": {"prefix": "/dead"}, "upstream": "dead",
         "retries": {"retry_on": "connect-failure", "num_retries": 2}},
        # An operator's route to one admin API (in real use, scoped to an admin key).
        {"name": "ops_index", "match": {"path": ADMIN_ROUTED}, "api": "kserve_http",
         "upstream": "triton_http", "admin_apis": True},
    ]  # fmt: skip
    stack = start_stack(cfg, d / "fw.yaml")
    try:
        yield Gateway(stack)
    finally:
        stack.stop()


def _raw(g: Gateway, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends bytes as they are (no client would send these) and parses the answer."""
    c = g.stack.cfg.listener
    with socket.create_connection((c.address, c.port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


def _request(*headers: bytes, version: bytes = b"HTTP/1.1", body: bytes = b"{}") -> bytes:
    head = [b"POST /echo/x " + version, b"Host: x", f"Authorization: Bearer {DEMO_KEY}".encode()]
    return b"\r\n".join([*head, *headers, b"Connection: close", b"", body])


def _assert_error(status: int, headers: dict[str, str], body: bytes, type_: str) -> None:
    assert headers.get("content-type") == "application/json", (status, headers, body)
    assert headers.get("x-floodwall-error") == type_, (status, headers, body)
    error = json.loads(body)["error"]
    assert error["type"] == type_ and error["message"], error


@pytest.mark.parametrize(
    "request_, status, type_",
    [
        (_request(b"Content-Length: 2", b"Transfer-Encoding: chunked"), 400, "bad_request"),
        (_request(b"x-a\x00b: v", b"Content-Length: 2"), 400, "bad_request"),
        (_request(*[f"x-h{i}: v".encode() for i in range(200)], b"Content-Length: 2"), 431,
         "request_headers_too_large"),
        (_request(b"Content-Length: 2", version=b"HTTP/1.0"), 426, "upgrade_required"),
        (_request(b"Transfer-Encoding: gzip"), 501, "not_implemented"),
    ],
    ids=["length-and-chunked", "nul-in-name", "200-headers", "http1.0", "te-gzip"],
)  # fmt: skip
def test_envoys_codec_refusals_are_json_errors(
    edges: Gateway, request_: bytes, status: int, type_: str
) -> None:
    got, headers, body = _raw(edges, request_)
    assert got == status, (headers, body)
    _assert_error(got, headers, body, type_)


def test_no_route_is_a_json_error_with_its_header(edges: Gateway) -> None:
    r = httpx.get(f"{edges.url}/nope", headers=AUTH)
    assert r.status_code == 404
    _assert_error(r.status_code, dict(r.headers), r.content, "not_found")
    assert r.json()["error"]["message"] == "no such route"


@pytest.mark.parametrize("path", ["/echo/passthrough", "/v2/models/embedder/infer"])
def test_bodies_over_max_request_bytes_get_413_on_passthrough_routes(
    edges: Gateway, path: str
) -> None:
    limit = edges.stack.cfg.listener.max_request_bytes
    # /echo: no filter reads bodies there, so nothing buffers them but the size check.
    assert (
        httpx.post(f"{edges.url}/echo/x", content=b"a" * limit, headers=AUTH).json()["body_len"]
        == limit
    )
    for body in (b"a" * (limit + 1), iter([b"a" * 65536] * (limit // 65536 + 1))):  # chunked
        r = httpx.post(f"{edges.url}{path}", content=body, headers=AUTH, timeout=10)
        assert r.status_code == 413, r.text
        _assert_error(r.status_code, dict(r.headers), r.content, "request_too_large")


def test_the_access_log_leaves_out_the_query(edges: Gateway) -> None:
    secret = "sk-in-the-query"
    assert httpx.get(f"{edges.url}/echo/q?api_key={secret}", headers=AUTH).status_code == 200
    rec = access_log_record(edges, "GET", "/echo/q")
    assert rec["route"] == "echo"
    envoy = next(c for c in edges.stack.children if c.name == "envoy")
    assert secret not in envoy.log_path.read_text()


def test_a_grpc_call_without_deadline_gets_the_route_timeout(edges: Gateway) -> None:
    with grpc.insecure_channel(edges.grpc_target) as channel:
        call = channel.unary_unary(SLOW_GRPC)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call(b"x", metadata=[("authorization", f"Bearer {DEMO_KEY}")])
        elapsed = time.monotonic() - t0
        assert elapsed < UPSTREAM_S - 1, f"answered after {elapsed:.2f}s: no timeout applied"
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
        # The model was slow, not the client: it read "request_timeout" before session 21.
        assert "upstream_timeout" in (e.value.details() or ""), e.value.details()
        # The client's own deadline still counts, capped by the route's timeout.
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call(b"x", timeout=0.3, metadata=[("authorization", f"Bearer {DEMO_KEY}")])
        assert time.monotonic() - t0 < 0.9
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_circuit_breakers_max_retries_holds(edges: Gateway) -> None:
    # The dead upstream's route retries connect failures twice; max_retries: 0 forbids it.
    r = httpx.get(f"{edges.url}/dead", headers=AUTH, timeout=10)
    assert r.status_code == 503
    a = edges.stack.cfg.admin
    url = f"http://{a.address}:{a.port}/stats?filter=^cluster\\.dead\\.upstream_rq_retry"
    stats = dict(ln.split(": ") for ln in urllib.request.urlopen(url).read().decode().splitlines())
    assert stats["cluster.dead.upstream_rq_retry"] == "0", stats
    assert stats["cluster.dead.upstream_rq_retry_overflow"] != "0", stats


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("POST", "/v2/repository/models/embedder/unload"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/status"),
    ],
)
def test_tritons_admin_apis_are_not_routed(edges: Gateway, method: str, path: str) -> None:
    r = httpx.request(method, f"{edges.url}{path}", headers=AUTH, content=b"{}")
    assert r.status_code == 404, r.text
    assert r.headers["x-floodwall-error"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        "/v2",
        "/v2/health/ready",
        "/v2/health/live",
        "/v2/models/embedder",
        "/v2/models/embedder/infer",
        "/v2/models/embedder/versions/1/ready",
        "/v2/models/embedder/config",
        "/v2/models/stats",
        "/v2/models/sim_llm/generate_stream",
        ADMIN_ROUTED,  # admin_apis: true on its route
    ],
)
def test_kserve_models_health_and_metadata_are_routed(edges: Gateway, path: str) -> None:
    # Triton is not running in this stack: a routed request gets Envoy's 503, not a 404.
    r = httpx.post(f"{edges.url}{path}", headers=AUTH, content=b"{}")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "upstream_unavailable"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/embedder/trace/setting",
        "/v2/models/embedder/versions/1/trace/setting",
        "/v2/models/embedder/trace%2Fsetting",  # spelled to slip past a deny list
        "/v2/models/embedder/versions/1/trace/setting/",
        "/V2/models/embedder/trace/setting",
    ],
)
def test_tritons_model_admin_apis_are_refused_on_kserve_routes(edges: Gateway, path: str) -> None:
    # Under /v2/models/ (routed): trace settings change what Triton does for every tenant.
    r = httpx.post(f"{edges.url}{path}", headers=AUTH, content=b'{"trace_level": ["TIMESTAMPS"]}')
    assert r.status_code == 404, r.text
    _assert_error(r.status_code, dict(r.headers), r.content, "not_found")


GRPC_SERVICE = "/inference.GRPCInferenceService/"


def _refused_rpc(g: Gateway, method: str) -> grpc.RpcError:
    """The error of an empty call to a GRPCInferenceService method with the demo key."""
    with grpc.insecure_channel(g.grpc_target) as channel, pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(GRPC_SERVICE + method)(
            b"", timeout=10, metadata=[("authorization", f"Bearer {DEMO_KEY}")]
        )
    return e.value


@pytest.mark.parametrize(
    "method",
    ["LogSettings", "TraceSetting", "SystemSharedMemoryRegister", "CudaSharedMemoryStatus",
     "RepositoryIndex", "RepositoryModelUnload", "SomethingNew"],
)  # fmt: skip
def test_tritons_admin_rpcs_are_unimplemented_on_kserve_grpc_routes(
    edges: Gateway, method: str
) -> None:
    error = _refused_rpc(edges, method)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error
    assert "not_found" in (error.details() or ""), error.details()


@pytest.mark.parametrize("method", ["ServerLive", "ModelInfer", "ModelStatistics"])
def test_tritons_data_plane_rpcs_are_routed(edges: Gateway, method: str) -> None:
    error = _refused_rpc(edges, method)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # no Triton here


def _k8s_envoy_commands() -> list[tuple[str, list[str]]]:
    """The exec commands deploy/k8s runs in Envoy containers (probes, preStop)."""
    import yaml

    from proxy.config import REPO_ROOT

    out = []
    for path in sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if "envoyproxy/envoy" not in c["image"]:
                    continue
                for probe in ("readinessProbe", "livenessProbe"):
                    if "exec" in c[probe]:
                        out.append((f"{path.name} {probe}", c[probe]["exec"]["command"]))
                pre = c.get("lifecycle", {}).get("preStop", {}).get("exec")
                if pre:
                    out.append((f"{path.name} preStop", pre["command"]))
    return out


def test_the_k8s_envoy_commands_work_against_a_real_admin(edges: Gateway) -> None:
    # They spoke HTTP/1.0, which Envoy's admin answers with 426: no Envoy pod ever became
    # ready, and the drain did nothing. Each runs here against this Envoy's admin; the drain
    # asks for /ready instead (draining this Envoy would end the other tests), with the same
    # framing, and its status line is read.
    import subprocess

    port = edges.stack.cfg.admin.port
    commands = _k8s_envoy_commands()
    assert {w.split()[1] for w, _ in commands} >= {"readinessProbe", "preStop"}
    for where, argv in commands:
        script = argv[-1].replace("/127.0.0.1/9901", f"/127.0.0.1/{port}")
        if "drain_listeners" in script:
            script = script.replace("drain_listeners?graceful", "ready").split("; sleep")[0]
            script += " && head -1 <&3"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, (where, done.stdout, done.stderr)
        if "head -1" in script:
            assert done.stdout.startswith("HTTP/1.1 200"), (where, done.stdout)
