#!lua
-- Record a child run in its parent's children set, before the child exists
-- (an entry whose run does not exist, or names another parent, is ignored by
-- readers). Refused while a delete holds the parent: no run joins a tree
-- that is being deleted.
-- KEYS[1] parent run hash  KEYS[2] parent children set
-- ARGV[1] child run id
-- Returns 1. Errors: SF_DELETING.
local fence = redis.call('HGET', KEYS[1], '~del')
if fence then return sf_fail('DELETING', fence) end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
