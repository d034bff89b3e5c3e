-- Remove a consumer from a group only if it owns no pending entry.
--
-- Why a script: XGROUP DELCONSUMER discards the consumer's pending entries; checking and deleting
-- in one step means an entry it claimed a moment ago is never silently dropped.
-- Safe to run twice: the second call finds no consumer to delete.
local stream = KEYS[1]

local group = ARGV[1]
local consumer = ARGV[2]

-- Reply: 1 if removed.
local owned = redis.call('XPENDING', stream, group, '-', '+', 1, consumer)
if #owned > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
return 1
