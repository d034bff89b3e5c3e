-- Replace a webhook endpoint's record (its new signing secret) and keep its previous secret for a
-- grace period, only if the record is still the one the caller read.
--
-- Why a script: the secret is sealed with NOVA_SECRETS_KEY, so the new record is built outside Redis
-- from the one read; writing it only if nothing changed meanwhile means two rotations at once cannot
-- both answer with a secret (one would never sign anything), and a rotation racing a delete cannot
-- bring the endpoint back. The record and the previous secret change together.
-- Safe to run twice: the second call finds the new record, not the one read, and changes nothing.
local endpoints_key = KEYS[1]  -- hash: endpoint id -> record (JSON)
local previous_key = KEYS[2]   -- hash: endpoint id -> previous secret and when it expires (JSON)

local endpoint_id = ARGV[1]
local expected = ARGV[2]       -- the record as the caller read it
local record = ARGV[3]         -- the record with its new secret
local previous = ARGV[4]       -- the previous secret's JSON, or '' for none (no grace)

-- Reply: 1 replaced, 0 the record changed or went meanwhile (nothing written).
if redis.call('HGET', endpoints_key, endpoint_id) ~= expected then return 0 end
redis.call('HSET', endpoints_key, endpoint_id, record)
if previous == '' then
  redis.call('HDEL', previous_key, endpoint_id)
else
  redis.call('HSET', previous_key, endpoint_id, previous)
end
return 1
