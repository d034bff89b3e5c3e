-- Move the webhook group to the end of a results stream while no endpoint is registered, so the fan-out
-- reads none of its entries: none could become a delivery.
--
-- Why a script: the check and the move must be one step. An endpoint registered between a separate
-- check and the move would miss the events written in between, which came after its registration
-- (endpoints receive events from their registration on; the group was created at '$' for that).
-- The move only goes forward ('$' is the stream's newest id), and leaves pending entries (read by a
-- consumer that died) where they are: they are claimed as before. A group at the end already is not
-- moved again: a move is a write (replicas, the append-only file), and an idle fan-out asks often.
-- Safe to run twice: the second call finds the group at the end, or moves it past newer entries no one
-- wants.
local endpoints = KEYS[1]
local results = KEYS[2]

local group = ARGV[1]

local MAX_ID = '18446744073709551615-18446744073709551615'

-- Reply: 1 if the group is at the stream's end (no endpoint); 0 if there are endpoints, or no stream or
-- no group yet (the fan-out reads, and its read makes them).
if redis.call('HLEN', endpoints) > 0 then return 0 end
if redis.call('EXISTS', results) == 0 then return 0 end

-- A reply of XINFO is a flat list of names and values.
local function field(reply, name)
  for i = 1, #reply, 2 do
    if reply[i] == name then return reply[i + 1] end
  end
  return nil
end

-- Behind is "an entry after the group's last-delivered id", looked up with a range of one entry: XINFO
-- STREAM's last-generated-id would say it too, but that reply carries the stream's first and last
-- entries whole, and a context can be megabytes (a 4 MB entry made each idle pass hold Redis 22 ms).
for _, info in ipairs(redis.call('XINFO', 'GROUPS', results)) do
  if field(info, 'name') == group then
    local delivered = field(info, 'last-delivered-id')
    -- Nothing comes after the greatest id (and a range cannot start past it).
    if delivered ~= MAX_ID and #redis.call('XRANGE', results, '(' .. delivered, '+', 'COUNT', 1) > 0 then
      redis.call('XGROUP', 'SETID', results, group, '$')
    end
    return 1
  end
end
return 0
