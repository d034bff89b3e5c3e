-- Take a slot of a run's concurrency key, or park the run in the key's wait set, freeing the worker.
--
-- Why a script: the semaphore is checked and the run parked (its entry acknowledged) in one step, so
-- a release (concurrency_release.lua) either ran before (the slot is free: the run takes it) or runs
-- after (and finds the run waiting, and wakes it): a run is never parked after the release that
-- should have woken it. Waiters keep their order: a newcomer finding a free slot while earlier runs
-- still wait (a slot freed by a crashed holder's expiry, not yet handed over by the promote loop)
-- waits behind them.
-- Safe to run twice: a holder that has its slot (a redelivery, a reclaim, a woken waiter whose slot
-- was held for it) only refreshes it; a second park finds the entry no longer this worker's.
local holders_key = KEYS[1]     -- the key's semaphore: holder (task id) -> deadline (ms)
local waiting_key = KEYS[2]     -- sorted set: waiting task id -> order
local parked_key = KEYS[3]      -- hash: waiting task id -> JSON of its request's fields
local index_key = KEYS[4]       -- hash: concurrency keys with waiters -> limit (for the promote loop)
local requests_stream = KEYS[5]  -- the stream the entry was read from (its lane's)
local task_key = KEYS[6]

local entry = ARGV[1]
local group = ARGV[2]
local consumer = ARGV[3]
local name = ARGV[4]            -- the rendered concurrency key
local holder = ARGV[5]          -- the task id: the same across redeliveries and reclaims
local ttl_ms = tonumber(ARGV[6])  -- holders expire this long after their last refresh (the visibility timeout)
local limit = tonumber(ARGV[7])  -- this run's workflow's limit for the key
local order = ARGV[8]           -- the run's first entry's place (ms * 1000 + sequence)
local member = ARGV[9]          -- JSON of the request's fields, with its order and its limit

-- Reply: 1 the slot is the run's (run it), 0 parked, -1 not this worker's entry (taken over, or already
-- parked), -2 the task has ended (its entry acknowledged, nothing held or parked).
if not owns(requests_stream, group, entry, consumer) then return -1 end
-- A cancel that landed after the worker read the task: parked, it would wait for nothing, and once woken
-- hold a slot that its delivery (acknowledged, the task being over) never gave back. A slot held for it
-- already (a woken waiter cancelled since) the caller releases, waking the next waiter.
if is_terminal(redis.call('HGET', task_key, 'status')) then
  redis.call('XACK', requests_stream, group, entry)
  return -2
end
local now = clock_ms()
local live = semaphore_live(holders_key, now)
if redis.call('ZSCORE', holders_key, holder) then
  semaphore_hold(holders_key, holder, now, ttl_ms)
  redis.call('HDEL', task_key, 'waiting_for')
  return 1
end
local ahead = redis.call('ZCOUNT', waiting_key, '-inf', '(' .. order)
if live < limit and ahead == 0 then
  semaphore_hold(holders_key, holder, now, ttl_ms)
  redis.call('HDEL', task_key, 'waiting_for')
  return 1
end
redis.call('ZADD', waiting_key, order, holder)
redis.call('HSET', parked_key, holder, member)
redis.call('HSET', index_key, name, limit)
-- Shown by GET /tasks; the status stays what it was (PENDING): the run has not started.
redis.call('HSET', task_key, 'waiting_for', name)
redis.call('XACK', requests_stream, group, entry)
return 0
