-- Release the locks that still hold this writer's token (one that expired and
-- was taken by another writer is left alone).
--
-- KEYS  lock keys
-- ARGV  token

for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return 0
