"""Triton python-backend model: text -> all-MiniLM-L6-v2 sentence embedding.

Input  TEXT       BYTES [1]   one UTF-8 string per batch row
Output EMBEDDING  FP32 [384]  mean-pooled, L2-normalised (same as sentence-transformers'
                              `encode(normalize_embeddings=True)`)
       TOKENS     INT32 [1]   tokens the input used after truncation, incl. [CLS]/[SEP]
                              (feeds OpenAI `usage.prompt_tokens`)
       TOKEN_EMBEDDING  FP16 [-1, 384]  the last layer's vector of each word piece that has
                              a letter or digit ([CLS], [SEP] and punctuation left out),
                              zero rows padding to the longest row of the request; only for
                              a request with the parameter `token_embeddings: true` (the
                              semantic cache's verifier aligns two prompts' words: a missing
                              "?" must not count as a missing word)

The ONNX graph (built by `floodwall models build`, see proxy/models.py) already does the
pooling and normalisation; this file tokenises, pads and runs it. Every request of one
`execute()` call goes into a single onnxruntime run, padded to the longest text in the
batch: that is what turns Triton's dynamic batching into throughput.

One implementation for every embedder variant: `triton_models/embedder_int8/1/model.py`
is a symlink to this file (Triton's python backend loads model.py by path, so a symlink
is enough). The ONNX directory comes from the model's config.pbtxt parameter `onnx_dir`
(a path relative to `$FLOODWALL_CACHE/models/`, or absolute), else from the Triton model
name: `embedder` -> `<cache>/models/embedder/`, `embedder_int8` -> `.../embedder_int8/`.

Runs inside the python backend stub, i.e. in the venv that launched Triton; it needs
numpy (< 2 for the stub's tensor bridge), tokenizers and onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

# sentence-transformers' max_seq_length for this model; tokenizer.json ships 128.
MAX_TOKENS = 256
# Thread budget for one instance on a 2-core box: intra-op 2 lets one batch use both cores
# (measured: batch 16 took 46 ms with 2 threads vs 80 ms with 1). One instance plus
# dynamic batching beats two single-threaded instances, and inter-op parallelism buys
# nothing for a sequential BERT graph. Fewer where Triton may run on fewer CPUs (taskset,
# cpuset; the benchmarks give the model a core of its own, bench/placement.py): a second
# thread on the same core only adds switches.
MAX_INTRA_OP_THREADS = 2
INTER_OP_THREADS = 1


# Tokenising takes time in proportion to the whole text, though only the first MAX_TOKENS
# tokens are kept. Two bounds: texts past MAX_INPUT_BYTES are refused (the OpenAI route
# allows at most 16,384 characters, filters/openai max_input_chars), and a text longer than
# HEAD_CHARS is tokenised from a prefix that ends where BERT's pre-tokeniser splits (before
# a space, a punctuation mark or a CJK ideograph) and already holds more tokens than are
# kept: the normaliser and pre-tokeniser work within words, so such a prefix's tokens are
# the whole text's first tokens and the kept ones are the same. A prefix with too few (long
# runs of spaces, words past WordPiece's 100 characters) is doubled until it has enough or
# is the whole text. (A 1 MB text took this instance 725 ms before these bounds.)
MAX_INPUT_BYTES = 65536
HEAD_CHARS = 8 * MAX_TOKENS
_SPLIT_SCAN = 512  # characters looked back for a split point before doubling
# BERT's CJK ideograph blocks (the normaliser puts spaces around each).
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # fmt: skip


def _splits_before(c: str) -> bool:
    """The pre-tokeniser always splits before ``c``: a space the normaliser keeps as one (a
    control character such as \\x0b is dropped instead, joining its neighbours), a
    punctuation mark, a CJK ideograph."""
    if c in " \t\n\r" or (c.isascii() and not c.isalnum() and c.isprintable()):
        return True
    category = unicodedata.category(c)
    return category == "Zs" or category[0] == "P" or any(lo <= ord(c) <= hi for lo, hi in _CJK)


def head(text: str, tokens_in: Callable[[str], int], max_tokens: int = MAX_TOKENS) -> str:
    """The shortest prefix tried (see HEAD_CHARS) that tokenises to the same kept tokens as
    ``text``; ``tokens_in(s)``: the tokens of ``s`` untruncated, [CLS] and [SEP] included."""
    n = HEAD_CHARS
    while n < len(text):
        end = next((i for i in range(n, max(0, n - _SPLIT_SCAN), -1) if _splits_before(text[i])), 0)
        if end > 0 and tokens_in(text[:end]) > max_tokens:
            return text[:end]
        n *= 2
    return text


def _intra_op_threads() -> int:
    return max(1, min(MAX_INTRA_OP_THREADS, len(os.sched_getaffinity(0))))


# The stub's stderr is Triton's: tracebacks logged here land in Triton's log.
logger = logging.getLogger("floodwall.triton.embedder")


def _onnx_dir(args: dict[str, str]) -> Path:
    """Where this model's `model.onnx` and `tokenizer.json` live (see the module docstring)."""
    config = json.loads(args.get("model_config") or "{}")
    parameter = config.get("parameters", {}).get("onnx_dir", {}).get("string_value", "")
    name = parameter or args.get("model_name") or "embedder"
    cache = os.environ.get("FLOODWALL_CACHE") or str(Path.home() / ".cache" / "floodwall")
    # An absolute parameter wins over the cache root (Path's / keeps the right side).
    return Path(cache).expanduser() / "models" / Path(name).expanduser()


def _asks_token_embeddings(request: pb_utils.InferenceRequest) -> bool:
    # Opt-in by parameter, not by requested output: a client that lists no outputs gets all
    # of them, and most never want a vector per token.
    try:
        return json.loads(request.parameters() or "{}").get("token_embeddings") is True
    except (ValueError, AttributeError):
        return False


def _word_rows(hidden: np.ndarray, words: list[list[int]]) -> np.ndarray:
    """[rows, longest, d] float16: each row's word-piece vectors, then zeros."""
    longest = max(1, max(len(w) for w in words))
    out = np.zeros((len(words), longest, hidden.shape[-1]), dtype=np.float16)
    for row, positions in enumerate(words):
        out[row, : len(positions)] = hidden[row, positions]
    return out


def _invalid(message: str) -> pb_utils.InferenceResponse:
    # INVALID_ARG maps to HTTP 400 / gRPC INVALID_ARGUMENT for the caller.
    return pb_utils.InferenceResponse(
        output_tensors=[],
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG),
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args.get("model_name", "embedder")
        model_dir = _onnx_dir(args)
        onnx_path = model_dir / "model.onnx"
        tokenizer_path = model_dir / "tokenizer.json"
        if not onnx_path.is_file() or not tokenizer_path.is_file():
            raise pb_utils.TritonModelException(
                f"{self.name}: {onnx_path} (or tokenizer.json) not found; run "
                "`floodwall models build` (or set FLOODWALL_CACHE to the cache it built into)"
            )

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        # pad_id/pad_token from BERT's vocab; no fixed length: pad to the longest in batch.
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        # The same vocabulary untruncated, unpadded: counts a long text's prefix (head()).
        self.counter = Tokenizer.from_file(str(tokenizer_path))
        self.counter.no_truncation()
        self.counter.no_padding()

        options = ort.SessionOptions()
        options.intra_op_num_threads = _intra_op_threads()
        options.inter_op_num_threads = INTER_OP_THREADS
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads would otherwise spin between batches and steal the CPU that
        # Triton's frontend, Envoy and the ext_proc server need on the same 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )

    def execute(
        self, requests: list[pb_utils.InferenceRequest]
    ) -> list[pb_utils.InferenceResponse]:
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, first row, row count)
        wants_tokens: set[int] = set()

        for index, request in enumerate(requests):
            try:
                rows = self._decode(request)
            except ValueError as exc:
                responses[index] = _invalid(str(exc))
                continue
            spans.append((index, len(texts), len(rows)))
            texts.extend(rows)
            if _asks_token_embeddings(request):
                wants_tokens.add(index)

        if texts:
            try:
                embeddings, counts, hidden, words = self._embed(texts, bool(wants_tokens))
            except Exception as exc:  # one bad batch must not take the model down
                logger.exception("%s: inference failed for %d texts", self.name, len(texts))
                error = pb_utils.TritonError(f"{self.name}: inference failed: {exc}")
                for index, _, _ in spans:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
            else:
                for index, start, count in spans:
                    stop = start + count
                    tensors = [
                        pb_utils.Tensor("EMBEDDING", embeddings[start:stop]),
                        pb_utils.Tensor("TOKENS", counts[start:stop]),
                    ]
                    if index in wants_tokens and hidden is not None:
                        rows = _word_rows(hidden[start:stop], words[start:stop])
                        tensors.append(pb_utils.Tensor("TOKEN_EMBEDDING", rows))
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
        return [r for r in responses if r is not None]

    def _decode(self, request: pb_utils.InferenceRequest) -> list[str]:
        tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
        if tensor is None:
            raise ValueError(f"{self.name}: input TEXT is required")
        values = tensor.as_numpy().reshape(-1)
        rows: list[str] = []
        for value in values:
            raw = value if isinstance(value, bytes) else str(value).encode()
            if len(raw) > MAX_INPUT_BYTES:
                raise ValueError(f"{self.name}: TEXT is over {MAX_INPUT_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{self.name}: TEXT is not valid UTF-8 ({exc.reason})") from None
            if not text:
                raise ValueError(f"{self.name}: TEXT must not be empty")
            rows.append(text)
        if not rows:
            raise ValueError(f"{self.name}: TEXT has no elements")
        return rows

    def _embed(
        self, texts: list[str], tokens: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[list[int]]]:
        def tokens_in(text: str) -> int:
            return len(self.counter.encode(text).ids)

        encodings = self.tokenizer.encode_batch([head(t, tokens_in) for t in texts])
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        token_type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        wanted = ["sentence_embedding", "last_hidden_state"] if tokens else ["sentence_embedding"]
        outputs = self.session.run(
            wanted,
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            },
        )
        counts = attention_mask.sum(axis=1, dtype=np.int32).reshape(-1, 1)
        embeddings = np.ascontiguousarray(outputs[0], dtype=np.float32)
        # Positions of the word pieces with a letter or digit, per row (for TOKEN_EMBEDDING).
        words = [
            [i for i, (t, special) in enumerate(zip(e.tokens, e.special_tokens_mask, strict=True))
             if not special and any(c.isalnum() for c in t)]
            for e in encodings
        ] if tokens else []  # fmt: skip
        return embeddings, counts, outputs[1] if tokens else None, words

    def finalize(self) -> None:
        self.session = None
