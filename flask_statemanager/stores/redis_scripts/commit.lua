-- Commit a batch of writes: compare-and-set, history, indexes, unlock.
--
-- Called after lock_read.lua with the locks held, or optimistically without
-- any lock, planned from the records this process last read or wrote: then
-- it refuses (returns 0: the caller reads again under locks) when a state's
-- stored document is not, byte for byte, the one remembered, or another
-- writer holds its lock (so it never overtakes a queued writer). Comparing
-- documents rather than versions also catches a state purged and registered
-- again, or restored, since it was remembered: its version may have come back
-- to the same number, its document has not.
--
-- A state's version is the length of its history plus the number of its
-- oldest entries pruned (its pruned key, absent for none): every change
-- appends one entry and adds one to the version, and pruning moves entries
-- from the list to the count. So the compare-and-set checks that sum, which
-- also holds for a tombstone whose document Redis already dropped. Every check
-- runs before the first write, and a script runs alone on the server: the
-- batch commits whole or not at all.
--
-- KEYS  for each of the n states: state, history, lock, pruned (4n keys); then the
--       index definitions hash, the change log, and every index key the
--       operations below name
-- ARGV  1: one JSON array (one argument instead of dozens: the client encodes
--       each argument on its own) of
--         lock token ('' when optimistic), tombstone time-to-live in ms (0 keeps tombstones), n states,
--         change log length, true if optimistic (no locks held) else false,
--         definition checks: per check type, its definition as planned ('' none),
--         writes: per write state number, expected version, change log entry,
--         states: per state true if its new document is a tombstone,
--         index operations: per operation 'zadd' | 'zrem' | 'sadd', key number,
--           score, member,
--         limits (max_states): per limited type, its sorted set's key number,
--           the most live states it may hold, the ids this batch leaves live
--           in it, and the other ids the batch writes;
--       then per write: state document, change document; then per state:
--       the document it was planned from ('' for none: absent, or a tombstone
--       Redis dropped) — remembered when optimistic, read under the lock
--       otherwise
--
-- Returns a number (a reply the client parses fastest): 1 committed; 2 a
-- retried call found its batch committed; -1 the index definitions changed
-- since the batch was planned (nothing written, locks kept: the caller plans
-- the index updates again and retries); 0 (optimistic calls only: nothing
-- written) a state moved on, is locked, or is not at the version it was
-- planned from. Or {state number, version}: that state is not at its
-- expected version (nothing written, locks released; optimistic calls
-- return 0 instead). Or {0, limit number, count}: the batch would take a
-- type past its max_states (nothing written, locks released).

local payload = cjson.decode(ARGV[1])
local token = payload[1]
local tombstone_ttl = payload[2]
local n_states = payload[3]
local log_length = payload[4]
local optimistic = payload[5]
local checks = payload[6]
local writes = payload[7]
local states = payload[8]
local ops = payload[9]
local limits = payload[10]
local n_writes = #writes / 3
local definitions = KEYS[4 * n_states + 1]
local log = KEYS[4 * n_states + 2]

local function pruned(s)
  return tonumber(redis.call('GET', KEYS[4 * s]) or '0')
end

local function version_of(s)
  return redis.call('LLEN', KEYS[4 * s - 2]) + pruned(s)
end

local function release()
  for s = 1, n_states do
    local lock = KEYS[4 * s - 1]
    if redis.call('GET', lock) == token then
      redis.call('DEL', lock)
    end
  end
end

-- 1. The declared fields the index updates were planned with are current.
for c = 1, #checks, 2 do
  if (redis.call('HGET', definitions, checks[c]) or '') ~= checks[c + 1] then
    return -1
  end
end

-- A call resent after a lost reply finds its own first entry in place.
local function resent()
  local s, expected = writes[1], writes[2]
  local at = expected - pruned(s)
  return at >= 0 and redis.call('LINDEX', KEYS[4 * s - 2], at) == ARGV[3]
end

-- 2. Every state is where the batch was planned from.
if optimistic then
  -- The stored documents are the remembered ones (which pins their versions)
  -- and no other writer holds a state.
  for s = 1, n_states do
    -- One command for both: the document, and the lock (false when free).
    local found = redis.call('MGET', KEYS[4 * s - 3], KEYS[4 * s - 1])
    if found[1] ~= ARGV[1 + 2 * n_writes + s] then
      if resent() then
        return 2
      end
      return 0
    end
    if found[2] then
      return 0
    end
  end
else
  -- Every state is at the version its write expects (writes of one state
  -- chain: each expects the version the one before it wrote).
  local versions = {}
  for w = 1, n_writes do
    local s = writes[3 * w - 2]
    local expected = writes[3 * w - 1]
    local current = versions[s]
    if current == nil then
      current = version_of(s)
    end
    if current ~= expected then
      if w == 1 and resent() then
        return 2
      end
      release()
      return {s, current}
    end
    versions[s] = expected + 1
  end
  -- And its document is still, byte for byte, the one read under the lock:
  -- a writer slower than its lock can find the same version on a new life of
  -- the state (purged and registered again, or restored), which it must not
  -- write over.
  for s = 1, n_states do
    if (redis.call('GET', KEYS[4 * s - 3]) or '') ~= ARGV[1 + 2 * n_writes + s] then
      release()
      return {s, version_of(s)}
    end
  end
end

-- 2c. Types with a max_states stay within it: a script runs alone, so the
--     count is exact whatever other writers do.
--     The count is of the type's set after the batch: ids it leaves live in
--     the type join it, the other ids it writes leave it.
for l = 1, #limits, 4 do
  local key = KEYS[limits[l]]
  local count = redis.call('ZCARD', key)
  for _, id in ipairs(limits[l + 2]) do
    if not redis.call('ZSCORE', key, id) then
      count = count + 1
    end
  end
  for _, id in ipairs(limits[l + 3]) do
    if redis.call('ZSCORE', key, id) then
      count = count - 1
    end
  end
  if count > limits[l + 1] then
    if not optimistic then
      release()
    end
    return {0, (l + 3) / 4, count}
  end
end

-- 3. Write: documents, history entries, the change log (trimmed in steps of
--    a tenth of its length: readers take at most its last log_length entries).
local logged = 0
for w = 1, n_writes do
  local s = writes[3 * w - 2]
  redis.call('SET', KEYS[4 * s - 3], ARGV[2 * w])
  redis.call('RPUSH', KEYS[4 * s - 2], ARGV[2 * w + 1])
  logged = redis.call('RPUSH', log, writes[3 * w])
end
if logged > log_length + log_length / 10 then
  redis.call('LTRIM', log, -log_length, -1)
end

-- 4. Tombstones (deleted or expired) leave Redis on their own after a while;
--    SET above removed any time-to-live from states that came back to life.
if tombstone_ttl > 0 then
  for s = 1, n_states do
    if states[s] then
      redis.call('PEXPIRE', KEYS[4 * s - 3], tombstone_ttl)
    end
  end
end

-- 5. Index updates: removals come first, so a member that stays is re-added.
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

if not optimistic then
  release()
end
return 1
