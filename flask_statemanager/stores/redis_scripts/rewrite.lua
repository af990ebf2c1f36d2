-- Maintenance: replace stored documents that are still what the caller read
-- (a state written meanwhile keeps the writer's document). No version, index
-- or TTL changes.
--
-- A history entry is found by its version, not by a position read earlier:
-- entry v sits at index v - 1 - pruned, and a prune running meanwhile moves
-- entries from the list to the pruned count (pruned entries are gone, and
-- need no rewrite).
--
-- KEYS  per item: a state key ("s"), or a history key and that state's pruned
--       key ("h")
-- ARGV  four per item: "s" or "h", the entry's version (history only), the
--       document read, the new document
-- ->    how many documents were replaced

local replaced = 0
local k = 1
for j = 1, #ARGV, 4 do
  if ARGV[j] == 's' then
    if redis.call('GET', KEYS[k]) == ARGV[j + 2] then
      redis.call('SET', KEYS[k], ARGV[j + 3], 'KEEPTTL')
      replaced = replaced + 1
    end
    k = k + 1
  else
    local pruned = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    local at = tonumber(ARGV[j + 1]) - 1 - pruned
    if at >= 0 and redis.call('LINDEX', KEYS[k], at) == ARGV[j + 2] then
      redis.call('LSET', KEYS[k], at, ARGV[j + 3])
      replaced = replaced + 1
    end
    k = k + 2
  end
end
return replaced
