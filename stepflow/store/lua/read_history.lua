#!lua flags=no-writes
-- Read one execution's history, or its events after a given one.
-- KEYS[1] run hash  KEYS[2] execs hash  KEYS[3] events list of the execution
-- ARGV[1] execution id  ARGV[2] read the events after this event id (0: all; ids
-- run 1..N in the list's order, so event i is at index i - 1)
-- Returns the events (JSON), oldest first. Errors: SF_NOTFOUND, SF_NOEXEC.
if redis.call('EXISTS', KEYS[1]) == 0 then return sf_fail('NOTFOUND', 'run') end
if redis.call('HEXISTS', KEYS[2], ARGV[1] .. '|status') == 0 then
  return sf_fail('NOEXEC', ARGV[1])
end
return redis.call('LRANGE', KEYS[3], ARGV[2], -1)
