-- Replace a reservation's estimate with the actual usage and release its lease.
-- The rules are those of MemoryQuotaStore.settle in proxy/store.py.
--
-- KEYS[i]  the counter of check i, then the lease record (KEYS[n + 1]; one hash tag)
-- ARGV     lease id, delta (actual - estimate), then kind_i, window_i for each check
--          (window_i as returned by reserve.lua)
--
-- The delta applies whether or not the lease record is still there (a request may
-- outlast lease_ttl); the record goes, so a release can no longer undo this lease.

local BUCKET, BUCKETS = 1000, 60

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, delta = ARGV[1], tonumber(ARGV[2])
local n = (#ARGV - 2) / 2

for i = 1, n do
  local key, kind, window = KEYS[i], ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  if kind == 'concurrency' then
    redis.call('ZREM', key, lease)
  elseif kind == 'tpm' and delta ~= 0 then
    local current = math.floor(now / BUCKET)
    local target = nil
    if window >= current - BUCKETS then
      target = window
    elseif delta > 0 then
      -- A late positive correction still counts, now; a late refund has nothing left to refund.
      target = current
    end
    if target then
      if redis.call('HINCRBY', key, target, delta) < 0 then redis.call('HSET', key, target, 0) end
      redis.call('PEXPIRE', key, (BUCKETS + 2) * BUCKET)
    end
  elseif (kind == 'day' or kind == 'month') and delta ~= 0 then
    if tonumber(redis.call('HGET', key, 'w')) == window then
      if redis.call('HINCRBY', key, 'n', delta) < 0 then redis.call('HSET', key, 'n', 0) end
    end
  end
end
redis.call('DEL', KEYS[n + 1])
return 1
