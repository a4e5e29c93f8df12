"""The job queue in Redis: what the processor (submit, read, cancel) and the workers (take,
run, finish, retry) share. Every state change is one Lua script, so a job, its queue entry and
the depth counters never disagree, whoever crashes when.

Layout (``P`` = the configured prefix; its {hash tag} puts everything in one cluster slot):

- ``P:job:{id}``  hash: tenant, key_id, priority, status, attempts, created/updated/finished,
  ``total``/``done`` (progress), per request ``m:i``/``u:i``/``b:i`` (method, url, body) and,
  once answered, ``rs:i``/``rb:i``/``rj:i`` (status, body, body-is-JSON); ``error`` (JSON).
  No TTL while unfinished; ``result_ttl`` once finished.
- ``P:ready:{class}`` sorted set per priority class: the queued jobs, scored by their start
  tag in the class's fair order (below); the workers' ``take`` moves the lowest into the
  class's stream and delivers it in the same script.
- ``P:q:{class}`` one stream per priority class, consumer group ``workers``: the jobs taken
  and not finished (a worker's pending entries, heartbeated, taken over when it dies); an
  entry carries the job id and is deleted when acknowledged.
- ``P:fair``      hash: per class the virtual time ``v:{class}`` (the start tag last taken),
  per tenant the tag its next job starts at ``t:{class}:{tenant}`` and its jobs in the
  ready set ``n:{class}:{tenant}``.
- ``P:wake``      list of tokens each queued job pushes (a submission, a retry falling due;
  at most 64 kept): idle workers block on it.
- ``P:delayed``   sorted set of jobs waiting to retry (score: due time in ms), as
  ``{class}:{id}``; any worker moves due ones back into their class's ready set.
- ``P:dead``      stream of jobs that failed for good (dead letters), for operators.
- ``P:depth`` / ``P:tdepth`` unfinished jobs in all / per tenant (hash): the queue caps.
- ``P:idem:{digest}`` Idempotency-Key (per tenant) -> job id.
- ``P:void:{id}`` a submission the processor gave up waiting for and then settled as not
  queued (``settle``): the submission, if Redis runs it later, queues nothing.

Times come from Redis (``TIME``): one clock for every processor and worker.

**Fair order within a class** (start-time fair queueing): a job's start tag is the larger of
its class's virtual time and its tenant's last finish tag, which then advances by the job's
cost (``COST / weight``). A tenant with a thousand jobs queued therefore gets every other
turn, not the next thousand, when a second tenant submits one; a tenant idle for a while
earns no credit (its tag is caught up to the virtual time). With ``order: fifo`` every job
shares one tenant's tags: first in, first out. A job retried later re-enters through the
same rule; a job cancelled while it waits leaves the order, and a tenant left with none
waiting starts again at the virtual time (a cancelled backlog costs it no turns).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from math import ceil
from typing import Any

import orjson

from filters.jobs.params import PRIORITIES

GROUP = "workers"
# One job's cost in its tenant's tags at weight 1 (see JobStore.cost).
COST = 1_000_000

# Helpers every script starts with (prepended at registration).
_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function terminal(st)
  return st == 'succeeded' or st == 'failed' or st == 'cancelled'
end
local function hset_pairs(key, argv, from)
  for i = from, #argv, 200 do
    redis.call('HSET', key, unpack(argv, i, math.min(i + 199, #argv)))
  end
end
local function ack(queue, entry)
  if entry ~= '' then
    redis.call('XACK', queue, '$GROUP', entry)
    redis.call('XDEL', queue, entry)
  end
end
local function unfinished_less(depth, tdepth, tenant)
  redis.call('DECR', depth)
  redis.call('HINCRBY', tdepth, tenant, -1)
end
-- Queues job `id` of fairness key `fq` (tenant, or '*' in FIFO order) in its class's ready
-- set at its start tag, and wakes an idle worker.
local function enqueue(ready, fair, wake, cls, fq, cost, id)
  local v = tonumber(redis.call('HGET', fair, 'v:' .. cls) or '0')
  local tf = 't:' .. cls .. ':' .. fq
  local start = math.max(v, tonumber(redis.call('HGET', fair, tf) or '0'))
  redis.call('HSET', fair, tf, start + cost)
  redis.call('HINCRBY', fair, 'n:' .. cls .. ':' .. fq, 1)
  redis.call('ZADD', ready, start, id)
  redis.call('LPUSH', wake, '1')
  redis.call('LTRIM', wake, 0, 63)
end
""".replace("$GROUP", GROUP)

# KEYS: job, ready, depth, tdepth, idem, void, fair, wake  ARGV: id, tenant, max_depth,
# max_tenant, idem_ttl_ms, class, fairness key, cost, then field/value pairs of the job.
_SUBMIT = """
if redis.call('EXISTS', KEYS[6]) == 1 then return {'void', ARGV[1]} end
-- The same submission run twice (a client library that sent the script again after a
-- timeout or a dropped connection): one job, queued once, counted once.
if redis.call('EXISTS', KEYS[1]) == 1 then return {'ok', ARGV[1]} end
if ARGV[5] ~= '0' then
  local got = redis.call('GET', KEYS[5])
  if got then return {'dup', got} end
end
local d = tonumber(redis.call('GET', KEYS[3]) or '0')
if d >= tonumber(ARGV[3]) then return {'full', tostring(d)} end
local mt = tonumber(ARGV[4])
if mt > 0 and tonumber(redis.call('HGET', KEYS[4], ARGV[2]) or '0') >= mt then
  return {'tenant_full', '0'}
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'queued', 'created', now, 'updated', now, 'attempts', 0,
           'done', 0, 'fq', ARGV[7], 'fc', ARGV[8])
hset_pairs(KEYS[1], ARGV, 9)
redis.call('INCR', KEYS[3])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
enqueue(KEYS[2], KEYS[7], KEYS[8], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[1])
if ARGV[5] ~= '0' then redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[5]) end
return {'ok', ARGV[1]}
"""

# KEYS: job, void  ARGV: void_ttl_ms. After a submission timed out: 1 if the job was queued,
# else 0 and the submission is voided, should Redis still run it (atomic with it either way).
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 0
"""

# A submission the client gave up on reaches Redis within seconds (it was sent already) or
# never; an hour is far past that, and a void key is a few bytes.
_VOID_TTL_MS = 3_600_000

# KEYS: job  ARGV: consumer
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', '0'} end
if terminal(st) then return {st, '0'} end
local a = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'updated', now)
redis.call('HSETNX', KEYS[1], 'started', now)
return {'run', tostring(a)}
"""

# KEYS: job  ARGV: index, status, body, is_json
_SAVE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or terminal(st) then return 0 end
local i = ARGV[1]
if redis.call('HEXISTS', KEYS[1], 'rs:' .. i) == 0 then
  redis.call('HINCRBY', KEYS[1], 'done', 1)
end
redis.call('HSET', KEYS[1], 'rs:' .. i, ARGV[2], 'rb:' .. i, ARGV[3], 'rj:' .. i, ARGV[4],
           'updated', now_ms())
redis.call('HDEL', KEYS[1], 'unavailable_since', 'unavailable_n')  -- the model answered
return 1
"""

# KEYS: job, queue, depth, tdepth, dead  ARGV: entry, status, ttl_ms, to_dead, id, pairs...
_FINISH = """
ack(KEYS[2], ARGV[1])
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if terminal(st) then return st end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated', now, 'finished', now)
-- A retry left its 'retrying' note in error: only a failed job shows an error (its own).
if ARGV[2] ~= 'failed' then redis.call('HDEL', KEYS[1], 'error') end
hset_pairs(KEYS[1], ARGV, 6)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
unfinished_less(KEYS[3], KEYS[4], redis.call('HGET', KEYS[1], 'tenant'))
if ARGV[4] == '1' then redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'id', ARGV[5]) end
return 'ok'
"""

# KEYS: job, queue, delayed  ARGV: entry, delay_ms, member, error, refund_attempt,
# unavailable_ms. unavailable_ms > 0: the model was refused for capacity (or unreachable),
# which spends no attempt while the job's current run of such refusals is younger than that
# ('expired' otherwise, changing nothing: the caller retries it again with 0); 0: keeps the
# run as it is (such a refusal past that, which spends an attempt; or a hand-back, refunded);
# '': any other failure, which ends the run.
_RETRY = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then ack(KEYS[2], ARGV[1]) return 'missing' end
if terminal(st) then ack(KEYS[2], ARGV[1]) return st end
local now = now_ms()
local refund = ARGV[5] == '1'
if ARGV[6] == '' then
  redis.call('HDEL', KEYS[1], 'unavailable_since', 'unavailable_n')
elseif ARGV[6] ~= '0' then
  local since = tonumber(redis.call('HGET', KEYS[1], 'unavailable_since') or now)
  if now - since > tonumber(ARGV[6]) then return 'expired' end
  redis.call('HSET', KEYS[1], 'unavailable_since', since)
  redis.call('HINCRBY', KEYS[1], 'unavailable_n', 1)
  refund = true
end
ack(KEYS[2], ARGV[1])
local due = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'queued', 'updated', now, 'next_attempt', due)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
if refund then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
redis.call('ZADD', KEYS[3], due, ARGV[3])
return 'ok'
"""

# KEYS: delayed, then one ready set per class in PRIORITIES order, fair, wake
# ARGV: limit, job key prefix, a job's cost at weight 1. A job due again re-enters its
# class's fair order as a new arrival of its tenant; one cancelled or gone meanwhile is
# dropped.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, ARGV[1])
local ready = {critical = KEYS[2], standard = KEYS[3], sheddable = KEYS[4]}
for _, m in ipairs(due) do
  local cls, id = string.match(m, '^(%a+):(.+)$')
  if cls and ready[cls] then
    -- Undeclared, but in the declared keys' slot: the prefix's {hash tag} is everyone's.
    local job = ARGV[2] .. id
    local f = redis.call('HMGET', job, 'fq', 'fc', 'tenant', 'status')
    local fq = f[1] or f[3]  -- a job queued before fair order has its tenant only
    if fq and not terminal(f[4]) then
      enqueue(ready[cls], KEYS[5], KEYS[6], cls, fq, tonumber(f[2] or ARGV[3]), id)
    end
  end
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""

# KEYS: one stream per class, then one ready set per class (PRIORITIES order), fair
# ARGV: consumer, n, the class names, job key prefix. Delivers up to n jobs to the
# consumer, highest class first: entries already in a stream (queued by a version before
# fair order), then the lowest start tags of the class's ready set, moved into its stream
# and delivered in this same script (a job is always in one or the other). Returns class
# index, entry id, job id, ...
_TAKE = """
-- Every class's group first: Redis does not undo a script's writes when it fails half way,
-- and jobs moved and delivered before a NOGROUP would wait for a takeover.
for c = 1, 3 do
  local found = false
  if redis.call('EXISTS', KEYS[c]) == 1 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[c])) do
      if g[2] == '$GROUP' then found = true end
    end
  end
  if not found then return redis.error_reply('NOGROUP no group $GROUP on ' .. KEYS[c]) end
end
local out = {}
local n = tonumber(ARGV[2])
local function read(c, count)
  local got = redis.call('XREADGROUP', 'GROUP', '$GROUP', ARGV[1], 'COUNT', count,
                         'STREAMS', KEYS[c], '>')
  if not got then return 0 end
  for _, e in ipairs(got[1][2]) do
    local id, f = '', e[2] or {}
    for i = 1, #f, 2 do if f[i] == 'id' then id = f[i + 1] end end
    out[#out + 1] = c
    out[#out + 1] = e[1]
    out[#out + 1] = id
  end
  return #got[1][2]
end
for c = 1, 3 do
  if n <= 0 then break end
  n = n - read(c, n)
  if n > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[c + 3], n)
    if #popped > 0 then
      for i = 1, #popped, 2 do
        redis.call('XADD', KEYS[c], '*', 'id', popped[i])
        -- Undeclared, in the declared keys' slot (the prefix's hash tag is everyone's).
        local f = redis.call('HMGET', ARGV[6] .. popped[i], 'fq', 'tenant')
        if f[1] or f[2] then
          local nf = 'n:' .. ARGV[c + 2] .. ':' .. (f[1] or f[2])
          if redis.call('HINCRBY', KEYS[7], nf, -1) <= 0 then redis.call('HDEL', KEYS[7], nf) end
        end
      end
      local vf = 'v:' .. ARGV[c + 2]
      local v = tonumber(redis.call('HGET', KEYS[7], vf) or '0')
      redis.call('HSET', KEYS[7], vf, math.max(v, tonumber(popped[#popped])))
      n = n - read(c, #popped / 2)
    end
  end
end
return out
""".replace("$GROUP", GROUP)

# KEYS: job, depth, tdepth, fair, then one ready set per class in PRIORITIES order
# ARGV: tenant, ttl_ms, id. A job still waiting in its ready set leaves it; the tenant's
# tag goes back to where it was when it was the tenant's latest, and is dropped (its next
# job starts at the class's virtual time) when the tenant has no other job waiting: a
# cancelled backlog costs its tenant no turns.
_CANCEL = """
local t = redis.call('HGET', KEYS[1], 'tenant')
if not t or t ~= ARGV[1] then return {'missing', ''} end
local st = redis.call('HGET', KEYS[1], 'status')
if terminal(st) then return {'conflict', st} end
local f = redis.call('HMGET', KEYS[1], 'priority', 'fq', 'fc')
local ready = ({critical = KEYS[5], standard = KEYS[6], sheddable = KEYS[7]})[f[1] or '']
local score = ready and redis.call('ZSCORE', ready, ARGV[3])
if score then
  redis.call('ZREM', ready, ARGV[3])
  if f[2] and f[3] then
    local tf = 't:' .. f[1] .. ':' .. f[2]
    local nf = 'n:' .. f[1] .. ':' .. f[2]
    if redis.call('HINCRBY', KEYS[4], nf, -1) <= 0 then
      redis.call('HDEL', KEYS[4], nf, tf)
    elseif tonumber(redis.call('HGET', KEYS[4], tf) or '0') == tonumber(score) + tonumber(f[3]) then
      redis.call('HSET', KEYS[4], tf, score)
    end
  end
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated', now, 'finished', now)
redis.call('HDEL', KEYS[1], 'error')  -- a retry's 'retrying' note: not an error of this job
redis.call('PEXPIRE', KEYS[1], ARGV[2])
unfinished_less(KEYS[2], KEYS[3], t)
return {'ok', st}
"""


class Submitted:
    """What a submission came to: ``ok`` (new job), ``dup`` (the Idempotency-Key's job),
    ``full`` (the queue is at max_depth), ``tenant_full`` (the tenant's share is) or ``void``
    (``settle`` ruled it out before Redis ran it)."""

    __slots__ = ("job_id", "outcome")

    def __init__(self, outcome: str, job_id: str) -> None:
        self.outcome, self.job_id = outcome, job_id


class JobStore:
    def __init__(
        self,
        redis: Any,
        prefix: str,
        *,
        order: str = "fair",
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """``order``: ``fair`` (tenants take turns within a class, each ``weights[tenant]``
        turns to another's 1; default weight 1) or ``fifo``. The submitting side's setting
        is the one that counts: a job carries its tenant's place in the order."""
        self.r = redis
        self.prefix = prefix
        self.order = order
        self.weights = dict(weights or {})
        self.depth_key = f"{prefix}:depth"
        self.tdepth_key = f"{prefix}:tdepth"
        self.delayed_key = f"{prefix}:delayed"
        self.dead_key = f"{prefix}:dead"
        self.fair_key = f"{prefix}:fair"
        self.wake_key = f"{prefix}:wake"
        self.queues: dict[str, str] = {cls: f"{prefix}:q:{cls}" for cls in PRIORITIES}
        self.ready: dict[str, str] = {cls: f"{prefix}:ready:{cls}" for cls in PRIORITIES}
        self._submit = redis.register_script(_LIB + _SUBMIT)
        self._settle = redis.register_script(_SETTLE)
        self._start = redis.register_script(_LIB + _START)
        self._save = redis.register_script(_LIB + _SAVE)
        self._finish = redis.register_script(_LIB + _FINISH)
        self._retry = redis.register_script(_LIB + _RETRY)
        self._promote = redis.register_script(_LIB + _PROMOTE)
        self._cancel = redis.register_script(_LIB + _CANCEL)
        self._take = redis.register_script(_TAKE)
        self._ack = redis.register_script(_LIB + "ack(KEYS[1], ARGV[1])")

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def void_key(self, job_id: str) -> str:
        return f"{self.prefix}:void:{job_id}"

    def idem_key(self, tenant: str, key: str) -> str:
        digest = hashlib.blake2b(f"{tenant}\0{key}".encode(), digest_size=16).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    # --- the processor's side ----------------------------------------------------------------

    async def submit(
        self,
        job_id: str,
        tenant: str,
        priority: str,
        fields: Mapping[str, bytes | str | int | float],
        *,
        max_depth: int,
        max_tenant: int,
        idempotency: tuple[str, float] | None,
    ) -> Submitted:
        idem_key, idem_ttl = (
            (self.idem_key(tenant, idempotency[0]), _ms(idempotency[1]))
            if idempotency
            else (f"{self.prefix}:idem:-", 0)
        )
        fair_key, cost = ("*", COST) if self.order == "fifo" else (tenant, self.cost(tenant))
        argv: list[Any] = [
            job_id, tenant, max_depth, max_tenant, idem_ttl, priority, fair_key, cost,
        ]  # fmt: skip
        for k, v in {"tenant": tenant, "priority": priority, **fields}.items():
            argv += [k, v]
        keys = [
            self.job_key(job_id),
            self.ready[priority],
            self.depth_key,
            self.tdepth_key,
            idem_key,
            self.void_key(job_id),
            self.fair_key,
            self.wake_key,
        ]
        out = await self._submit(keys=keys, args=argv)
        return Submitted(as_text(out[0]), as_text(out[1]))

    def cost(self, tenant: str) -> int:
        """How far one job moves its tenant's tag (``COST / weight``): whole numbers, exact
        in Redis' doubles for the first 2**53 / COST (9 billion) turns."""
        return max(1, round(COST / self.weights.get(tenant, 1.0)))

    async def settle(self, job_id: str) -> bool:
        """After ``submit`` gave no answer (a timeout: Redis may run it later): True if the job
        is queued; False if it is not and never will be (a late ``submit`` finds it void)."""
        out = await self._settle(
            keys=[self.job_key(job_id), self.void_key(job_id)], args=[_VOID_TTL_MS]
        )
        return bool(out)

    async def get(self, job_id: str) -> dict[str, bytes]:
        raw = await self.r.hgetall(self.job_key(job_id))
        return {as_text(k): v for k, v in raw.items()}

    async def cancel(self, job_id: str, tenant: str, ttl_s: float) -> tuple[str, str]:
        keys = [self.job_key(job_id), self.depth_key, self.tdepth_key, self.fair_key]
        out = await self._cancel(
            keys=[*keys, *(self.ready[c] for c in PRIORITIES)], args=[tenant, _ms(ttl_s), job_id]
        )
        return as_text(out[0]), as_text(out[1])

    # --- the workers' side -------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        for q in self.queues.values():
            try:
                await self.r.xgroup_create(q, GROUP, id="0", mkstream=True)
            except Exception as exc:  # BUSYGROUP: it exists already
                if "BUSYGROUP" not in str(exc):
                    raise

    async def ack(self, priority: str, entry: str) -> None:
        """Drops a stream entry that needs no run (its job finished, was cancelled or is
        gone, or the entry is not ours)."""
        # A script, not MULTI: cluster pipelines take transactions only from redis-py 6.1.
        await self._ack(keys=[self.queues[priority]], args=[entry])

    async def start(self, job_id: str, consumer: str) -> tuple[str, int]:
        out = await self._start(keys=[self.job_key(job_id)], args=[consumer])
        return as_text(out[0]), int(out[1])

    async def save(self, job_id: str, index: int, status: int, body: bytes, is_json: bool) -> bool:
        out = await self._save(
            keys=[self.job_key(job_id)], args=[index, status, body, "1" if is_json else "0"]
        )
        return bool(out)

    async def finish(
        self,
        job_id: str,
        priority: str,
        entry: str,
        status: str,
        ttl_s: float,
        *,
        dead: bool = False,
        fields: Mapping[str, bytes | str | int] | None = None,
    ) -> str:
        argv: list[Any] = [entry, status, _ms(ttl_s), "1" if dead else "0", job_id]
        for k, v in (fields or {}).items():
            argv += [k, v]
        keys = [
            self.job_key(job_id),
            self.queues[priority],
            self.depth_key,
            self.tdepth_key,
            self.dead_key,
        ]
        return as_text(await self._finish(keys=keys, args=argv))

    async def retry(
        self,
        job_id: str,
        priority: str,
        entry: str,
        delay_s: float,
        error: bytes,
        *,
        refund_attempt: bool = False,
        unavailable_s: float | None = None,
    ) -> str:
        """``unavailable_s``: the model refused for capacity; 'expired' if the job's refusals
        in a row began longer ago than that (nothing changed then); 0: keep that run as it
        is (past its budget, or a hand-back). None: another failure, which ends the run."""
        keys = [self.job_key(job_id), self.queues[priority], self.delayed_key]
        args = [
            entry,
            max(0, ceil(delay_s * 1000)),
            f"{priority}:{job_id}",
            error,
            "1" if refund_attempt else "0",
            "" if unavailable_s is None else ceil(unavailable_s * 1000),
        ]
        return as_text(await self._retry(keys=keys, args=args))

    async def promote_due(self, limit: int = 1000) -> int:
        keys = [
            self.delayed_key, *(self.ready[c] for c in PRIORITIES), self.fair_key, self.wake_key,
        ]  # fmt: skip
        return int(await self._promote(keys=keys, args=[limit, f"{self.prefix}:job:", COST]))

    async def take(self, consumer: str, n: int) -> list[tuple[str, str, str]]:
        """Up to ``n`` jobs delivered to ``consumer``, highest class first and in each class
        in fair order: (class, stream entry, job id) each."""
        keys = [*(self.queues[c] for c in PRIORITIES), *(self.ready[c] for c in PRIORITIES)]
        args = [consumer, n, *PRIORITIES, f"{self.prefix}:job:"]
        out = await self._take(keys=[*keys, self.fair_key], args=args)
        return [
            (PRIORITIES[int(out[i]) - 1], as_text(out[i + 1]), as_text(out[i + 2]))
            for i in range(0, len(out), 3)
        ]

    async def wait_for_work(self, timeout_s: float) -> None:
        """Blocks until a submission or a retry falls due (a token on the wake list), or
        ``timeout_s``: the tokens are hints, the ready sets are the truth."""
        await self.r.blpop([self.wake_key], timeout=timeout_s)

    async def queued(self, priority: str) -> int:
        """Jobs of a class waiting for a worker: its ready set (a stream entry written by a
        version before fair order is not counted)."""
        return int(await self.r.zcard(self.ready[priority]))

    async def depth(self) -> int:
        return int(await self.r.get(self.depth_key) or 0)

    async def status(self) -> dict[str, Any]:
        """The queue at a glance, for operators (``floodwall jobs status``): unfinished jobs
        in all; per class those waiting for a worker and those taken (a worker's, running
        or about to be taken over); jobs waiting to retry; dead letters; per tenant its
        unfinished jobs and, per class, its jobs waiting."""
        classes: dict[str, dict[str, int]] = {}
        for cls in PRIORITIES:
            taken = 0
            if await self.r.exists(self.queues[cls]):
                try:
                    taken = int((await self.r.xpending(self.queues[cls], GROUP))["pending"])
                except Exception as exc:  # NOGROUP: no worker made the group yet
                    if "NOGROUP" not in str(exc):
                        raise
            classes[cls] = {"waiting": await self.queued(cls), "taken": taken}
        tenants: dict[str, dict[str, Any]] = {}
        for t, n in (await self.r.hgetall(self.tdepth_key)).items():
            if int(n) > 0:
                tenants[as_text(t)] = {"unfinished": int(n), "waiting": {}}
        for field, n in (await self.r.hgetall(self.fair_key)).items():
            kind, _, rest = as_text(field).partition(":")
            of_class, _, tenant = rest.partition(":")
            if kind == "n" and int(n) > 0:
                entry = tenants.setdefault(tenant, {"unfinished": 0, "waiting": {}})
                entry["waiting"][of_class] = int(n)
        return {
            "unfinished": await self.depth(),
            "classes": classes,
            "retrying": int(await self.r.zcard(self.delayed_key)),
            "dead_letters": int(await self.r.xlen(self.dead_key)),
            "order": self.order,
            "tenants": dict(sorted(tenants.items())),
        }


def as_text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


# --- the job as the API shows it ---------------------------------------------------------------


def _int(fields: Mapping[str, bytes], name: str, default: int = 0) -> int:
    v = fields.get(name)
    return int(v) if v is not None else default


def _total(fields: Mapping[str, bytes]) -> int:
    """The job's request count, never more than its record's fields (a request has three):
    a damaged ``total`` must not make a reader loop for ever."""
    return max(0, min(_int(fields, "total", 1), len(fields)))


def _result(fields: Mapping[str, bytes], i: int) -> dict[str, Any] | None:
    status = fields.get(f"rs:{i}")
    if status is None:
        return None
    body = fields.get(f"rb:{i}", b"")
    shown: Any = (
        orjson.Fragment(body) if fields.get(f"rj:{i}") == b"1" else body.decode("utf-8", "replace")
    )
    return {"status": int(status), "body": shown}


def _ms(ttl_s: float) -> int:
    """A TTL in whole milliseconds, never 0: '0' is the scripts' "none" (idempotency off)
    and PEXPIRE 0 deletes at once (a 0.5 ms TTL was both)."""
    return max(1, ceil(ttl_s * 1000))


def view(job_id: str, fields: Mapping[str, bytes], api_path: str) -> bytes:
    """The job as ``GET /v1/jobs/{id}`` and the webhook show it. Model answers are spliced in
    as they are (``orjson.Fragment``): no parse of a possibly large body on the way out."""
    total = _total(fields)
    out: dict[str, Any] = {
        "id": job_id,
        "object": "job",
        "status": as_text(fields.get("status", b"unknown")),
        "priority": as_text(fields.get("priority", b"standard")),
        "created_at": _int(fields, "created") / 1000,
        "updated_at": _int(fields, "updated") / 1000,
        "attempts": _int(fields, "attempts"),
        "progress": {"completed": _int(fields, "done"), "total": total},
        "url": f"{api_path}/{job_id}",
    }
    if "finished" in fields:
        out["finished_at"] = _int(fields, "finished") / 1000
    if total == 1:
        out["request"] = {
            "method": as_text(fields.get("m:0", b"POST")),
            "url": as_text(fields.get("u:0", b"")),
        }
        res = _result(fields, 0)
        if res is not None:
            out["result"] = res
    else:
        out["results"] = [_result(fields, i) for i in range(total)]
    if "error" in fields:
        out["error"] = orjson.Fragment(fields["error"])
    return orjson.dumps(out)


def requests_of(fields: Mapping[str, bytes]) -> list[tuple[str, str, bytes]]:
    """(method, url, body) of each request of a job, in order."""
    total = _total(fields)
    return [
        (as_text(fields[f"m:{i}"]), as_text(fields[f"u:{i}"]), fields.get(f"b:{i}", b""))
        for i in range(total)
    ]
