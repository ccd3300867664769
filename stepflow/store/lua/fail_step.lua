#!lua
-- Record a failed attempt of a step and release its lease.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] steps hash
-- KEYS[5] execs hash  KEYS[6] events list of the lease's execution
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] token  ARGV[4] epoch
-- ARGV[5] execution id  ARGV[6] error (JSON)  ARGV[7] '1' if final (status
-- failed) else '0' (status pending, ready for the next attempt)
-- ARGV[8] event kind ('' for none)  ARGV[9] event payload (JSON)
-- ARGV[10] '0' when no attempt ran under the lease (its claim's count is taken back)
-- Returns 'OK'. Errors: SF_STALE, SF_DONE.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local now = sf_now_ms()
local held = sf_step_state(redis.call('HGET', KEYS[4], ARGV[2] .. '|l'))
local code, detail = sf_check_lease(KEYS[1], held, ARGV[2], ARGV[3], ARGV[4], ARGV[5], now)
if code then return sf_fail(code, detail) end

held.status, held.token, held.expires = 'pending', '', '0'
if ARGV[10] == '0' then held.attempt = string.format('%d', held.attempt - 1) end
if ARGV[7] == '1' then held.status = 'failed' end
redis.call('HSET', KEYS[4], ARGV[2] .. '|l', sf_step_line(held),
  ARGV[2] .. '|r', sf_result('null', ARGV[6], now))
if ARGV[8] ~= '' then
  sf_append_event(KEYS[6], KEYS[5], ARGV[5], ARGV[8], ARGV[9], now)
end
return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'OK')
