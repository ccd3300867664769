-- Helpers shared by every stepflow script; scripts.py places this text
-- after each script's "#!lua" line and before its body.
--
-- Conventions: every value in the run, steps and execs hashes is JSON;
-- errors are error_reply('SF_<CODE> <detail>') and mapped to Python
-- exceptions in scripts.py; every script reads and validates before its
-- first write, because Redis does not roll a script back.

local function sf_fail(code, detail)
  return redis.error_reply('SF_' .. code .. ' ' .. detail)
end

-- The store's clock: leases and timers never trust a worker's clock.
local function sf_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- redis-py re-sends a script after a dropped connection, so one call may
-- run twice. A script that carries a request id returns the remembered
-- result of the first run instead of applying itself again.
local function sf_replayed(reqs, req_id)
  if req_id == '' then return false end
  return redis.call('HGET', reqs, req_id)
end

local SF_REMEMBERED = 128

local function sf_remember(reqs, reqlog, req_id, result)
  if req_id ~= '' then
    redis.call('HSET', reqs, req_id, result)
    if redis.call('RPUSH', reqlog, req_id) > SF_REMEMBERED then
      redis.call('HDEL', reqs, redis.call('LPOP', reqlog))
    end
  end
  return result
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
-- event counter, so ids run 1..N even when a script is replayed.
local function sf_append_event(events, execs, xid, kind, payload, now)
  local id = redis.call('HINCRBY', execs, xid .. '|events', 1)
  redis.call('RPUSH', events, '{"event_id":' .. id .. ',"kind":"' .. kind ..
    '","timestamp":' .. now .. ',"payload":' .. payload .. '}')
  return id
end

-- Nil when the lease (token, epoch) is the step's current live lease,
-- otherwise the error code and detail to refuse the write with.
local function sf_check_lease(run, steps, sid, token, epoch, now)
  if redis.call('EXISTS', run) == 0 then
    return 'STALE', 'the run no longer exists'
  end
  local s = sid .. '|'
  local held = redis.call('HMGET', steps, s .. 'token', s .. 'epoch', s .. 'expires', s .. 'status')
  if held[1] ~= token or held[2] ~= epoch then
    if held[4] == '"completed"' then return 'DONE', sid end
    return 'STALE', 'the lease was taken over'
  end
  if tonumber(held[3]) <= now then
    return 'STALE', 'the lease expired'
  end
  return nil
end
