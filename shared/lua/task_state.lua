-- Read what a delivery needs before it runs: its task's fields, and whether its workflow or the whole
-- queue is paused. Writes nothing.
--
-- Why a script: one command instead of a pipeline of two. Every delivery pays this read, and on the
-- worker's side a pipeline costs more CPU than the script call (the client builds, sends and parses
-- each of its commands): a tenth of a no-op run's worker CPU went to it.
local task_key = KEYS[1]
local control_key = KEYS[2]

local workflow_field = ARGV[1]   -- 'workflow:{id}' in the control hash

-- Reply: {the task hash as a flat field/value list, {queue flag, workflow flag}} (a flag nil if unset)
return {redis.call('HGETALL', task_key), redis.call('HMGET', control_key, 'queue', workflow_field)}
