#!lua
-- Append one event to an execution's history.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] execs hash  KEYS[5] events list of the execution
-- ARGV[1] request id  ARGV[2] execution id  ARGV[3] kind  ARGV[4] payload (JSON)
-- ARGV[5] '1' to append only if that execution is the run's current one
-- ARGV[6] to append only if no event but raised ones came after that many ('' for any)
-- Returns '<event_id>|<timestamp ms>'. Errors: SF_NOTFOUND, SF_DELETING, SF_CANCELLED
-- (a cancelled run's history takes nothing more until a resume), SF_NOEXEC,
-- SF_CONFLICT (not the current execution, with ARGV[5] = '1'; other events after ARGV[6]).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return done end
local refused, run = sf_writable(KEYS[1], 'current_execution_id')
if refused then return refused end
if run[1] == '"cancelled"' then return sf_fail('CANCELLED', 'run') end
if redis.call('HEXISTS', KEYS[4], ARGV[2] .. '|status') == 0 then
  return sf_fail('NOEXEC', ARGV[2])
end
if ARGV[5] == '1' and run[3] ~= ARGV[2] then
  return sf_fail('CONFLICT', 'execution ' .. ARGV[2] .. ' is no longer current')
end
if not sf_unseen_raised(KEYS[4], KEYS[5], ARGV[2], ARGV[6]) then
  return sf_fail('CONFLICT', 'events arrived in execution ' .. ARGV[2] .. ' meanwhile')
end
local now = sf_now_ms()
local id = sf_append_event(KEYS[5], KEYS[4], ARGV[2], ARGV[3], ARGV[4], now)
return sf_remember(KEYS[2], KEYS[3], ARGV[1], id .. '|' .. now)
