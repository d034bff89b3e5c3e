-- Claim the due tick of a built-in schedule (the retention cleanup) for one worker, and move the
-- schedule on to its next tick.
--
-- Why a script: every worker's scheduler may look at the same moment; reading the due tick and
-- moving it forward in one step means exactly one of them claims each tick (the others find the
-- next tick, not yet due). A schedule not yet in the set is registered at `next_ms` (no operator
-- creates built-in schedules), so a new installation's first tick is the cron's next one.
-- Safe to run twice: the second call finds the schedule moved on and claims nothing (a claim whose
-- reply was lost skips that tick; the next tick does its work).
local schedules_key = KEYS[1]

local name = ARGV[1]              -- the built-in schedule's name (member of the set)
local now_ms = tonumber(ARGV[2])  -- Redis's clock, as every schedule uses
local next_ms = tonumber(ARGV[3]) -- the cron's next tick after now

-- Reply: the claimed tick (ms), or 0 when nothing was claimed.
local due = redis.call('ZSCORE', schedules_key, name)
if not due then
  redis.call('ZADD', schedules_key, next_ms, name)
  return 0
end
due = tonumber(due)
if due > now_ms then return 0 end
redis.call('ZADD', schedules_key, next_ms, name)
return due
