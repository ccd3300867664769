#!lua
-- Phase 1 of a multi-run delete: check one run and fence it for the request.
-- The caller has read the run, its parent and its children; this script
-- checks, atomically with setting the fence, that none of it changed, so the
-- rules (terminal unless forced, no sub-run alone, no orphan) hold at the
-- moment the run stops taking writes.
-- KEYS[1] run hash  KEYS[2] children set of the run
-- ARGV[1] request id  ARGV[2] coordinator run id (holds the decision)
-- ARGV[3] '1' to allow an unfinished run (force), else '0'
-- ARGV[4] the parent_run_id field as the caller read it (JSON)
-- ARGV[5] on the coordinator: every run id of the request, space separated;
--         '' on the other runs
-- ARGV[6..] every member of the children set the caller saw
-- Returns 'OK' (also when this request already fences the run).
-- Errors: SF_NOTFOUND, SF_DELETING '<request id>' (another delete holds it),
-- SF_RUNNING '<status JSON>', SF_CHANGED (parent or children changed).
local row = redis.call('HMGET', KEYS[1], 'status', 'parent_run_id', '~del')
if not row[1] then return sf_fail('NOTFOUND', 'run') end
if row[3] then
  if row[3] == ARGV[1] then return 'OK' end
  return sf_fail('DELETING', row[3])
end
if ARGV[3] ~= '1' and (row[1] == '"running"' or row[1] == '"pending"') then
  return sf_fail('RUNNING', row[1])
end
if row[2] ~= ARGV[4] then return sf_fail('CHANGED', 'the parent changed') end
local seen = {}
for i = 6, #ARGV do seen[ARGV[i]] = true end
for _, child in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not seen[child] then return sf_fail('CHANGED', 'a child run appeared') end
end

redis.call('HSET', KEYS[1], '~del', ARGV[1], '~del_coord', ARGV[2], '~del_at', sf_now_ms())
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], '~del_state', 'prepared', '~del_ids', ARGV[5])
end
return 'OK'
