#!lua
-- Record a step completed, merge its context patch and append its history
-- event, all or nothing: the heart of "a completed step never runs again".
-- Optionally claim the next step for the same owner in the same script, so
-- a chain of steps costs one round trip per step; or, for a run's last step,
-- complete the run in the same script.
-- KEYS[1] run hash  KEYS[2] steps hash  KEYS[3] ctx hash  KEYS[4] execs hash
-- KEYS[5] events list of the lease's execution  KEYS[6] order list
-- ARGV[1] request id  ARGV[2] step id  ARGV[3] token  ARGV[4] epoch
-- ARGV[5] execution id  ARGV[6] output (JSON)
-- ARGV[7] event kind ('' for none)  ARGV[8] event payload (JSON)
-- ARGV[9] next step id to claim ('' for none)  ARGV[10] its name (JSON)
-- ARGV[11] owner (JSON)  ARGV[12] its lease token  ARGV[13] its lease duration (ms)
-- ARGV[14] '1' to complete the run too ('' otherwise)  ARGV[15] the run's output (JSON)
-- ARGV[16] the run's event kind ('' for none)  ARGV[17] its payload (JSON)
-- ARGV[18..] context key/value pairs (JSON values)
-- Returns '<event id>|<timestamp ms>' of the appended event, or 'OK' without one;
-- with a next step, followed by '#<epoch>|<expires_at ms>|<attempt>' of its lease, or by
-- '#' alone when it was not claimed (completed, held, the run cancelled).
-- Completing the run, the reply is {that text followed by '!<change of the global
-- event count>', or by '!' alone when the run was not completed (cancelled, or at
-- another execution), run fields flat, ctx fields flat}.
-- Errors: SF_STALE (lease expired, taken over, for another execution, run deleted or
-- being deleted), SF_DONE.
--
-- This runs once per step, so it keeps to few commands. A re-sent request is
-- recognised by the request id the completion leaves in the step's '|d'
-- field, not by the run's request log: no extra writes.
local function reply(result)
  if ARGV[14] ~= '1' then return result end
  return {result, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[3])}
end

local sid = ARGV[2]
-- The next step's state line comes in the same read (a field '|l' never exists).
local row = redis.call('HMGET', KEYS[2], sid .. '|l', sid .. '|d', ARGV[9] .. '|l')
local replay = row[2] and ARGV[1] .. '#'
if replay and string.sub(row[2], 1, #replay) == replay then
  return reply(string.sub(row[2], #replay + 1))
end
local held = sf_step_state(row[1])
local now = sf_now_ms()
local code, detail, status, current = sf_check_lease(KEYS[1], held, sid, ARGV[3], ARGV[4],
  ARGV[5], now)
if code then return sf_fail(code, detail) end
local finishing = ARGV[14] == '1' and not sf_status_refusal(status, current, ARGV[5],
  '"completed"')

local fields = {}
local claimed
if ARGV[9] ~= '' then
  claimed = ''
  if status ~= '"cancelled"' then
    claimed = sf_claim(KEYS[6], ARGV[9], row[3], ARGV[10], ARGV[11], ARGV[12],
      ARGV[13], ARGV[5], 'null', now, fields) or ''
  end
end
sf_hset_from(KEYS[3], ARGV, 18)
local result = 'OK'
if ARGV[7] ~= '' then
  local id = sf_append_event(KEYS[5], KEYS[4], ARGV[5], ARGV[7], ARGV[8], now)
  result = id .. '|' .. now
end
if claimed then result = result .. '#' .. claimed end
if finishing then
  result = result .. '!' .. sf_set_status(KEYS[1], KEYS[4], KEYS[5], ARGV[5], '"completed"',
    ARGV[15], 'null', true, ARGV[16], ARGV[17], now)
elseif ARGV[14] == '1' then
  result = result .. '!'
end
held.status, held.token, held.expires = 'completed', '', '0'
redis.call('HSET', KEYS[2], sid .. '|l', sf_step_line(held),
  sid .. '|r', sf_result(ARGV[6], 'null', now),
  sid .. '|d', ARGV[1] .. '#' .. result, unpack(fields))
return reply(result)
