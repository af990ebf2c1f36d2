-- The newest changes of every state, newest first.
--
-- The change log holds '<state id> <version> <change id>' per committed
-- change, in commit order ('<state id> <version>' before the change id was
-- added); the change itself is entry version - 1 - pruned of the state's
-- history, where pruned counts the oldest entries prune removed. An entry
-- that was pruned, or purged with its state (whose id may since have a new
-- life with the same version), is left out.
--
-- KEYS  change log
-- ARGV  key prefix, limit

local entries = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[2]), -1)
local out = {}
for i = #entries, 1, -1 do
  local id, version, change = string.match(entries[i], '^(%S+) (%d+) ?(%x*)$')
  local tag = '{' .. id .. '}'
  local pruned = tonumber(redis.call('GET', ARGV[1] .. ':pruned:' .. tag) or '0')
  local at = tonumber(version) - 1 - pruned
  if at >= 0 then
    local entry = redis.call('LINDEX', ARGV[1] .. ':history:' .. tag, at)
    if entry and (change == '' or string.find(entry, change, 1, true)) then
      out[#out + 1] = entry
    end
  end
end
return out
