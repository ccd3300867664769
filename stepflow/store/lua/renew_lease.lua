#!lua
-- Extend a lease (a heartbeat from the owner of a long step). A lease that
-- expired is renewed too while nobody claimed the step since (token and epoch
-- unchanged): a stalled owner keeps its step instead of running it twice.
-- Writes (complete, fail) still refuse an expired lease. A cancelled run's
-- lease is not renewed: that is how a cancel from another process reaches a
-- running step (its owner stops it at the next heartbeat).
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] steps hash
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] token  ARGV[4] epoch
-- ARGV[5] lease duration (ms)  ARGV[6] the lease's execution id
-- Returns the new expires_at (ms). Errors: SF_STALE, SF_DONE, SF_CANCELLED.
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return tonumber(done) end
local now = sf_now_ms()
local held = sf_step_state(redis.call('HGET', KEYS[4], ARGV[2] .. '|l'))
local code, detail, status = sf_check_lease(KEYS[1], held, ARGV[2], ARGV[3], ARGV[4], ARGV[6],
  now, true)
if code then return sf_fail(code, detail) end
if status == '"cancelled"' then return sf_fail('CANCELLED', 'run') end
held.expires = tonumber(now) + tonumber(ARGV[5])
redis.call('HSET', KEYS[4], ARGV[2] .. '|l', sf_step_line(held))
sf_remember(KEYS[2], KEYS[3], ARGV[1], tostring(held.expires))
return held.expires
