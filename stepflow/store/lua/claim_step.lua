#!lua
-- Start an attempt of a step under a fresh lease.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] steps hash  KEYS[5] order list  KEYS[6] execs hash
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] name (JSON)  ARGV[4] owner (JSON)
-- ARGV[5] lease token  ARGV[6] lease duration (ms)  ARGV[7] execution id
-- ARGV[8] step input (JSON)
-- ARGV[9] request id of the create_run this claim rides with (optional): the claim is
-- made only if that request created the run with its execution, else the reply is ''.
-- Returns '<epoch>|<expires_at ms>|<attempt>'. Errors: SF_NOTFOUND, SF_DELETING, SF_CANCELLED
-- (the run was cancelled: no new work starts), SF_NOEXEC (no such execution),
-- SF_DONE (step completed), SF_HELD '<owner JSON>|<expires_at>' (a live lease).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
if ARGV[9] and redis.call('HGET', KEYS[2], ARGV[9]) ~= '1' then return '' end
local refused, run = sf_writable(KEYS[1])
if refused then return refused end
if run[1] == '"cancelled"' then return sf_fail('CANCELLED', 'run') end
if redis.call('HEXISTS', KEYS[6], ARGV[7] .. '|status') == 0 then
  return sf_fail('NOEXEC', ARGV[7])
end
local fields = {}
local line = redis.call('HGET', KEYS[4], ARGV[2] .. '|l')
local lease, code, detail = sf_claim(KEYS[5], ARGV[2], line, ARGV[3], ARGV[4],
  ARGV[5], ARGV[6], ARGV[7], ARGV[8], sf_now_ms(), fields)
if not lease then return sf_fail(code, detail) end
redis.call('HSET', KEYS[4], unpack(fields))
return sf_remember(KEYS[2], KEYS[3], ARGV[1], lease)
