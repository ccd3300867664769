#!lua
-- Add deltas to the global counters, once per request id.
-- The store sends this right after (or pipelined with) the per-run script
-- whose change it counts, with that script's request id; a re-sent request
-- is recognised and not counted twice.
-- KEYS[1] metrics hash  KEYS[2] reqs hash  KEYS[3] reqlog list (index tag)
-- ARGV[1] request id  ARGV[2..] counter name / integer delta pairs
-- Returns 'OK' (also for a request applied before, which changes nothing).
sf_bump(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV, 2)
return 'OK'
