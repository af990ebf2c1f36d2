-- The newest changes of every state, newest first.
--
-- The change log holds '<state id> <version>' per committed change, in commit
-- order; the change itself is entry version - 1 of the state's history.
--
-- KEYS  change log
-- ARGV  key prefix, limit

local entries = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[2]), -1)
local out = {}
for i = #entries, 1, -1 do
  local id, version = string.match(entries[i], '^(.+) (%d+)$')
  out[#out + 1] = redis.call('LINDEX', ARGV[1] .. ':history:{' .. id .. '}', tonumber(version) - 1)
end
return out
