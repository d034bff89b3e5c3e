-- Park a delivered request while its workflow or the whole queue is paused, freeing the worker's slot.
--
-- Why a script: the pause flag is checked in the same step that parks, so a resume (resume.lua)
-- either ran before (the flag is gone: nothing is parked, the run starts) or runs after (and finds
-- the request parked): a request is never parked after its resume, where nothing would move it back.
-- Safe to run twice: the second call finds the entry no longer this worker's and writes nothing.
local control_key = KEYS[1]
local requests_stream = KEYS[2]
local parked_queue = KEYS[3]      -- parked while the queue is paused
local parked_workflow = KEYS[4]   -- parked while the request's workflow is paused

local entry = ARGV[1]
local group = ARGV[2]
local consumer = ARGV[3]
local workflow_field = ARGV[4]    -- 'workflow:{id}' in the control hash
local score = tonumber(ARGV[5])   -- the entry's time (ms): resume starts parked requests in this order
local member = ARGV[6]            -- JSON of the request's fields

-- Reply: 1 parked, 0 not paused (run it), -1 not this worker's entry (taken over, or already parked).
local flags = redis.call('HMGET', control_key, 'queue', workflow_field)
if not flags[1] and not flags[2] then return 0 end
if not owns(requests_stream, group, entry, consumer) then return -1 end
-- A paused workflow keeps its own runs until it is resumed, whatever the queue does.
local target = parked_queue
if flags[2] then target = parked_workflow end
redis.call('ZADD', target, score, member)
redis.call('XACK', requests_stream, group, entry)
return 1
