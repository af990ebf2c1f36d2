-- Apply a retention to a batch of states of one type (RedisStore.prune).
--
-- Per state: a deleted one whose deletion is old enough is removed whole
-- (document, history, pruned count, tombstone set member); otherwise its
-- oldest history entries are removed as the retention allows, never the
-- newest, and added to its pruned count so its version (history length plus
-- pruned count, see commit.lua) stays the same. A state locked by a writer is
-- left for the next run; one whose document names another type (its id was
-- registered again under another type) is not this type's to prune. A script
-- runs alone, so no write interleaves with a decision.
--
-- KEYS  the type's tombstone set, then per state: state, history, pruned, lock;
--       last, the set of every state id with history (a purged id leaves it)
-- ARGV  1: JSON [type, keep last (false: no rule), keep since (the stored
--       timestamp format, false: no rule), purge before (same, false: no
--       purging), dry run (true: count only)], then the state ids
--
-- Returns {entries removed, purged id, ...}.

local rule = cjson.decode(ARGV[1])
local type_name, keep_last, keep_since, purge_before, dry_run =
  rule[1], rule[2], rule[3], rule[4], rule[5]
local tombstones = KEYS[1]
local all_ids = KEYS[#KEYS]
local removed = 0
local out = {0}

for i = 2, #ARGV do
  local id = ARGV[i]
  local state, history, pruned, lock =
    KEYS[4 * i - 6], KEYS[4 * i - 5], KEYS[4 * i - 4], KEYS[4 * i - 3]
  local raw = redis.call('GET', state)
  local length = redis.call('LLEN', history)
  local status, stamp, kind = nil, nil, type_name
  if raw then
    local document = cjson.decode(raw)
    status, stamp, kind = document.status, document.updated_at, document.type
  elseif length > 0 then
    -- A tombstone whose document Redis dropped: its last change tells.
    local last = cjson.decode(redis.call('LINDEX', history, -1))
    status, stamp = last.metadata.to_status, last.created_at
  end
  local tombstone = status == 'deleted' or status == 'expired'
  if raw and not dry_run and (kind ~= type_name or not tombstone) then
    -- Registered again over a tombstone whose document Redis had dropped:
    -- the commit could not tell the old type, so the member stayed behind.
    redis.call('ZREM', tombstones, id)
  end
  if redis.call('EXISTS', lock) == 1 or kind ~= type_name then
    -- Locked: the next run decides. Another type: not ours.
  elseif status == 'deleted' and purge_before and stamp <= purge_before then
    removed = removed + length
    out[#out + 1] = id
    if not dry_run then
      redis.call('DEL', state, history, pruned)
      redis.call('ZREM', tombstones, id)
      redis.call('ZREM', all_ids, id)
    end
  elseif status == nil and not raw then
    if not dry_run then
      redis.call('ZREM', tombstones, id) -- nothing left of it
    end
  elseif (keep_last or keep_since) and length > 1 then
    local count = length - 1
    if keep_last then
      count = math.min(count, length - keep_last)
    end
    if keep_since and count > 0 then
      local old = 0
      for _, entry in ipairs(redis.call('LRANGE', history, 0, count - 1)) do
        if cjson.decode(entry).created_at >= keep_since then
          break
        end
        old = old + 1
      end
      count = old
    end
    if count > 0 then
      removed = removed + count
      if not dry_run then
        redis.call('LTRIM', history, count, -1)
        redis.call('INCRBY', pruned, count)
      end
    end
  end
end
out[1] = removed
return out
