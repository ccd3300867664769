#!lua flags=no-writes
-- Read one run and its context bag in one consistent snapshot.
-- KEYS[1] run hash   KEYS[2] ctx hash
-- Returns {run fields flat, ctx fields flat}; the first is empty when absent.
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
