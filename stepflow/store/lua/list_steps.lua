#!lua flags=no-writes
-- Read every step of a run.
-- KEYS[1] order list  KEYS[2] steps hash
-- Returns {step ids in insertion order, steps hash flat}.
return {redis.call('LRANGE', KEYS[1], 0, -1), redis.call('HGETALL', KEYS[2])}
