"""The shared store: counters in Redis, each request's check-and-record one Lua script (atomic).

Why Lua and not INCR + EXPIRE: the decision reads several windows (requests, tokens per minute and
per day, stream leases) and records the request only when all of them pass; one script does that
in one round trip with no interleaving between replicas. Time is Redis's own clock (`TIME`), so
replicas with skewed clocks still share one window.

Keys, per bucket `b` (the `{b}` hash tag keeps one bucket's keys on one Redis Cluster slot):
  guardgate:rl:{b}:req   ZSET  admitted requests (member: lease id, score: time ms), last 60 s
  guardgate:rl:{b}:tpm   HASH  sub-bucket index -> tokens, per-minute window (60 x 1 s)
  guardgate:rl:{b}:tpd   HASH  sub-bucket index -> tokens, per-day window (60 x 24 min)
  guardgate:rl:{b}:conc  ZSET  stream leases (member: lease id, score: expiry ms)
Every key carries a TTL, so idle buckets vanish on their own.
"""

from __future__ import annotations

from typing import Any

from gateway.limits.store import (
    CONCURRENCY_RETRY_MS,
    DAY_MS,
    LEASE_TTL_S,
    MINUTE_MS,
    SUB_BUCKETS,
    Decision,
    RateLimits,
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ACQUIRE = _NOW + """
local rpm, tpm, tpd, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local stream = ARGV[5] == '1'
local lease = ARGV[6]
local ttl, n, minute, day, cretry = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]),
  tonumber(ARGV[11])

-- the sum of a token window and how long until it drops below `limit` (0 when it is below)
local function window(key, w, limit)
  local size = math.floor(w / n)
  local first = math.floor((now - w) / size)
  local flat = redis.call('HGETALL', key)
  local idx, counts, total = {}, {}, 0
  for i = 1, #flat, 2 do
    local b, c = tonumber(flat[i]), tonumber(flat[i + 1])
    if b < first then
      redis.call('HDEL', key, flat[i])
    else
      table.insert(idx, b)
      counts[b] = c
      total = total + c
    end
  end
  if total < limit then return total, 0 end
  table.sort(idx)
  local left = total
  for _, b in ipairs(idx) do
    left = left - counts[b]
    if left < limit then return total, (b + 1) * size + w - now end
  end
  return total, w
end

local allowed, refused, retry = 1, '', 0
local rused, rreset, mused, mreset, dused, dreset = 0, 0, 0, 0, 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - minute)
  rused = redis.call('ZCARD', KEYS[1])
  if rused > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    rreset = tonumber(oldest[2]) + minute - now
  end
  if rused >= rpm then allowed, refused, retry = 0, 'requests_per_minute', rreset end
end
if tpm > 0 then
  mused, mreset = window(KEYS[2], minute, tpm)
  if allowed == 1 and mused >= tpm then allowed, refused, retry = 0, 'tokens_per_minute', mreset end
end
if tpd > 0 then
  dused, dreset = window(KEYS[3], day, tpd)
  if allowed == 1 and dused >= tpd then allowed, refused, retry = 0, 'tokens_per_day', dreset end
end
if conc > 0 and stream then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if allowed == 1 and redis.call('ZCARD', KEYS[4]) >= conc then
    allowed, refused, retry = 0, 'max_concurrent_streams', cretry
  end
end
if allowed == 1 then
  if rpm > 0 then
    redis.call('ZADD', KEYS[1], now, lease)
    redis.call('PEXPIRE', KEYS[1], minute)
    rused = rused + 1
    if rused == 1 then rreset = minute end
  end
  if conc > 0 and stream then
    redis.call('ZADD', KEYS[4], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
return {allowed, refused, retry, rused, rreset, mused, mreset, dused, dreset}
"""

FINISH = _NOW + """
local tokens, n = tonumber(ARGV[1]), tonumber(ARGV[4])
local function charge(key, w)
  local size = math.floor(w / n)
  redis.call('HINCRBY', key, tostring(math.floor(now / size)), tokens)
  redis.call('PEXPIRE', key, w + size)
end
if tokens > 0 and ARGV[2] == '1' then charge(KEYS[1], tonumber(ARGV[5])) end
if tokens > 0 and ARGV[3] == '1' then charge(KEYS[2], tonumber(ARGV[6])) end
if ARGV[7] == '1' then redis.call('ZREM', KEYS[3], ARGV[8]) end
return 1
"""


def _keys(bucket: str) -> tuple[str, str, str, str]:
    base = f"guardgate:rl:{{{bucket}}}"
    return f"{base}:req", f"{base}:tpm", f"{base}:tpd", f"{base}:conc"


class RedisStore:
    name = "redis"

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No client-side retries: a Redis that is down must be noticed within the limiter's timeout and
        # handed to on_store_error, not retried behind the request's back.
        self.client: Any = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                             retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._acquire = self.client.register_script(ACQUIRE)
        self._finish = self.client.register_script(FINISH)

    async def acquire(self, limits: RateLimits, now_ms: int, lease: str, stream: bool) -> Decision:
        r = await self._acquire(keys=list(_keys(limits.bucket)), args=[
            limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day,
            limits.max_concurrent_streams, "1" if stream else "0", lease, int(LEASE_TTL_S * 1000), SUB_BUCKETS,
            MINUTE_MS, DAY_MS, CONCURRENCY_RETRY_MS])
        refused = r[1].decode() if isinstance(r[1], bytes) else str(r[1])
        return Decision(allowed=int(r[0]) == 1, refused=refused, retry_ms=int(r[2]), requests_used=int(r[3]),
                        requests_reset_ms=int(r[4]), tokens_minute_used=int(r[5]), tokens_minute_reset_ms=int(r[6]),
                        tokens_day_used=int(r[7]), tokens_day_reset_ms=int(r[8]))

    async def finish(self, limits: RateLimits, now_ms: int, lease: str, stream: bool, tokens: int) -> None:
        _, tpm, tpd, conc = _keys(limits.bucket)
        await self._finish(keys=[tpm, tpd, conc], args=[
            max(0, tokens), "1" if limits.tokens_per_minute else "0", "1" if limits.tokens_per_day else "0",
            SUB_BUCKETS, MINUTE_MS, DAY_MS, "1" if stream else "0", lease])

    async def aclose(self) -> None:
        await self.client.aclose()
