#!lua
-- Write one step row as given (no lease check). A new step is appended to
-- the run's step order.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] steps hash  KEYS[5] order list
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] '1' to leave a completed step as it is
-- ARGV[4..] '<step>|<field>'/JSON pairs
-- Returns 'OK', or 'KEPT' when ARGV[3] is '1' and the step is completed (nothing
-- written: a completion recorded meanwhile by another owner is never undone).
-- Errors: SF_NOTFOUND, SF_DELETING.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local refused = sf_writable(KEYS[1])
if refused then return refused end
if ARGV[3] == '1' and redis.call('HGET', KEYS[4], ARGV[2] .. '|status') == '"completed"' then
  return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'KEPT')
end
if redis.call('HEXISTS', KEYS[4], ARGV[2] .. '|name') == 0 then
  redis.call('RPUSH', KEYS[5], ARGV[2])
end
sf_hset_from(KEYS[4], ARGV, 4)
return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'OK')
