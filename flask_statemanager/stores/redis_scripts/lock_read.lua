-- Take the write locks of n states, all of them or none, and read the states.
--
-- Taking every lock in one step means two writers of overlapping batches never
-- hold one lock each while waiting for the other's: there is no lock order to
-- get wrong. A lock already holding this token (a retried call) counts as ours.
--
-- KEYS  n lock keys, then the n state keys, then the n history keys
-- ARGV  token, lock time-to-live in milliseconds
--
-- Returns {1, document or nil, version, last change or nil, ...} with the
-- locks taken, where the version is the history's length and the last change
-- is the newest history entry (the new entries chain to its hash; for a
-- tombstone whose document Redis already dropped, it also stands in for it);
-- or {0, i} when lock i belongs to another writer.

local n = #KEYS / 3
local token = ARGV[1]

for i = 1, n do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= token then
    return {0, i}
  end
end

local out = {1}
for i = 1, n do
  redis.call('SET', KEYS[i], token, 'PX', ARGV[2])
  local history = KEYS[2 * n + i]
  local document = redis.call('GET', KEYS[n + i])
  local version = redis.call('LLEN', history)
  local last = false
  if version > 0 then
    last = redis.call('LINDEX', history, -1)
  end
  out[#out + 1] = document
  out[#out + 1] = version
  out[#out + 1] = last
end
return out
