-- Park a run that hit a transient error until its retry is due, freeing the worker's slot.
--
-- Why a script: the retry event, the parked request and the ack of the old entry happen together,
-- so the request is never in neither place (lost) nor in both (run twice). The due time is Redis's
-- clock plus the delay, so workers with skewed clocks agree on it.
-- Safe to run twice: the second call finds the entry acknowledged (no longer this worker's) and
-- writes nothing.
local task_key = KEYS[1]
local results_stream = KEYS[2]
local requests_stream = KEYS[3]
local delayed_key = KEYS[4]      -- sorted set of parked requests, scored by due time (ms)
local task_events_key = KEYS[5]

local entry = ARGV[1]
local group = ARGV[2]
local consumer = ARGV[3]
local delay_ms = tonumber(ARGV[4])
local member = ARGV[5]           -- JSON of the request's fields
-- ARGV[6..]: the retry event (item count, then field/value pairs), then the task's field/value pairs.

-- Reply: 1 parked, 0 the task was already terminal (the entry is only acknowledged), -1 not this
-- worker's entry (taken over, or this call already happened).
local status = redis.call('HGET', task_key, 'status')
if is_terminal(status) then
  redis.call('XACK', requests_stream, group, entry)
  return 0
end
if not owns(requests_stream, group, entry, consumer) then return -1 end
local events, pos = read_lists(1, 6)
append_event(results_stream, task_events_key, events[1])
local fields = rest_of_argv(pos)
if #fields > 0 then redis.call('HSET', task_key, unpack(fields)) end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', delayed_key, now_ms + delay_ms, member)
redis.call('XACK', requests_stream, group, entry)
return 1
