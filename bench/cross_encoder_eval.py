"""The semantic cache's judge (filters/cache/judge.py), judged pair by pair on the six held-out
sets: the model alone (no cosine floor, no index) at every cut, as Triton serves it (the int8
ONNX in onnxruntime) and, for a model trained here, in torch (fp32), with its time per pair.
``floodwall cache eval --judge`` measures the same model through the live decision code.

The cut is chosen on the two ``VALIDATION`` sets (the lowest whose wrong-answer rate there
stays within 1.5%); the shipped default (``judge.DEFAULT_CUT``) is reported beside it.

    .venv/bin/python -m bench.cross_encoder_eval                  # the shipped judge, ~2 min
    .venv/bin/python -m bench.cross_encoder_eval --train          # retrain (~30 min on 2 cores)
    .venv/bin/python -m bench.cross_encoder_eval --train --epochs 1   # ~15 minutes
    .venv/bin/python -m bench.cross_encoder_eval --model DIR      # a model trained earlier
    .venv/bin/python -m bench.cross_encoder_eval --served DIR     # `models train-judge`'s output

Writes bench/results/cross_encoder_eval[_<what>].json and .md; a trained model goes to
``--save`` (default: a folder under /tmp), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from filters.cache import judge as judge_model
from filters.cache.evaluate import HELD_OUT, Pair, near_duplicates, reasks
from proxy.config import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results"
VALIDATION = judge_model.VALIDATION
MAX_VALIDATION_WRONG = 0.015
CUTS = tuple(round(0.05 * i, 2) for i in range(1, 20))
MAX_TOKENS, INPUTS = judge_model.MAX_TOKENS, judge_model.INPUTS
_load = judge_model.load


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


def _feed(encodings: list[Any]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def _ort_scorer(tokenizer_dir: Path, onnx_path: Path, threads: int) -> Any:
    """The int8 file scored as Triton's model.py scores it: its tokenizer.json through
    ``tokenizers`` (truncated to MAX_TOKENS longest first, padded to the longest pair)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_TOKENS, strategy="longest_first")
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def score(pairs: list[Pair]) -> np.ndarray[Any, Any]:
        out: list[float] = []
        for i in range(0, len(pairs), 64):
            (logits,) = session.run(
                None, _feed(tok.encode_batch([(p.a, p.b) for p in pairs[i : i + 64]]))
            )
            out += (1 / (1 + np.exp(-logits.ravel()))).tolist()
        return np.asarray(out)

    def one_pair_ms() -> dict[str, float]:
        feed = _feed([tok.encode("How do I reset my password?", "how can I reset my password")])
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
    ap.add_argument("--train", action="store_true", help="train a judge first (the recipe)")
    ap.add_argument("--epochs", type=int, default=judge_model.EPOCHS)
    ap.add_argument("--model", type=Path, help="a trained model folder: judge it, no training")
    ap.add_argument(
        "--served",
        type=Path,
        default=judge_model.SHIPPED_DIR,
        help="a served model's folder (model.onnx, tokenizer.json, training.json) "
        "when neither --train nor --model: default the shipped one",
    )
    ap.add_argument("--save", type=Path, help="where the trained model goes")
    ap.add_argument("--out", help="default: bench/results/cross_encoder_eval[_<what>]")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fw-xenc-", dir="/tmp"))
    results: dict[str, Any] = {"validation_sets": VALIDATION, "held_out": HELD_OUT,
                               "default_cut": judge_model.DEFAULT_CUT}  # fmt: skip
    model_dir = args.model
    if args.train:
        model_dir = args.save or work / "model"
        print(f"== training, {args.epochs} epochs (the model goes to {model_dir})", flush=True)
        results["training"] = judge_model.train(model_dir, args.epochs)
    if model_dir is not None:
        import torch

        torch.set_num_threads(2)
        if "training" not in results and (model_dir / "training.json").exists():
            results["training"] = json.loads((model_dir / "training.json").read_text())
        print("== judged in torch (fp32)", flush=True)
        results["fp32"] = judge(_torch_scorer(model_dir))
        onnx, tokenizer = judge_model.export_int8(model_dir, work / "model.onnx"), model_dir
    else:
        results["training"] = json.loads((args.served / "training.json").read_text())
        onnx, tokenizer = args.served / "model.onnx", args.served
    print("== judged as int8 in onnxruntime", flush=True)
    int8 = _ort_scorer(tokenizer, onnx, threads=1)
    results["int8"] = judge(int8)
    results["int8"]["one_pair_ms_1_thread"] = int8.one_pair_ms()
    results["int8"]["onnx_bytes"] = onnx.stat().st_size
    t = results["training"]
    # The shipped model's results keep the plain name; any other model's say what it is.
    shipped = model_dir is None and args.served.resolve() == judge_model.SHIPPED_DIR.resolve()
    default = "cross_encoder_eval" + ("" if shipped else f"_{t.get('layers', 6)}l{t['epochs']}ep")
    out = Path(args.out or RESULTS / default)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = _markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)


def _markdown(r: dict[str, Any]) -> str:
    t = r["training"]
    dc = r["default_cut"]
    fp32 = r.get("fp32")
    lines = [
        f"The semantic cache's judge (all-MiniLM-L6-v2's first {t.get('layers', 6)} layers "
        f"fine-tuned on pairs; {t['epochs']} epochs, {t['train_rows']} rows, "
        f"{t['train_s'] / 60:.0f} min of training), judged pair "
        "by pair on the held-out sets (target: >= 70% of paraphrases served, <= 2% of traps); "
        f"cut {r['int8']['cut']} chosen on {', '.join(r['validation_sets'])}, and the shipped "
        f"default {dc}",
        "",
        "| set | " + ("fp32: paraphrases | fp32: traps | " if fp32 else "")
        + "int8: paraphrases | int8: traps | int8 at the default cut | int8: near-duplicates "
        "| int8: reframed |",
        "|---|" + ("---:|---:|" if fp32 else "") + "---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name in r["held_out"]:
        q = r["int8"]["sets"][name]
        hit, wrong = q["by_cut"][str(dc)] if str(dc) in q["by_cut"] else q["by_cut"][dc]
        f = fp32["sets"][name] if fp32 else None
        lines.append(
            f"| `{name}` | "
            + (f"{f['hit']:.1%} | {f['wrong']:.1%} | " if f else "")
            + f"{q['hit']:.1%} | {q['wrong']:.1%} | {hit:.1%} / {wrong:.1%} | "
            f"{q['near_duplicates_served']:.0%} | {q['reframed_served']:.0%} |"
        )
    q = r["int8"]["pooled"]
    f = fp32["pooled"] if fp32 else None
    ms = r["int8"]["one_pair_ms_1_thread"]
    lines += [
        "| all six | " + (f"{f['hit']:.1%} | {f['wrong']:.2%} | " if f else "")
        + f"{q['hit']:.1%} | {q['wrong']:.2%} | | | |",
        "",
        f"- int8 in onnxruntime, one pair, one thread: p50 {ms['p50']:.2f} ms, p99 "
        f"{ms['p99']:.2f} ms; model file {r['int8']['onnx_bytes'] / 1e6:.0f} MB",
        f"- traps served (int8, cut {r['int8']['cut']}): "
        + "; ".join(
            f'{t["category"]}: "{t["a"]}" -> "{t["b"]}" ({t["p"]})'
            for name in r["held_out"]
            for t in r["int8"]["sets"][name]["traps_served"]
        ),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
