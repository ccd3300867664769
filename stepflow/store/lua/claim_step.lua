#!lua
-- Start an attempt of a step under a fresh lease.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] steps hash  KEYS[5] order list  KEYS[6] execs hash
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] name (JSON)  ARGV[4] owner (JSON)
-- ARGV[5] lease token  ARGV[6] lease duration (ms)  ARGV[7] execution id
-- ARGV[8] step input (JSON)
-- Returns '<epoch>|<expires_at ms>'. Errors: SF_NOTFOUND, SF_DELETING, SF_CANCELLED
-- (the run was cancelled: no new work starts), SF_NOEXEC (no such execution),
-- SF_DONE (step completed), SF_HELD '<owner JSON>|<expires_at>' (a live lease).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local run = redis.call('HMGET', KEYS[1], 'status', '~del')
if not run[1] then return sf_fail('NOTFOUND', 'run') end
if run[2] then return sf_fail('DELETING', run[2]) end
if run[1] == '"cancelled"' then return sf_fail('CANCELLED', 'run') end
if redis.call('HEXISTS', KEYS[6], ARGV[7] .. '|status') == 0 then
  return sf_fail('NOEXEC', ARGV[7])
end

local s = ARGV[2] .. '|'
local row = redis.call('HMGET', KEYS[4], s .. 'status', s .. 'token', s .. 'expires',
  s .. 'worker_id', s .. 'name')
if row[1] == '"completed"' then return sf_fail('DONE', ARGV[2]) end
local now = sf_now_ms()
if row[2] and row[2] ~= '' and tonumber(row[3]) > now then
  return sf_fail('HELD', tostring(row[4]) .. '|' .. row[3])
end

if not row[5] then redis.call('RPUSH', KEYS[5], ARGV[2]) end
local epoch = redis.call('HINCRBY', KEYS[4], s .. 'epoch', 1)
redis.call('HINCRBY', KEYS[4], s .. 'attempt', 1)
local expires = now + tonumber(ARGV[6])
redis.call('HSET', KEYS[4], s .. 'name', ARGV[3], s .. 'status', '"running"',
  s .. 'input', ARGV[8], s .. 'output', 'null', s .. 'error', 'null',
  s .. 'started_at', now, s .. 'finished_at', 'null', s .. 'worker_id', ARGV[4],
  s .. 'execution_id', ARGV[7], s .. 'token', ARGV[5], s .. 'expires', expires)
return sf_remember(KEYS[2], KEYS[3], ARGV[1], epoch .. '|' .. expires)
