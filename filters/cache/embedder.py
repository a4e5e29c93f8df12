"""Prompt embeddings from Triton's embedder (KServe v2 HTTP), through its dynamic batcher:
concurrent look-ups of all processes become one batch on the model."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson


class EmbedderError(Exception):
    """The embedder did not answer usefully in time; the cache treats it as a miss."""


class Embedder(Protocol):
    async def embed(self, text: str) -> np.ndarray[Any, Any]: ...
    async def close(self) -> None: ...


class TritonEmbedder:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        input_name: str = "TEXT",
        output_name: str = "EMBEDDING",
        timeout_s: float = 0.5,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/v2/models/{model}/infer"
        self.input_name, self.output_name = input_name, output_name
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    async def embed(self, text: str) -> np.ndarray[Any, Any]:
        # The vector comes back as raw float32 (KServe's binary tensor extension) after a
        # short JSON header: Triton neither prints nor the cache parses 384 decimal floats.
        body = orjson.dumps(
            {
                "inputs": [
                    {"name": self.input_name, "shape": [1, 1], "datatype": "BYTES",
                     "data": [text]}
                ],
                "outputs": [{"name": self.output_name, "parameters": {"binary_data": True}}],
            }
        )  # fmt: skip
        try:
            async with self._client().post(
                self.url, data=body, headers={"content-type": "application/json"}
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise EmbedderError(f"embedder answered {resp.status}: {raw[:200]!r}")
                header_length = resp.headers.get("Inference-Header-Content-Length")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EmbedderError(f"embedder unreachable or slow: {exc!r}") from None
        try:
            vec = _vector(raw, header_length, self.output_name)
        except (ValueError, KeyError, StopIteration, TypeError) as exc:
            raise EmbedderError(f"embedder answer not understood: {exc!r}") from None
        if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
            raise EmbedderError("embedder returned no usable vector")
        return vec

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _vector(raw: bytes, header_length: str | None, name: str) -> np.ndarray[Any, Any]:
    """The output ``name`` of a KServe v2 answer: binary (after a JSON header of
    ``header_length`` bytes) or, from a server without the extension, JSON data."""
    if header_length is None:
        out = next(o for o in orjson.loads(raw)["outputs"] if o["name"] == name)
        return np.asarray(out["data"], dtype=np.float32)
    start = int(header_length)
    offset = start
    for out in orjson.loads(raw[:start])["outputs"]:
        size = int(out.get("parameters", {}).get("binary_data_size", 0))
        if out["name"] == name:
            if out["datatype"] != "FP32" or offset + size > len(raw):
                raise ValueError(f"output {name}: {out['datatype']}, {size} bytes")
            return np.frombuffer(raw, dtype="<f4", count=size // 4, offset=offset).copy()
        offset += size
    raise KeyError(name)
