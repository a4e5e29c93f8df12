"""Cache entries in Redis (the source of truth) and the change feed replicas follow.

Layout (``{S}`` is the scope id as a hash tag: a scope's keys share one cluster slot):

    fw:cache:{S}:e:<id>   HASH  r body, h headers (JSON), c created (ms), x expires (ms),
                                s stale-if-error window after x (ms),
                                p partition (conversation prefix and parameters digest),
                                t prompt text, v vector (float32 bytes; both empty when the
                                entry is exact-only), k the prompt's token vectors (float16
                                bytes, [n, d]; only for the align verifier), a the id of
                                the entry whose answer this is when it is an alias (a
                                semantic hit's answer copied under the asking request's id),
                                al the ids of this entry's aliases; PEXPIREs with the entry
    fw:cache:{S}:z        ZSET  id -> end of life (x + s, ms): the scope's entries, for
                                rebuilds, the entry cap (soonest-ending evicted first) and
                                invalidation
    fw:cache:scopes       HASH  S -> JSON {tenant, route, model, version}: what to drop when
                                a tenant's or a model's entries are invalidated
    fw:cache:feed         STREAM  op=add|del|drop, s=S, id: every change, so each process's
                                in-memory index follows the others' within a feed poll

``<id>`` is the exact-match digest: storing the same request twice replaces one entry, so
concurrent identical misses cannot leave duplicates or a half-written entry (the store is
one Lua script: delete, write, expire, index, evict, atomically).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from proxy.api import REDIS_FAULTS

log = logging.getLogger("floodwall.cache")

PREFIX = "fw:cache:"
SCOPES = PREFIX + "scopes"
FEED = PREFIX + "feed"
FEED_MAXLEN = 100_000

_STORE = """
local entry, zset, original = KEYS[1], KEYS[2], KEYS[3]
local id, expires, ttl, cap, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4]), tonumber(ARGV[5])
local prefix, partition = ARGV[6], ARGV[7]
local aliases, listed
if original then
  -- An alias (KEYS[3]: the entry it copies): only of the answer that entry still holds (the
  -- fields start 'r', body), and a bounded number per entry.
  if redis.call('HGET', original, 'r') ~= ARGV[9] then return false end
  aliases = redis.call('HGET', original, 'al') or ''
  listed = string.find(aliases, id, 1, true)
  if not listed and #aliases > MAX_ALIAS_CHARS then return false end
end
-- The aliases of the answer this write replaces go with it (those still copying it: an id
-- stored again as an entry of its own since is left alone).
local old = redis.call('HGET', entry, 'al')
if old then
  for alias in string.gmatch(old, '%S+') do
    if redis.call('HGET', prefix .. alias, 'a') == id then
      redis.call('DEL', prefix .. alias)
      redis.call('ZREM', zset, alias)
    end
  end
end
-- A write without a vector (ARGV[7]: its partition) keeps the one stored under the same id
-- (the same prompt in the same partition): an embedder outage during a refresh must not
-- take the entry out of semantic matching.
local kept = false
if partition ~= '' then
  kept = redis.call('HMGET', entry, 'p', 't', 'v', 'k')
  if kept[1] ~= partition or not kept[3] or kept[3] == '' then kept = false end
end
redis.call('DEL', entry)
redis.call('HSET', entry, unpack(ARGV, 8))
if kept then
  redis.call('HSET', entry, 't', kept[2], 'v', kept[3])
  if kept[4] then redis.call('HSET', entry, 'k', kept[4]) end
end
redis.call('PEXPIRE', entry, ttl)
redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
redis.call('ZADD', zset, expires, id)
local evicted = {}
local n = redis.call('ZCARD', zset)
if n > cap then
  local popped = redis.call('ZPOPMIN', zset, n - cap)
  for i = 1, #popped, 2 do
    redis.call('DEL', prefix .. popped[i])
    evicted[#evicted + 1] = popped[i]
  end
end
local longest = redis.call('ZRANGE', zset, -1, -1, 'WITHSCORES')
-- Relative to the caller's clock (ARGV now), not Redis's: the set outlives its last entry.
if longest[2] then redis.call('PEXPIRE', zset, math.floor(tonumber(longest[2])) - now + 1000) end
if original and not listed then redis.call('HSET', original, 'al', aliases .. ' ' .. id) end
return evicted
"""
# At most 256 aliases per entry (ids are 32 hex digits, each after a space).
MAX_ALIASES = 256
_STORE = _STORE.replace("MAX_ALIAS_CHARS", str(33 * (MAX_ALIASES - 1)))


# One batch of a scope's drop: ids from its zset, their entries deleted, the members removed;
# returns {dropped, left}. Entry keys share the zset's hash tag (one cluster slot).
_DROP = """
local zset, prefix, batch = KEYS[1], ARGV[1], tonumber(ARGV[2])
local ids = redis.call('ZRANGE', zset, 0, batch - 1)
for _, id in ipairs(ids) do redis.call('DEL', prefix .. id) end
if #ids > 0 then redis.call('ZREM', zset, unpack(ids)) end
return {#ids, redis.call('ZCARD', zset)}
"""
DROP_BATCH = 500


def entry_key(scope: str, entry_id: str) -> str:
    return f"{PREFIX}{{{scope}}}:e:{entry_id}"


def zset_key(scope: str) -> str:
    return f"{PREFIX}{{{scope}}}:z"


# body, headers, created, expires, stale window, alias
_ENTRY_FIELDS = ("r", "h", "c", "x", "s", "a")


def _entry(raw: list[Any], now_ms: int) -> Entry | None:
    """The entry from its HMGET of ``_ENTRY_FIELDS``, if fresh or stale but inside its
    stale-if-error window."""
    body, headers, created, expires, stale, alias = raw
    if body is None or expires is None:
        return None
    x = int(expires)
    if x + int(stale or 0) <= now_ms:
        return None
    return Entry(body, orjson.loads(headers or b"{}"), int(created or 0), x, x > now_ms,
                 bool(alias))  # fmt: skip


@dataclass(slots=True)
class Entry:
    body: bytes
    headers: dict[str, str]
    created_ms: int
    expires_ms: int
    fresh: bool = True  # False: past its expiry, inside its stale-if-error window
    alias: bool = False  # another request's answer, copied after a semantic hit


@dataclass(slots=True)
class Indexed:
    """What a process keeps in memory per semantic entry (the body stays in Redis)."""

    scope: str
    entry_id: str
    partition: str
    text: str
    vector: np.ndarray[Any, Any]
    expires_ms: int


class CacheStore:
    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._store = redis.register_script(_STORE)
        self._drop = redis.register_script(_DROP)

    async def get(self, scope: str, entry_id: str, now_ms: int) -> Entry | None:
        """The entry if it is fresh, or stale but inside its stale-if-error window."""
        return _entry(await self.redis.hmget(entry_key(scope, entry_id), *_ENTRY_FIELDS), now_ms)

    async def put(
        self,
        *,
        scope: str,
        scope_meta: dict[str, str],
        entry_id: str,
        body: bytes,
        headers: dict[str, str],
        partition: str,
        text: str,
        vector: bytes,
        now_ms: int,
        ttl_ms: int,
        max_entries: int,
        stale_ms: int = 0,
        tokens: bytes = b"",
        alias_of: tuple[str, int] | None = None,
    ) -> list[str] | None:
        """Writes one entry (replacing one with the same id, and that one's aliases); returns
        the ids evicted. The entry is fresh for ``ttl_ms`` and kept ``stale_ms`` longer for
        stale-if-error. A write without ``vector`` (but an alias) keeps the vector (text,
        tokens) stored under the same id, if any. ``alias_of``: (id, created ms) of the
        entry whose answer ``body`` is (a semantic hit's); None is returned, and nothing
        written, when that entry no longer holds that answer or has its share of aliases."""
        expires = now_ms + ttl_ms
        created = now_ms if alias_of is None else alias_of[1]
        fields = [
            "r", body, "h", orjson.dumps(headers), "c", created, "x", expires, "s", stale_ms,
            "p", partition, "t", text, "v", vector,
        ]  # fmt: skip
        if tokens:
            fields += ["k", tokens]
        keys = [entry_key(scope, entry_id), zset_key(scope)]
        if alias_of is not None:
            fields += ["a", alias_of[0]]
            keys.append(entry_key(scope, alias_of[0]))
        keep = ttl_ms + stale_ms
        evicted = await self._store(
            keys=keys,
            args=[entry_id, now_ms + keep, keep, max_entries, now_ms, entry_key(scope, ""),
                  "" if vector or alias_of else partition, *fields],
        )  # fmt: skip
        if evicted is None:
            return None
        ids = [e.decode() if isinstance(e, bytes) else str(e) for e in evicted]
        # Not atomic with the entry (the scope registry and the feed live in other slots in a
        # cluster); a lost feed event only delays a replica's index until its next rebuild.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(SCOPES, scope, orjson.dumps(scope_meta))
        pipe.xadd(FEED, {"op": "add", "s": scope, "id": entry_id}, maxlen=FEED_MAXLEN)
        for gone in ids:
            pipe.xadd(FEED, {"op": "del", "s": scope, "id": gone}, maxlen=FEED_MAXLEN)
        await pipe.execute()
        return ids

    async def tokens(
        self, scope: str, ids: list[str], dim: int, now_ms: int
    ) -> tuple[dict[str, np.ndarray[Any, Any]], Entry | None]:
        """The token vectors stored with entries (entries without them are left out) and,
        in the same round trip, the first entry itself (as ``get``): the best candidate is
        usually the answer, and fetching it now spares the hit a second round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hget(entry_key(scope, i), "k")
        pipe.hmget(entry_key(scope, ids[0]), *_ENTRY_FIELDS)
        *raws, first = await pipe.execute()
        out: dict[str, np.ndarray[Any, Any]] = {}
        for i, raw in zip(ids, raws, strict=True):
            if raw and len(raw) % (2 * dim) == 0:
                out[i] = np.frombuffer(raw, dtype="<f2").reshape(-1, dim)
        return out, _entry(first, now_ms)

    async def delete(self, scope: str, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(entry_key(scope, entry_id))
        pipe.zrem(zset_key(scope), entry_id)
        pipe.xadd(FEED, {"op": "del", "s": scope, "id": entry_id}, maxlen=FEED_MAXLEN)
        await pipe.execute()

    async def load(self, scope: str, ids: list[str]) -> list[Indexed]:
        """The semantic part of entries (for the in-memory index); skips gone or exact-only."""
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(entry_key(scope, i), "p", "t", "v", "x")
        out: list[Indexed] = []
        for i, (p, t, v, x) in zip(ids, await pipe.execute(), strict=True):
            if not v or x is None:
                continue  # gone, or exact-only (stale-window entries are dropped by expiry)
            out.append(
                Indexed(scope, i, p.decode(), t.decode(), np.frombuffer(v, dtype=np.float32),
                        int(x))
            )  # fmt: skip
        return out

    async def scopes(self) -> dict[str, dict[str, str]]:
        raw = await self.redis.hgetall(SCOPES)
        return {k.decode(): orjson.loads(v) for k, v in raw.items()}

    async def live_ids(self, scope: str, now_ms: int) -> list[str]:
        raw = await self.redis.zrangebyscore(zset_key(scope), now_ms, "+inf")
        return [r.decode() for r in raw]

    async def drop_scope(self, scope: str) -> int:
        """Deletes every entry of a scope; returns how many there were. Each batch deletes
        entries and their zset members together (one script), until the zset is empty, so an
        entry stored meanwhile is either dropped too or stays findable: never an entry left
        in Redis that no zset or scope lists (served until its TTL, beyond invalidation)."""
        dropped = 0
        while True:
            n, left = await self._drop(keys=[zset_key(scope)],
                                       args=[entry_key(scope, ""), DROP_BATCH])  # fmt: skip
            dropped += int(n)
            if not int(left):
                break
        meta = await self.redis.hget(SCOPES, scope)
        await self.redis.hdel(SCOPES, scope)
        # A store after the last batch may have registered the scope before the HDEL: its
        # zset exists again, so the scope stays listed (a store after this check registers
        # it itself, after its entry).
        if meta is not None and await self.redis.exists(zset_key(scope)):
            await self.redis.hset(SCOPES, scope, meta)
        await self.redis.xadd(FEED, {"op": "drop", "s": scope, "id": ""}, maxlen=FEED_MAXLEN)
        return dropped

    async def feed_tail(self) -> str:
        last = await self.redis.xrevrange(FEED, count=1)
        return last[0][0].decode() if last else "0-0"

    async def follow(
        self,
        since: str,
        apply: Callable[[str, str, str], Awaitable[None]],
        block_ms: int = 500,
    ) -> str:
        """Applies the feed events after ``since`` (waiting up to ``block_ms`` for some);
        returns the last id seen."""
        got = await self.redis.xread({FEED: since}, count=1000, block=block_ms)
        for _stream, events in got or []:
            for event_id, fields in events:
                since = event_id.decode()
                f = {k.decode(): v.decode() for k, v in fields.items()}
                try:
                    await apply(f.get("op", ""), f.get("s", ""), f.get("id", ""))
                except (asyncio.CancelledError, *REDIS_FAULTS):
                    # Redis failing mid-event: the caller rebuilds; skipping the event would
                    # leave this process without the entry until its next rebuild.
                    raise
                except Exception as exc:  # one bad event must not stop the follower
                    log.warning("cache feed event %s not applied: %r", event_id, exc)
        return since
