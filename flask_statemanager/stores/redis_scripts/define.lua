-- Replace a type's index definition if it is still the one the caller read.
--
-- KEYS  index definitions hash
-- ARGV  type, definition read ('' for none), new definition ('' deletes it)
--
-- Returns 1 when replaced, 0 when another process changed it first.

if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
