-- Maintenance: replace stored documents that are still what the caller read
-- (a state written meanwhile keeps the writer's document). No version, index
-- or TTL changes.
--
-- KEYS  state keys and history keys (a history key once per entry)
-- ARGV  four per key: "s" (state) or "h" (history entry), the entry's 0-based
--       position (history only), the document read, the new document
-- ->    how many documents were replaced

local replaced = 0
for i = 1, #KEYS do
  local j = 4 * i - 3
  if ARGV[j] == 's' then
    if redis.call('GET', KEYS[i]) == ARGV[j + 2] then
      redis.call('SET', KEYS[i], ARGV[j + 3], 'KEEPTTL')
      replaced = replaced + 1
    end
  elseif redis.call('LINDEX', KEYS[i], ARGV[j + 1]) == ARGV[j + 2] then
    redis.call('LSET', KEYS[i], ARGV[j + 1], ARGV[j + 3])
    replaced = replaced + 1
  end
end
return replaced
