#!lua
-- End the current execution as continued-as-new and start the next one.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list  KEYS[4] execs hash
-- KEYS[5] events list of the current execution  KEYS[6] events list of the next
-- KEYS[7] steps hash  KEYS[8] order list
-- KEYS[9..] events lists of the executions listed in ARGV (prune candidates)
-- ARGV[1] request id  ARGV[2] current execution id  ARGV[3] next execution id
-- ARGV[4] next input (JSON)  ARGV[5] '1' to prune, else '0'
-- ARGV[6] keep_last ('' = only the current)  ARGV[7] completed_before ms ('' = any)
-- ARGV[8] n  ARGV[9 .. 8+n] execution ids
-- ARGV[9+n] the current execution's event count the caller saw ('' = any)
-- ARGV[10+n ..] kind / payload (JSON) pairs of events to carry into the next
-- execution (raised events no wait consumed), appended in the same step,
-- followed by the raised events after those the caller saw (see below)
-- A next execution left from before a create_run that moved the run back
-- is replaced, history included. With pruning, old executions go in the
-- same step and the next execution's history records a history_pruned
-- event with the counts. The run's events are settled (see sf_settle).
-- Returns {change in the number of stored executions, change of the global
-- event count}.
-- Errors: SF_NOTFOUND, SF_DELETING, SF_CANCELLED (a cancelled run does not go on),
-- SF_CONFLICT (not the current execution, or events other than raised ones arrived
-- since the caller read the history: it reads again).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then
  local dx, de = string.match(done, '^(-?%d+)|(-?%d+)$')
  return {tonumber(dx), tonumber(de)}
end
local refused, run = sf_writable(KEYS[1], 'current_execution_id')
if refused then return refused end
if run[1] == '"cancelled"' then return sf_fail('CANCELLED', 'run') end
local current = run[3]
if current ~= ARGV[2] then
  return sf_fail('CONFLICT', 'the run is at execution ' .. tostring(current) ..
    ', not ' .. ARGV[2])
end

local listed = tonumber(ARGV[8])
local seen = ARGV[9 + listed]
-- Raised events after those the caller saw go along, so a stream of them
-- cannot hold the continue off; any other event there, it reads again.
local late = sf_unseen_raised(KEYS[4], KEYS[5], ARGV[2], seen)
if not late then
  return sf_fail('CONFLICT', 'events arrived in execution ' .. ARGV[2] .. ' meanwhile')
end

local now = sf_now_ms()
local history = sf_history_keys(8, 9)
local doomed = {}
if ARGV[5] == '1' then
  local err
  doomed, err = sf_prune_select(KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[6]) or 1,
    tonumber(ARGV[7]), history, tonumber(ARGV[2]), now)
  if not doomed then return err end
end

local old, new = ARGV[2] .. '|', ARGV[3] .. '|'
-- A next execution left from before is replaced: its events stop counting.
local replaced = redis.call('HMGET', KEYS[4], new .. 'status', new .. 'events')
local d_execs = 1
if replaced[1] then
  d_execs = 0
  -- 0 - n, not -n: Lua's -0 is sent as '-0', which HINCRBY refuses.
  redis.call('HINCRBY', KEYS[4], '~events', 0 - tonumber(replaced[2] or '0'))
end
redis.call('HSET', KEYS[4], old .. 'status', '"continued_as_new"', old .. 'completed_at', now)
sf_append_event(KEYS[5], KEYS[4], ARGV[2], 'continued_as_new',
  '{"next":' .. ARGV[3] .. '}', now)
redis.call('DEL', KEYS[6])
redis.call('HSET', KEYS[4], new .. 'status', '"running"', new .. 'input', ARGV[4],
  new .. 'output', 'null', new .. 'error', 'null', new .. 'started_at', now,
  new .. 'completed_at', 'null', new .. 'events', 0)
sf_append_event(KEYS[6], KEYS[4], ARGV[3], 'run_started', ARGV[4], now)
if ARGV[5] == '1' then
  local deleted, events = sf_prune_apply(KEYS[4], KEYS[7], KEYS[8], doomed, history)
  sf_append_event(KEYS[6], KEYS[4], ARGV[3], 'history_pruned',
    '{"reason":"continue_as_new","executions_deleted":' .. deleted ..
    ',"events_deleted":' .. events .. '}', now)
  d_execs = d_execs - deleted
end
for i = 10 + listed, #ARGV, 2 do
  sf_append_event(KEYS[6], KEYS[4], ARGV[3], ARGV[i], ARGV[i + 1], now)
end
for _, raised in ipairs(late) do
  local from = '"carried_from":[' .. ARGV[2] .. ',' .. raised[1] .. ']'
  local payload = string.sub(raised[2], 1, -2) .. ',' .. from .. '}'
  if raised[2] == '{}' then payload = '{' .. from .. '}' end
  sf_append_event(KEYS[6], KEYS[4], ARGV[3], 'event_raised', payload, now)
end
local d_events = sf_settle(KEYS[4])
redis.call('HSET', KEYS[1], 'current_execution_id', ARGV[3], 'status', '"running"',
  'input', ARGV[4], 'output', 'null', 'error', 'null', 'updated_at', now,
  'completed_at', 'null')
sf_remember(KEYS[2], KEYS[3], ARGV[1], d_execs .. '|' .. d_events)
return {d_execs, d_events}
