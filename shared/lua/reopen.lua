-- Re-open a FAILURE (or a REVOKED run) so that it runs again from its failed node, or from the last
-- node a cancelled run completed (POST /executions/{id}/retry).
--
-- Why a script: two operators retrying at once must start one run, not two.
-- Safe to run twice: each call carries a token; the same token again answers as the first call did.
local task_key = KEYS[1]
local requests_stream = KEYS[2]  -- the request's lane's stream
local results_stream = KEYS[3]
local task_events_key = KEYS[4]
local inflight_key = KEYS[5]

local token = ARGV[1]
-- ARGV[2..]: the retry event (item count, then field/value pairs), then the request's field/value pairs.

-- Reply: the status the task had; the retry happened only if it was FAILURE or REVOKED.
local state = redis.call('HMGET', task_key, 'status', 'reopen_token', 'reopened_from')
if state[2] == token then return state[3] or 'FAILURE' end
if state[1] ~= 'FAILURE' and state[1] ~= 'REVOKED' then return state[1] or '' end
local events, pos = read_lists(1, 2)
local request = rest_of_argv(pos)
local attempt = tonumber(redis.call('HGET', task_key, 'attempt') or '0') + 1
redis.call('HSET', task_key, 'status', 'RETRY', 'attempt', attempt, 'reopen_token', token, 'reopened_from', state[1])
redis.call('HDEL', task_key, 'finished_at', 'result', 'cancel_reason')
redis.call('PERSIST', task_key)
redis.call('PERSIST', task_events_key)
append_event(results_stream, task_events_key, events[1])
redis.call('XADD', requests_stream, '*', unpack(request))
redis.call('INCR', inflight_key)
return state[1]
