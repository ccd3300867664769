#!lua
-- Write one step row as given (no lease check): its status, attempt, owner,
-- execution and record; its lease (epoch, token, expiry) is left as it is.
-- A new step is appended to the run's step order.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] steps hash  KEYS[5] order list
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] '1' to leave a completed step as it is
-- ARGV[4] status  ARGV[5] attempt  ARGV[6] execution id  ARGV[7] worker (JSON)
-- ARGV[8] its '|c' members  ARGV[9] its '|r' members (see sf_step_state)
-- Returns 'OK', or 'KEPT' when ARGV[3] is '1' and the step is completed (nothing
-- written: a completion recorded meanwhile by another owner is never undone).
-- Errors: SF_NOTFOUND, SF_DELETING.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local refused = sf_writable(KEYS[1])
if refused then return refused end
local current = sf_step_state(redis.call('HGET', KEYS[4], ARGV[2] .. '|l'))
if ARGV[3] == '1' and current and current.status == 'completed' then
  return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'KEPT')
end
if not current then
  redis.call('RPUSH', KEYS[5], ARGV[2])
  current = {epoch = 0, expires = 0, token = ''}
end
local line = sf_step_line({status = ARGV[4], epoch = current.epoch, attempt = ARGV[5],
  expires = current.expires, xid = ARGV[6], token = current.token, worker = ARGV[7]})
redis.call('HSET', KEYS[4], ARGV[2] .. '|l', line, ARGV[2] .. '|c', ARGV[8], ARGV[2] .. '|r', ARGV[9])
return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'OK')
