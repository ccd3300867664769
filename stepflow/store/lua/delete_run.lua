#!lua
-- Delete a run and every key of it.
-- KEYS[1] run hash  KEYS[2] tomb string  KEYS[3] execs hash
-- KEYS[4..] every other key of the run: ctx, steps, order, reqs, reqlog and
--           the events list of each execution listed in ARGV
-- ARGV[1] request id  ARGV[2..] the execution ids the caller found
-- The caller lists executions before calling; when they changed in between
-- (continue-as-new) the script refuses with SF_CONFLICT and the caller
-- retries, so no history list is ever left behind. The tomb remembers the
-- request id for 60 s so a replayed delete still answers 1.
-- Returns 1 when the run was deleted, 0 when it did not exist.
if redis.call('GET', KEYS[2]) == ARGV[1] then return 1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end

local fields = redis.call('HKEYS', KEYS[3])
local stored = 0
for _, field in ipairs(fields) do
  if string.sub(field, -7) == '|status' then stored = stored + 1 end
end
if stored ~= #ARGV - 1 then
  return sf_fail('CHANGED', 'executions changed during delete')
end
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[3], ARGV[i] .. '|status') == 0 then
    return sf_fail('CHANGED', 'executions changed during delete')
  end
end

redis.call('DEL', KEYS[1], KEYS[3])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SET', KEYS[2], ARGV[1], 'PX', 60000)
return 1
