"""Canary: a weighted split of one model's traffic between versions (or models), say 95/5,
with per-target metrics so a bad version shows before it takes all the traffic.

The split is a policy: change the weights in the config and reload (SIGHUP or the file
watch) to move traffic, no restart. Place it after ``openai`` (it reads ``ctx.model``) and
before ``degrade`` and ``breaker``, which then judge the chosen target. The answer says which
target served it (``x-floodwall-canary``); ``floodwall_canary_requests_total{model,target,
status}`` counts outcomes per target.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

from prometheus_client import Counter

from filters.canary.params import CanaryParams, Split, Target
from proxy.api import CONTINUE, Decision, Deps, Headers, Mutate, Outcome, RequestContext
from proxy.steering import ModelSteeringFilter, send_to, upstream_model

log = logging.getLogger("floodwall.canary")

REQUESTS = Counter(
    "floodwall_canary_requests",
    "Calls of a split model by the target that served them and the status class",
    ["model", "target", "status"],
)


@dataclass(slots=True)
class _State:
    model: str = ""
    target: str | None = None


class CanaryFilter(ModelSteeringFilter):
    Params = CanaryParams

    def __init__(self, params: CanaryParams, deps: Deps) -> None:
        super().__init__(params, deps)
        # Per instance: two of this filter on one route keep their own request state.
        self._state = functools.partial(_State)
        self.p = params
        # Cumulative weights per split, normalised to [0, 1).
        self._cuts = {model: _cuts(split) for model, split in params.splits.items()}
        self._unsplit: set[str] = set()  # models whose streamed calls were left alone (logged)

    def steer(self, ctx: RequestContext) -> Decision:
        model = ctx.model
        split = self.p.splits.get(model or "")
        if model is None or split is None or upstream_model(ctx) is None:
            return CONTINUE
        # A streamed call must stay on a decoupled model. Named by the client (KServe HTTP), the
        # targets are of its kind; sent by the API filter to the model's twin (OpenAI chat),
        # it needs the targets' twins, and without them stays where it is.
        streamed = _streamed(ctx.upstream_path)
        if streamed and not split.streams and upstream_model(ctx) != model:
            if model not in self._unsplit:
                self._unsplit.add(model)
                log.warning("canary: streamed calls of %s are not split: its targets have no "
                            "stream_model", model)  # fmt: skip
            return CONTINUE
        target = self._pick(model, split, ctx)
        st = ctx.state(self._state)
        st.model, st.target = model, target.model
        return send_to(
            ctx, target.stream_model if streamed and target.stream_model else target.model
        )

    def _pick(self, model: str, split: Split, ctx: RequestContext) -> Target:
        who = {"key": ctx.key_id, "tenant": ctx.tenant}.get(split.sticky)
        if who is None:
            x = self.deps.rng.random()
        else:  # the same caller, the same point in [0, 1): the same target until weights move
            digest = hashlib.blake2b(f"{model}\0{who}".encode(), digest_size=8).digest()
            x = int.from_bytes(digest, "big") / 2**64
        for cut, target in self._cuts[model]:
            if x < cut:
                return target
        return self._cuts[model][-1][1]

    async def on_response_headers(self, ctx: RequestContext, headers: Headers) -> Decision:
        target = ctx.state(self._state).target
        if target is None:
            return CONTINUE
        return Mutate(set_headers={"x-floodwall-canary": target})

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        st = ctx.state(self._state)
        if st.target is None:
            return
        # The target's own answer: a stale cached 200 served for its 503 is still its 5xx.
        answered = outcome.upstream_status or outcome.status
        status = f"{answered // 100}xx" if answered else "aborted"
        REQUESTS.labels(st.model, st.target, status).inc()


def _streamed(path: str) -> bool:
    return path.split("?", 1)[0].endswith("/generate_stream")


def _cuts(split: Split) -> list[tuple[float, Target]]:
    total = sum(t.weight for t in split.targets)
    out, acc = [], 0.0
    for t in split.targets:
        if t.weight <= 0:
            continue
        acc += t.weight / total
        out.append((acc, t))
    return out
