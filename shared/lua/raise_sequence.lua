-- Raise the execution id sequence to at least a floor (the largest id PostgreSQL knows), creating it
-- if Redis lost it. Ids must never be handed out twice.
--
-- Safe to run twice: it only ever raises.
local sequence_key = KEYS[1]

local floor = tonumber(ARGV[1])

-- Reply: the sequence's value.
local current = tonumber(redis.call('GET', sequence_key) or '-1')
if floor > current then
  redis.call('SET', sequence_key, floor)
  return floor
end
return current
