"""Triton python-backend STAND-IN for a generative LLM. It is not a model.

`sim_llm` (and `sim_llm_stream`, whose 1/model.py is a symlink to this file) lets benchmarks
and demos of the gateway run on machines without a GPU: it answers with the contract of a
chat LLM and takes the *time* one would take on one accelerator, but it generates
pseudo-words from a seeded RNG and spends that time asleep, so it uses almost no CPU and a
2-core box can still run Envoy, the processor and a load generator beside it.

Inputs   PROMPT       BYTES [1]  flattened chat prompt, UTF-8, at least one token
         MAX_TOKENS   INT32 [1]  optional, default 64, clamped to 1..1024
         TEMPERATURE  FP32  [1]  optional, default 1.0; ignored except as part of the seed
Outputs  TEXT               BYTES [1]  generated text (streaming: the new piece)
         PROMPT_TOKENS      INT32 [1]  tokens in PROMPT by the rule below
         COMPLETION_TOKENS  INT32 [1]  tokens in TEXT by the same rule, <= MAX_TOKENS
         FINISH_REASON      BYTES [1]  "length" (hit MAX_TOKENS) or "stop" (stopped early)

Token rule (both directions): a token is a run of word characters or one other
non-space character, i.e. `len(re.findall(r"\\w+|[^\\w\\s]", text))`. "Hello, world!" is 4.

Determinism: the token stream is a function of (PROMPT, TEMPERATURE) only, and whether and
where it stops early is a function of (PROMPT, TEMPERATURE, MAX_TOKENS): the same request
always gets the same TEXT (exact-cache demos), and a shorter MAX_TOKENS gives a prefix of a
longer one unless it stopped early, as greedy decoding would. With MAX_TOKENS >= 3, a
`stop_fraction` of seeds stop early, at a length in [ceil(MAX_TOKENS/2), MAX_TOKENS-1],
ending in ".".

Cost model (config.pbtxt `parameters`): one execute() is one batch on one accelerator.
Prefill is compute-bound, so it costs `prefill_ms_per_token` x the batch's prompt tokens;
then one decode step serves every sequence still generating and costs
`decode_step_base_ms + decode_step_ms_per_seq` x that count. A sequence leaves the batch
when done (its response is sent right then); requests queued meanwhile wait for the next
execute() (static batching, as Triton's dynamic batcher gives a python model).
The sleeps follow an absolute schedule, so per-step overheads do not accumulate.

Decoupled (`sim_llm_stream`): every `stream_tokens_per_chunk` tokens a response with the new
TEXT piece; the last response also carries the counts and FINISH_REASON and is flagged
TRITONSERVER_RESPONSE_COMPLETE_FINAL. The concatenated pieces equal sim_llm's TEXT.

Bad input (missing/empty/non-UTF-8/over-long PROMPT) is a per-request INVALID_ARG error.
Cancelled requests leave the batch at the next check (every few steps), freeing their share
of the step time: Triton cancels a request when a generate_stream/gRPC-stream client goes
away; a plain HTTP /infer or /generate client that disconnects is NOT cancelled by Triton
2.51, so its sequence runs to the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import struct
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 1024
DEFAULT_TEMPERATURE = 1.0
# is_cancelled() is a round trip to the Triton process: check every few steps, not every one.
CANCEL_CHECK_EVERY_STEPS = 4

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "st")

logger = logging.getLogger("floodwall.triton.sim_llm")


def count_tokens(text: str) -> int:
    return len(TOKEN_RE.findall(text))


def _seed(*parts: bytes) -> int:
    digest = hashlib.blake2b(b"\x00".join(parts), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class CostModel:
    prefill_ms_per_token: float
    decode_step_base_ms: float
    decode_step_ms_per_seq: float
    stop_fraction: float
    max_prompt_tokens: int
    stream_tokens_per_chunk: int


def _parameters(model_config: dict) -> CostModel:  # type: ignore[type-arg]
    raw = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}

    def number(key: str, default: float) -> float:
        value = float(raw[key]) if raw.get(key) else default
        if not math.isfinite(value) or value < 0:
            raise pb_utils.TritonModelException(f"sim_llm: parameter {key}={value} must be >= 0")
        return value

    cost = CostModel(
        prefill_ms_per_token=number("prefill_ms_per_token", 0.2),
        decode_step_base_ms=number("decode_step_base_ms", 8.0),
        decode_step_ms_per_seq=number("decode_step_ms_per_seq", 0.5),
        stop_fraction=number("stop_fraction", 0.25),
        max_prompt_tokens=int(number("max_prompt_tokens", 8192)),
        stream_tokens_per_chunk=max(1, int(number("stream_tokens_per_chunk", 1))),
    )
    if cost.stop_fraction > 1:
        raise pb_utils.TritonModelException("sim_llm: parameter stop_fraction must be <= 1")
    return cost


def generate(
    prompt: bytes, max_tokens: int, temperature: float, stop_fraction: float
) -> tuple[list[str], str]:
    """(pieces, finish_reason): one piece per completion token; "".join(pieces) is TEXT."""
    temp_bytes = struct.pack("<f", temperature)
    stream = random.Random(_seed(b"text", prompt, temp_bytes))
    decide = random.Random(_seed(b"stop", prompt, temp_bytes, struct.pack("<i", max_tokens)))
    length, finish = max_tokens, "length"
    if max_tokens >= 3 and decide.random() < stop_fraction:
        length, finish = decide.randint(math.ceil(max_tokens / 2), max_tokens - 1), "stop"

    # The stream does not depend on MAX_TOKENS: a shorter answer is a prefix of a longer one.
    pieces: list[str] = []
    capital = True
    for index in range(length):
        if index > 0 and pieces[-1][-1].isalpha() and stream.random() < 0.1:
            mark = stream.choice((",", ",", "."))
            pieces.append(mark)
            capital = mark == "."
            continue
        word = _word(stream)
        if capital:
            word, capital = word.capitalize(), False
        pieces.append(word if index == 0 else " " + word)
    if finish == "stop":
        # Stopping is the model choosing to end its sentence: a final "." after a word.
        if length >= 2 and not pieces[-2][-1].isalpha():
            pieces[-2] = " " + _word(stream)
        pieces[-1] = "."
    return pieces, finish


def _word(stream: random.Random) -> str:
    return "".join(
        stream.choice(_ONSETS) + stream.choice(_VOWELS) + stream.choice(_CODAS)
        for _ in range(stream.choice((1, 1, 2, 2, 3)))
    )


def _invalid(message: str) -> pb_utils.TritonError:
    # INVALID_ARG maps to HTTP 400 / gRPC INVALID_ARGUMENT for the caller.
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


def _scalar(request: pb_utils.InferenceRequest, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"sim_llm: {name} must hold exactly one element, got {values.size}")
    return values


class _Sequence:
    """One request in the batch: its generated pieces and where it stands."""

    def __init__(self, request: pb_utils.InferenceRequest, cost: CostModel) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        prompt = _scalar(request, "PROMPT")
        if prompt is None:
            raise ValueError("sim_llm: input PROMPT is required")
        raw = prompt[0] if isinstance(prompt[0], bytes) else str(prompt[0]).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"sim_llm: PROMPT is not valid UTF-8 ({exc.reason})") from None
        self.prompt_tokens = count_tokens(text)
        if self.prompt_tokens == 0:
            raise ValueError("sim_llm: PROMPT must contain at least one token")
        if self.prompt_tokens > cost.max_prompt_tokens:
            raise ValueError(
                f"sim_llm: PROMPT has {self.prompt_tokens} tokens, the limit is "
                f"{cost.max_prompt_tokens}"
            )
        max_tokens = _scalar(request, "MAX_TOKENS")
        limit = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens[0])
        limit = min(max(limit, 1), MAX_TOKENS_LIMIT)
        temperature = _scalar(request, "TEMPERATURE")
        temp = DEFAULT_TEMPERATURE if temperature is None else float(temperature[0])
        if not math.isfinite(temp):
            raise ValueError("sim_llm: TEMPERATURE must be finite")
        self.pieces, self.finish = generate(raw, limit, temp, cost.stop_fraction)
        self.sent = 0  # pieces already streamed
        self.done = False

    def outputs(self, stop: int, final: bool) -> list[pb_utils.Tensor]:
        text = "".join(self.pieces[self.sent : stop]).encode()
        self.sent = stop
        tensors = [pb_utils.Tensor("TEXT", np.array([text], dtype=np.object_))]
        if final:
            tensors += [
                pb_utils.Tensor("PROMPT_TOKENS", np.array([self.prompt_tokens], dtype=np.int32)),
                pb_utils.Tensor("COMPLETION_TOKENS", np.array([len(self.pieces)], dtype=np.int32)),
                pb_utils.Tensor(
                    "FINISH_REASON", np.array([self.finish.encode()], dtype=np.object_)
                ),
            ]
        return tensors


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        self.cost = _parameters(model_config)
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.name = args.get("model_name", "sim_llm")
        logger.info("%s: stand-in LLM (sleeps, no real model), %s", self.name, self.cost)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        # Every response goes through the response sender, decoupled or not, so a sequence
        # that finishes early is answered at once instead of waiting for the whole batch.
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        active: list[_Sequence] = []
        for request in requests:
            try:
                active.append(_Sequence(request, self.cost))
            except ValueError as exc:
                response = pb_utils.InferenceResponse(output_tensors=[], error=_invalid(str(exc)))
                request.get_response_sender().send(response, flags=final)
            except Exception as exc:  # never let one request take the model down
                logger.exception("%s: bad request", self.name)
                response = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"sim_llm: {exc}")
                )
                request.get_response_sender().send(response, flags=final)
        if not active:
            return None

        clock = time.monotonic()
        clock += self.cost.prefill_ms_per_token * sum(s.prompt_tokens for s in active) / 1e3
        _sleep_until(clock)
        step = 0
        chunk = self.cost.stream_tokens_per_chunk
        while active:
            clock += (
                self.cost.decode_step_base_ms + self.cost.decode_step_ms_per_seq * len(active)
            ) / 1e3
            _sleep_until(clock)
            step += 1
            check_cancel = step % CANCEL_CHECK_EVERY_STEPS == 0
            still: list[_Sequence] = []
            for seq in active:
                if check_cancel and seq.request.is_cancelled():
                    error = pb_utils.TritonError(
                        "sim_llm: cancelled", pb_utils.TritonError.CANCELLED
                    )
                    seq.sender.send(
                        pb_utils.InferenceResponse(output_tensors=[], error=error), flags=final
                    )
                    continue
                finished = step >= len(seq.pieces)
                if finished:
                    response = pb_utils.InferenceResponse(seq.outputs(len(seq.pieces), True))
                    seq.sender.send(response, flags=final)
                    continue
                if self.streaming and step - seq.sent >= chunk:
                    seq.sender.send(pb_utils.InferenceResponse(seq.outputs(step, False)))
                still.append(seq)
            active = still
        return None

    def finalize(self) -> None:
        logger.info("%s: finalized", self.name)


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
