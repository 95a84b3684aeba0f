-- Replace a reservation's estimate with the actual usage and release its lease.
-- The rules are those of MemoryQuotaStore.settle in proxy/store.py.
--
-- KEYS[i]  the counter of check i, then the lease record (KEYS[n + 1]; one hash tag)
-- ARGV     lease id, delta (actual - estimate), then kind_i, window_i for each check
--          (window_i as returned by reserve.lua)
--
-- The delta applies whether or not the lease record is still there (a request may
-- outlast lease_ttl); the record goes, so a release can no longer undo this lease. While
-- the record is there, the estimate also leaves the in-flight fields it was added to (see
-- reserve.lua); after it, those no longer count anyway.

local BUCKET, BUCKETS = 1000, 60
local TOTAL, OLDEST = '-1', '-2'  -- of a tpm hash: see reserve.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- A key's expiry only ever moves later (see reserve.lua).
local function live_for(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- Add delta to one bucket of a tpm hash, keeping TOTAL exact and no bucket at 0 or below.
-- A bucket field that appears or goes may change the oldest: forget OLDEST, the next
-- reserve rebuilds it (rare: a bucket appears only for a late correction, or one that an
-- earlier refund had emptied).
local function add(key, bucket, delta)
  local r = redis.call('HINCRBY', key, bucket, delta)
  local change = delta
  if r <= 0 then
    redis.call('HDEL', key, bucket)
    change = delta - r  -- it went to 0 from r - delta, not to r
  end
  if change ~= 0 then redis.call('HINCRBY', key, TOTAL, change) end
  if r <= 0 or r == delta then redis.call('HDEL', key, OLDEST) end
  -- A bucket that appeared may have brought the key back too: it lives while that bucket counts
  -- (as reserve's do, a second past its last; after a step back of the clock it may be newer
  -- than the current one).
  if r == delta and r > 0 then live_for(key, (bucket + BUCKETS + 2) * BUCKET - now) end
end

-- Take a settled or released estimate out of its in-flight field; a field at 0 goes.
local function unhold(key, field, estimate)
  if redis.call('HINCRBY', key, field, -estimate) <= 0 then redis.call('HDEL', key, field) end
end

local lease, delta = ARGV[1], tonumber(ARGV[2])
local n = (#ARGV - 2) / 2
local record = redis.call('HMGET', KEYS[n + 1], 'e', 'x')
local estimate, expiry = tonumber(record[1]) or 0, tonumber(record[2])

for i = 1, n do
  local key, kind, window = KEYS[i], ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  if kind == 'concurrency' then
    redis.call('ZREM', key, lease)
  elseif kind == 'tpm' then
    if estimate > 0 and expiry then unhold(key, -math.min(expiry, window + BUCKETS + 1), estimate) end
    if delta ~= 0 then
      local current = math.floor(now / BUCKET)
      local target = nil
      if window >= current - BUCKETS then
        target = window
      elseif delta > 0 then
        -- A late positive correction still counts, now; a late refund has nothing left to refund.
        target = current
      end
      if target then add(key, target, delta) end
    end
  elseif (kind == 'day' or kind == 'month') and (delta ~= 0 or (estimate > 0 and expiry))
      and tonumber(redis.call('HGET', key, 'w')) == window then
    if estimate > 0 and expiry then unhold(key, -expiry, estimate) end
    if delta ~= 0 and redis.call('HINCRBY', key, 'n', delta) < 0 then redis.call('HSET', key, 'n', 0) end
  end
end
redis.call('DEL', KEYS[n + 1])
return 1
