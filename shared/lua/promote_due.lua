-- Move parked retries that are due (by Redis's clock) back onto the requests stream.
--
-- Why a script: two workers promoting at once move each retry exactly once.
-- Safe to run twice: a promoted member is gone from the set.
local delayed_key = KEYS[1]
local requests_stream = KEYS[2]  -- the shard's normal-lane stream (each request goes to its lane's)

local limit = tonumber(ARGV[1])  -- most to move per call

-- Reply: how many moved.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', delayed_key, '-inf', now_ms, 'LIMIT', 0, limit)
for _, member in ipairs(due) do
  requeue(requests_stream, member)
  redis.call('ZREM', delayed_key, member)
end
return #due
