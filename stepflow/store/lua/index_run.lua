#!lua
-- Put a run in the index of its status and in no other, and count the change
-- its per-run script made: one script in the index slot, safe to send again.
-- KEYS[1] runs zset (run id -> created_at)  KEYS[2] metrics hash
-- KEYS[3] metrics reqs hash  KEYS[4] metrics reqlog list
-- KEYS[5..] the status zsets, one per status
-- ARGV[1] run id  ARGV[2] position of its status's zset among KEYS[5..] (1-based;
-- 0 for none: a deleted run)
-- ARGV[3] request id of the counted change ('' for none)
-- ARGV[4..] counter name / integer delta pairs
-- The entry's score is the run's created_at, read from KEYS[1]: a run without
-- an entry there (deleted meanwhile) is only taken out of the status zsets.
-- Returns 'OK'.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local wanted = 4 + tonumber(ARGV[2])
for i = 5, #KEYS do
  if i == wanted and score then
    redis.call('ZADD', KEYS[i], score, ARGV[1])
  else
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
end
if ARGV[3] ~= '' then sf_bump(KEYS[2], KEYS[3], KEYS[4], ARGV[3], ARGV, 4) end
return 'OK'
