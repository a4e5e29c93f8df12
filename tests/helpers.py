"""Shared by the integration and e2e tiers: free ports, an echo upstream, stack launching."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxy.config import REPO_ROOT, load_config
from proxy.runtime import Stack
from proxy.testing import UpstreamReply

DEMO_KEY = "fw-demo-key"
AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
# The demo key, asking for the model's own answer: load and fault tests must reach Triton,
# not the cache in front of it.
NO_CACHE = {**AUTH, "cache-control": "no-store"}


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(cert, key) for CN=localhost, made by openssl."""
    import subprocess

    key, crt = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Echo(BaseHTTPRequestHandler):
    """A real HTTP upstream that answers with what it received (to see what Envoy forwarded)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        # Read the body first, whatever the answer: left unread it would be taken for the
        # next request on this keep-alive connection.
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        if "triton-queue-full" in self.path:  # what Triton says when its queue is full
            err = b'{"error":"[request id: <id_unknown>] Exceeds maximum queue size"}'
            self.send_response(503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        out = json.dumps(
            {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
             "body_len": len(body)}
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer


@contextmanager
def echo_server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free ports (process i of N listens on base + i)."""
    import random

    # Below the kernel's ephemeral range (32768+): client sockets made later by the load
    # (wrk, Envoy's upstream pools) cannot take these ports before the processes bind them.
    for _ in range(200):
        base = random.randint(20000, 32000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")


def kserve_binary_request(input_name: str, raw: bytes) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 HTTP request carrying one BYTES element as raw bytes (binary tensor
    extension): JSON cannot carry invalid UTF-8, so this is how a client sends any bytes."""
    import struct

    element = struct.pack("<I", len(raw)) + raw
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ]
        }
    ).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + element, headers


def local_config_dict() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_ROOT / "examples" / "local.yaml").read_text())
    return data


def metric_total(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples carrying ``labels`` (0 when none)."""
    total = 0.0
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stack_config(
    runtime_dir: Path, echo_port: int, *, triton: bool = True, **processor: Any
) -> dict[str, Any]:
    """The shipped local config on free ports, plus an /echo route to a real echo upstream."""
    cfg = local_config_dict()
    listener, admin, th, tg, tm = free_ports(5)
    padmin = free_port_block(int(processor.get("processes", 1)))
    cfg["listener"]["port"] = listener
    cfg["admin"]["port"] = admin
    cfg["processor"].update({"admin_port": padmin, **processor})
    cfg["runtime_dir"] = str(runtime_dir)
    cfg["triton"].update(
        {"model_repository": str(REPO_ROOT / "triton_models"), "http_port": th, "grpc_port": tg,
         "metrics_port": tm, "enabled": triton}
    )  # fmt: skip
    for f in cfg["filters"]:
        if f["type"] == "jobs":  # the stack's worker: its own admin port; lost jobs move fast
            f["params"]["worker"].update(
                {"admin_port": free_ports(1)[0], "visibility_timeout_s": 3, "backoff_s": 0.2}
            )
        sat = f.get("params", {}).get("saturation")
        if sat is not None:
            sat["triton_metrics_url"] = f"http://127.0.0.1:{tm}/metrics"
    cfg["upstreams"]["triton_http"]["endpoints"][0]["port"] = th
    cfg["upstreams"]["triton_grpc"]["endpoints"][0]["port"] = tg
    cfg["upstreams"]["echo"] = {
        "endpoints": [{"address": "127.0.0.1", "port": echo_port}],
        "health_check": None,
    }
    cfg["routes"].insert(0, {"name": "echo", "match": {"prefix": "/echo"}, "upstream": "echo"})
    return cfg


def start_stack(cfg_dict: dict[str, Any], path: Path) -> Stack:
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path)
    assert cfg.runtime_dir is not None
    cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(cfg, path, cfg.runtime_dir, say=lambda s: None)
    try:
        stack.start_all()
    except BaseException:
        stack.stop()
        raise
    return stack


class RedisServer:
    """A real redis-server on a free TCP port that tests can kill, freeze and restart."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port_block(1)
        self.extra = extra
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        import shutil
        import subprocess
        import time

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--save", "", "--appendonly", "no", *self.extra],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (with a password)
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP/SIGCONT: a Redis that accepts connections but never answers."""
        import signal

        self.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.freeze(False)
            self.proc.terminate()
            self.proc.wait(timeout=5)


@contextmanager
def redis_cluster(
    directory: Path, masters: int = 3, replicas: int = 0, *extra: str
) -> Iterator[list[RedisServer]]:
    """A local Redis Cluster of ``masters`` primaries with ``replicas`` replicas each, made by
    redis-cli; ``extra``: more redis-server arguments for every node."""
    import subprocess

    nodes = []
    try:
        for i in range(masters * (1 + replicas)):
            # The bus port defaults to port + 10000, which may fall in the ephemeral range
            # and be taken: pick it below that range like the port itself.
            node = RedisServer(
                directory / f"node{i}", "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / f"node{i}" / "nodes.conf"),
                "--cluster-port", str(free_port_block(1)), *extra,
            )  # fmt: skip
            nodes.append(node.start())
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        _wait_cluster_ok([n.port for n in nodes])
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _wait_cluster_ok(ports: list[int]) -> None:
    """Until every node says the cluster is up and knows every other node: ``redis-cli
    --cluster create`` returns once node 0 agrees, while the others may still answer
    CLUSTERDOWN for a moment, which a limiter would take for Redis being gone."""
    import subprocess
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        infos = [
            subprocess.run(
                ["redis-cli", "-p", str(p), "cluster", "info"], capture_output=True, text=True
            ).stdout
            for p in ports
        ]
        if all(
            "cluster_state:ok" in out and f"cluster_known_nodes:{len(ports)}" in out
            for out in infos
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("redis cluster did not reach cluster_state:ok on every node")


def alive_mentioning(needle: str) -> list[int]:
    """Pids of live processes (zombies aside) whose command line mentions ``needle``, this
    one excepted: what a stopped stack must not leave running."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if needle in cmd and state != "Z" and int(d.name) != os.getpid():
            pids.append(int(d.name))
    return pids


def sim_llm_answer(
    prompt_tokens: int = 7, completion_tokens: int = 2, text: str = "lorem ipsum"
) -> UpstreamReply:
    """The sim_llm stand-in's KServe answer (one chat completion)."""
    outputs = [
        {"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [text]},
        {"name": "PROMPT_TOKENS", "datatype": "INT32", "shape": [1, 1], "data": [prompt_tokens]},
        {"name": "COMPLETION_TOKENS", "datatype": "INT32", "shape": [1, 1],
         "data": [completion_tokens]},
        {"name": "FINISH_REASON", "datatype": "BYTES", "shape": [1, 1], "data": ["stop"]},
    ]  # fmt: skip
    body = json.dumps({"outputs": outputs}).encode()
    return UpstreamReply(200, {"content-type": "application/json"}, body)


def raw_model_infer(target: str, message: bytes, **kw: Any) -> Any:
    """One KServe gRPC ModelInfer call of ``message`` (bytes, sent as they are) to ``target``
    (host:port) with the demo key: the response's bytes, or the grpc.RpcError."""
    import grpc

    big = 64 << 20
    options = [("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            return call(message, metadata=[("authorization", AUTH["authorization"])],
                        timeout=30, **kw)  # fmt: skip
        except grpc.RpcError as e:
            return e


def infer_request(model: str, raw: bytes) -> bytes:
    """A serialized ModelInferRequest of one BYTES tensor ``TEXT`` whose raw contents are
    ``raw`` (Triton's BYTES encoding: a little-endian uint32 length before each element)."""
    from tritonclient.grpc import service_pb2

    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                                            shape=[1, 1])  # fmt: skip
    message = service_pb2.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[raw]
    )
    out: bytes = message.SerializeToString()
    return out
