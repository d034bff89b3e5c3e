-- Move a request to the dead-letter stream; if it belongs to a live task, end that task as DEAD.
--
-- Why a script: the dead letter is written if and only if the request is acknowledged, and a task
-- that already reached a terminal state is neither given a second one nor a replayable letter (a
-- copy that finished meanwhile must not run again from a replay).
-- Safe to run twice: the second call finds the entry acknowledged and writes nothing.
local dead_letter_stream = KEYS[1]
local requests_stream = KEYS[2]
local task_key = KEYS[3]         -- left out (see given()) when the request has no usable task id
local results_stream = KEYS[4]
local task_events_key = KEYS[5]  -- '' with task_key
local inflight_key = KEYS[6]     -- '' with task_key

local group = ARGV[1]
local entry = ARGV[2]
local consumer = ARGV[3]
local task_ttl = tonumber(ARGV[4])
-- ARGV[5..]: the letter (item count, then field/value pairs), the DEAD event (item count, then
-- pairs; count 0 for none), then the task's field/value pairs.

-- Reply: {1 if a DEAD event was written else 0, dead-letter entry id or ''}
if not owns(requests_stream, group, entry, consumer) then return {0, ''} end
if given(task_key) and is_terminal(redis.call('HGET', task_key, 'status')) then
  redis.call('XACK', requests_stream, group, entry)
  return {0, ''}
end
local lists, pos = read_lists(2, 5)
local letter, event = lists[1], lists[2]
local letter_id = redis.call('XADD', dead_letter_stream, '*', unpack(letter))
redis.call('XACK', requests_stream, group, entry)
if not given(task_key) then return {0, letter_id} end
if #event > 0 then append_event(results_stream, task_events_key, event) end
local fields = rest_of_argv(pos)
if #fields > 0 then
  redis.call('HSET', task_key, unpack(fields))
  if task_ttl > 0 then
    redis.call('EXPIRE', task_key, task_ttl)
    redis.call('EXPIRE', task_events_key, task_ttl)
  end
end
if redis.call('DECR', inflight_key) <= 0 then redis.call('DEL', inflight_key) end
return {1, letter_id}
