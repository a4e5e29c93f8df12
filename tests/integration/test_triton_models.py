"""The model repository's serving behaviour in the real Triton: both embedders load, int8
stays close to fp32 and is faster, priority 1 overtakes queued priority 2, a full queue
and an expired request are refused fast (with the statuses the gateway maps to 503), and
warm-up makes the first request after start as fast as later ones."""

from __future__ import annotations

import re
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import MODEL_REPOSITORY, READY_TIMEOUT_S, tail, wait_ready

pytestmark = pytest.mark.integration

MODELS = ("embedder", "embedder_int8")

# Varied on purpose: one word to a paragraph, several scripts, code, numbers.
SENTENCES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Floodwall keeps AI model services standing when traffic floods in.",
    "An Envoy front proxy calls a Python external processor over gRPC.",
    "Triton batches requests dynamically to use the CPU better.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I love pizza.",
    "Rate limits protect the backend from abusive clients.",
    "a",
    "Numbers: 3.14159, 2.71828, 1e-9 and 42.",
    "Grüße aus Zürich! Äpfel, Öl und Übermut.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "Emoji test 🚀🔥✓ — with an em dash and “quotes”.",
    "def f(x):\n    return x * 2  # code",
    "The patient was prescribed 20 mg of atorvastatin daily.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password?",
    "My order arrived damaged and I would like a refund.",
    "The mitochondria is the powerhouse of the cell.",
    "She sells sea shells by the sea shore.",
    "Quantum entanglement links the states of two particles.",
    "Add two cups of flour and stir until smooth.",
    "The match ended in a draw after extra time.",
    "Please summarise the attached quarterly report.",
    "Error 503: service temporarily unavailable, retry later.",
    "A cat sat on the mat and purred.",
    "Climate change is driving more frequent floods along the coast.",
    "Can you recommend a good science fiction novel?",
    "The Supreme Court ruled on the case yesterday.",
    "GPU memory bandwidth often limits transformer inference.",
    "Je voudrais réserver une table pour deux personnes.",
    "¿Dónde está la estación de tren?",
    "kubectl get pods -n floodwall --watch",
    "The river burst its banks and flooded the village overnight.",
    "Meeting moved to Thursday at 3 pm, same room.",
    "Sentence embeddings map text to vectors for semantic search.",
    " ".join(f"Paragraph sentence {i} about levees, pumps and flood defences." for i in range(12)),
    "No.",
]

SHORT_TEXT = "Clause 1: the levee holds while the pumps keep up."
# ~70 tokens: enough work per row that a few requests keep the model busy.
MEDIUM_TEXT = " ".join(f"Clause {i}: the levee holds while the pumps keep up." for i in range(6))

# Triton's refusals, exactly as the bundled Triton 2.51 answers over KServe v2 HTTP (the
# gateway maps both to 503 + Retry-After). Queue full: 503, application/json,
# {"error":"[request id: <id_unknown>] Exceeds maximum queue size"} ("<id_unknown>" is the
# request's "id" when it has one); gRPC: UNAVAILABLE with the same message.
# Expired in the queue (timeout_action REJECT): 503, {"error":"Request timeout expired"},
# sent as text/plain although the body is JSON.
QUEUE_FULL_STATUS = 503
QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"
TIMEOUT_STATUS = 503
TIMEOUT_MESSAGE = "Request timeout expired"


def infer_body(
    texts: list[str], priority: int | None = None, timeout_us: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]
    }
    parameters: dict[str, int] = {}
    if priority is not None:
        parameters["priority"] = priority
    if timeout_us is not None:
        parameters["timeout"] = timeout_us
    if parameters:
        body["parameters"] = parameters
    return body


def embed(
    client: httpx.Client, http_url: str, model: str, texts: list[str]
) -> np.ndarray[Any, Any]:
    response = client.post(f"{http_url}/v2/models/{model}/infer", json=infer_body(texts))
    assert response.status_code == 200, response.text
    (out,) = [o for o in response.json()["outputs"] if o["name"] == "EMBEDDING"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def timed_post(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, float]:
    """(latency, completion time) in perf_counter seconds; asserts success."""
    started = time.perf_counter()
    response = client.post(url, json=body)
    done = time.perf_counter()
    assert response.status_code == 200, response.text
    return done - started, done


@pytest.fixture(scope="module")
def client(triton: Any) -> Any:
    with httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=128)) as c:
        yield c


def test_both_models_ready_with_batching_and_policy_off(client: httpx.Client, triton: Any) -> None:
    for model in MODELS:
        assert client.get(f"{triton.http_url}/v2/models/{model}/ready").status_code == 200
        config = client.get(f"{triton.http_url}/v2/models/{model}/config").json()
        batching = config["dynamic_batching"]
        assert batching["preferred_batch_size"] == [16]
        # Shipped off on this Triton build (see config.pbtxt); the tests below switch it on.
        assert int(batching.get("priority_levels", 0)) == 0
    assert client.get(f"{triton.http_url}/v2/health/ready").status_code == 200


def test_policy_variant_loads_with_priorities_and_bounded_queue(
    launch_triton: Any, model_cache: Path, tmp_path: Path
) -> None:
    shipped = _repository_copy(tmp_path / "shipped", {}) / "embedder" / "config.pbtxt"
    shipped_timeout = re.search(r"default_timeout_microseconds: (\d+)", shipped.read_text())
    assert shipped_timeout and 0 < int(shipped_timeout.group(1)) <= 10_000_000
    # Served with a 30 s default: a request can only shorten its queue timeout, never extend
    # it, and with the shipped 2 s the third busy batch below expired on a slow CI machine
    # (two 64-row batches ahead of it took longer than 2 s on 2 shared cores).
    http_url, metrics_url = _launch_ready(
        launch_triton,
        model_cache,
        _repository_copy(
            tmp_path,
            {r"default_timeout_microseconds: \d+": "default_timeout_microseconds: 30000000"},
        ),
    )
    config = httpx.get(f"{http_url}/v2/models/embedder/config").json()
    batching = config["dynamic_batching"]
    assert batching["priority_levels"] == 2
    assert batching["default_priority_level"] == 2
    policy = batching["default_queue_policy"]
    assert policy["timeout_action"] == "REJECT"
    assert policy["allow_timeout_override"] is True
    assert 0 < int(policy["max_queue_size"]) <= 1024
    assert int(policy["default_timeout_microseconds"]) == 30_000_000

    # A request whose own deadline passes in the queue is refused, not run late.
    url = f"{http_url}/v2/models/embedder/infer"
    # Full batches (max_batch_size 64): each runs alone, so while one runs the others wait
    # in the queue, whenever they arrive (16 rows each could all run as one batch).
    busy = infer_body([MEDIUM_TEXT] * 64)
    with (
        httpx.Client(timeout=60.0) as c,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        busy_futures = [pool.submit(timed_post, c, url, busy) for _ in range(3)]
        _wait_pending(metrics_url, 2)  # one batch running, two queued
        # allow_timeout_override: a caller's own 1 ms deadline replaces the 30 s default.
        response = c.post(url, json=infer_body(["too late"], timeout_us=1_000))
        for future in busy_futures:
            future.result()
    assert response.status_code == TIMEOUT_STATUS, response.text
    assert response.json() == {"error": TIMEOUT_MESSAGE}


def test_int8_is_close_to_fp32(client: httpx.Client, triton: Any) -> None:
    fp32 = embed(client, triton.http_url, "embedder", SENTENCES)
    int8 = embed(client, triton.http_url, "embedder_int8", SENTENCES)
    assert int8.shape == fp32.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-4)
    cosine = (fp32 * int8).sum(axis=1)
    print(f"cosine int8 vs fp32: mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    # Measured over these 40 sentences: mean 0.995, min 0.972 (one- and two-word inputs).
    worst = int(np.argmin(cosine))
    assert cosine.mean() >= 0.985, f"mean cosine {cosine.mean():.4f}"
    assert cosine.min() >= 0.95, f"cosine {cosine[worst]:.4f} for {SENTENCES[worst]!r}"


def test_int8_is_faster_than_fp32(client: httpx.Client, triton: Any) -> None:
    batch = SENTENCES[:16]
    latencies: dict[str, list[float]] = {model: [] for model in MODELS}
    for model in MODELS:  # not timed: first run at this padded shape
        embed(client, triton.http_url, model, batch)
    # Interleaved, so a noisy neighbour on the shared cores slows both alike.
    for _ in range(11):
        for model in MODELS:
            started = time.perf_counter()
            embed(client, triton.http_url, model, batch)
            latencies[model].append(time.perf_counter() - started)
    # The fastest of each: noise on shared cores only ever adds time.
    fp32, int8 = (min(latencies[m]) for m in MODELS)
    print(f"batch of 16: fp32 {fp32 * 1e3:.1f} ms, int8 {int8 * 1e3:.1f} ms")
    # Measured on the 2-core dev VM: fp32 ~90 ms, int8 ~65 ms for this batch.
    assert int8 < fp32, f"int8 {int8 * 1e3:.1f} ms vs fp32 {fp32 * 1e3:.1f} ms"


def test_priority_1_overtakes_queued_priority_2(
    launch_triton: Any, model_cache: Path, tmp_path: Path
) -> None:
    # Its own server with a 30 s queue timeout: with the shipped 2 s, a flood long enough
    # to measure overtaking on 2 shared cores risks expiring (a request can only shorten
    # the timeout, never extend it).
    repository = _repository_copy(
        tmp_path, {r"default_timeout_microseconds: \d+": "default_timeout_microseconds: 30000000"}
    )
    http_url, metrics_url = _launch_ready(launch_triton, model_cache, repository)
    url = f"{http_url}/v2/models/embedder/infer"
    # Many short batches: a priority-1 request still waits for the batch executing when
    # it arrives, so the flood must be many batches long to show it overtaking.
    flood, probes = 12, 4
    flood_body = infer_body([SHORT_TEXT] * 16, priority=2)
    start = threading.Barrier(flood + 1)

    def queued(_: int) -> tuple[float, float]:
        start.wait()
        return timed_post(http, url, flood_body)

    with (
        httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=64)) as http,
        ThreadPoolExecutor(max_workers=1 + flood + 2 * probes) as pool,
    ):
        embed(http, http_url, "embedder", [SHORT_TEXT] * 16)  # connect, warm this shape
        # A long batch first, a full one (max_batch_size 64) so no flood request joins it:
        # the flood queues behind it however late its threads get to send. Without it, a
        # flood whose requests arrived one by one was executed as it came and never all
        # queued at once (a CI run saw 0 of 11 pending: the count is of requests waiting,
        # not executing).
        blocker_body = infer_body([MEDIUM_TEXT] * 64, priority=2)
        blocker = pool.submit(timed_post, http, url, blocker_body)
        time.sleep(0.3)  # sent and started: queued requests are all the metric shows
        flood_futures = [pool.submit(queued, i) for i in range(flood)]
        start.wait()
        _wait_pending(metrics_url, flood)  # the flood is in Triton's queue first
        # Sent together, behind the flood: only the priority differs.
        urgent_futures, late_futures = (
            [
                pool.submit(timed_post, http, url, infer_body([SHORT_TEXT], priority=p))
                for _ in range(probes)
            ]
            for p in (1, 2)
        )
        blocker.result()
        flood_results = [f.result() for f in flood_futures]
        urgent = [f.result() for f in urgent_futures]
        late = [f.result() for f in late_futures]

    urgent_latency = statistics.median(latency for latency, _ in urgent)
    late_latency = statistics.median(latency for latency, _ in late)
    urgent_done = statistics.median(done for _, done in urgent)
    # Every flood request was sent before the priority-1 ones; most must finish later.
    overtaken = sum(done > urgent_done for _, done in flood_results) / flood
    detail = (
        f"priority 1 median {urgent_latency * 1e3:.0f} ms, priority 2 sent at the same "
        f"time {late_latency * 1e3:.0f} ms, {overtaken:.0%} of the earlier priority 2 "
        "overtaken"
    )
    print(detail)  # visible with -s
    assert overtaken >= 0.5, detail
    # Without priorities the two would be alike (sent together); with them the urgent ones
    # wait for the batch executing, the late ones for the flood: about half (a CI run on a
    # busy VM saw 0.52, so the bound leaves room for noise).
    assert urgent_latency < 0.75 * late_latency, detail


def _repository_copy(tmp_path: Path, replacements: dict[str, str]) -> Path:
    """A repository holding only `embedder`, with the shipped-but-off priorities and bounded
    queue switched on (the "#: " lines of config.pbtxt), then edited by regex."""
    repository = tmp_path / "repository"
    shutil.copytree(
        MODEL_REPOSITORY / "embedder",
        repository / "embedder",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    config = repository / "embedder" / "config.pbtxt"
    text = re.sub(r"(?m)^#: ", "", config.read_text())
    for pattern, replacement in replacements.items():
        text, replaced = re.subn(pattern, replacement, text)
        assert replaced == 1, pattern
    config.write_text(text)
    return repository


def _url_from_log(process: Any, log_path: Path, service: str) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        # Up to the end of the line only: the log may be part-way through writing it.
        match = re.search(
            rf"Started {service} at ([\d.]+:\d+)\"?\n", log_path.read_text(errors="replace")
        )
        if match:
            return f"http://{match.group(1)}"
        if process.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"tritonserver never started {service}; log:\n" + tail(log_path), pytrace=False)


def _launch_ready(
    launch_triton: Callable[..., tuple[Any, Path]], cache: Path, repository: Path
) -> tuple[str, str]:
    """The server's HTTP base URL and its metrics URL, once ready."""
    process, log_path = launch_triton(cache, repository)
    http_url = _url_from_log(process, log_path, "HTTPService")
    wait_ready(process, http_url, log_path)
    return http_url, _url_from_log(process, log_path, "Metrics Service") + "/metrics"


def _wait_pending(metrics_url: str, at_least: int) -> None:
    """Until Triton holds ``at_least`` embedder requests waiting in its queue (Triton's
    pending count leaves out the executing batch): sleeping a fixed time instead let slow
    client threads arrive late."""
    deadline = time.monotonic() + 10.0
    pending = 0
    while time.monotonic() < deadline:
        found = re.search(r'nv_inference_pending_request_count\{model="embedder"[^}]*\} (\d+)',
                          httpx.get(metrics_url).text)  # fmt: skip
        pending = int(found.group(1)) if found else 0
        if pending >= at_least:
            return
        time.sleep(0.01)
    pytest.fail(f"only {pending} embedder requests reached Triton, {at_least} expected")


def test_full_queue_is_refused_fast(launch_triton: Any, model_cache: Path, tmp_path: Path) -> None:
    # A 30 s queue timeout, so that only a full queue refuses (not a slow CI expiring one).
    repository = _repository_copy(
        tmp_path,
        {
            r"max_queue_size: \d+": "max_queue_size: 4",
            r"default_timeout_microseconds: \d+": "default_timeout_microseconds: 30000000",
        },
    )
    http_url, _ = _launch_ready(launch_triton, model_cache, repository)

    body = infer_body([MEDIUM_TEXT] * 8)
    concurrency = 32
    start = threading.Barrier(concurrency)

    def one(_: int) -> tuple[httpx.Response, float]:
        start.wait()
        started = time.perf_counter()
        response = http.post(f"{http_url}/v2/models/embedder/infer", json=body)
        return response, time.perf_counter() - started

    with (
        httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=64)) as http,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        results = list(pool.map(one, range(concurrency)))

    served = [latency for response, latency in results if response.status_code == 200]
    refused = [(r, latency) for r, latency in results if r.status_code != 200]
    # At most 4 queued plus the batch executing; the rest are turned away.
    assert len(served) <= 12, f"{len(served)} of {concurrency} served"
    assert refused
    for response, _ in refused:
        assert response.status_code == QUEUE_FULL_STATUS, response.text
        assert response.headers["content-type"] == "application/json"
        assert QUEUE_FULL_MESSAGE in response.json()["error"], response.text
    # Refused at the door, not after waiting: typically faster than the quickest served
    # request. The median, not the slowest: 32 client threads on 2 busy cores can delay any
    # one of them by a few hundred milliseconds (seen on CI: one refusal measured 0.41 s).
    assert statistics.median(latency for _, latency in refused) < min(served)


def test_first_request_after_start_is_warm(launch_triton: Any, model_cache: Path) -> None:
    http_url, _ = _launch_ready(launch_triton, model_cache, MODEL_REPOSITORY)
    text = ["How long does the first request after a restart take?"]
    with httpx.Client(timeout=60.0) as client:
        client.get(f"{http_url}/v2/health/ready")  # connect before timing
        for model in MODELS:
            latencies = []
            for _ in range(15):
                started = time.perf_counter()
                embed(client, http_url, model, text)
                latencies.append(time.perf_counter() - started)
            steady = statistics.median(latencies[4:])
            print(f"{model}: first {latencies[0] * 1e3:.1f} ms, 5-15 {steady * 1e3:.1f} ms")
            # +40 ms absorbs a preemption on shared cores at this ~10 ms scale; a cold
            # onnxruntime session costs far more on its first run.
            assert latencies[0] <= 3 * steady + 0.040, (
                f"{model}: first {latencies[0] * 1e3:.1f} ms, median of 5-15 {steady * 1e3:.1f} ms"
            )
