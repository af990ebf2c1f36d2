-- Add index members for states that existed before their field was declared.
--
-- A member is added only if its state is still at the version it was computed
-- from; a state changed since then was indexed by that change's commit.
--
-- KEYS  the history, pruned and index keys the members name
-- ARGV  per member: history key number, pruned key number, version, index
--       key number, member (the version is the history's length plus the
--       entries pruned from it, see commit.lua)

for a = 1, #ARGV, 5 do
  local pruned = tonumber(redis.call('GET', KEYS[tonumber(ARGV[a + 1])]) or '0')
  if redis.call('LLEN', KEYS[tonumber(ARGV[a])]) + pruned == tonumber(ARGV[a + 2]) then
    redis.call('ZADD', KEYS[tonumber(ARGV[a + 3])], 0, ARGV[a + 4])
  end
end
return 0
