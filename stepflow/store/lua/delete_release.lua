#!lua
-- Remove the fence of a multi-run delete that was rolled back.
-- KEYS[1] run hash
-- ARGV[1] request id
-- Returns 'OK' (also when the request holds no fence there: nothing to do).
if redis.call('HGET', KEYS[1], '~del') == ARGV[1] then
  redis.call('HDEL', KEYS[1], unpack(SF_FENCE_FIELDS))
end
return 'OK'
