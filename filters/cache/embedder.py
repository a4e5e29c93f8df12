"""The semantic cache's Triton models over KServe v2 HTTP: prompt embeddings from the
embedder and pair verdicts from the judge, each through its model's dynamic batcher
(concurrent look-ups of all processes become one batch)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np
import orjson

from proxy.http1 import Http1Pool, HTTPProtocolError

TOKEN_OUTPUT = "TOKEN_EMBEDDING"


class EmbedderError(Exception):
    """The embedder did not answer usefully in time; the cache treats it as a miss."""


class Embedder(Protocol):
    async def embed(self, text: str) -> np.ndarray[Any, Any]: ...
    async def close(self) -> None: ...


class TokenEmbedder(Embedder, Protocol):
    """An embedder that also gives each token's vector (the align verifier needs them)."""

    async def embed_tokens(
        self, text: str
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]: ...


class JudgeError(Exception):
    """The judge did not answer usefully in time; the cache treats it as a miss."""


class PairJudge(Protocol):
    async def same_answer(self, cached: str, asked: str) -> float: ...
    async def close(self) -> None: ...


class _TritonHTTP:
    """One Triton model's KServe v2 ``infer`` endpoint over kept-alive connections
    (``proxy/http1.py``: ~0.7 ms less per call than aiohttp at p50; a semantic hit found by
    its vector makes two calls one after the other)."""

    def __init__(self, base_url: str, model: str, timeout_s: float) -> None:
        self.path = f"/v2/models/{model}/infer"
        self.timeout_s = timeout_s
        self._pool = Http1Pool(base_url)

    async def _post(self, request: dict[str, Any]) -> tuple[bytes, str | None]:
        """The raw answer and the length of its JSON header (binary tensors follow it);
        ValueError saying what went wrong when there is no usable answer."""
        try:
            answer = await self._pool.post(
                self.path, orjson.dumps(request), "application/json", self.timeout_s
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError, HTTPProtocolError) as exc:
            raise ValueError(f"unreachable or slow: {exc!r}") from None
        if answer.status != 200:
            raise ValueError(f"answered {answer.status}: {answer.body[:200]!r}")
        return answer.body, answer.headers.get("inference-header-content-length")

    async def close(self) -> None:
        await self._pool.close()


class TritonEmbedder(_TritonHTTP):
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        input_name: str = "TEXT",
        output_name: str = "EMBEDDING",
        timeout_s: float = 0.5,
    ) -> None:
        super().__init__(base_url, model, timeout_s)
        self.input_name, self.output_name = input_name, output_name

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        vec, _ = await self._infer(text, tokens=False)
        return vec

    async def embed_tokens(self, text: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The sentence vector and the last-layer vector of each word piece with a letter or
        digit ([n, d] float16; see triton_models/embedder/1/model.py)."""
        vec, tok = await self._infer(text, tokens=True)
        if tok is None or tok.ndim != 3 or tok.shape[2] != vec.size:
            raise EmbedderError("embedder returned no usable token vectors")
        return vec, word_rows(tok[0])

    async def _infer(
        self, text: str, *, tokens: bool
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]:
        # Tensors come back as raw bytes (KServe's binary tensor extension) after a short
        # JSON header: Triton neither prints nor the cache parses 384 decimal floats.
        binary = {"binary_data": True}
        outputs = [{"name": self.output_name, "parameters": binary}]
        request: dict[str, Any] = {
            "inputs": [
                {"name": self.input_name, "shape": [1, 1], "datatype": "BYTES", "data": [text]}
            ],
            "outputs": outputs,
        }
        if tokens:
            outputs.append({"name": TOKEN_OUTPUT, "parameters": binary})
            request["parameters"] = {"token_embeddings": True}
        try:
            raw, header_length = await self._post(request)
        except ValueError as exc:
            raise EmbedderError(f"embedder {exc}") from None
        try:
            vec = _tensor(raw, header_length, self.output_name).reshape(-1)
            tok = _tensor(raw, header_length, TOKEN_OUTPUT) if tokens else None
        except (ValueError, KeyError, StopIteration, TypeError) as exc:
            raise EmbedderError(f"embedder answer not understood: {exc!r}") from None
        if vec.size == 0 or not np.isfinite(vec).all():
            raise EmbedderError("embedder returned no usable vector")
        return vec, tok


class TritonPairJudge(_TritonHTTP):
    """The ``pair_judge`` model (triton_models/pair_judge): one pair per call; Triton's
    dynamic batcher joins concurrent look-ups."""

    def __init__(self, base_url: str, model: str = "pair_judge", *, timeout_s: float = 0.5) -> None:
        super().__init__(base_url, model, timeout_s)

    async def same_answer(self, cached: str, asked: str) -> float:
        """The probability that ``cached``'s answer serves ``asked``."""
        request = {
            "inputs": [
                {"name": "CACHED", "shape": [1, 1], "datatype": "BYTES", "data": [cached]},
                {"name": "ASKED", "shape": [1, 1], "datatype": "BYTES", "data": [asked]},
            ],
            "outputs": [{"name": "SAME_ANSWER", "parameters": {"binary_data": True}}],
        }
        try:
            raw, header_length = await self._post(request)
        except ValueError as exc:
            raise JudgeError(f"judge {exc}") from None
        try:
            p = float(_tensor(raw, header_length, "SAME_ANSWER").reshape(-1)[0])
        except (ValueError, KeyError, StopIteration, TypeError, IndexError) as exc:
            raise JudgeError(f"judge answer not understood: {exc!r}") from None
        if not 0.0 <= p <= 1.0:  # NaN fails both
            raise JudgeError(f"judge returned {p!r}, not a probability")
        return p


def word_rows(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """One prompt's word-piece vectors without the zero rows that pad a batch."""
    kept: np.ndarray[Any, Any] = rows[np.any(rows != 0, axis=1)]
    return kept


_DTYPES = {"FP32": "<f4", "FP16": "<f2", "INT32": "<i4"}


def _tensor(raw: bytes, header_length: str | None, name: str) -> np.ndarray[Any, Any]:
    """The output ``name`` of a KServe v2 answer, in its shape: binary (after a JSON header
    of ``header_length`` bytes) or, from a server without the extension, JSON data."""
    if header_length is None:
        out = next(o for o in orjson.loads(raw)["outputs"] if o["name"] == name)
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    start = int(header_length)
    offset = start
    for out in orjson.loads(raw[:start])["outputs"]:
        size = int(out.get("parameters", {}).get("binary_data_size", 0))
        if out["name"] == name:
            dtype = np.dtype(_DTYPES[out["datatype"]])
            if offset + size > len(raw) or size != dtype.itemsize * int(np.prod(out["shape"])):
                raise ValueError(f"output {name}: {size} bytes for shape {out['shape']}")
            data = np.frombuffer(raw, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            return data.reshape(out["shape"]).copy()
        offset += size
    raise KeyError(name)
