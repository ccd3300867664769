#!lua
-- Delete a run's old finished executions with their histories.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] execs hash
-- KEYS[5] steps hash  KEYS[6] order list
-- KEYS[7..] events lists of the executions listed in ARGV
-- ARGV[1] request id  ARGV[2] keep_last ('' = keep only the current)
-- ARGV[3] completed_before ms ('' = any)  ARGV[4] n  ARGV[5 .. 4+n] execution ids
-- Never the current execution, never a running one. Step rows of deleted
-- executions go too; the context bag stays. The run's events are settled (see
-- sf_settle). Returns {executions deleted, events deleted, change of the global
-- event count}.
-- Errors: SF_NOTFOUND, SF_DELETING, SF_CHANGED (the caller's list of executions is stale).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then
  local deleted, events, delta = string.match(done, '^(%d+)|(%d+)|(-?%d+)$')
  return {tonumber(deleted), tonumber(events), tonumber(delta)}
end
local refused, run = sf_writable(KEYS[1], 'current_execution_id')
if refused then return refused end
local current = tonumber(run[3])
local history = sf_history_keys(4, 7)
local doomed, err = sf_prune_select(KEYS[4], current, tonumber(ARGV[2]) or 1,
  tonumber(ARGV[3]), history, nil, nil)
if not doomed then return err end
local deleted, events = sf_prune_apply(KEYS[4], KEYS[5], KEYS[6], doomed, history)
local delta = sf_settle(KEYS[4])
sf_remember(KEYS[2], KEYS[3], ARGV[1], deleted .. '|' .. events .. '|' .. delta)
return {deleted, events, delta}
