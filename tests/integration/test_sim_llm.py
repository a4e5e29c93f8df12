"""sim_llm / sim_llm_stream, the sleeping LLM stand-ins, served by the real Triton binary.

One Triton per module on a temporary repository holding only the two stand-ins (copied,
symlinks resolved), so these tests need neither the ONNX export nor the embedder.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import kserve_binary_request
from tests.integration.conftest import MODEL_REPOSITORY, start_triton, stop_triton, wait_ready

pytestmark = pytest.mark.integration

# The documented token rule (config.pbtxt, 1/model.py).
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Cost constants from triton_models/sim_llm/config.pbtxt.
PREFILL_S_PER_TOKEN = 0.2e-3
DECODE_STEP_BASE_S = 8e-3


def tokens(text: str) -> int:
    return len(TOKEN_RE.findall(text))


@dataclass(frozen=True)
class Server:
    http_url: str
    grpc_url: str
    metrics_url: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("sim_llm")
    repository = root / "models"
    for name in ("sim_llm", "sim_llm_stream"):
        shutil.copytree(MODEL_REPOSITORY / name, repository / name, ignore=_no_pycache)
    log_path = root / "tritonserver.log"
    process, (http_port, grpc_port, metrics_port) = start_triton(
        log_path, root / "cache", repository
    )
    try:
        http_url = f"http://127.0.0.1:{http_port}"
        wait_ready(process, http_url, log_path)
        yield Server(
            http_url=http_url,
            grpc_url=f"127.0.0.1:{grpc_port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        stop_triton(process)


def _no_pycache(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with httpx.Client(base_url=server.http_url, timeout=30.0, limits=limits) as c:
        yield c


def generate(client: httpx.Client, prompt: str, **inputs: Any) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    response = client.post("/v2/models/sim_llm/generate", json={"PROMPT": prompt, **inputs})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return response.json(), elapsed


def fastest(client: httpx.Client, prompt: str, **inputs: Any) -> tuple[dict[str, Any], float]:
    runs = [generate(client, prompt, **inputs) for _ in range(3)]
    assert all(body == runs[0][0] for body, _ in runs)
    return runs[0][0], min(elapsed for _, elapsed in runs)


def stream(client: httpx.Client, prompt: str, **inputs: Any) -> list[dict[str, Any]]:
    events = []
    with client.stream(
        "POST", "/v2/models/sim_llm_stream/generate_stream", json={"PROMPT": prompt, **inputs}
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:") :]))
    return events


def length_prompt(client: httpx.Client, max_tokens: int) -> str:
    """A prompt whose answer runs to max_tokens (finish "length"; a quarter stop early)."""
    for i in range(20):
        prompt = f"Write a long essay about flood defences, take {i}."
        body, _ = generate(client, prompt, MAX_TOKENS=max_tokens)
        if body["FINISH_REASON"] == "length":
            return prompt
    raise AssertionError("20 prompts in a row stopped early")


def settled_stats(client: httpx.Client, expect_inferences: int = 0) -> dict[str, int]:
    """sim_llm's counts. Responses leave before execute() returns and Triton counts the
    batch after it returns, so the last answer can arrive before its count: poll a little."""
    deadline = time.monotonic() + 2.0
    while True:
        body = client.get("/v2/models/sim_llm/stats").json()["model_stats"][0]
        counts = {k: int(body[k]) for k in ("inference_count", "execution_count")}
        if counts["inference_count"] >= expect_inferences or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def test_config_declares_the_contract_and_the_stand_in(client: httpx.Client) -> None:
    for model in ("sim_llm", "sim_llm_stream"):
        config = client.get(f"/v2/models/{model}/config").json()
        assert config["parameters"]["stand_in"]["string_value"] == "true"
        inputs = {i["name"]: (i["data_type"], i["optional"]) for i in config["input"]}
        assert inputs == {
            "PROMPT": ("TYPE_STRING", False),
            "MAX_TOKENS": ("TYPE_INT32", True),
            "TEMPERATURE": ("TYPE_FP32", True),
        }
        outputs = {o["name"]: o["data_type"] for o in config["output"]}
        assert outputs == {
            "TEXT": "TYPE_STRING",
            "PROMPT_TOKENS": "TYPE_INT32",
            "COMPLETION_TOKENS": "TYPE_INT32",
            "FINISH_REASON": "TYPE_STRING",
        }
        assert int(config["dynamic_batching"]["priority_levels"]) == 2
        decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
        assert decoupled is (model == "sim_llm_stream")


def test_infer_returns_typed_outputs(client: httpx.Client) -> None:
    request = {
        "inputs": [
            {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": ["Hi there!"]},
            {"name": "MAX_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [5]},
            {"name": "TEMPERATURE", "shape": [1, 1], "datatype": "FP32", "data": [0.7]},
        ]
    }
    response = client.post("/v2/models/sim_llm/infer", json=request)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert {n: o["datatype"] for n, o in outputs.items()} == {
        "TEXT": "BYTES",
        "PROMPT_TOKENS": "INT32",
        "COMPLETION_TOKENS": "INT32",
        "FINISH_REASON": "BYTES",
    }
    assert outputs["PROMPT_TOKENS"]["data"] == [3]
    assert 1 <= outputs["COMPLETION_TOKENS"]["data"][0] <= 5
    generated, _ = generate(client, "Hi there!", MAX_TOKENS=5, TEMPERATURE=0.7)
    assert outputs["TEXT"]["data"] == [generated["TEXT"]]


@pytest.mark.parametrize(
    "prompt",
    [
        "Hello, world!",
        "system: be brief\nuser: What's 2+2?\nassistant:",
        "Grüße aus Zürich! 東京は日本の首都です。 🚀🔥",
        "a",
    ],
)
def test_usage_counts_follow_the_token_rule(client: httpx.Client, prompt: str) -> None:
    for max_tokens in (3, 16):
        body, _ = generate(client, prompt, MAX_TOKENS=max_tokens)
        assert body["PROMPT_TOKENS"] == tokens(prompt)
        assert body["COMPLETION_TOKENS"] == tokens(body["TEXT"]) <= max_tokens
        hit_limit = body["COMPLETION_TOKENS"] == max_tokens
        assert body["FINISH_REASON"] == ("length" if hit_limit else "stop"), body


def test_both_finish_reasons_occur_and_defaults_apply(client: httpx.Client) -> None:
    reasons = set()
    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = list(
            pool.map(lambda i: generate(client, f"question {i}", MAX_TOKENS=8), range(16))
        )
    for body, _ in bodies:
        reasons.add(body["FINISH_REASON"])
        if body["FINISH_REASON"] == "stop":
            assert 4 <= body["COMPLETION_TOKENS"] < 8 and body["TEXT"].endswith(".")
    assert reasons == {"length", "stop"}

    default, _ = generate(client, "no max tokens given")  # default 64
    assert default["COMPLETION_TOKENS"] <= 64
    assert default == generate(client, "no max tokens given", MAX_TOKENS=64)[0]
    for out_of_range in (0, -5):
        clamped, _ = generate(client, "clamp me", MAX_TOKENS=out_of_range)
        assert clamped["COMPLETION_TOKENS"] == 1 and clamped["FINISH_REASON"] == "length"


def test_same_request_same_text(client: httpx.Client) -> None:
    prompt = length_prompt(client, 32)
    first, _ = generate(client, prompt, MAX_TOKENS=32)
    again, _ = generate(client, prompt, MAX_TOKENS=32)
    assert first == again
    other_temperature, _ = generate(client, prompt, MAX_TOKENS=32, TEMPERATURE=0.2)
    assert other_temperature["TEXT"] != first["TEXT"]
    # Like greedy decoding: a shorter answer is a prefix of a longer one.
    shorter, _ = generate(client, prompt, MAX_TOKENS=8)
    if shorter["FINISH_REASON"] == "length":
        assert first["TEXT"].startswith(shorter["TEXT"])


def test_latency_grows_with_max_tokens(client: httpx.Client) -> None:
    prompt = length_prompt(client, 64)
    # Min of three: a stall of this (shared, busy) box only ever adds time. At 8 tokens
    # this prompt may stop early; the bounds below use the tokens actually generated.
    short, short_s = fastest(client, prompt, MAX_TOKENS=8)
    long, long_s = generate(client, prompt, MAX_TOKENS=64)
    assert long["COMPLETION_TOKENS"] == 64
    # Sleeps give hard lower bounds: every decode step costs at least the base step time.
    assert long_s >= 64 * DECODE_STEP_BASE_S
    assert short_s >= short["COMPLETION_TOKENS"] * DECODE_STEP_BASE_S
    assert long_s - short_s >= (64 - 8) * DECODE_STEP_BASE_S * 0.8, (short_s, long_s)


def test_latency_grows_with_prompt_length(client: httpx.Client) -> None:
    short_prompt = "word " * 10
    long_prompt = "word " * 4000
    short, short_s = fastest(client, short_prompt, MAX_TOKENS=1)
    long, long_s = generate(client, long_prompt, MAX_TOKENS=1)
    assert (short["PROMPT_TOKENS"], long["PROMPT_TOKENS"]) == (10, 4000)
    assert long_s >= 4000 * PREFILL_S_PER_TOKEN
    assert long_s - short_s >= 3990 * PREFILL_S_PER_TOKEN * 0.8, (short_s, long_s)


def test_concurrent_requests_batch(client: httpx.Client) -> None:
    max_tokens = 64
    # The previous test's last batch may not be counted yet: wait until the counts hold still.
    before, deadline = settled_stats(client), time.monotonic() + 5.0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = settled_stats(client)
        if now == before:
            break
        before = now
    _, single_s = generate(client, "one alone", MAX_TOKENS=max_tokens)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: generate(client, f"caller {i}", MAX_TOKENS=max_tokens), range(16)))
    wall_s = time.perf_counter() - started
    after = settled_stats(client, expect_inferences=before["inference_count"] + 17)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 17
    assert executions < inferences, (executions, inferences)
    # Sequential would be 16x; batched it is two or three generations (a lone first
    # request, then the rest; a decode step grows only mildly with the batch).
    assert wall_s < 6 * single_s, (single_s, wall_s)


def infer_body(prompt: str, max_tokens: int, **parameters: int) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
            {"name": "MAX_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]},
        ],
        "parameters": parameters,
    }


def pending(server: Server) -> int:
    metrics = httpx.get(server.metrics_url).text
    found = re.search(
        r'^nv_inference_pending_request_count\{model="sim_llm",.*\} (\d+)', metrics, re.M
    )
    assert found, metrics
    return int(found.group(1))


def test_priority_and_queue_timeout(server: Server) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    client = httpx.Client(base_url=server.http_url, timeout=30.0, limits=limits)

    def post(body: dict[str, Any]) -> tuple[int, float]:
        response = client.post("/v2/models/sim_llm/infer", json=body)
        return response.status_code, time.perf_counter()

    with client, ThreadPoolExecutor(max_workers=48) as pool:
        # 4.4-8.8 s of generation (512-1024 tokens: it may stop early, never before half)
        # holds the one instance while the queue fills up, however slow the box.
        blocker = pool.submit(post, infer_body("hold the accelerator", 1024))
        time.sleep(0.05)
        # 40 priority-2 requests: more than one batch (32) of queue in front of the next two;
        # 16-32 tokens each, so the batch after the first ends 0.14 s or more after it.
        flood = [pool.submit(post, infer_body(f"flood {i}", 32, priority=2)) for i in range(40)]
        deadline = time.monotonic() + 3.0
        while pending(server) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pending(server) >= 40 and not blocker.done(), "box too slow to fill the queue"
        urgent = pool.submit(post, infer_body("urgent", 8, priority=1))
        expiring = pool.submit(post, infer_body("impatient", 8, timeout=100_000))  # 100 ms
        assert blocker.result()[0] == 200
        urgent_status, urgent_done = urgent.result()
        flood_results = [f.result() for f in flood]
        expiring_status, _ = expiring.result()

    assert urgent_status == 200 and all(status == 200 for status, _ in flood_results)
    # Priority 1 goes into the first batch after the blocker, ahead of priority 2 that was
    # queued earlier; the 8+ priority-2 requests left over run in a later batch.
    later = sum(done > urgent_done + 0.1 for _, done in flood_results)
    assert later >= 8, later
    assert expiring_status == 503  # REJECT after its own, shorter queue timeout


def test_stream_chunks_concatenate_to_the_non_streaming_text(client: httpx.Client) -> None:
    for prompt, max_tokens in (("Tell me about levees.", 16), ("Hello, world!", 40)):
        events = stream(client, prompt, MAX_TOKENS=max_tokens)
        whole, _ = generate(client, prompt, MAX_TOKENS=max_tokens)
        assert len(events) >= 2
        assert "".join(e["TEXT"] for e in events) == whole["TEXT"]
        assert len(events) == whole["COMPLETION_TOKENS"]  # one token per chunk by default
        final = events[-1]
        for key in ("PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON"):
            assert final[key] == whole[key]
            assert all(key not in e for e in events[:-1])


def grpc_stream(server: Server, prompt: bytes, max_tokens: int) -> list[tuple[Any, Any]]:
    """(result, error) pairs of one sim_llm_stream request over gRPC, up to the final one."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    inputs = [
        grpcclient.InferInput("PROMPT", [1, 1], "BYTES"),
        grpcclient.InferInput("MAX_TOKENS", [1, 1], "INT32"),
    ]
    inputs[0].set_data_from_numpy(np.array([[prompt]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    received: list[tuple[Any, Any]] = []
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("sim_llm_stream", inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=10)
            received.append((result, error))
            if error is not None:
                break
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    finally:
        client.close()
    return received


def test_stream_over_grpc_flags_the_last_response_final(server: Server) -> None:
    received = grpc_stream(server, b"Stream over gRPC, please.", 12)
    assert all(error is None for _, error in received)
    pieces = [result.as_numpy("TEXT").reshape(-1)[0].decode() for result, _ in received]
    *chunks, final = (result for result, _ in received)
    assert all(r.as_numpy("FINISH_REASON") is None for r in chunks)
    assert final.as_numpy("FINISH_REASON").reshape(-1)[0] in (b"length", b"stop")
    assert int(final.as_numpy("COMPLETION_TOKENS").reshape(-1)[0]) == len(pieces)
    assert len(pieces) >= 2 and tokens("".join(pieces)) == len(pieces)


def test_abandoned_stream_frees_the_simulated_accelerator(client: httpx.Client) -> None:
    # 1024 tokens would hold the single instance for ~9 s; the client leaves after 3 chunks.
    with client.stream(
        "POST",
        "/v2/models/sim_llm_stream/generate_stream",
        json={"PROMPT": "a very long answer, please", "MAX_TOKENS": 1024},
    ) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break
    started = time.perf_counter()
    response = client.post(
        "/v2/models/sim_llm_stream/generate", json={"PROMPT": "next", "MAX_TOKENS": 1}
    )
    assert response.status_code == 200, response.text
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize("model", ["sim_llm", "sim_llm_stream"])
def test_bad_input_is_a_per_request_400(client: httpx.Client, server: Server, model: str) -> None:
    def expect_400(response: httpx.Response, fragment: str) -> None:
        assert response.status_code == 400, response.text
        assert fragment in response.text

    generate_url = f"/v2/models/{model}/generate"
    expect_400(client.post(generate_url, json={"PROMPT": ""}), "at least one token")
    expect_400(client.post(generate_url, json={"PROMPT": " \n\t"}), "at least one token")
    expect_400(client.post(generate_url, json={"PROMPT": "x " * 9000}), "limit is 8192")
    # JSON cannot carry invalid UTF-8: binary tensors over HTTP /infer, or gRPC for the
    # decoupled model (Triton's HTTP /infer answers 501 for decoupled models).
    if model == "sim_llm":
        body, headers = kserve_binary_request("PROMPT", b"\xff\xfe not utf-8")
        response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        expect_400(response, "UTF-8")
    else:
        [(result, error)] = grpc_stream(server, b"\xff\xfe not utf-8", 4)
        # A stream's error response carries the message only, no gRPC status.
        assert result is None and "not valid UTF-8" in str(error)
    # A bad request batched with good ones fails alone.
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(
            pool.map(
                lambda p: client.post(generate_url, json={"PROMPT": p, "MAX_TOKENS": 1}),
                ["", "fine", "", "also fine", "", "ok"],
            )
        )
    assert [r.status_code for r in responses] == [400, 200, 400, 200, 400, 200]
    assert client.get(f"/v2/models/{model}/ready").status_code == 200


def test_model_files_are_shared() -> None:
    # sim_llm_stream must stay the same implementation as sim_llm, not a drifting copy.
    stream_model = MODEL_REPOSITORY / "sim_llm_stream" / "1" / "model.py"
    assert stream_model.resolve() == (MODEL_REPOSITORY / "sim_llm" / "1" / "model.py").resolve()
