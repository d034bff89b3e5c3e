-- Cancel a task: end it as REVOKED unless it already has a terminal state, and push its id to the
-- workers so that whichever one holds it stops it at once.
--
-- Why a script: a cancel racing a finish (record.lua) or a dead letter must leave exactly one terminal
-- state; both check is_terminal inside the server, so whichever step runs first wins and the other
-- writes nothing. The in-flight slot is released here, once, because no later step writes a terminal
-- event for this task. The request entry is not acknowledged here: a worker that holds it, or reads
-- it later, finds the task terminal and acknowledges it (the existing check in record.lua and in the
-- run's first read), so a queued run never starts.
-- A run waiting for a concurrency key leaves the key's wait set in the same step: a release after the
-- cancel never wakes it, and one before it already took it out (the cancel then finds no waiting_for).
-- Safe to run twice: the second call finds the task REVOKED and writes nothing (the push is repeated,
-- which is harmless: a worker not running the task ignores it).
local task_key = KEYS[1]
local results_stream = KEYS[2]
local task_events_key = KEYS[3]
local inflight_key = KEYS[4]     -- the owner's count; left out when the task cannot be the owner's
local waiting_key = KEYS[5]  -- the wait set of the concurrency key the task waits for (left out if none)
local parked_key = KEYS[6]   -- and that key's parked requests (left out with waiting_key)
local index_key = KEYS[7]    -- the index of keys with waiters (left out with waiting_key)
local holders_key = KEYS[8]  -- that key's semaphore (left out with waiting_key)
local requests_stream = KEYS[9]  -- the shard's normal-lane stream (a woken waiter goes to its lane's)

local client = ARGV[1]      -- '' for any client (operators); else the task must be this client's
local task_ttl = tonumber(ARGV[2])   -- seconds a finished task is kept (0: for ever)
local channel = ARGV[3]     -- the workers' control channel
local task_id = ARGV[4]
local waiting_for = ARGV[5]  -- the concurrency key the caller read from the task ('' for none)
local ttl_ms = tonumber(ARGV[6])  -- how long a slot handed to a woken waiter is held (the visibility timeout)
-- ARGV[7..]: the cancelled event (item count, then field/value pairs), then the task's field/value pairs.

-- Reply: {outcome, status the task has now}; STALE_KEY: the task waits for another concurrency key
-- than the caller read (it was parked meanwhile): nothing written, call again with that key.
local CANCELLED, ALREADY_TERMINAL, MISSING, STALE_KEY = 1, 0, -1, 2

local state = redis.call('HMGET', task_key, 'status', 'client', 'waiting_for')
if not state[1] or (client ~= '' and state[2] ~= client) then return {MISSING, ''} end
if is_terminal(state[1]) then
  if state[1] == 'REVOKED' then redis.call('PUBLISH', channel, 'cancel ' .. task_id) end
  return {ALREADY_TERMINAL, state[1]}
end
if (state[3] or '') ~= waiting_for then return {STALE_KEY, state[3] or ''} end
if waiting_for ~= '' then
  redis.call('HDEL', task_key, 'waiting_for')
  if redis.call('ZREM', waiting_key, task_id) == 1 then
    -- Still waiting: it leaves the wait set with its cancel, never to be woken; it holds no slot.
    redis.call('HDEL', parked_key, task_id)
    if redis.call('ZCARD', waiting_key) == 0 then redis.call('HDEL', index_key, waiting_for) end
  else
    -- Woken, not yet started (starting clears waiting_for in the same step as it takes the slot):
    -- the slot held for it goes to the next waiter now rather than when it expires.
    local limit = tonumber(redis.call('HGET', index_key, waiting_for) or '0')
    if redis.call('ZREM', holders_key, task_id) == 1 and limit > 0 then
      wake_waiters(holders_key, waiting_key, parked_key, index_key, requests_stream, waiting_for, limit, clock_ms(), ttl_ms)
    end
  end
end
local events, pos = read_lists(1, 7)
append_event(results_stream, task_events_key, events[1])
local fields = rest_of_argv(pos)
redis.call('HSET', task_key, 'status', 'REVOKED', unpack(fields))
if task_ttl > 0 then
  redis.call('EXPIRE', task_key, task_ttl)
  redis.call('EXPIRE', task_events_key, task_ttl)
end
if given(inflight_key) and redis.call('DECR', inflight_key) <= 0 then redis.call('DEL', inflight_key) end
redis.call('PUBLISH', channel, 'cancel ' .. task_id)
return {CANCELLED, 'REVOKED'}
