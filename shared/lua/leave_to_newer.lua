-- Leave a delivered request to the workers of a newer release: its entry (or its task hash) has a
-- format newer than this worker reads. The request is kept in the sorted set of its format and its
-- entry acknowledged, together; a worker that reads that format moves it back onto the stream
-- (resume.lua, with no flag to clear).
--
-- Why a script: parking and acknowledging happen together, so the request is never both pending and
-- parked (run twice) nor neither (lost). Why park rather than put it back on the stream or leave it
-- pending: two old workers would hand a request back and forth for as long as no new worker read it,
-- and a pending entry's delivery count would grow with every reclaim until a new worker dead-lettered
-- it for max_deliveries. Parked, it waits once, without a delivery, for as long as no new worker runs
-- (a deploy rolled back included).
-- Safe to run twice: the second call finds the entry no longer this worker's and writes nothing.
local requests_stream = KEYS[1]
local newer_key = KEYS[2]         -- the requests left for workers that read this format

local entry = ARGV[1]
local group = ARGV[2]
local consumer = ARGV[3]
local score = tonumber(ARGV[4])   -- the entry's place in the stream: moved back in this order
local member = ARGV[5]            -- JSON of the request's fields, as they are

-- Reply: 1 left to newer workers, -1 not this worker's entry (taken over, or already left).
if not owns(requests_stream, group, entry, consumer) then return -1 end
redis.call('ZADD', newer_key, score, member)
redis.call('XACK', requests_stream, group, entry)
return 1
