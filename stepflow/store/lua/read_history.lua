#!lua flags=no-writes
-- Read one execution's history.
-- KEYS[1] run hash  KEYS[2] execs hash  KEYS[3] events list of the execution
-- ARGV[1] execution id
-- Returns the events (JSON), oldest first. Errors: SF_NOTFOUND, SF_NOEXEC.
if redis.call('EXISTS', KEYS[1]) == 0 then return sf_fail('NOTFOUND', 'run') end
if redis.call('HEXISTS', KEYS[2], ARGV[1] .. '|status') == 0 then
  return sf_fail('NOEXEC', ARGV[1])
end
return redis.call('LRANGE', KEYS[3], 0, -1)
