-- Commit a batch of writes: compare-and-set, history, indexes, unlock.
--
-- Called after lock_read.lua with the locks held, or optimistically without
-- any lock, planned from the records this process last read or wrote: then
-- it also refuses when a state is locked by another writer (so it never
-- overtakes a queued writer) or is not at the version it was planned from,
-- and says 'stale' instead of 'mismatch': the caller reads again under locks.
--
-- A state's version is the length of its history: every change appends one
-- entry and adds one to the version. So the compare-and-set checks LLEN, which
-- also holds for a tombstone whose document Redis already dropped. Every check
-- runs before the first write, and a script runs alone on the server: the
-- batch commits whole or not at all.
--
-- KEYS  for each of the n states: state, history, lock (3n keys); then the
--       index definitions hash, the change log, and every index key the
--       operations below name
-- ARGV  token, tombstone time-to-live in ms (0 keeps tombstones), n states,
--       n writes, n definition checks, n index operations, change log length,
--       '1' if optimistic (no locks held) else '0';
--       then per definition check: type, its definition as planned ('' none);
--       per write: state number, expected version, state document, change
--         document, change log entry;
--       per state: '1' if its new document is a tombstone, else '0', and the
--         version it was planned from ('' not checked: the caller holds locks);
--       per index operation: 'zadd' | 'zrem' | 'sadd', key number, score, member
--
-- Returns {'ok'}; {'done'} when a retried call finds its batch committed;
-- {'mismatch', state number, version} when a state is not at its expected
-- version (nothing written, locks released); or {'indexes'} when the index
-- definitions changed since the batch was planned (nothing written, locks kept:
-- the caller plans the index updates again and retries). An optimistic call
-- returns {'stale'} (nothing written) instead of {'mismatch', ...}, and also
-- when a state is locked or not at the version it was planned from.

local token = ARGV[1]
local tombstone_ttl = tonumber(ARGV[2])
local n_states = tonumber(ARGV[3])
local n_writes = tonumber(ARGV[4])
local n_checks = tonumber(ARGV[5])
local n_ops = tonumber(ARGV[6])
local log_length = tonumber(ARGV[7])
local optimistic = ARGV[8] == '1'
local definitions = KEYS[3 * n_states + 1]
local log = KEYS[3 * n_states + 2]

local function release()
  for s = 1, n_states do
    local lock = KEYS[3 * s]
    if redis.call('GET', lock) == token then
      redis.call('DEL', lock)
    end
  end
end

-- 1. The declared fields the index updates were planned with are current.
local a = 9
for _ = 1, n_checks do
  if (redis.call('HGET', definitions, ARGV[a]) or '') ~= ARGV[a + 1] then
    return {'indexes'}
  end
  a = a + 2
end

-- 2. Every state is at the version its write expects (writes of one state
--    chain: each expects the version the one before it wrote).
local first_write = a
local versions = {}
for w = 1, n_writes do
  local s = tonumber(ARGV[a])
  local expected = tonumber(ARGV[a + 1])
  local history = KEYS[3 * s - 1]
  local current = versions[s]
  if current == nil then
    current = redis.call('LLEN', history)
  end
  if current ~= expected then
    -- A call resent after a lost reply finds its own first entry in place.
    if w == 1 and redis.call('LINDEX', history, expected) == ARGV[a + 3] then
      return {'done'}
    end
    if optimistic then
      return {'stale'}
    end
    release()
    return {'mismatch', s, current}
  end
  versions[s] = expected + 1
  a = a + 5
end

-- 2b. Optimistic: every state (written or only read) is still at the version
--     it was planned from, and no other writer holds its lock.
local per_state = a
if optimistic then
  for s = 1, n_states do
    local planned = ARGV[per_state + 2 * s - 1]
    if planned ~= '' and redis.call('LLEN', KEYS[3 * s - 1]) ~= tonumber(planned) then
      return {'stale'}
    end
    local holder = redis.call('GET', KEYS[3 * s])
    if holder and holder ~= token then
      return {'stale'}
    end
  end
end

-- 3. Write: documents, history entries, the change log.
a = first_write
for _ = 1, n_writes do
  local s = tonumber(ARGV[a])
  redis.call('SET', KEYS[3 * s - 2], ARGV[a + 2])
  redis.call('RPUSH', KEYS[3 * s - 1], ARGV[a + 3])
  redis.call('RPUSH', log, ARGV[a + 4])
  a = a + 5
end
redis.call('LTRIM', log, -log_length, -1)

-- 4. Tombstones (deleted or expired) leave Redis on their own after a while;
--    SET above removed any time-to-live from states that came back to life.
for s = 1, n_states do
  if ARGV[a] == '1' and tombstone_ttl > 0 then
    redis.call('PEXPIRE', KEYS[3 * s - 2], tombstone_ttl)
  end
  a = a + 2
end

-- 5. Index updates: removals come first, so a member that stays is re-added.
for _ = 1, n_ops do
  local verb, key = ARGV[a], KEYS[tonumber(ARGV[a + 1])]
  if verb == 'zadd' then
    redis.call('ZADD', key, ARGV[a + 2], ARGV[a + 3])
  elseif verb == 'zrem' then
    redis.call('ZREM', key, ARGV[a + 3])
  else
    redis.call('SADD', key, ARGV[a + 3])
  end
  a = a + 4
end

release()
return {'ok'}
