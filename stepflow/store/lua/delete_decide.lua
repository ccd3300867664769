#!lua
-- The decision of a multi-run delete, held by its coordinator run: commit
-- (phase 2 may remove the runs) or abort (every fence is to be removed).
-- The coordinator commits after fencing every run; a process that finds a
-- run fenced by a delete that is not its own aborts that delete only when
-- it has been prepared for longer than ARGV[3] (its process presumably died),
-- and rolls a committed one forward.
-- KEYS[1] coordinator run hash
-- ARGV[1] request id  ARGV[2] 'commit' or 'abort'  ARGV[3] minimum age (ms) to abort
-- Returns {state, run ids space separated}; state is 'committed', 'aborted',
-- 'pending' (prepared and younger than ARGV[3]: left alone) or 'gone' (the
-- coordinator holds no decision of this request: it was rolled back).
local row = redis.call('HMGET', KEYS[1], '~del', '~del_state', '~del_at', '~del_ids')
if row[1] ~= ARGV[1] or not row[2] then return {'gone', ''} end
if row[2] ~= 'prepared' then return {row[2], row[4]} end
if ARGV[2] == 'commit' then
  redis.call('HSET', KEYS[1], '~del_state', 'committed')
  return {'committed', row[4]}
end
if sf_now_ms() - tonumber(row[3]) < tonumber(ARGV[3]) then return {'pending', row[4]} end
redis.call('HSET', KEYS[1], '~del_state', 'aborted')
return {'aborted', row[4]}
