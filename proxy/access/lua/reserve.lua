-- Check every limit of one request and, only if all have room, charge them all.
-- The rules are those of proxy/store.py (MemoryQuotaStore); keep the two alike.
--
-- KEYS[i]  the counter of check i (all share one hash tag, so one Cluster slot),
--          then, to reserve, the lease record (KEYS[n + 1])
-- ARGV     mode ("reserve" | "peek"), lease id, estimate, lease ttl (ms),
--          then kind_i, limit_i for each check
-- Returns  {admitted, denied (1-based, 0 if none), retry_ms, why (0 if admitted, else BUSY,
--           LIMIT or TOO_LARGE, below), then used_i, remaining_i, reset_ms_i, window_i for each check}
--          or {0, 0, 0} alone, charging nothing: this lease's record (or tombstone) is
--          there already, so this is a re-sent call, or one that came after its release.
--
-- A check has room when what this request adds (one request, or the estimate in tokens, at
-- least 1) fits below its limit. A token check that has none says why:
--   TOO_LARGE  the estimate alone is larger than the (non-zero) limit: it never fits;
--   BUSY       it would fit but for the estimates of requests in flight (they may settle lower);
--   LIMIT      it does not fit even without them: settled usage fills the limit.
-- rpm and concurrency deny with LIMIT. Of several checks that deny, the one with the gravest
-- reason is named, then the one with room last.
--
-- An admitted reservation leaves its lease record, a hash {e: estimate, x: in-flight second
-- (below), i: window_i} that lives as long as the lease (ttl): release.lua undoes exactly
-- that charge when the gateway never got this answer; settle.lua deletes it.
--
-- In-flight fields: every token counter (a tpm bucket hash, a day or month hash) also keeps
-- the estimates of its reservations in flight, summed by the second they stop counting as in
-- flight: field -s => tokens, for s = the lease's expiry second (rounded up), and for tpm no
-- later than the second its bucket leaves the window. A settle or a release takes its
-- estimate out again (a field brought to 0 goes); a lease that expired without either stays
-- charged, as settled usage. The names are negative numbers below TOTAL and OLDEST, which
-- every script takes for no bucket. They are read only for a denial, which also drops those
-- that no longer count.
--
-- Redis's clock, not the replicas', so replicas with skewed clocks agree.

local WINDOW, BUCKET, BUCKETS, DAY = 60000, 1000, 60, 86400000
local UNKNOWN_RETRY = 1000
local BUSY, LIMIT, TOO_LARGE = 1, 2, 3  -- why a check denies, gravest last

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode, lease = ARGV[1], ARGV[2]
local estimate, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local writing = mode == 'reserve'
local n = (#ARGV - 4) / 2
local record = KEYS[n + 1]

if writing and redis.call('EXISTS', record) == 1 then
  return {0, 0, 0}
end

-- Days since 1970-01-01 <-> civil dates (H. Hinnant's algorithms), for UTC months.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local function first_day(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + math.floor((153 * mp + 2) / 5)
  return era * 146097 + doe - 719468
end

local function calendar(kind)
  if kind == 'day' then
    local day = math.floor(now / DAY)
    return day, (day + 1) * DAY
  end
  local y, m = civil(math.floor(now / DAY))
  local index = y * 12 + m - 1
  local ny, nm = math.floor((index + 1) / 12), (index + 1) % 12 + 1
  return index, first_day(ny, nm) * DAY
end

-- A bucket hash (of an rpm or a tpm check) holds one field per 1-second bucket (its index =>
-- requests or tokens) and two more:
-- TOTAL, the sum of every bucket field, and OLDEST, the oldest bucket field's index.
-- Every script that changes a bucket keeps TOTAL exact; no bucket field is kept at 0
-- (a bucket brought to 0 is deleted, an estimate of 0 adds none), so OLDEST is also the
-- oldest non-empty bucket, whose expiry is the reset header. A script that adds or
-- deletes a bucket field other than the current second's deletes OLDEST instead of
-- finding the new one; the next reserve then rebuilds both from the buckets (below).
-- So while OLDEST is still counted, a check reads three fields (with the current bucket),
-- not every bucket.
-- The names are numbers below any bucket index: a script of the previous layout, which
-- reads every field as a bucket, takes them for expired buckets and deletes them
-- (without failing), and the next reserve here rebuilds them.
local TOTAL, OLDEST = '-1', '-2'

-- Buckets of a bucket hash still counted, oldest first (for a denial's retry_ms, or the
-- admin API's peek past an expired bucket).
local function counted(key)
  local oldest = math.floor(now / BUCKET) - BUCKETS
  local raw = redis.call('HGETALL', key)
  local list = {}
  for i = 1, #raw, 2 do
    local b = tonumber(raw[i])
    if b >= oldest then list[#list + 1] = {b, tonumber(raw[i + 1])} end
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  return list
end

-- Drop expired (and empty) buckets, and in-flight fields that no longer count, and
-- recompute TOTAL and OLDEST from the buckets left: on a
-- reserve, when OLDEST has expired (at most about once a second under steady traffic)
-- or is unknown. Recomputing rather than subtracting also heals a TOTAL that a script of
-- the previous layout left behind. Returns total, oldest (nil when no bucket is left).
local function rebuild(key)
  local cutoff = math.floor(now / BUCKET) - BUCKETS
  local raw = redis.call('HGETALL', key)
  local total, first, stale = 0, nil, {}
  for i = 1, #raw, 2 do
    local b, v = tonumber(raw[i]), tonumber(raw[i + 1])
    if b >= 0 then  -- a bucket, not TOTAL or OLDEST
      if b < cutoff or v <= 0 then
        stale[#stale + 1] = raw[i]
      else
        total = total + v
        if first == nil or b < first then first = b end
      end
    elseif b < tonumber(OLDEST) and -b * BUCKET <= now then
      stale[#stale + 1] = raw[i]  -- an in-flight field that no longer counts
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if first then
    redis.call('HSET', key, TOTAL, total, OLDEST, first)
  elseif #raw > 0 then
    redis.call('DEL', key)  -- nothing counted is left
  end
  return total, first
end

local current = math.floor(now / BUCKET)

-- A key's expiry only ever moves later. After a step back of Redis's clock (a failover to a
-- node behind), what was charged before the step may count longer than what is charged now.
local function live_for(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- What state() read of each bucket hash, for charge(): {total, oldest, current bucket}
local read = {}

-- used, reset_ms, retry_ms (if it had no room for need) of one rpm or tpm check
local function window_state(key, limit, need)
  local stored = redis.call('HMGET', key, TOTAL, OLDEST, current)
  local used, oldest = tonumber(stored[1]), tonumber(stored[2])
  if used == nil or oldest == nil or oldest < current - BUCKETS then
    if writing then
      used, oldest = rebuild(key)  -- it keeps the current bucket: never expired, never 0
    else
      -- peek writes nothing: sum what is still counted
      used, oldest = 0, nil
      for _, e in ipairs(counted(key)) do
        used = used + e[2]
        if oldest == nil and e[2] > 0 then oldest = e[1] end
      end
    end
  end
  read[key] = {used, oldest, tonumber(stored[3]) or 0}
  local reset = oldest and (oldest + BUCKETS + 1) * BUCKET - now or 0
  local retry = WINDOW
  if used + need > limit then
    -- The bucket whose leaving makes room for need (rare: a denial).
    local left = used
    for _, e in ipairs(counted(key)) do
      left = left - e[2]
      if left + need <= limit then
        retry = (e[1] + BUCKETS + 1) * BUCKET - now
        break
      end
    end
  end
  return used, reset, retry
end

-- used, reset_ms, retry_ms (if it had no room for need) of one check
local function state(key, kind, limit, need)
  if kind == 'rpm' or kind == 'tpm' then
    return window_state(key, limit, need)
  elseif kind == 'concurrency' then
    if writing then redis.call('ZREMRANGEBYSCORE', key, '-inf', now) end
    return redis.call('ZCOUNT', key, '(' .. now, '+inf'), 0, UNKNOWN_RETRY
  end
  local index, ends = calendar(kind)
  local stored = redis.call('HMGET', key, 'w', 'n')
  local used = tonumber(stored[1]) == index and tonumber(stored[2]) or 0
  return used, ends - now, ends - now
end

-- How much a check charges: one request, or the estimate in tokens
local function amount(kind)
  if kind == 'rpm' or kind == 'concurrency' then return 1 end
  return estimate
end

local function is_tokens(kind)
  return kind == 'tpm' or kind == 'day' or kind == 'month'
end

-- The in-flight field of an estimate charged to window (see In-flight fields)
local function in_flight_field(kind, window, expiry)
  if kind == 'tpm' then return -math.min(expiry, window + BUCKETS + 1) end
  return -expiry
end

-- Tokens of a token counter that reservations in flight hold (see In-flight fields); the
-- fields that no longer count go. A day or month hash of a past window holds none now.
local function held(key, kind)
  if kind ~= 'tpm' and tonumber(redis.call('HGET', key, 'w')) ~= calendar(kind) then
    return 0
  end
  local raw = redis.call('HGETALL', key)
  local sum, stale = 0, {}
  for i = 1, #raw, 2 do
    local s = tonumber(raw[i])
    if s and s < tonumber(OLDEST) then
      if -s * BUCKET > now then
        sum = sum + tonumber(raw[i + 1])
      else
        stale[#stale + 1] = raw[i]
      end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return sum
end

-- charge one check its amount(); returns where the charge went (for settle and release)
local function charge(key, kind, add)
  if kind == 'rpm' or kind == 'tpm' then
    if add > 0 then  -- no bucket field at 0 (see TOTAL)
      -- state() left TOTAL exact and OLDEST counted
      local r = read[key]
      if r[2] and r[2] <= current then
        redis.call('HSET', key, current, r[3] + add, TOTAL, r[1] + add)
      else  -- no bucket yet, or Redis's clock stepped back (a failover) past the oldest one
        redis.call('HSET', key, current, r[3] + add, TOTAL, r[1] + add, OLDEST, current)
      end
      -- The key lives while its newest bucket counts: set once, when that bucket appears.
      if r[3] == 0 then live_for(key, (BUCKETS + 2) * BUCKET) end
    end
    return current
  elseif kind == 'concurrency' then
    redis.call('ZADD', key, now + ttl, lease)
    live_for(key, ttl)
    return 0
  end
  local index, ends = calendar(kind)
  if tonumber(redis.call('HGET', key, 'w')) == index then
    redis.call('HINCRBY', key, 'n', add)
  else
    redis.call('DEL', key)  -- a new window: the last one's in-flight fields go with its count
    redis.call('HSET', key, 'w', index, 'n', add)
  end
  redis.call('PEXPIREAT', key, ends)
  return index
end

local used, reset = {}, {}
local denied, why, retry = 0, 0, 0
for i = 1, n do
  local kind, limit = ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i])
  local need = math.max(amount(kind), 1)
  local u, r, wait = state(KEYS[i], kind, limit, need)
  used[i], reset[i] = u, r
  if u + need > limit then
    local reason = LIMIT
    if writing and is_tokens(kind) then
      if limit > 0 and need > limit then
        reason, wait = TOO_LARGE, 0
      elseif u - held(KEYS[i], kind) + need <= limit then
        reason, wait = BUSY, UNKNOWN_RETRY  -- nobody knows when they settle
      end
    end
    if reason > why or (reason == why and wait > retry) then
      denied, why, retry = i, reason, wait
    end
  end
end

local out = {0, denied, 0, why}
if denied > 0 or not writing then
  out[3] = math.max(retry, 1)
  for i = 1, n do
    local limit = tonumber(ARGV[4 + 2 * i])
    out[#out + 1] = used[i]
    out[#out + 1] = math.max(limit - used[i], 0)
    out[#out + 1] = math.max(reset[i], 0)
    out[#out + 1] = 0
  end
  return out
end

out[1] = 1
local expiry = math.floor((now + ttl + BUCKET - 1) / BUCKET)  -- the lease's, in seconds, rounded up
local fields = {'e', estimate, 'x', expiry}
for i = 1, n do
  local kind, limit = ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i])
  local add = amount(kind)
  local window = charge(KEYS[i], kind, add)
  if add > 0 and is_tokens(kind) then
    redis.call('HINCRBY', KEYS[i], in_flight_field(kind, window, expiry), add)
  end
  fields[#fields + 1] = i
  fields[#fields + 1] = window
  local u, r = used[i] + add, reset[i]
  if (kind == 'rpm' or kind == 'tpm') and add > 0 then
    -- This bucket is the newest, unless Redis's clock stepped back: then it is the oldest.
    local bucket_expiry = (window + BUCKETS + 1) * BUCKET - now
    if r == 0 or bucket_expiry < r then r = bucket_expiry end
  end
  out[#out + 1] = u
  out[#out + 1] = math.max(limit - u, 0)
  out[#out + 1] = math.max(r, 0)
  out[#out + 1] = window
end
redis.call('HSET', record, unpack(fields))
redis.call('PEXPIRE', record, ttl)
return out
