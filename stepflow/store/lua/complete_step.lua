#!lua
-- Record a step completed, merge its context patch and append its history
-- event, all or nothing: the heart of "a completed step never runs again".
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] steps hash
-- KEYS[5] ctx hash  KEYS[6] execs hash  KEYS[7] events list of the lease's execution
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] token  ARGV[4] epoch
-- ARGV[5] execution id  ARGV[6] output (JSON)
-- ARGV[7] event kind ('' for none)  ARGV[8] event payload (JSON)
-- ARGV[9..] context key/value pairs (JSON values)
-- Returns '<event id>|<timestamp ms>' of the appended event, or 'OK' without one.
-- Errors: SF_STALE (lease expired, taken over, run deleted or being deleted), SF_DONE,
-- SF_NOEXEC (the lease's execution is gone).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local now = sf_now_ms()
local code, detail = sf_check_lease(KEYS[1], KEYS[4], ARGV[2], ARGV[3], ARGV[4], now)
if code then return sf_fail(code, detail) end
if redis.call('HEXISTS', KEYS[6], ARGV[5] .. '|status') == 0 then
  return sf_fail('NOEXEC', ARGV[5])
end

local s = ARGV[2] .. '|'
redis.call('HSET', KEYS[4], s .. 'status', '"completed"', s .. 'output', ARGV[6],
  s .. 'error', 'null', s .. 'finished_at', now)
redis.call('HDEL', KEYS[4], s .. 'token', s .. 'expires')
sf_hset_from(KEYS[5], ARGV, 9)
local result = 'OK'
if ARGV[7] ~= '' then
  local id = sf_append_event(KEYS[7], KEYS[6], ARGV[5], ARGV[7], ARGV[8], now)
  result = id .. '|' .. now
end
return sf_remember(KEYS[2], KEYS[3], ARGV[1], result)
