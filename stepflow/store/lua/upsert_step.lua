#!lua
-- Write one step row as given (no lease check). A new step is appended to
-- the run's step order.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] steps hash  KEYS[5] order list
-- ARGV[1] request id  ARGV[2] step id  ARGV[3..] '<step>|<field>'/JSON pairs
-- Returns 'OK'. Errors: SF_NOTFOUND, SF_DELETING.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local refused = sf_writable(KEYS[1])
if refused then return refused end
if redis.call('HEXISTS', KEYS[4], ARGV[2] .. '|name') == 0 then
  redis.call('RPUSH', KEYS[5], ARGV[2])
end
sf_hset_from(KEYS[4], ARGV, 3)
return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'OK')
