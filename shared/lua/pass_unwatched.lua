-- Move the webhook group past the end of a results stream while no endpoint is registered, so the
-- fan-out reads none of its entries: none could become a delivery.
--
-- Why a script: the check and the move must be one step. An endpoint registered between a separate
-- check and the move would miss the events written in between, which came after its registration
-- (endpoints receive events from their registration on; the group was created at '$' for that).
-- The move only goes forward ('$' is the stream's newest id), and leaves pending entries (read by a
-- consumer that died) where they are: they are claimed as before.
-- Safe to run twice: the second call moves the group to where it is, or past newer entries no one wants.
local endpoints = KEYS[1]
local results = KEYS[2]

local group = ARGV[1]

-- Reply: 1 if the group was moved (no endpoint), 0 if there are endpoints (read the entries).
if redis.call('HLEN', endpoints) > 0 then return 0 end
redis.call('XGROUP', 'SETID', results, group, '$')
return 1
