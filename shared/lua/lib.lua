-- Helpers prepended to every script of this folder (EVAL has no includes). Only functions here:
-- each script names its own KEYS and ARGV at its top.

-- Whether the caller passed a key in a KEYS slot it may leave out. Left out, it is '' on a single
-- Redis, and on a cluster (where every key of a script must share one slot) the shard's bare hash tag
-- (`Keys.absent`, e.g. `{nova:3}`): no key NOVA writes starts with '{'.
local function given(key)
  return key ~= '' and string.sub(key, 1, 1) ~= '{'
end

-- A task has exactly one terminal state; nothing is written over it.
local function is_terminal(status)
  return status == 'SUCCESS' or status == 'FAILURE' or status == 'DEAD' or status == 'REVOKED'
end

-- Whether `entry` is pending in `group` and delivered to `consumer` now. A worker whose entry was
-- reclaimed by another (it went silent, or was cut off from Redis) no longer owns it, and whatever
-- it would write (events, checkpoint, retry, dead letter) belongs to the new owner.
local function owns(stream, group, entry, consumer)
  local pending = redis.call('XPENDING', stream, group, entry, entry, 1)
  return #pending > 0 and pending[1][2] == consumer
end

-- Reads `count` flat lists, each written as its item count then its items, from ARGV at `pos`.
-- Returns the lists and the position after them.
local function read_lists(count, pos)
  local lists = {}
  for _ = 1, count do
    local n = tonumber(ARGV[pos])
    local list = {}
    for i = pos + 1, pos + n do list[#list + 1] = ARGV[i] end
    lists[#lists + 1] = list
    pos = pos + n + 1
  end
  return lists, pos
end

-- ARGV from `pos` to the end, as one flat list.
local function rest_of_argv(pos)
  local list = {}
  for i = pos, #ARGV do list[#list + 1] = ARGV[i] end
  return list
end

-- Appends one event to the results stream and its id to the task's event list; returns the id.
-- (The results stream is trimmed by maintenance, never past what a group has not yet read.)
local function append_event(results_stream, task_events_key, event)
  local id = redis.call('XADD', results_stream, '*', unpack(event))
  redis.call('RPUSH', task_events_key, id)
  return id
end

-- The requests stream of a request's priority lane, from the shard's normal-lane stream: its name
-- plus ':high' or ':low' (shared/streams.py `Keys.in_lane`). The hash tag stays in the name, so on a
-- cluster the lane's stream is in the same slot as the keys the script was given. Any other value
-- (none, 'normal', a forged one) means the normal lane: a request is never put where nobody reads.
local function lane_stream(requests_stream, lane)
  if lane == 'high' or lane == 'low' then return requests_stream .. ':' .. lane end
  return requests_stream
end

-- Appends a request's fields back onto the requests stream of its lane; `requests_stream` is the
-- shard's normal-lane stream.
local function requeue_fields(requests_stream, fields)
  local flat = {}
  for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = tostring(v) end
  redis.call('XADD', lane_stream(requests_stream, fields['lane']), '*', unpack(flat))
end

-- The same for a request kept aside as JSON (a parked or delayed member).
local function requeue(requests_stream, member)
  requeue_fields(requests_stream, cjson.decode(member))
end

-- Milliseconds since the epoch by Redis's clock: every caller agrees on it, whatever its own clock.
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The counting semaphore (semaphore.lua, and each concurrency key) is a sorted set of holder ->
-- deadline (ms). Drops the holders past their deadline and returns how many are left.
local function semaphore_live(holders_key, now)
  redis.call('ZREMRANGEBYSCORE', holders_key, '-inf', now)
  return redis.call('ZCARD', holders_key)
end

-- Gives `holder` a slot until now + ttl_ms, or extends the one it has. Every holder is added with
-- the same ttl, so the set may expire with the newest deadline.
local function semaphore_hold(holders_key, holder, now, ttl_ms)
  redis.call('ZADD', holders_key, now + ttl_ms, holder)
  redis.call('PEXPIRE', holders_key, ttl_ms)
end

-- Hands the free slots of concurrency key `name` to its first waiters, in their order: each slot is
-- held for its waiter at once (so that nobody arriving meanwhile takes it; the waiter's delivery
-- finds it held and refreshes it), and the waiter's request goes back onto the requests stream.
-- Each waiter is admitted against its own workflow's limit (its member's ckey_limit; `limit` for one
-- parked without), as it would have been had the slot been free when it came: the releaser's limit
-- let two runs of a limit-1 workflow through when a limit-3 run of the same key ended. The first
-- waiter its limit holds back holds back those after it (their order is kept). The key leaves the
-- index when nobody waits any more. Returns how many were woken.
local function wake_waiters(holders_key, waiting_key, parked_key, index_key, requests_stream, name, limit, now, ttl_ms)
  local live = semaphore_live(holders_key, now)
  local woken = 0
  while true do
    local holder = redis.call('ZRANGE', waiting_key, 0, 0)[1]
    if not holder then break end
    local member = redis.call('HGET', parked_key, holder)
    local fields = member and cjson.decode(member)
    if fields and live >= (tonumber(fields['ckey_limit']) or limit) then break end
    redis.call('ZREM', waiting_key, holder)
    redis.call('HDEL', parked_key, holder)
    if fields then
      semaphore_hold(holders_key, holder, now, ttl_ms)
      requeue_fields(requests_stream, fields)
      live = live + 1
      woken = woken + 1
    end
  end
  if redis.call('ZCARD', waiting_key) == 0 then redis.call('HDEL', index_key, name) end
  return woken
end
