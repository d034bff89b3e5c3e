-- Move a schedule on from the tick a scheduler fired (or found already run) to its next tick, only if
-- that tick is still the schedule's score.
--
-- Why a script: the score is compared and replaced in one step. Replicas that fired the same tick race to
-- move it on: the first does, the others find another score and leave it. And a replica whose pass
-- outlived its lease must not undo what another did meanwhile: a bring-back after Redis's clock stepped
-- back (ScheduleStore.bring_back) set an earlier score, which a plain "only forward" write (ZADD GT) from
-- the late pass replaced with the tick after the wrong time, silencing a minutely schedule for a day.
-- A schedule deleted meanwhile has no score, and is not brought back.
-- Safe to run twice: the second call finds the score moved on and writes nothing.
local schedules_key = KEYS[1]     -- sorted set: schedule id -> its next tick (ms)

local schedule_id = ARGV[1]
local fired_ms = tonumber(ARGV[2])  -- the tick this pass read as due
local next_ms = tonumber(ARGV[3])   -- the schedule's tick after it

-- Reply: 1 moved on, 0 left as another scheduler (or a delete) had it.
local score = redis.call('ZSCORE', schedules_key, schedule_id)
if not score or tonumber(score) ~= fired_ms then return 0 end
redis.call('ZADD', schedules_key, next_ms, schedule_id)
return 1
