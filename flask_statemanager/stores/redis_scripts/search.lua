-- Search: one page of live states matching every condition, and the total.
--
-- Reproduces flask_statemanager.query.matches exactly: JSON kinds matter
-- (true is not 1, 1 equals 1.0, null is a value and a missing field is not),
-- range operators compare numbers with numbers and strings with strings, in
-- byte order. Live means: status neither deleted nor expired, and no
-- expires_at at or before now. Results are ordered by one column, nulls last
-- in both directions, ties by state_id in the same direction.
--
-- Candidates come from an index, never from KEYS or SCAN: the states of the
-- type (its sorted set, or those of every type), or, when a condition is an
-- equality (or __in) on a field the type declared and the index is built,
-- that field's index. The state keys of the candidates are read as the
-- indexes name them: fine on one server, not on Redis Cluster.
--
-- KEYS  index definitions hash, types set, and with a type: its states and
--       expiry sorted sets, then the field index keys the hints name
-- ARGV  key prefix, type ('' for every type), now (ISO-8601, the stored
--       format), now in microseconds, order column, '1' for descending,
--       offset, limit, conditions (JSON list of {r: root, p: path, o: op,
--       v: value}), index hints (JSON list of [field, key number, [encoded
--       values]])
--
-- Returns {total, state document, ...}.

local prefix, type_name, now, now_us = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local order, descending = ARGV[5], ARGV[6] == '1'
local offset, limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local conditions = cjson.decode(ARGV[9])
local hints = cjson.decode(ARGV[10])
local null = cjson.null

local function state_key(id)
  return prefix .. ':state:{' .. id .. '}'
end

-- Lua's < on strings follows the server's locale (strcoll); search compares
-- bytes, as Python compares code points. Bisect the common prefix, then
-- compare the first differing byte.
local function bytecmp(a, b)
  if a == b then
    return 0
  end
  local n = math.min(#a, #b)
  local lo, hi = 0, n
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if string.sub(a, 1, mid) == string.sub(b, 1, mid) then
      lo = mid
    else
      hi = mid - 1
    end
  end
  if lo == n then
    return #a < #b and -1 or 1
  end
  return string.byte(a, lo + 1) < string.byte(b, lo + 1) and -1 or 1
end

-- The JSON kind of a decoded value; arrays and objects are both tables.
local function kind(v)
  local t = type(v)
  if t == 'boolean' then
    return 'bool'
  elseif t == 'number' then
    return 'number'
  elseif t == 'string' then
    return 'string'
  elseif v == null then
    return 'null'
  end
  return 'container'
end

local function equal(a, b)
  return kind(a) == kind(b) and a == b
end

local function compare(a, op, b)
  local k = kind(a)
  if k ~= kind(b) then
    return false
  end
  local c
  if k == 'number' then
    c = (a < b and -1) or (a > b and 1) or 0
  elseif k == 'string' then
    c = bytecmp(a, b)
  else
    return false
  end
  if op == 'gt' then
    return c > 0
  elseif op == 'gte' then
    return c >= 0
  elseif op == 'lt' then
    return c < 0
  end
  return c <= 0
end

-- The value at a condition's root and path, or nil when absent. Only objects
-- are walked into: an array has integer keys, so a path name never finds one.
local function resolve(document, c)
  local value = document[c.r]
  for _, name in ipairs(c.p) do
    if type(value) ~= 'table' then
      return nil
    end
    value = value[name]
    if value == nil then
      return nil
    end
  end
  return value
end

local function matches(document, c)
  local value = resolve(document, c)
  local op, wanted = c.o, c.v
  if op == 'exists' then
    return (value ~= nil) == wanted
  end
  if value == nil then
    return op == 'ne'
  end
  if op == 'eq' then
    return equal(value, wanted)
  elseif op == 'ne' then
    return not equal(value, wanted)
  elseif op == 'in' then
    for _, w in ipairs(wanted) do
      if equal(value, w) then
        return true
      end
    end
    return false
  elseif op == 'contains' then
    if type(value) == 'table' then
      -- Array items; an object has no integer keys, so it holds no items.
      for _, item in ipairs(value) do
        if equal(item, wanted) then
          return true
        end
      end
      return false
    end
    return type(value) == 'string' and type(wanted) == 'string'
      and string.find(value, wanted, 1, true) ~= nil
  end
  return compare(value, op, wanted)
end

local function live(document)
  local status, expires_at = document.status, document.expires_at
  if status == 'deleted' or status == 'expired' then
    return false
  end
  return expires_at == null or expires_at == nil or bytecmp(expires_at, now) > 0
end

-- Fast path: a type's states, newest change first (get_states_by_type), are
-- its sorted set in score order, ties by id in the same direction. Only the
-- states whose TTL passed unrecorded are left out: they are the expiry set's
-- members scored at or before now.
if type_name ~= '' and #conditions == 0 and order == 'updated_at' then
  local states, expiry = KEYS[3], KEYS[4]
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', now_us)
  local total = redis.call('ZCARD', states) - #due
  local out = {total}
  if offset >= total then
    return out
  end
  local rank = descending and 'ZREVRANK' or 'ZRANK'
  local is_due, ranks = {}, {}
  for _, id in ipairs(due) do
    is_due[id] = true
    local r = redis.call(rank, states, id)
    if r then
      ranks[#ranks + 1] = r
    end
  end
  table.sort(ranks)
  -- The rank of the offset-th live state: step over the due ones before it.
  local start, skipped = offset, 0
  for _, r in ipairs(ranks) do
    if r > start then
      break
    end
    start = start + 1
    skipped = skipped + 1
  end
  local stop = start + limit + (#ranks - skipped) - 1
  local ids = redis.call(descending and 'ZREVRANGE' or 'ZRANGE', states, start, stop)
  for _, id in ipairs(ids) do
    if #out > limit then
      break
    end
    if not is_due[id] then
      out[#out + 1] = redis.call('GET', state_key(id))
    end
  end
  return out
end

-- Candidates: the smallest usable index.
local candidates = {}
if type_name ~= '' then
  local definition = redis.call('HGET', KEYS[1], type_name)
  local built = definition and cjson.decode(definition) or {}
  local best, best_count = nil, redis.call('ZCARD', KEYS[3])
  for _, hint in ipairs(hints) do
    if built[hint[1]] == true then
      local key, count = KEYS[hint[2]], 0
      for _, value in ipairs(hint[3]) do
        count = count + redis.call('ZLEXCOUNT', key, '[' .. value .. '\0', '(' .. value .. '\0\255')
      end
      if count < best_count then
        best, best_count = hint, count
      end
    end
  end
  if best then
    -- Members are '<encoded value>\0<state id>'; encoded values hold no NUL.
    for _, value in ipairs(best[3]) do
      local members = redis.call(
        'ZRANGEBYLEX', KEYS[best[2]], '[' .. value .. '\0', '(' .. value .. '\0\255'
      )
      for _, member in ipairs(members) do
        local at = string.find(member, '\0', 1, true)
        candidates[#candidates + 1] = string.sub(member, at + 1)
      end
    end
  else
    candidates = redis.call('ZRANGE', KEYS[3], 0, -1)
  end
else
  for _, t in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    for _, id in ipairs(redis.call('ZRANGE', prefix .. ':type:' .. t, 0, -1)) do
      candidates[#candidates + 1] = id
    end
  end
end

-- Sort keys. Comparing strings byte by byte in Lua is slow, so each is packed
-- once into numbers of six bytes each (exact: 48 bits), which compare in order
-- as numbers do; a shorter string sorts first. Strings hold no NUL bytes.
local function pack(s)
  local key = {}
  for i = 1, #s, 6 do
    local b1, b2, b3, b4, b5, b6 = string.byte(s, i, i + 5)
    key[#key + 1] = ((((b1 * 256 + (b2 or 0)) * 256 + (b3 or 0)) * 256 + (b4 or 0)) * 256
      + (b5 or 0)) * 256 + (b6 or 0)
  end
  return key
end

local function keycmp(a, b)
  if type(a) == 'number' then
    return (a < b and -1) or (a > b and 1) or 0
  end
  for i = 1, math.min(#a, #b) do
    local x, y = a[i], b[i]
    if x ~= y then
      return x < y and -1 or 1
    end
  end
  return (#a < #b and -1) or (#a > #b and 1) or 0
end

-- Filter, keeping each match's sort key (false for null), packed id and document.
local rows, seen = {}, {}
for _, id in ipairs(candidates) do
  if not seen[id] then
    seen[id] = true
    local raw = redis.call('GET', state_key(id))
    if raw then
      local document = cjson.decode(raw)
      local ok = live(document) and (type_name == '' or document.type == type_name)
      for _, c in ipairs(conditions) do
        if not ok then
          break
        end
        ok = matches(document, c)
      end
      if ok then
        local value = document[order]
        local key = false
        if type(value) == 'string' then
          key = pack(value)
        elseif type(value) == 'number' then
          key = value
        end
        rows[#rows + 1] = {key, pack(id), raw}
      end
    end
  end
end

local function before(x, y)
  local a, b = x[1], y[1]
  local c
  if a == false or b == false then
    if a ~= false then
      return true -- nulls last, whichever the direction
    elseif b ~= false then
      return false
    end
    c = 0
  else
    c = keycmp(a, b)
  end
  if c == 0 then
    c = keycmp(x[2], y[2])
  end
  if descending then
    return c > 0
  end
  return c < 0
end
table.sort(rows, before)

local out = {#rows}
for i = offset + 1, math.min(offset + limit, #rows) do
  out[#out + 1] = rows[i][3]
end
return out
