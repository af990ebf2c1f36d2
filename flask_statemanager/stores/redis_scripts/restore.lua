-- Restore one state and its history exactly as given (flask states import).
--
-- Not a change: the documents are written as they come, versions and ids
-- included. The store's invariants hold afterwards as after a commit: the
-- version is the history's length (the caller checked the history is versions
-- 1 to n; a pruned count left by an earlier life is dropped), the state is in its type's, expiry and declared-field indexes while
-- live, a tombstone expires after the tombstone time-to-live, and the change
-- log lists the restored changes. Checks run before the first write.
--
-- KEYS  state, history, lock, index definitions hash, change log, pruned count,
--       then every index key the operations name
-- ARGV  1: one JSON array of
--         the history length the caller read (and planned the index removals
--           from), true to replace what is stored, the tombstone time-to-live
--           in ms (0: the state is live, or tombstones are kept), the change
--           log length, definition checks (per check type, its definition as
--           planned), index operations (per operation 'zadd' | 'zrem' |
--           'sadd', key number, score, member), change log entries;
--       2: the state document the caller read ('' for none), compared byte
--       for byte: a history of the same length can belong to a new life of
--       the state (purged and registered again, or restored meanwhile);
--       3: the state document; 4 and on: the change documents, oldest first
--
-- Returns 1 restored; 0 the id is stored and replace is false; -1 the index
-- definitions changed since the caller planned; -2 the state changed since
-- the caller read it; -3 a writer holds the state's lock. Nothing is written
-- unless it returns 1.

local payload = cjson.decode(ARGV[1])
local expected = payload[1]
local replace = payload[2]
local tombstone_ttl = payload[3]
local log_length = payload[4]
local checks = payload[5]
local ops = payload[6]
local entries = payload[7]

if redis.call('EXISTS', KEYS[3]) == 1 then
  return -3
end
for c = 1, #checks, 2 do
  if (redis.call('HGET', KEYS[4], checks[c]) or '') ~= checks[c + 1] then
    return -1
  end
end
local length = redis.call('LLEN', KEYS[2])
if length ~= expected or (redis.call('GET', KEYS[1]) or '') ~= ARGV[2] then
  return -2
end
if not replace and (length > 0 or redis.call('EXISTS', KEYS[1]) == 1) then
  return 0
end

redis.call('DEL', KEYS[2], KEYS[6])
redis.call('SET', KEYS[1], ARGV[3])
if tombstone_ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], tombstone_ttl)
end
for i = 4, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
local logged = 0
for i = 1, #entries do
  logged = redis.call('RPUSH', KEYS[5], entries[i])
end
if logged > log_length + log_length / 10 then
  redis.call('LTRIM', KEYS[5], -log_length, -1)
end

-- Removals come first, so a member that stays is re-added.
for o = 1, #ops, 4 do
  local verb, key = ops[o], KEYS[ops[o + 1]]
  if verb == 'zadd' then
    redis.call('ZADD', key, ops[o + 2], ops[o + 3])
  elseif verb == 'zrem' then
    redis.call('ZREM', key, ops[o + 3])
  else
    redis.call('SADD', key, ops[o + 3])
  end
end
return 1
