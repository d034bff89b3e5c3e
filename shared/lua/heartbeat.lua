-- Keep this worker's in-flight entries fresh so that no other worker reclaims a healthy run.
--
-- Why a script: XCLAIM alone would also steal back an entry another worker has reclaimed meanwhile;
-- checking ownership and claiming in one step cannot. Ownership is looked up per entry, so entries
-- this consumer still owns but no longer runs (orphans) cannot crowd live ones out of the check.
-- Safe to run twice: it only resets idle times.
local requests_stream = KEYS[1]

local group = ARGV[1]
local consumer = ARGV[2]
-- ARGV[3..]: the entry ids this worker is running.

-- Reply: the ids still owned (now refreshed); an id missing from the reply was taken over.
local keep = {}
for i = 3, #ARGV do
  if owns(requests_stream, group, ARGV[i], consumer) then keep[#keep + 1] = ARGV[i] end
end
if #keep > 0 then
  -- The ids must be the last arguments of the call: unpack() in the middle of an argument list
  -- yields only its first value.
  local claim = {'XCLAIM', requests_stream, group, consumer, 0}
  for _, id in ipairs(keep) do claim[#claim + 1] = id end
  claim[#claim + 1] = 'JUSTID'
  redis.call(unpack(claim))
end
return keep
