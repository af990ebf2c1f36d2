-- How many states are live by status (TTL-passed ones included until their
-- expiry is recorded): the sizes of the types' sorted sets.
--
-- KEYS  types set
-- ARGV  key prefix

local total = 0
for _, t in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  total = total + redis.call('ZCARD', ARGV[1] .. ':type:' .. t)
end
return total
