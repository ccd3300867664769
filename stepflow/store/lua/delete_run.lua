#!lua
-- Delete a run and every key of it.
-- KEYS[1] run hash  KEYS[2] tomb string  KEYS[3] execs hash
-- KEYS[4..] every other key of the run: ctx, steps, order, reqs, reqlog,
--           children and the events list of each execution listed in ARGV
-- ARGV[1] request id  ARGV[2] 'plain' (refused while a multi-run delete holds
-- the run) or 'fenced' (phase 2 of the multi-run delete ARGV[1]: only a run
-- that delete holds is removed; any other is left alone and counts 0)
-- ARGV[3..] the execution ids the caller found
-- The caller lists executions before calling; when they changed in between
-- (continue-as-new) the script refuses with SF_CHANGED and the caller
-- retries, so no history list is ever left behind. The tomb remembers the
-- request id and counts for 60 s so a replayed delete answers the same.
-- Returns {1 if deleted else 0, executions deleted, events deleted, events the
-- global counter held for the run (see sf_settle)}.
-- Errors: SF_DELETING (plain, while a multi-run delete holds the run), SF_CHANGED.
local tomb = redis.call('GET', KEYS[2])
if tomb then
  local req, execs, events, counted = string.match(tomb, '^(.+)|(%d+)|(%d+)|(-?%d+)$')
  if req == ARGV[1] then return {1, tonumber(execs), tonumber(events), tonumber(counted)} end
end
local row = redis.call('HMGET', KEYS[1], 'status', '~del')
if not row[1] then return {0, 0, 0, 0} end
if ARGV[2] == 'fenced' then
  if row[2] ~= ARGV[1] then return {0, 0, 0, 0} end
elseif row[2] then
  return sf_fail('DELETING', row[2])
end

local stored = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
  if string.sub(field, -7) == '|status' then stored = stored + 1 end
end
if stored ~= #ARGV - 2 then
  return sf_fail('CHANGED', 'executions changed during delete')
end
local events = 0
for i = 3, #ARGV do
  local x = redis.call('HMGET', KEYS[3], ARGV[i] .. '|status', ARGV[i] .. '|events')
  if not x[1] then return sf_fail('CHANGED', 'executions changed during delete') end
  events = events + tonumber(x[2] or '0')
end

local counted = tonumber(redis.call('HGET', KEYS[3], '~counted') or '0')
redis.call('DEL', KEYS[1], KEYS[3])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. stored .. '|' .. events .. '|' .. counted,
  'PX', 60000)
return {1, stored, events, counted}
