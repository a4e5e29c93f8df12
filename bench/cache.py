"""The cache: hit latency through Envoy, index look-up time, and the evaluation tables.

1. Through the gateway (the shipped local stack: Envoy, processor, Redis, Triton), side by
   side in one open loop (the four kinds interleaved, latency from the scheduled send time):
   - ``gateway``: the gateway's own overhead: the same kind of chat request (headers and
     body through Envoy and the processor) with ``Cache-Control: no-store`` (the cache does
     nothing) for a model that does not exist, so the gateway answers it itself (404);
   - ``exact``: a repeated chat request, answered from Redis;
   - ``semantic``: a paraphrase of a cached question (embedding by Triton, index, the
     judge by Triton, Redis);
   - ``miss``: the same chat request with ``Cache-Control: no-cache`` (embedding, the model
     call, the store; only the look-up itself is skipped).
   At a low rate and at a fixed higher rate, first with Triton on cores of its own (the
   accelerator it stands in for; ``bench/placement.py``), then sharing every core with the
   gateway (points named ", shared"; ``--shared``: those only). Targets, judged on the
   first: exact hit p99 <= 2 ms and semantic hit p99 <= 15 ms above the gateway's own p99.
2. ``VectorIndex`` look-up at 10k and 100k entries in one scope (clustered synthetic
   384-d vectors; flat scan below 20k, IVF above), p50/p99 and recall of a near-duplicate.
   Target: 100k <= 5 ms.
3. ``cache eval`` on the shipped sets: pairs.jsonl (the guards were developed against it),
   holdout.jsonl to holdout17.jsonl (each written apart; see filters/cache/README.md), by the
   guards and the shipped verifier (fp32 vectors) and the judge (the local config's decider,
   with its embedder and cut). The targets are
   judged on ``evaluate.HELD_OUT``: the sets neither the verifier nor the judge was trained
   on and no guard rule was written from.

    .venv/bin/python -m bench.cache            # 11-40 minutes (most of it the labelled sets)
    .venv/bin/python -m bench.cache --quick
    .venv/bin/python -m bench.cache --alone    # ~9 minutes: each semantic kind by itself
    .venv/bin/python -m bench.cache --judges DIR DIR --rounds 2   # judges in turn, ~3 min each
    .venv/bin/python -m bench.cache --speculation --rounds 3      # with and without, in turn

Writes bench/results/cache.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import placement
from bench.loadgen import HttpRequest, histogram, open_loop_mix, quantiles
from bench.run import write_results
from filters.cache import evaluate, judge
from filters.cache.index import VectorIndex
from filters.cache.words import WordsFirst
from proxy.config import REPO_ROOT
from tests.helpers import DEMO_KEY, echo_server, local_config_dict, stack_config, start_stack

LOOKUP_SECONDS = "floodwall_cache_lookup_duration_seconds"
RESULTS = REPO_ROOT / "bench" / "results"
JUDGE_FILES = ("model.onnx", "tokenizer.json", "training.json")  # what train-judge writes
SEMANTIC_TARGET_MS = 15.0  # issue #5: a semantic hit's p99 above the gateway's own
CACHED = "How do I rotate the API keys of my account without downtime?"
# Shares most of CACHED's words: words-first (the local config's semantic.judge.words_first)
# finds it with no embedding, so its hit is one Triton call, the judge's.
PARAPHRASE = "how can I rotate my account's API keys with no downtime"
# Shares too few (overlap 0.27 < 0.3): embedded, found by its vector, then judged (two calls).
PARAPHRASE_BY_VECTOR = (
    "I need to cycle the API keys on my account but can't afford an outage. What should I do?"
)
SETS = ("pairs", "holdout", *(f"holdout{i}" for i in range(2, 18)),
        *(f"everyday{i}" for i in range(1, 5)))  # fmt: skip
# The targets are judged on the sets neither the guards nor the verifier were shaped by.
FRESH = evaluate.HELD_OUT
PROBE = "what is the way to rotate the API keys of my account without any downtime"
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {DEMO_KEY}"}


def _chat(question: str, model: str = "sim-llm", **headers: str) -> HttpRequest:
    body = {"model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}  # fmt: skip
    return HttpRequest("POST", "/v1/chat/completions", {**HEADERS, **headers},
                       json.dumps(body).encode())  # fmt: skip


def gateway_points(
    quick: bool,
    split: placement.Split | None,
    alone: bool = False,
    judge_dir: Path | None = None,
    speculate: bool = True,
) -> dict[str, Any]:
    """The two load points, with Triton on its own cores (``split``) or sharing all of them
    (None); the point names say which. ``alone``: instead, each semantic kind by itself
    beside the gateway's requests (at the same rates), to see what the other kinds' model
    calls on the same cores add to its latency in the full mix. ``judge_dir``: Triton serves
    the judge in that folder (``models train-judge``'s output) instead of the shipped one.
    ``speculate`` False: the local config without words-first's speculation."""
    from proxy import models

    models.build()
    suffix = "" if split is not None else ", shared"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fw-cache-", dir="/tmp") as d, echo_server() as echo:
        cfg = stack_config(Path(d) / "run", echo)
        if judge_dir is not None:
            cfg["triton"]["model_repository"] = str(_repository_with_judge(Path(d), judge_dir))
        cfg["listener"]["access_log"] = False
        # Each semantic kind asks one paraphrase over and over: with its hits copied under
        # its own key, all but the first would be exact look-ups. Off, every one takes the
        # semantic path this benchmark measures (a first-time paraphrase's cost).
        cache = next(f for f in cfg["filters"] if f["type"] == "cache")
        cache["params"]["alias_semantic_hits"] = False
        if not speculate:
            cache["params"]["semantic"]["judge"]["words_first"].pop("speculate")  # must be on
        start = functools.partial(start_stack, cfg, Path(d) / "floodwall.yaml")
        with placement.apart(split, start) as stack:
            _points(stack, quick, suffix, split, out, alone)
    return out


def _repository_with_judge(work: Path, judge_dir: Path) -> Path:
    """A model repository under ``work``: the shipped one's models, linked, with
    ``judge_dir``'s model.onnx, tokenizer.json and training.json as the judge's."""
    shipped = REPO_ROOT / "triton_models"
    repo = work / "models"
    repo.mkdir()
    for model in shipped.iterdir():
        if model.name != judge.TRITON_MODEL:
            (repo / model.name).symlink_to(model)
    mine = repo / judge.TRITON_MODEL
    shutil.copytree(shipped / judge.TRITON_MODEL, mine, symlinks=True,
                    ignore=shutil.ignore_patterns(*JUDGE_FILES, "__pycache__"))  # fmt: skip
    for name in JUDGE_FILES:
        (mine / "1" / name).symlink_to((judge_dir / name).resolve())
    return repo


# (label, what it is: kept in the results, gateway_points' options)
Variant = tuple[str, dict[str, Any], dict[str, Any]]


def judge_variants(dirs: list[Path]) -> list[Variant]:
    """``--judges``: each folder's judge, with its training.json's layers and model hash,
    under the local config (speculating or not, as it says)."""
    out = []
    words_first = local_judging()[2]
    speculating = words_first is not None and words_first.speculate is not None
    for d in dirs:
        info = json.loads((d / "training.json").read_text())
        about = {"judge": str(d), "layers": info.get("layers"),
                 "onnx_sha256": info.get("onnx_sha256"), "speculate": speculating}  # fmt: skip
        out.append((f"`{d}` ({info.get('layers')} layers)", about, {"judge_dir": d}))
    return out


# ``--speculation``: the local config as shipped, and without words-first's speculation.
SPECULATION: list[Variant] = [
    ("speculating", {"speculate": True}, {"speculate": True}),
    ("not speculating", {"speculate": False}, {"speculate": False}),
]


def variant_rounds(
    variants: list[Variant], rounds: int, split: placement.Split | None
) -> dict[str, Any]:
    """The two load points once per variant per round, the variants taking turns (this VM's
    speed drifts within minutes: compare variants within a round)."""
    runs = []
    for r in range(rounds):
        for label, about, options in variants:
            print(f"== round {r + 1}, {label}", flush=True)
            runs.append({"round": r + 1, "variant": label, **about,
                         "gateway": gateway_points(False, split, **options)})  # fmt: skip
    return {"runs": runs}


def variants_markdown(res: dict[str, Any], what: str) -> str:
    lines = [f"{what} side by side ({res['machine']['cpus']} CPUs; the mixed load of "
             "`bench/cache.py`, each variant's stack in turn; p99 added over the gateway's "
             "own p99; judge per call: Triton's compute_infer; speculations: the judge's "
             "answers on a guess made during the embedding, used / wasted / skipped)", "",
             "| round | variant | load | by words: p50 / p99 added | "
             "by vector: p50 / p99 added | judge per call | speculations |",
             "|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for run in res["runs"]:
        for name, point in run["gateway"].items():
            k = point["kinds"]
            g50, g99 = k["gateway"]["p50_ms"], k["gateway"]["p99_ms"]
            cells = [f"{k[kind]['p50_ms'] - g50:+.2f} / {k[kind]['p99_ms'] - g99:+.2f} ms"
                     for kind in ("semantic", "semantic_by_vector")]  # fmt: skip
            per = point["triton_per_call_ms"].get(judge.TRITON_MODEL, {})
            lines.append(f"| {run['round']} | {run['variant']} | {name} | {cells[0]} | "
                         f"{cells[1]} | {per.get('compute_infer', float('nan')):.2f} ms | "
                         f"{_speculations(point)} |")  # fmt: skip
    lines += ["", "Per variant, the median over the rounds of each point's p99 added (target "
              f"<= {SEMANTIC_TARGET_MS:g} ms; a single run's p99 moves by a few ms on this VM):",
              "", "| variant | load | by words | by vector | worst run, by vector |",
              "|---|---|---:|---:|---:|"]  # fmt: skip
    for d in dict.fromkeys(run["variant"] for run in res["runs"]):
        mine = [run["gateway"] for run in res["runs"] if run["variant"] == d]
        for name in mine[0]:
            added = {
                kind: [g[name]["kinds"][kind]["p99_ms"] - g[name]["kinds"]["gateway"]["p99_ms"]
                       for g in mine]
                for kind in ("semantic", "semantic_by_vector")
            }  # fmt: skip
            words, vector = (float(np.median(added[k])) for k in added)
            lines.append(f"| {d} | {name} | {words:+.2f} ms | {vector:+.2f} ms | "
                         f"{max(added['semantic_by_vector']):+.2f} ms |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _points(
    stack: Any,
    quick: bool,
    suffix: str,
    split: placement.Split | None,
    out: dict[str, Any],
    alone: bool = False,
) -> None:
    try:
        host, port = stack.cfg.listener.address, stack.cfg.listener.port
        mix = [
            (
                "gateway",
                _chat(CACHED, model="no-such-model", **{"cache-control": "no-store"}),
                1.0,
            ),
            ("exact", _chat(CACHED), 1.0),
            # Half each: together the semantic hits load Triton as one kind at the full rate.
            ("semantic", _chat(PARAPHRASE), 0.5),
            ("semantic_by_vector", _chat(PARAPHRASE_BY_VECTOR), 0.5),
            # Fewer misses: each one is a model call, and the point is the hits.
            ("miss", _chat(CACHED, **{"cache-control": "no-cache"}), 0.25),
        ]
        # Store the entry, check both hits answer as they should, warm everything up.
        warm = open_loop_mix(host, port, [mix[4]], rate=5, seconds=1, mark=None)
        assert warm["miss"]["statuses"] == {"200": 5}, warm
        time.sleep(0.5)
        check = open_loop_mix(host, port, mix[1:4], rate=30, seconds=1,
                              mark=b"x-floodwall-cache: hit")  # fmt: skip
        _reset(f"http://127.0.0.1:{stack.cfg.processor.admin_port}")
        for kind in ("exact", "semantic", "semantic_by_vector"):
            if check[kind]["marked"] != check[kind]["requests"]:
                raise RuntimeError(f"{kind} requests were not all hits: {check[kind]}")
        admin = f"http://127.0.0.1:{stack.cfg.processor.admin_port}"
        triton = f"http://127.0.0.1:{stack.cfg.triton.http_port}"
        semantic = next(f for f in stack.cfg.filters if f.type == "cache").params["semantic"]
        cache_models = [semantic["model"], *([semantic["judge"]["model"]]
                                             if semantic.get("judge") else [])]  # fmt: skip
        # Each kind counts answers from the level it is meant to test. A semantic look-up
        # that misses (the embedder over its budget under load) stores the paraphrase as
        # an entry of its own, and later ones would hit it exactly: every point starts
        # from the base entry alone.
        marks = {"exact": b"x-floodwall-cache: hit-exact",
                 "semantic": b"x-floodwall-cache: hit-semantic",
                 "semantic_by_vector": b"x-floodwall-cache: hit-semantic"}  # fmt: skip
        # 12 and 30 requests/s per kind (each semantic kind half, misses a quarter of that).
        # Long enough for a p99 that one stall of the VM does not decide: at 6 requests/s,
        # 90 s gives each semantic kind 540 samples (the p99 is the 6th slowest; until
        # session 29, 30 s: the 2nd slowest of 180, which moved by several ms run to run),
        # and at 15/s, 30 s gives 450.
        plan = [("low_load", mix, 39.0, 90.0), ("fixed_rate", mix, 97.5, 30.0)]
        if alone:  # the same per-kind rates: 12 and 30 gateway requests/s, 6 and 15 semantic
            plan = [(f"{kind[0]} alone, {name}", [mix[0], kind], rate, seconds)
                    for kind in mix[2:4]
                    for name, rate, seconds in (("low_load", 18.0, 90.0),
                                                ("fixed_rate", 45.0, 30.0))]  # fmt: skip
        for name, kinds, rate, seconds in plan:
            seconds = 5.0 if quick else seconds
            name += suffix
            # The base entry alone: a probe that missed is an entry of its own, which shares
            # PARAPHRASE's words and would take words-first's clear candidate away.
            for _ in range(5):
                _reset(admin)
                open_loop_mix(host, port, [mix[4]], rate=5, seconds=1)
                time.sleep(1.5)  # the change feed brings the entry within a second
                if _until_semantic(host, port) == 0:
                    break
            else:
                raise RuntimeError("the first probe after a reset kept missing")
            hits_before = _counters(admin + "/metrics")
            before = histogram(admin + "/metrics", LOOKUP_SECONDS, ("level",))
            stats_before = _triton_stats(triton, cache_models)
            per = open_loop_mix(host, port, kinds, rate=rate, seconds=seconds, mark=marks)
            decide = quantiles(before, histogram(admin + "/metrics", LOOKUP_SECONDS, ("level",)))
            in_triton = _per_call(stats_before, _triton_stats(triton, cache_models))
            counters = _counters(admin + "/metrics")
            # How this point's semantic hits found their candidate (the two kinds' sum).
            found_by, speculations = ({k.split('"')[1]: v - hits_before.get(k, 0.0)
                                       for k, v in counters.items() if k.startswith(prefix)}
                                      for prefix in ("semantic_hits", "speculations"))  # fmt: skip
            out[name] = {"rate_total": rate, "seconds": seconds, "kinds": per,
                         "placement": split.describe() if split else "shared",
                         "processor_lookup_ms": decide, "cache_counters": counters,
                         "semantic_hits_found_by": found_by, "speculations": speculations,
                         "triton_per_call_ms": in_triton}  # fmt: skip
            print(f"   semantic hits found by: {found_by}; speculations: {speculations}",
                  flush=True)  # fmt: skip
            print(f"   counters so far: {counters}", flush=True)
            line = "  ".join(
                f"{k} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms ({v['marked']} hits)"
                for k, v in per.items()
            )
            print(f"   {name} ({rate:.0f}/s total): {line}", flush=True)
    finally:
        stack.stop()


def _triton_stats(base: str, models: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Triton's cumulative statistics of ``models``: (count, ns) per phase."""
    import urllib.request

    out = {}
    for m in models:
        with urllib.request.urlopen(f"{base}/v2/models/{m}/stats", timeout=5) as r:
            st = json.load(r)["model_stats"][0]["inference_stats"]
        out[m] = {k: (int(v["count"]), int(v["ns"])) for k, v in st.items() if k != "fail"}
    return out


def _per_call(
    before: dict[str, dict[str, tuple[int, int]]], after: dict[str, dict[str, tuple[int, int]]]
) -> dict[str, dict[str, float]]:
    """Mean milliseconds per call in each phase Triton times (queue, compute_input,
    compute_infer: the python backend's execute, compute_output), and the call count, over
    one point: where a semantic hit's model time goes."""
    out: dict[str, dict[str, float]] = {}
    for m, phases in after.items():
        calls = phases["success"][0] - before[m]["success"][0]
        row: dict[str, float] = {"calls": calls}
        for phase, (count, ns) in phases.items():
            n = count - before[m][phase][0]
            if phase != "success" and n > 0:
                row[phase] = (ns - before[m][phase][1]) / n / 1e6
        out[m] = row
    return out


def _until_semantic(host: str, port: int) -> int:
    """Waits until this process's index serves the base entry again (the invalidation and
    the re-stores reach it through the change feed), probing with a paraphrase of its own:
    a probe that misses is stored under its own text and never asked again. Returns how many
    missed."""
    for i in range(50):
        probe = _chat(f"{PROBE} {'please ' * i}".strip())
        got = open_loop_mix(host, port, [("probe", probe, 1.0)], rate=1, seconds=1,
                            mark=b"x-floodwall-cache: hit-semantic")["probe"]  # fmt: skip
        if got["marked"]:
            return i
    raise RuntimeError("the base entry never became a semantic hit after the reset")


def _reset(admin: str) -> None:
    """Drops every cached answer (the local config's demo admin token)."""
    import urllib.request

    req = urllib.request.Request(f"{admin}/cache/invalidate?all=1", method="POST",
                                 headers={"authorization": "Bearer fw-demo-admin"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def _speculations(point: dict[str, Any]) -> str:
    spec = point.get("speculations", {})
    return " / ".join(f"{spec.get(o, 0):.0f}" for o in ("used", "wasted", "skipped"))


def _counters(url: str) -> dict[str, float]:
    """The cache's error, veto and store counters (totals since start)."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(
            (
                "floodwall_cache_errors_total",
                "floodwall_cache_vetoes_total",
                "floodwall_cache_stores_total",
                "floodwall_cache_lookups_total",
                "floodwall_cache_semantic_hits_total",
                "floodwall_cache_speculations_total",
            )
        ):
            name, value = line.rsplit(" ", 1)
            out[name.replace("floodwall_cache_", "")] = float(value)
    return out


def index_points(quick: bool) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {}
    for n in (10_000, 100_000):
        topics = rng.standard_normal((max(200, n // 50), 384)).astype(np.float32)
        x = topics[rng.integers(0, topics.shape[0], n)]
        x += 0.6 * rng.standard_normal((n, 384)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ix = VectorIndex(384)
        for i in range(n):
            ix.add(str(i), x[i])
        t0 = time.perf_counter()
        if ix.wants_clustering():
            ix.cluster_now()
        cluster_s = time.perf_counter() - t0
        queries = 200 if quick else 1000
        times, found = [], 0
        for i in rng.choice(n, queries, replace=False):
            q = x[i] + 0.02 * rng.standard_normal(384).astype(np.float32)
            t = time.perf_counter()
            hits = ix.search(q, 4)
            times.append((time.perf_counter() - t) * 1000)
            found += bool(hits) and hits[0].key == str(i)
        flat = []
        for i in rng.choice(n, 50, replace=False):
            t = time.perf_counter()
            s = x @ x[i]
            np.argpartition(s, -4)[-4:]
            flat.append((time.perf_counter() - t) * 1000)
        out[str(n)] = {
            "entries": n, "mode": "ivf" if ix.clustered else "flat",
            "clustering_s": round(cluster_s, 2),
            "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "recall_at_1": found / queries,
            "flat_scan_p50_ms": float(np.percentile(flat, 50)),
        }  # fmt: skip
        r = out[str(n)]
        print(f"   index {n:>6}: {r['mode']} p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
              f"recall {r['recall_at_1']:.3f} (flat scan p50 {r['flat_scan_p50_ms']:.2f} ms)",
              flush=True)  # fmt: skip
    return out


def eval_points() -> tuple[dict[str, Any], dict[str, Any]]:
    """The shipped sets judged by the guards (at the recommended threshold) and by the shipped
    verifier and the judge; then the held-out sets among every set's questions
    (``all_stored_points``)."""
    from filters.cache.params import JUDGE_THRESHOLD, load_verifier

    verifier = load_verifier("shipped")
    model, cut, words_first = local_judging()
    out: dict[str, Any] = {}
    more = {model, judge.TRITON_MODEL} - {"embedder"}
    with evaluate.private_embedder("embedder", *sorted(more)) as url:
        for name in SETS:
            path = evaluate.SHIPPED_PAIRS.with_name(f"{name}.jsonl")
            # The guards and the verifier with the vectors they were developed and trained
            # on; the judge as the local config runs it.
            r = evaluate.run(path, evaluate_threshold(), url, "embedder", verifier)
            r["judge"] = evaluate.run(path, evaluate_threshold(), url, model, judge_cut=cut,
                                      judge_threshold=JUDGE_THRESHOLD,
                                      words_first=words_first)["judge"]  # fmt: skip
            out[name] = {k: r[k] for k in ("pairs", "threshold", "hit_rate", "wrong_hit_rate",
                                           "thresholds", "guards", "by_category",
                                           "recommended_threshold", "verifier", "judge",
                                           "near_duplicates")}  # fmt: skip
            out[name]["one_index"] = r["one_index"]
            v = r["verifier"]
            print(f"   eval {name}: guards hit {r['hit_rate']:.1%} wrong "
                  f"{r['wrong_hit_rate']:.1%} at {r['threshold']}; verifier hit "
                  f"{v['hit_rate']:.1%} wrong {v['wrong_hit_rate']:.1%}; near-duplicates "
                  f"{r['near_duplicates']['hit_rate']:.1%} / "
                  f"{v['near_duplicates_hit_rate']:.1%}; one index "
                  f"{v['one_index']['hit_rate']:.1%} / {v['one_index']['wrong_hit_rate']:.1%}; "
                  f"judge {_rates(r['judge'])}, one index {_rates(r['judge']['one_index'])}",
                  flush=True)  # fmt: skip
        return out, all_stored_points(url, verifier)


def all_stored_points(url: str, verifier: Any) -> dict[str, Any]:
    """Each held-out set looked up in one index holding the questions of every shipped set
    (a cache of ~6,700 entries across many topics), by the shipped verifier and by the
    judge: embedded once."""
    from filters.cache.params import JUDGE_THRESHOLD

    sets = {n: evaluate.read_pairs(evaluate.SHIPPED_PAIRS.with_name(f"{n}.jsonl")) for n in SETS}
    questions = list(dict.fromkeys(p.a for ps in sets.values() for p in ps))
    texts = questions + [p.b for n in FRESH for p in sets[n]]
    vectors, tokens = evaluate.embed_all_tokens(texts, url, "embedder", tokens=verifier.align)
    model, cut, words_first = local_judging()
    judged, _ = evaluate.embed_all_tokens(texts, url, model, tokens=False)
    out: dict[str, Any] = {"verifier": {}, "judge": {}, "judge_embedding_only": {}}
    for n in FRESH:
        out["verifier"][n] = evaluate.one_index_report(
            sets[n], vectors, threshold=verifier.threshold, verifier=verifier, tokens=tokens,
            distractors=questions,
        )  # fmt: skip
        by_judge = functools.partial(
            evaluate.one_index_report, sets[n], judged, threshold=JUDGE_THRESHOLD,
            distractors=questions, judge_cut=cut,
            ask_judge=lambda asks: evaluate.judge_all(asks, url),
        )  # fmt: skip
        out["judge"][n] = by_judge(words_first=words_first)
        out["judge_embedding_only"][n] = by_judge()
        print(f"   all stored {n}: verifier {_rates(out['verifier'][n])}, judge "
              f"{_rates(out['judge'][n])} (embedding only: "
              f"{_rates(out['judge_embedding_only'][n])})", flush=True)  # fmt: skip
    return out


def local_judging() -> tuple[str, float, WordsFirst | None]:
    """The local config's semantic embedder, judge cut and words-first rule: the judge is
    measured as shipped."""
    from filters.cache.params import SemanticParams

    cache = next(f for f in local_config_dict()["filters"] if f["type"] == "cache")
    semantic = SemanticParams.model_validate(cache["params"]["semantic"])
    assert semantic.judge is not None, "the local config's cache decides with the judge"
    return semantic.model, semantic.judge.cut, semantic.judge.words_rule()


def evaluate_threshold() -> float:
    from filters.cache.params import RECOMMENDED_THRESHOLD

    return RECOMMENDED_THRESHOLD


def summary(res: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for name, point in res["gateway"].items():
        k = point["kinds"]
        base = k["gateway"]["p99_ms"]
        s[name] = {
            "exact_added_p99_ms": k["exact"]["p99_ms"] - base,
            "semantic_added_p99_ms": k["semantic"]["p99_ms"] - base,
            "semantic_by_vector_added_p99_ms": k["semantic_by_vector"]["p99_ms"] - base,
            "miss_p99_ms": k["miss"]["p99_ms"],
        }
    # Judged where Triton has cores of its own (an accelerator's stand-in), if it had.
    judged = [n for n, p in res["gateway"].items() if p.get("placement") != "shared"] or list(s)

    def worst(key: str) -> float:
        return float(max(s[n][key] for n in judged))

    s["judged_points"] = judged
    s["targets"] = {
        "exact_hit_added_p99_le_2ms": worst("exact_added_p99_ms") <= 2.0,
        # Found by its words (one Triton call) and by its vector (two): both are hits the
        # target covers, so it is met only if both are.
        "semantic_hit_by_words_added_p99_le_15ms": worst("semantic_added_p99_ms")
        <= SEMANTIC_TARGET_MS,
        "semantic_hit_by_vector_added_p99_le_15ms": worst("semantic_by_vector_added_p99_ms")
        <= SEMANTIC_TARGET_MS,
        "index_100k_p99_le_5ms": res["index"]["100000"]["p99_ms"] <= 5.0,
        "held_out_hit_ge_70pct": min(res["eval"][n]["hit_rate"] for n in FRESH) >= 0.70,
        "held_out_wrong_le_2pct": max(res["eval"][n]["wrong_hit_rate"] for n in FRESH) <= 0.02,
    }
    judged_sets = [res["eval"][n]["judge"] for n in FRESH if "judge" in res["eval"][n]]
    if judged_sets:
        # The shipped decider (the local config's): the target on each held-out set.
        s["targets"]["judge_held_out_hit_ge_70pct"] = (
            min(j["hit_rate"] for j in judged_sets) >= 0.70
        )
        s["targets"]["judge_held_out_wrong_le_2pct"] = (
            max(j["wrong_hit_rate"] for j in judged_sets) <= 0.02
        )
        s["judge_held_out_pooled"] = _pooled(judged_sets, list(FRESH))
    held_out = verifier_held_out(res)
    if held_out:
        ver = [res["eval"][n]["verifier"] for n in held_out]
        s["targets"]["verifier_held_out_hit_ge_70pct"] = min(v["hit_rate"] for v in ver) >= 0.70
        s["targets"]["verifier_held_out_wrong_le_2pct"] = (
            max(v["wrong_hit_rate"] for v in ver) <= 0.02
        )
        # The same sets with all of a set's questions stored together, as a live cache holds
        # them (a nearer other question can take a paraphrase's hit or serve a trap).
        one = [v["one_index"] for v in ver]
        s["targets"]["verifier_held_out_one_index_hit_ge_70pct"] = (
            min(o["hit_rate"] for o in one) >= 0.70
        )
        s["targets"]["verifier_held_out_one_index_wrong_le_2pct"] = (
            max(o["wrong_hit_rate"] for o in one) <= 0.02
        )
        s["verifier_held_out_pooled"] = _pooled(ver, held_out)
    return s


def _pooled(reports: list[dict[str, Any]], sets: list[str]) -> dict[str, Any]:
    """Several sets as one: paraphrases served and traps served, over their counts."""
    cats = [(c, x) for r in reports for c, x in r["by_category"].items()]
    para = [x for c, x in cats if c == "paraphrase"]
    traps = [x for c, x in cats if c != "paraphrase"]
    return {
        "sets": sets,
        "hit_rate": sum(x["served"] for x in para) / sum(x["pairs"] for x in para),
        "wrong_hit_rate": sum(x["served"] for x in traps) / sum(x["pairs"] for x in traps),
        "traps": sum(x["pairs"] for x in traps),
    }


def verifier_held_out(res: dict[str, Any]) -> list[str]:
    """The fresh sets the shipped verifier was not trained on."""
    trained = set(res.get("verifier_trained_on", ["pairs.jsonl", "holdout.jsonl"]))
    return [n for n in FRESH if f"{n}.jsonl" not in trained and "verifier" in res["eval"][n]]


def gateway_markdown(res: dict[str, Any]) -> list[str]:
    """The through-the-gateway tables of ``res`` (latency per kind, how semantic hits were
    found, the cache's own time, Triton's per call)."""
    split = next((p["placement"] for p in res["gateway"].values()
                  if isinstance(p.get("placement"), dict)), None)  # fmt: skip
    where = (f"points without \", shared\": {placement.words(split)}; \", shared\": "
             f"{placement.words(None)}" if split else placement.words(None))  # fmt: skip
    lines = [f"Cache ({res['machine']['cpus']} CPUs; through Envoy with the shipped local "
             f"stack; the kinds interleaved in one open loop; semantic: a paraphrase "
             f"words-first finds, semantic_by_vector: one found by its embedding, each "
             f"taking the semantic path every time (alias_semantic_hits off); {where})", "",
             "| load | kind | p50 | p90 | p99 | p99 added over gateway | answered at its level "
             "| statuses |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, point in res["gateway"].items():
        base = point["kinds"]["gateway"]["p99_ms"]
        for kind, v in point["kinds"].items():
            added = "" if kind == "gateway" else f"{v['p99_ms'] - base:+.2f} ms"
            each = point["kinds"][kind]["target_rps"]
            lines.append(f"| {name} | {kind} ({each:.0f}/s) | "
                         f"{v['p50_ms']:.2f} ms | {v['p90_ms']:.2f} ms | {v['p99_ms']:.2f} ms | "
                         f"{added} | "
                         f"{v['marked']}/{v['requests']} | {v['statuses']} |")  # fmt: skip
    lines += ["", "Semantic hits by how their candidate was found (both semantic kinds, and the "
              "probes before each point): " + "; ".join(
                  f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                          sorted(p.get("semantic_hits_found_by", {}).items()))
                  for name, p in res["gateway"].items())]  # fmt: skip
    lines += [
        "",
        "Time the cache itself takes in the processor (its histogram, bucket bounds):",
        "",
        "| load | level | look-ups | p50 <= | p99 <= |",
        "|---|---|---:|---:|---:|",
    ]
    for name, point in res["gateway"].items():
        for level, q in point["processor_lookup_ms"].items():
            lines.append(f"| {name} | {level} | {q['count']} | {q['p50_le_ms']:g} ms | "
                         f"{q['p99_le_ms']:g} ms |")  # fmt: skip
    lines += ["", "Time in Triton per call, by model (its statistics over the point; compute_infer "
              "is the python backend's execute, model run included):", "",
              "| load | model | calls | queue | compute_input | compute_infer | compute_output |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, point in res["gateway"].items():
        for model, t in point.get("triton_per_call_ms", {}).items():
            phases = " | ".join(
                f"{t[k]:.2f} ms" if k in t else ""
                for k in ("queue", "compute_input", "compute_infer", "compute_output")
            )
            lines.append(f"| {name} | {model} | {t['calls']:.0f} | {phases} |")  # fmt: skip
    return lines


def markdown(res: dict[str, Any]) -> str:
    lines = gateway_markdown(res)
    lines += ["", "| index entries | mode | p50 | p99 | recall@1 | flat scan p50 | clustering |",
              "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for v in res["index"].values():
        lines.append(f"| {v['entries']} | {v['mode']} | {v['p50_ms']:.2f} ms | "
                     f"{v['p99_ms']:.2f} ms | {v['recall_at_1']:.3f} | "
                     f"{v['flat_scan_p50_ms']:.2f} ms | {v['clustering_s']} s |")  # fmt: skip
    ev = res["eval"]
    names = [n for n in SETS if n in ev]
    cols = [n for n in ("pairs", *FRESH) if n in ev]
    lines += ["", "Hit rate on paraphrases / wrong answers on traps, per threshold, the guards "
              f"alone (the development set and the held-out ones; last column: {cols[-1]} "
              "with the threshold alone):", "",
              "| threshold | pairs (dev) | " + " | ".join(cols[1:]) + f" | {cols[-1]}, no "
              "guards |", "|---:|" + "---:|" * (len(cols) + 1)]  # fmt: skip
    for rows in zip(*(ev[n]["thresholds"] for n in cols), strict=True):
        if rows[0]["threshold"] > 0.95:
            continue
        cells = [f"{x['hit_rate']:.1%} / {x['wrong_hit_rate']:.1%}" for x in rows]
        last = rows[-1]
        cells.append(f"{last['hit_rate_unguarded']:.1%} / {last['wrong_hit_rate_unguarded']:.1%}")
        lines.append(f"| {rows[0]['threshold']:.3f} | " + " | ".join(cells) + " |")
    if all("verifier" in ev[n] for n in names):
        v0 = ev[names[0]]["verifier"]
        trained = {t.removesuffix(".jsonl") for t in res.get("verifier_trained_on", [])}
        lines += ["", f"Each set: paraphrases served / traps served by the guards (threshold "
                  f"{ev[names[0]]['threshold']}) and by the shipped verifier (cosine ≥ "
                  f"{v0['threshold']}, p ≥ {v0['cut']}); the set's own questions asked again "
                  "re-cased or framed (\"I was wondering, ...\"; trained on), in framing no "
                  "training saw (\"Can you tell me ...\", \"Hello there! ...\", \"... Any help "
                  "appreciated.\") and with a typo, served by the verifier:", "",
                  "| set | verifier | guards | verifier | verifier, one index | re-cased or "
                  "framed | other framing | typo |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for n in names:
            v, r = ev[n]["verifier"], ev[n]
            again = {k: f"{x['rate']:.1%}" for k, x in v.get("reasks", {}).items()}
            lines.append(f"| {n} | {'trained on' if n in trained else '**held out**'} | "
                         f"{r['hit_rate']:.1%} / {r['wrong_hit_rate']:.1%} | "
                         f"{v['hit_rate']:.1%} / {v['wrong_hit_rate']:.1%} | "
                         f"{_rates(v['one_index'])} | "
                         f"{v['near_duplicates_hit_rate']:.1%} | {again.get('reask', '')} | "
                         f"{again.get('typo', '')} |")  # fmt: skip
        lines += ["", "\"One index\": all of the set's questions stored together and each "
                  "paraphrase or trap looked up among them, as a live cache meets it (a "
                  "question nearer than its own can take a paraphrase's hit or serve a trap "
                  "its answer)."]  # fmt: skip
    if all("judge" in ev[n] for n in names):
        j0 = ev[names[0]]["judge"]
        lines += ["", f"Each set by the judge (the local config's decider; cosine ≥ "
                  f"{j0['threshold']}, p ≥ {j0['cut']}): paraphrases served / traps served, "
                  "pair by pair and with the set's questions stored together; its own "
                  "questions re-cased or framed, in other framing and with a typo:", "",
                  "| set | judge | judge | judge, one index | re-cased or framed | other "
                  "framing | typo |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for n in names:
            j = ev[n]["judge"]
            again = {k: f"{x['rate']:.1%}" for k, x in j.get("reasks", {}).items()}
            seen = "**held out**" if n in FRESH else ("validation" if n in judge.VALIDATION
                                                     else "trained on")  # fmt: skip
            lines.append(f"| {n} | {seen} | {_rates(j)} | {_rates(j['one_index'])} | "
                         f"{j['near_duplicates_hit_rate']:.1%} | {again.get('reask', '')} | "
                         f"{again.get('typo', '')} |")  # fmt: skip
    every = res.get("eval_all_stored") or {}
    for decider, reports in every.items():
        if not reports:
            continue
        first = next(iter(reports.values()))
        lines += ["", f"The held-out sets looked up among the questions of all {len(names)} "
                  f"sets ({first['stored']} entries), by the {decider}: paraphrases "
                  "served their own question's answer / traps served any answer; then the "
                  "paraphrases served another question's answer, and every wrong answer "
                  "(both kinds) over all pairs. Questions from different sets can be the "
                  "same question, so part of these \"wrong\" answers are right.", "",
                  "| set | served / traps served | paraphrases served another | "
                  "wrong answers |", "|---|---:|---:|---:|"]  # fmt: skip
        for n, o in reports.items():
            lines.append(f"| {n} | {_rates(o)} | {o['paraphrases_served_another']} | "
                         f"{o['wrong_answers']} ({o['wrong_answer_rate']:.1%}) |")  # fmt: skip
    lines += _speculation_lines(ev, every.get("judge") or {})
    for decider in ("verifier", "judge"):
        pooled = res["summary"].get(f"{decider}_held_out_pooled")
        if pooled:
            lines += ["", f"{decider.capitalize()} on the held-out sets "
                      f"({', '.join(pooled['sets'])}) as one: {pooled['hit_rate']:.1%} of "
                      f"paraphrases served, {pooled['wrong_hit_rate']:.2%} of {pooled['traps']} "
                      "traps served."]  # fmt: skip
    t = res["summary"]["targets"]
    lines += ["", "Targets (latency judged on " + ", ".join(res["summary"]["judged_points"])
              + "): " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                  for k, v in t.items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def _speculation_lines(ev: dict[str, Any], among_all: dict[str, Any]) -> list[str]:
    """How often words-first's speculation guessed the candidate the embedding found, for
    the held-out sets' paraphrases (``one_index_report``'s ``speculation``)."""
    out = []
    for where, reports in (("each set's questions stored together",
                            {n: ev[n]["judge"]["one_index"] for n in FRESH if n in ev}),
                           ("among all sets' questions", among_all)):  # fmt: skip
        counts = [r["speculation"]["true"] for r in reports.values() if "speculation" in r]
        if not counts:
            continue
        embedded, guessed, right = (
            sum(c.get(k, 0) for c in counts) for k in ("embedded", "guessed", "guessed_nearest")
        )
        share = right / max(embedded, 1)
        out.append(f"Speculation (words_first.speculate), {where}: of the held-out "
                   f"paraphrases that went on to the embedding and found a candidate "
                   f"({embedded}), {guessed} had a guess and {right} ({share:.0%}) a guess "
                   "that was that candidate.")  # fmt: skip
    return [line for sentence in out for line in ("", sentence)]


def _rates(o: dict[str, Any]) -> str:
    return f"{o['hit_rate']:.1%} / {o['wrong_hit_rate']:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shared", action="store_true",
                    help="only the points with Triton sharing every core")  # fmt: skip
    ap.add_argument("--alone", action="store_true",
                    help="only each semantic kind by itself beside the gateway's requests, "
                         "into <out>_alone.{json,md} (~9 minutes)")  # fmt: skip
    ap.add_argument(
        "--judges",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="only the two load points with each judge in turn (folders as "
        "`models train-judge` writes them), into <out>_judges.{json,md}",
    )
    ap.add_argument("--speculation", action="store_true",
                    help="only the two load points with and without words-first's speculation "
                         "in turn, into <out>_speculation.{json,md}")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2,
                    help="with --judges or --speculation (~3 min a variant)")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "cache"))
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    if args.judges or args.speculation:
        if args.alone or args.quick or args.rounds < 1 or (args.judges and args.speculation):
            ap.error("--judges or --speculation (one) takes --rounds N >= 1 and neither "
                     "--alone nor --quick")  # fmt: skip
        for d in args.judges or ():
            missing = [n for n in JUDGE_FILES if not (d / n).is_file()]
            if missing:
                ap.error(f"{d}: no {', '.join(missing)} (a `models train-judge` folder)")
        variants = judge_variants(args.judges) if args.judges else SPECULATION
        res |= variant_rounds(variants, args.rounds, placement.Split.choose(args.shared))
        out = Path(args.out + ("_judges" if args.judges else "_speculation"))
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        md = variants_markdown(res, "Judges" if args.judges else "Speculation on and off")
        out.with_suffix(".md").write_text(md)
        print(md)
        return
    if args.alone:
        res["gateway"] = gateway_points(args.quick, placement.Split.choose(args.shared), True)
        out = Path(args.out + "_alone")
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        md = "\n".join(gateway_markdown(res)) + "\n"
        out.with_suffix(".md").write_text(md)
        print(md)
        return
    print("== through the gateway", flush=True)
    res["gateway"] = {}
    split = placement.Split.choose(args.shared)
    if split is not None:
        res["gateway"] |= gateway_points(args.quick, split)  # Triton on its own cores
    res["gateway"] |= gateway_points(args.quick, None)  # and sharing them, side by side
    print("== index look-up", flush=True)
    res["index"] = index_points(args.quick)
    print("== evaluation sets", flush=True)
    res["eval"], res["eval_all_stored"] = eval_points()
    from filters.cache.params import load_verifier

    shipped = load_verifier("shipped")
    res["verifier_trained_on"] = shipped.about.get("trained_on", []) if shipped else []
    res["summary"] = summary(res)
    write_results(Path(args.out), res, markdown(res))


if __name__ == "__main__":
    main()
