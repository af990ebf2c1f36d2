-- Add index members for states that existed before their field was declared.
--
-- A member is added only if its state is still at the version it was computed
-- from; a state changed since then was indexed by that change's commit.
--
-- KEYS  the history and index keys the members name
-- ARGV  per member: history key number, version, index key number, member

for a = 1, #ARGV, 4 do
  if redis.call('LLEN', KEYS[tonumber(ARGV[a])]) == tonumber(ARGV[a + 1]) then
    redis.call('ZADD', KEYS[tonumber(ARGV[a + 2])], 0, ARGV[a + 3])
  end
end
return 0
