#!lua
-- Replace the context bag, or merge a patch into it key by key.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] ctx hash
-- ARGV[1] request id  ARGV[2] 'replace' or 'merge'  ARGV[3..] key/value pairs (JSON values)
-- Returns 'OK'. Errors: SF_NOTFOUND, SF_DELETING.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local refused = sf_writable(KEYS[1])
if refused then return refused end
if ARGV[2] == 'replace' then redis.call('DEL', KEYS[4]) end
sf_hset_from(KEYS[4], ARGV, 3)
return sf_remember(KEYS[2], KEYS[3], ARGV[1], 'OK')
