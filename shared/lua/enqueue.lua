-- Enqueue one execution request: admission (in-flight cap, rate), the task hash, the request entry
-- and the queued event, together or not at all.
--
-- Why one script: a refused request leaves no trace and an accepted one is counted exactly once,
-- whichever API replica took it; GET /tasks answers PENDING the moment the call returns; and an
-- idempotency key maps to exactly one task.
-- Safe to run twice (a reply lost on the way back and the call re-sent): a second call for a task id
-- that already has its hash answers what the first call did and writes nothing.
local requests_stream = KEYS[1]  -- the request's lane's stream
local results_stream = KEYS[2]
local sequence_key = KEYS[3]     -- the execution id sequence
local task_key = KEYS[4]
local idempotency_key = KEYS[5]  -- left out (see given()) when the caller gave none
local task_events_key = KEYS[6]  -- the task's results-stream ids, in order
local inflight_key = KEYS[7]     -- the client's count of unfinished executions
local rate_key = KEYS[8]         -- the client's token bucket
local workflow_key = KEYS[9]     -- the workflow's head (JSON); left out when the caller read it itself

local task_id = ARGV[1]
local workflow_id = ARGV[2]
local workflow_name = ARGV[3]
local client = ARGV[4]
local enqueued_at = ARGV[5]
local payload = ARGV[6]          -- JSON
local queued_data = ARGV[7]      -- JSON, the queued event's data
local idempotency_ttl = ARGV[8]  -- seconds
local max_inflight = tonumber(ARGV[9])  -- 0: no cap
local rate = tonumber(ARGV[10])         -- executions per second, 0: no limit
local burst = tonumber(ARGV[11])
local execution_key_prefix = ARGV[12]    -- + execution id: the execution -> task id map; '' for none
local execution_key_ttl = tonumber(ARGV[13])
local format = ARGV[14]          -- the format version written on the entry, the task hash and the event
local id_stride = tonumber(ARGV[15])     -- the number of shards: ids are n * stride + offset, so that
local id_offset = tonumber(ARGV[16])     -- an execution id says its shard (offset: this shard's index)
local lane = ARGV[17]            -- the priority lane: 'high' or 'low', '' for normal
local workflow_version = tonumber(ARGV[18])  -- with KEYS[9]: the version the request was built for
local sequence_seen = tonumber(ARGV[19])     -- the highest value the caller has seen the sequence hold

-- Reply: {task_id, execution_id, request entry id or '', outcome}
local NEW, REPEAT, AT_CAPACITY, RATE_LIMITED, NO_SEQUENCE, WORKFLOW_CHANGED = 1, 0, 2, 3, 4, 5

if given(idempotency_key) then
  local existing = redis.call('GET', idempotency_key)
  if existing then
    local sep = string.find(existing, ' ', 1, true)
    return {string.sub(existing, 1, sep - 1), string.sub(existing, sep + 1), '', REPEAT}
  end
end
local previous = redis.call('HMGET', task_key, 'execution_id', 'entry')
if previous[1] then
  -- This very call again: answer as the first time did.
  return {task_id, previous[1], previous[2] or '', NEW}
end
if given(workflow_key) then
  -- The request names a version the caller remembered: it goes in only while the workflow is live at
  -- that version, so an update or a delete cannot slip in between the caller's read and this step.
  -- Anything else (changed, deleted, missing, unreadable): the caller reads the head again.
  -- After the two checks above: a call sent again (its reply lost) or a request repeated with its
  -- idempotency key answers as its first call did whatever became of the workflow since; told
  -- "changed", the caller would queue the request again under a new task id.
  local raw = redis.call('GET', workflow_key)
  local ok, head = false, nil
  if raw then ok, head = pcall(cjson.decode, raw) end
  if not ok or type(head) ~= 'table' or head.deleted == true or tonumber(head.version) ~= workflow_version then
    return {'', '', '', WORKFLOW_CHANGED}
  end
end
local sequence = tonumber(redis.call('GET', sequence_key))
if sequence == nil or sequence < sequence_seen then
  -- Redis lost its data, or some of it: restarted without persistence (no sequence), or from an older
  -- snapshot or a lagging replica (a sequence below what the caller saw it reach). The caller raises
  -- it above every id PostgreSQL knows and every one it saw, then calls again. Handing out ids again
  -- would give a new execution the id of one PostgreSQL holds for another task.
  return {'', '', '', NO_SEQUENCE}
end
local inflight = tonumber(redis.call('GET', inflight_key) or '0')
if max_inflight > 0 and inflight >= max_inflight then
  return {'', tostring(inflight), '', AT_CAPACITY}
end
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local state = redis.call('HMGET', rate_key, 'tokens', 'at')
  local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate / 1000)
  if tokens < 1 then
    redis.call('HSET', rate_key, 'tokens', tostring(tokens), 'at', now)
    return {'', tostring(math.ceil((1 - tokens) * 1000 / rate)), '', RATE_LIMITED}
  end
  redis.call('HSET', rate_key, 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', rate_key, math.ceil(burst * 1000 / rate) + 1000)
end
redis.call('INCR', inflight_key)
local execution_id = redis.call('INCR', sequence_key) * id_stride + id_offset
if execution_key_prefix ~= '' then
  -- Named from the new id, so not in KEYS: it carries the same hash tag as the keys above (one slot).
  -- GET /executions/{id} reads it to answer from the task hash before PostgreSQL has the execution.
  redis.call('SET', execution_key_prefix .. execution_id, task_id, 'EX', execution_key_ttl)
end
local request = {
  'task_id', task_id, 'execution_id', execution_id, 'workflow_id', workflow_id,
  'workflow_name', workflow_name, 'client', client, 'enqueued_at', enqueued_at, 'payload', payload,
  'v', format}
local task = {
  'status', 'PENDING', 'task_id', task_id, 'execution_id', execution_id, 'workflow_id', workflow_id,
  'workflow_name', workflow_name, 'client', client, 'enqueued_at', enqueued_at, 'attempt', '0',
  'updated_at', enqueued_at, 'v', format}
if lane ~= '' then
  -- On the entry, so that a retry, a resume or a concurrency slot puts it back onto its lane's stream.
  request[#request + 1] = 'lane'; request[#request + 1] = lane
  task[#task + 1] = 'lane'; task[#task + 1] = lane
end
local entry = redis.call('XADD', requests_stream, '*', unpack(request))
task[#task + 1] = 'entry'; task[#task + 1] = entry
redis.call('HSET', task_key, unpack(task))
local event_id = redis.call('XADD', results_stream, '*',
  'type', 'queued', 'task_id', task_id, 'execution_id', execution_id, 'workflow_id', workflow_id,
  'client', client, 'ts', enqueued_at, 'data', queued_data, 'v', format)
redis.call('RPUSH', task_events_key, event_id)
if given(idempotency_key) then
  -- "task_id execution_id": a repeat is answered from this key alone.
  redis.call('SET', idempotency_key, task_id .. ' ' .. execution_id, 'EX', idempotency_ttl)
end
return {task_id, tostring(execution_id), entry, NEW}
