#!lua flags=no-writes
-- Read a run's executions.
-- KEYS[1] run hash  KEYS[2] execs hash
-- Returns the execs hash flat. Errors: SF_NOTFOUND.
if redis.call('EXISTS', KEYS[1]) == 0 then return sf_fail('NOTFOUND', 'run') end
return redis.call('HGETALL', KEYS[2])
