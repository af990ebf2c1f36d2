-- States whose TTL passed and whose expiry is not recorded yet, soonest first.
--
-- Each type's expiry sorted set holds its live states that have an
-- expires_at, scored by it in microseconds; recording the EXPIRE change (or
-- any change to a tombstone) takes a state out.
--
-- KEYS  types set
-- ARGV  key prefix, now in microseconds, limit
--
-- Returns the state documents.

local prefix, now_us, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local due = {}
for _, t in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local found = redis.call(
    'ZRANGEBYSCORE', prefix .. ':expiry:' .. t, '-inf', now_us, 'WITHSCORES', 'LIMIT', 0, limit
  )
  for i = 1, #found, 2 do
    due[#due + 1] = {tonumber(found[i + 1]), found[i]}
  end
end
table.sort(due, function(x, y) return x[1] < y[1] end)

local out = {}
for i = 1, math.min(limit, #due) do
  out[#out + 1] = redis.call('GET', prefix .. ':state:{' .. due[i][2] .. '}')
end
return out
