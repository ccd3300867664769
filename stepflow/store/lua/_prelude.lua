-- Helpers the stepflow scripts share; scripts.py places the ones a script
-- uses (with the comment above each) after its "#!lua" line, before its body.
--
-- Conventions: every value in the run, steps and execs hashes is JSON;
-- errors are error_reply('SF_<CODE> <detail>') and mapped to Python
-- exceptions in scripts.py; every script reads and validates before its
-- first write, because Redis does not roll a script back.

local function sf_fail(code, detail)
  return redis.error_reply('SF_' .. code .. ' ' .. detail)
end

-- The store's clock in ms: leases and timers never trust a worker's clock.
-- Text, made of TIME's own digits: a script writes the time more often than
-- it computes with it, and Lua writes a number through sprintf('%.14g'),
-- about 0.5 us for a 13-digit one. Compare with tonumber(now).
local function sf_now_ms()
  local t = redis.call('TIME')
  return t[1] .. string.sub('00000' .. t[2], -6, -4)
end

-- redis-py re-sends a script after a dropped connection, so one call may
-- run twice. A script that carries a request id returns the remembered
-- result of the first run instead of applying itself again.
local function sf_replayed(reqs, req_id)
  if req_id == '' then return false end
  return redis.call('HGET', reqs, req_id)
end

local SF_REMEMBERED = 128

-- Remember the result of request req_id; the oldest beyond ``limit``
-- (default SF_REMEMBERED) are forgotten.
local function sf_remember(reqs, reqlog, req_id, result, limit)
  if req_id ~= '' then
    redis.call('HSET', reqs, req_id, result)
    if redis.call('RPUSH', reqlog, req_id) > (limit or SF_REMEMBERED) then
      redis.call('HDEL', reqs, redis.call('LPOP', reqlog))
    end
  end
  return result
end

-- Add counter name / integer delta pairs args[first..] to the global
-- counters hash, once per request id (the request id of the per-run change
-- they count), so a change sent twice is counted once.
local function sf_bump(metrics, reqs, reqlog, req_id, args, first)
  if sf_replayed(reqs, req_id) then return end
  for i = first, #args, 2 do redis.call('HINCRBY', metrics, args[i], args[i + 1]) end
  sf_remember(reqs, reqlog, req_id, 'OK', 10000)
end

-- A multi-run delete fences each run it will remove with fields in the run
-- hash: '~del' (its request id), '~del_coord' (the run holding its
-- decision), '~del_at' (ms), and on that run '~del_state' and '~del_ids'.
-- Every script that writes to a run refuses while '~del' is set.
local SF_FENCE_FIELDS = {'~del', '~del_coord', '~del_at', '~del_state', '~del_ids'}

-- Nil when the run exists and no delete holds it, else the error reply.
-- The second value is {status, ~del, then the run fields named in ...}, read
-- in the same call, so a script needs no second read of the run.
local function sf_writable(run, ...)
  local row = redis.call('HMGET', run, 'status', '~del', ...)
  if not row[1] then return sf_fail('NOTFOUND', 'run'), row end
  if row[2] then return sf_fail('DELETING', row[2]), row end
  return nil, row
end

-- HSET field/value pairs args[first..] in batches (unpack has a stack limit).
local function sf_hset_from(key, args, first)
  local batch = {}
  for i = first, #args do
    batch[#batch + 1] = args[i]
    if #batch == 1000 then
      redis.call('HSET', key, unpack(batch))
      batch = {}
    end
  end
  if #batch > 0 then redis.call('HSET', key, unpack(batch)) end
end

-- Append one event to an execution's history; its id is the execution's
-- event counter, so ids run 1..N even when a script is replayed. The run's
-- count of stored events ('~events' in the execs hash) grows with it.
local function sf_append_event(events, execs, xid, kind, payload, now)
  redis.call('HINCRBY', execs, '~events', 1)
  local id = string.format('%d', redis.call('HINCRBY', execs, xid .. '|events', 1))
  redis.call('RPUSH', events, '{"event_id":' .. id .. ',"kind":"' .. kind ..
    '","timestamp":' .. now .. ',"payload":' .. payload .. '}')
  return id
end

-- The events of execution xid after the first ``seen`` (a count as text, or
-- '' for no check), when they are all raised events: a list of {id, payload
-- JSON} (raised events arrive from outside at any rate and settle nothing a
-- writer records). Nil when another event is there or there are fewer than
-- ``seen``: the writer must read again. MemoryStore's ``_unseen_raised``.
local function sf_unseen_raised(execs, events, xid, seen)
  local late = {}
  if seen == '' then return late end
  local from = tonumber(seen)
  local held = tonumber(redis.call('HGET', execs, xid .. '|events') or '0')
  if held < from then return nil end
  if held == from then return late end
  for _, item in ipairs(redis.call('LRANGE', events, from, -1)) do
    local id, payload = string.match(item,
      '^{"event_id":(%d+),"kind":"event_raised","timestamp":%d+,"payload":({.*})}$')
    if not id then return nil end
    late[#late + 1] = {id, payload}
  end
  return late
end

-- The global event counter takes a run's events only now and then (a write
-- in its slot on every step would cost a second script per step): '~counted'
-- in the execs hash is how many of the run's stored events ('~events') it
-- holds. Settling makes it hold them all and returns the change, which the
-- caller adds to the counter under the request id of its script.
local function sf_settle(execs)
  local row = redis.call('HMGET', execs, '~events', '~counted')
  local delta = (tonumber(row[1]) or 0) - (tonumber(row[2]) or 0)
  if delta ~= 0 then redis.call('HSET', execs, '~counted', row[1] or 0) end
  return delta
end

-- Move the run and its execution xid to status (JSON) with output and err
-- (JSON), appending the event kind/payload to the execution's history
-- (kind '' for none). A terminal status (terminal true) sets completed_at
-- and settles the run's events. Writes only: the caller checked the run.
-- Returns the change of the global event count (see sf_settle).
local function sf_set_status(run, execs, events, xid, status, output, err, terminal,
                             kind, payload, now)
  local completed = 'null'
  if terminal then completed = now end
  redis.call('HSET', run, 'status', status, 'output', output, 'error', err,
    'updated_at', now, 'completed_at', completed)
  local x = xid .. '|'
  redis.call('HSET', execs, x .. 'status', status, x .. 'output', output,
    x .. 'error', err, x .. 'completed_at', completed)
  if kind ~= '' then sf_append_event(events, execs, xid, kind, payload, now) end
  if terminal then return sf_settle(execs) end
  return 0
end

-- Why a run whose status is run_status (JSON) and whose current execution is
-- current may not move to status (JSON) from execution xid: nil when it may,
-- else the code and detail to refuse with. A cancelled run stays cancelled
-- unless resumed (to running); a finished run is not cancelled (a cancel
-- read it running, then it finished); only the current execution moves the run.
local function sf_status_refusal(run_status, current, xid, status)
  if run_status == '"cancelled"' and status ~= '"running"' and status ~= '"cancelled"' then
    return 'CANCELLED', 'run'
  end
  if status == '"cancelled"' and (run_status == '"completed"' or run_status == '"failed"') then
    return 'CONFLICT',
      'it is ' .. string.sub(run_status, 2, -2) .. ', and a finished run is not cancelled'
  end
  if current ~= xid then
    return 'CONFLICT', 'the run is at execution ' .. tostring(current) .. ', not ' .. xid
  end
  return nil
end

-- A step is at most four fields of the run's steps hash. Few fields keep the
-- hash small and each script's reads and writes short (a small hash is a
-- list Redis scans field by field):
--   '<sid>|l'  its state line: '<status>|<epoch>|<attempt>|<expires>|<execution>|<token>|<worker>'
--              (status a bare word; expires 0 and token '' without a lease;
--              worker the owner as JSON, last, as it may hold '|')
--   '<sid>|c'  what its claim recorded: JSON object members "name", "input", "started_at"
--   '<sid>|r'  its result: JSON object members "output", "error", "finished_at"
--   '<sid>|d'  '<request id>#<result>' of the completion that ended it (replays)
local SF_STEP_FIELDS = {'l', 'c', 'r', 'd'}

-- A step's '|r' field: its output, error (JSON) and finished_at (ms or 'null').
local function sf_result(output, err, finished_at)
  return '"output":' .. output .. ',"error":' .. err .. ',"finished_at":' .. finished_at
end

-- The state line parsed (a table of its texts), or nil for no line (no such
-- step). A line this version cannot read (another layout) stops the script
-- before it writes. The numbers stay text, as they are mostly written back.
local function sf_step_state(line)
  if not line then return nil end
  local status, epoch, attempt, expires, xid, token, worker = string.match(line,
    '^(%a+)|(%d+)|(-?%d+)|(%d+)|(-?%d+)|([^|]*)|(.*)$')
  if not status then error('stepflow: unreadable step state ' .. line) end
  return {status = status, epoch = epoch, attempt = attempt, expires = expires, xid = xid,
    token = token, worker = worker}
end

local function sf_step_line(state)
  return state.status .. '|' .. state.epoch .. '|' .. state.attempt .. '|' .. state.expires ..
    '|' .. state.xid .. '|' .. state.token .. '|' .. state.worker
end

-- Nil when the lease (token, epoch, execution xid) is the step's current live lease (or,
-- with allow_expired, its current lease even past expiry: nobody claimed the
-- step since), otherwise the error code and detail to refuse the write with.
-- ``held`` is the step's parsed state (nil: no such step). The third value
-- is the run's status (JSON) when the lease is good, the fourth its current
-- execution id, read in the same call.
--
-- A lease that matches also proves its execution exists: a prune deletes
-- the step rows of the executions it deletes, so the row would be gone.
local function sf_check_lease(run, held, sid, token, epoch, xid, now, allow_expired)
  local state = redis.call('HMGET', run, 'status', '~del', 'current_execution_id')
  if not state[1] then
    return 'STALE', 'the run no longer exists'
  end
  if state[2] then
    return 'STALE', 'the run is being deleted'
  end
  if not held or held.token ~= token or held.epoch ~= epoch then
    if held and held.status == 'completed' then return 'DONE', sid end
    return 'STALE', 'the lease was taken over'
  end
  if not allow_expired and tonumber(held.expires) <= tonumber(now) then
    return 'STALE', 'the lease expired'
  end
  if held.xid ~= xid then return 'STALE', 'the lease is for another execution' end
  return nil, nil, state[1], state[3]
end

-- Start an attempt of step sid under a fresh lease (the caller checked the
-- run and the execution, and read the step's state line ``line``: false or
-- nil for none). Writes only a new step's place at the end of ``order``;
-- returns the lease as '<epoch>|<expires>|<attempt>' and appends the
-- steps-hash field/value pairs for the caller to write to ``fields``; or nil,
-- a code and a detail when the step completed ('DONE') or another live lease
-- holds it ('HELD', detail '<owner JSON>|<expires_at>').
local function sf_claim(order, sid, line, name, owner, token, lease_ms, xid, input, now, fields)
  local current = sf_step_state(line)
  if not current then
    redis.call('RPUSH', order, sid)
    current = {epoch = 0, attempt = 0}
  elseif current.status == 'completed' then
    return nil, 'DONE', sid
  elseif current.token ~= '' and tonumber(current.expires) > tonumber(now) then
    return nil, 'HELD', current.worker .. '|' .. current.expires
  end
  -- Each number made text once, as an integer: Lua formats a number at every
  -- concatenation, and tostring goes through sprintf('%.14g'), the slow path.
  local epoch = string.format('%d', current.epoch + 1)
  local expires = string.format('%d', tonumber(now) + tonumber(lease_ms))
  local attempt = string.format('%d', current.attempt + 1)
  local n = #fields
  fields[n + 1] = sid .. '|l'
  fields[n + 2] = sf_step_line({status = 'running', epoch = epoch, attempt = attempt,
    expires = expires, xid = xid, token = token, worker = owner})
  fields[n + 3] = sid .. '|c'
  fields[n + 4] = '"name":' .. name .. ',"input":' .. input .. ',"started_at":' .. now
  fields[n + 5] = sid .. '|r'
  fields[n + 6] = sf_result('null', 'null', 'null')
  return epoch .. '|' .. expires .. '|' .. attempt
end

-- Which finished executions a prune deletes: never the current one, never
-- one still running; keep the newest keep_last (the current counts, 0 means
-- 1); with completed_before, only those completed earlier. ``finishing`` is
-- an execution the caller is about to end at ``now`` (continue-as-new), so
-- it is judged as finished. ``history`` maps execution id -> events key as
-- given in KEYS; an execution to delete whose key was not given means the
-- caller read a stale list: a conflict. Reads only.
-- Returns the ids to delete, or nil and an error reply.
local function sf_prune_select(execs, current, keep_last, completed_before, history,
                               finishing, now)
  local ids = {}
  for _, field in ipairs(redis.call('HKEYS', execs)) do
    local xid = tonumber(string.match(field, '^(%d+)|status$'))
    if xid and xid ~= current then ids[#ids + 1] = xid end
  end
  -- The current execution counts first, then the others newest first.
  table.sort(ids, function(a, b) return a > b end)
  table.insert(ids, 1, current)
  local keep = math.max(keep_last, 1)
  local doomed = {}
  for position, xid in ipairs(ids) do
    local x = xid .. '|'
    local row = redis.call('HMGET', execs, x .. 'status', x .. 'completed_at')
    if xid == finishing then row = {'"continued_as_new"', tostring(now)} end
    local finished = row[1] ~= '"running"' and row[1] ~= '"pending"'
    local old_enough = completed_before == nil or
      (row[2] ~= 'null' and tonumber(row[2]) < completed_before)
    if xid ~= current and position > keep and finished and old_enough then
      if not history[xid] then return nil, sf_fail('CHANGED', 'executions changed') end
      doomed[#doomed + 1] = xid
    end
  end
  return doomed
end

local SF_EXEC_FIELDS = {'status', 'input', 'output', 'error', 'started_at', 'completed_at', 'events'}

-- The hash fields '<prefix><name>' for each name (one HDEL deletes them all).
local function sf_fields_of(prefix, names)
  local fields = {}
  for i, name in ipairs(names) do fields[i] = prefix .. name end
  return fields
end

-- Delete the selected executions, their histories and their step rows, so
-- an eternal workflow that prunes keeps bounded storage.
-- Returns executions and events deleted.
local function sf_prune_apply(execs, steps, order, doomed, history)
  if #doomed == 0 then return 0, 0 end
  local events = 0
  local gone = {}
  for _, xid in ipairs(doomed) do
    local x = xid .. '|'
    events = events + tonumber(redis.call('HGET', execs, x .. 'events') or '0')
    redis.call('DEL', history[xid])
    redis.call('HDEL', execs, unpack(sf_fields_of(x, SF_EXEC_FIELDS)))
    gone[tostring(xid)] = true
  end
  local kept = {}
  for _, sid in ipairs(redis.call('LRANGE', order, 0, -1)) do
    local state = sf_step_state(redis.call('HGET', steps, sid .. '|l'))
    if state and gone[state.xid] then
      redis.call('HDEL', steps, unpack(sf_fields_of(sid .. '|', SF_STEP_FIELDS)))
    else
      kept[#kept + 1] = sid
    end
  end
  redis.call('HINCRBY', execs, '~events', 0 - events)  -- not -events: Redis refuses '-0'
  redis.call('DEL', order)
  for i = 1, #kept, 1000 do
    redis.call('RPUSH', order, unpack(kept, i, math.min(i + 999, #kept)))
  end
  return #doomed, events
end

-- ARGV[first] = number n of executions listed, then n ids; their events keys
-- are KEYS[key_first ..]. Returns the id -> key map sf_prune takes.
local function sf_history_keys(first, key_first)
  local history = {}
  for i = 1, tonumber(ARGV[first]) do
    history[tonumber(ARGV[first + i])] = KEYS[key_first + i - 1]
  end
  return history
end
