-- What each worker reports of itself (its executors' lasting faults, its load), for health and metrics.
--
-- Why a script: a report, its deadline (by Redis's clock, which every host shares) and the removal of
-- reports past theirs must be one step, or a reader could see a dead worker's report, or a live
-- worker's report without its deadline. Stale reports (a worker killed without a goodbye) are dropped
-- here by any live worker's next report; both keys expire too, for when no worker is left.
-- Safe to run twice: a report overwrites itself, and removing is idempotent.
local reports_key = KEYS[1]    -- hash: consumer -> report (JSON)
local deadlines_key = KEYS[2]  -- sorted set: consumer -> when its report goes stale (ms since the epoch)

local op = ARGV[1]             -- 'report' or 'remove'
local consumer = ARGV[2]
local report = ARGV[3]         -- JSON ('report' only)
local ttl_ms = tonumber(ARGV[4])

-- Reply: the number of stale reports dropped.
if op == 'remove' then
  redis.call('HDEL', reports_key, consumer)
  redis.call('ZREM', deadlines_key, consumer)
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = redis.call('ZRANGEBYSCORE', deadlines_key, '-inf', now)
for _, gone in ipairs(stale) do redis.call('HDEL', reports_key, gone) end
redis.call('ZREMRANGEBYSCORE', deadlines_key, '-inf', now)
redis.call('HSET', reports_key, consumer, report)
redis.call('ZADD', deadlines_key, now + ttl_ms, consumer)
redis.call('PEXPIRE', reports_key, ttl_ms)
redis.call('PEXPIRE', deadlines_key, ttl_ms)
return #stale
