-- A named counting semaphore shared by every worker, with an optional start rate, in one step.
--
-- Why a script: counting the live holders, taking a rate token and adding the holder must be one
-- decision, or two workers seeing the last free slot would both take it. Holders expire: each is
-- added with a deadline (the caller's reclaim horizon, NOVA_VISIBILITY_TIMEOUT) and refreshed while
-- its run lives, so a crashed holder's slot comes back when its run is reclaimed, without anyone
-- releasing it. The concurrency keys are the same semaphore (lib.lua's semaphore_* helpers; their
-- holders are refreshed by this script), with waiters: concurrency_acquire.lua, concurrency_release.lua.
-- Safe to run twice: acquiring a slot already held only refreshes it, and refresh and release are
-- idempotent.
local holders_key = KEYS[1]  -- sorted set: holder -> deadline (ms since the epoch)
local rate_key = KEYS[2]     -- hash (tokens, at) of the start rate's bucket; unused when the rate is 0

local op = ARGV[1]           -- 'acquire', 'refresh' or 'release'
local ttl_ms = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local rate = tonumber(ARGV[4])   -- acquisitions per second across all callers; 0: unlimited
local burst = tonumber(ARGV[5])
-- ARGV[6..]: holders (acquire takes exactly one)

-- Reply: {1, 0} acquired (or refreshed, released); {0, ms} not acquired, worth asking again in ms.
local now = clock_ms()
local live = semaphore_live(holders_key, now)

if op == 'release' then
  for i = 6, #ARGV do redis.call('ZREM', holders_key, ARGV[i]) end
  return {1, 0}
end

if op == 'refresh' then
  -- XX: a holder that expired meanwhile is not brought back over someone who took its slot.
  local kept = 0
  for i = 6, #ARGV do kept = kept + redis.call('ZADD', holders_key, 'XX', 'CH', now + ttl_ms, ARGV[i]) end
  redis.call('PEXPIRE', holders_key, ttl_ms)
  return {1, kept}
end

local holder = ARGV[6]
if redis.call('ZSCORE', holders_key, holder) then
  semaphore_hold(holders_key, holder, now, ttl_ms)
  return {1, 0}
end
if live >= limit then
  -- Full: the earliest deadline bounds the wait (a release usually comes sooner).
  local first = redis.call('ZRANGE', holders_key, 0, 0, 'WITHSCORES')
  return {0, math.max(1, tonumber(first[2]) - now)}
end
if rate > 0 then
  local state = redis.call('HMGET', rate_key, 'tokens', 'at')
  local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate / 1000)
  if tokens < 1 then
    redis.call('HSET', rate_key, 'tokens', tostring(tokens), 'at', now)
    redis.call('PEXPIRE', rate_key, math.ceil(burst * 1000 / rate) + 1000)
    return {0, math.max(1, math.ceil((1 - tokens) * 1000 / rate))}
  end
  redis.call('HSET', rate_key, 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', rate_key, math.ceil(burst * 1000 / rate) + 1000)
end
semaphore_hold(holders_key, holder, now, ttl_ms)
return {1, 0}
