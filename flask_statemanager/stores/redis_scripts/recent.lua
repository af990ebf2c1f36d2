-- The newest changes of every state, newest first.
--
-- The change log holds '<state id> <version> <change id>' per committed
-- change, in commit order ('<state id> <version>' before the change id was
-- added); the change itself is entry version - 1 - pruned of the state's
-- history, where pruned counts the oldest entries prune removed. An entry
-- that was pruned, or purged with its state (whose id may since have a new
-- life with the same version), is left out; so is an entry naming a history
-- entry already listed (a restore logs the changes it writes again, and may
-- write the same ones). The log is read backwards in chunks until `limit`
-- changes are found or it ends, so left-out entries do not shorten the list.
--
-- KEYS  change log
-- ARGV  key prefix, limit

local limit = tonumber(ARGV[2])
local total = redis.call('LLEN', KEYS[1])
local chunk = math.max(limit, 100)
local out = {}
local listed = {}
local stop = total -- entries at or after this position (from the start) were read
while #out < limit and stop > 0 do
  local start = math.max(stop - chunk, 0)
  local entries = redis.call('LRANGE', KEYS[1], start, stop - 1)
  for i = #entries, 1, -1 do
    local id, version, change = string.match(entries[i], '^(%S+) (%d+) ?(%x*)$')
    local tag = '{' .. id .. '}'
    local seen = id .. ' ' .. version
    if not listed[seen] then
      local pruned = tonumber(redis.call('GET', ARGV[1] .. ':pruned:' .. tag) or '0')
      local at = tonumber(version) - 1 - pruned
      if at >= 0 then
        local entry = redis.call('LINDEX', ARGV[1] .. ':history:' .. tag, at)
        if entry and (change == '' or string.find(entry, change, 1, true)) then
          listed[seen] = true
          out[#out + 1] = entry
          if #out == limit then
            break
          end
        end
      end
    end
  end
  stop = start
end
return out
