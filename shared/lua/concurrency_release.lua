-- Give back a run's slot of its concurrency key and wake the next waiters, or (no holder) only hand
-- the slots freed by expired holders to the waiters (the workers' promote loop, after a crash).
--
-- Why a script: the release and the move of the next waiter back onto the requests stream are one
-- step, so a waiter is never left parked beside a free slot, and the slot is held for the woken
-- waiter at once, so a newcomer cannot take its turn. Two workers waking at once move each waiter
-- once (a woken waiter leaves the wait set in the same step).
-- Safe to run twice: the holder is gone after the first call, and a waiter is woken only into a free
-- slot.
local holders_key = KEYS[1]
local waiting_key = KEYS[2]
local parked_key = KEYS[3]
local index_key = KEYS[4]
local requests_stream = KEYS[5]  -- the shard's normal-lane stream (a woken waiter goes to its lane's)

local name = ARGV[1]            -- the rendered concurrency key
local holder = ARGV[2]          -- the finished run's task id; '' to wake only
local ttl_ms = tonumber(ARGV[3])  -- how long a woken waiter's slot is held before its delivery refreshes it
local limit = tonumber(ARGV[4])  -- the limit of a waiter parked without its own (by an older release)

-- Reply: how many waiters were woken.
local now = clock_ms()
if holder ~= '' then redis.call('ZREM', holders_key, holder) end
return wake_waiters(holders_key, waiting_key, parked_key, index_key, requests_stream, name, limit, now, ttl_ms)
