-- Cancel a task: end it as REVOKED unless it already has a terminal state, and push its id to the
-- workers so that whichever one holds it stops it at once.
--
-- Why a script: a cancel racing a finish (record.lua) or a dead letter must leave exactly one terminal
-- state; both check is_terminal inside the server, so whichever step runs first wins and the other
-- writes nothing. The in-flight slot is released here, once, because no later step writes a terminal
-- event for this task. The request entry is not acknowledged here: a worker that holds it, or reads
-- it later, finds the task terminal and acknowledges it (the existing check in record.lua and in the
-- run's first read), so a queued run never starts.
-- Safe to run twice: the second call finds the task REVOKED and writes nothing (the push is repeated,
-- which is harmless: a worker not running the task ignores it).
local task_key = KEYS[1]
local results_stream = KEYS[2]
local task_events_key = KEYS[3]
local inflight_key = KEYS[4]

local client = ARGV[1]      -- '' for any client (operators); else the task must be this client's
local task_ttl = tonumber(ARGV[2])   -- seconds a finished task is kept (0: for ever)
local channel = ARGV[3]     -- the workers' control channel
local task_id = ARGV[4]
-- ARGV[5..]: the cancelled event (item count, then field/value pairs), then the task's field/value pairs.

-- Reply: {outcome, status the task has now}
local CANCELLED, ALREADY_TERMINAL, MISSING = 1, 0, -1

local state = redis.call('HMGET', task_key, 'status', 'client')
if not state[1] or (client ~= '' and state[2] ~= client) then return {MISSING, ''} end
if is_terminal(state[1]) then
  if state[1] == 'REVOKED' then redis.call('PUBLISH', channel, 'cancel ' .. task_id) end
  return {ALREADY_TERMINAL, state[1]}
end
local events, pos = read_lists(1, 5)
append_event(results_stream, task_events_key, events[1])
local fields = rest_of_argv(pos)
redis.call('HSET', task_key, 'status', 'REVOKED', unpack(fields))
if task_ttl > 0 then
  redis.call('EXPIRE', task_key, task_ttl)
  redis.call('EXPIRE', task_events_key, task_ttl)
end
if redis.call('DECR', inflight_key) <= 0 then redis.call('DEL', inflight_key) end
redis.call('PUBLISH', channel, 'cancel ' .. task_id)
return {CANCELLED, 'REVOKED'}
