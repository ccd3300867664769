#!lua
-- Replace the context bag, or merge a patch into it key by key.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] ctx hash
-- ARGV[1] request id  ARGV[2] 'replace' or 'merge'  ARGV[3..] key/value pairs (JSON values)
-- Returns 'OK'. Errors: SF_NOTFOUND.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
if redis.call('EXISTS', KEYS[1]) == 0 then return sf_fail('NOTFOUND', 'run') end
if ARGV[2] == 'replace' then redis.call('DEL', KEYS[4]) end
sf_hset_from(KEYS[4], ARGV, 3)
return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'OK')
