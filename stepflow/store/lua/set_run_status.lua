#!lua
-- Move a run and its current execution to a new status, optionally
-- appending a history event, in one step.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] execs hash  KEYS[5] events list of that execution  KEYS[6] ctx hash
-- ARGV[1] request id  ARGV[2] execution id (must be current)
-- ARGV[3] status (JSON)  ARGV[4] '1' if terminal (sets completed_at)
-- ARGV[5] output (JSON)  ARGV[6] error (JSON)
-- ARGV[7] event kind ('' for none)  ARGV[8] event payload (JSON)
-- A terminal status settles the run's events (see sf_settle). A run already
-- in the terminal status asked for, or completed (that is final), is left as
-- it is but for that: two drivers of one run (one resumed it while the other
-- drove it) both finish it.
-- Returns {run fields flat, ctx fields flat, change of the global event count}:
-- the run as it now is (a replayed request reads it again).
-- Errors: SF_NOTFOUND, SF_DELETING, SF_CONFLICT (not the current execution),
-- SF_CANCELLED (the run was cancelled: only a resume, to running, may change that).
local function snapshot(delta)
  return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[6]), tonumber(delta)}
end
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return snapshot(done) end
local refused, row = sf_writable(KEYS[1], 'current_execution_id')
if refused then return refused end
local code, detail = sf_status_refusal(row[1], row[3], ARGV[2], ARGV[3])
if code then return sf_fail(code, detail) end
if ARGV[4] == '1' and (row[1] == ARGV[3] or row[1] == '"completed"') then
  local delta = sf_settle(KEYS[4])
  return snapshot(sf_remember(KEYS[2], KEYS[3], ARGV[1], tostring(delta)))
end

local delta = sf_set_status(KEYS[1], KEYS[4], KEYS[5], ARGV[2], ARGV[3], ARGV[5], ARGV[6],
  ARGV[4] == '1', ARGV[7], ARGV[8], sf_now_ms())
sf_remember(KEYS[2], KEYS[3], ARGV[1], tostring(delta))
return snapshot(delta)
