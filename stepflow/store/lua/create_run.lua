#!lua
-- Create a run, or overwrite the record of an existing one (create-or-resume).
-- Step rows and history are kept; the context bag is replaced; the current
-- execution is created when missing, else its status follows the record.
-- KEYS[1] run hash  KEYS[2] reqs hash  KEYS[3] reqlog list
-- KEYS[4] ctx hash  KEYS[5] execs hash  KEYS[6] events list of the execution
-- ARGV[1] request id   ARGV[2] execution id   ARGV[3] status (JSON)
-- ARGV[4] input (JSON) ARGV[5] created_at (ms) ARGV[6] n = number of run fields
-- ARGV[7] '1' to create only when no run has this id (else nothing is written)
-- ARGV[8] kind of an event to append to the execution's history ('' for none)
-- ARGV[9] its payload (JSON)
-- ARGV[10 .. 9+2n] run field/value pairs, then context key/value pairs
-- Returns the number of executions created (0 or 1, for the global counters),
-- or -1 when ARGV[7] is '1' and the run exists (nothing written).
-- Errors: SF_DELETING (a delete holds the run: it cannot be overwritten now).
local done = sf_replayed(KEYS[2], ARGV[1])
if done then return tonumber(done) end
local fence = redis.call('HGET', KEYS[1], '~del')
if fence then return sf_fail('DELETING', fence) end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return sf_remember(KEYS[2], KEYS[3], ARGV[1], '-1') and -1
end

local n = tonumber(ARGV[6])
local run_fields = {}
for i = 10, 9 + 2 * n do run_fields[#run_fields + 1] = ARGV[i] end

redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(run_fields))
redis.call('DEL', KEYS[4])
sf_hset_from(KEYS[4], ARGV, 10 + 2 * n)

local x = ARGV[2] .. '|'
local created = 0
if redis.call('HEXISTS', KEYS[5], x .. 'status') == 0 then
  redis.call('HSET', KEYS[5], x .. 'status', ARGV[3], x .. 'input', ARGV[4],
    x .. 'output', 'null', x .. 'error', 'null', x .. 'started_at', ARGV[5],
    x .. 'completed_at', 'null', x .. 'events', 0)
  created = 1
else
  redis.call('HSET', KEYS[5], x .. 'status', ARGV[3])
end
if ARGV[8] ~= '' then
  sf_append_event(KEYS[6], KEYS[5], ARGV[2], ARGV[8], ARGV[9], sf_now_ms())
end
sf_remember(KEYS[2], KEYS[3], ARGV[1], tostring(created))
return created
