-- Resume a paused workflow or the whole queue: clear its flag and move its parked requests back onto
-- the requests stream, oldest first.
--
-- Why a script: clearing the flag and moving what was parked under it happen together, so a request
-- parked a moment before is moved, and none is parked after (park.lua checks the flag itself).
-- Safe to run twice: the second call finds no flag and nothing parked.
-- Also moves back the requests older workers left for a newer format (leave_to_newer.lua): their
-- 'format:N' scope is never a flag, and the caller never asks to clear it.
local control_key = KEYS[1]
local parked_key = KEYS[2]
local requests_stream = KEYS[3]  -- the shard's normal-lane stream (each request goes to its lane's)

local field = ARGV[1]            -- 'queue' or 'workflow:{id}'
local limit = tonumber(ARGV[2])  -- most to move per call (a long backlog is moved in several calls)
local clear = ARGV[3] == '1'     -- the first call clears the flag; later ones only move

-- Reply: how many requests moved.
if clear then redis.call('HDEL', control_key, field) elseif redis.call('HEXISTS', control_key, field) == 1 then
  -- Paused again between two calls: what is left stays parked for the next resume.
  return 0
end
local members = redis.call('ZRANGE', parked_key, 0, limit - 1)
for _, member in ipairs(members) do
  requeue(requests_stream, member)
  redis.call('ZREM', parked_key, member)
end
return #members
