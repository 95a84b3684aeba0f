-- Undo a reservation whose answer never reached the gateway (a store timeout, a dropped
-- connection): exactly what reserve.lua charged, as its lease record says, if the record
-- is still there. Then the record becomes a tombstone for ttl, so that a reserve with this
-- lease id that Redis has not run yet (it may come later, on another connection) charges
-- nothing. Run twice, or for a lease never charged or already settled: no change.
-- The rules are those of MemoryQuotaStore.release in proxy/store.py.
--
-- KEYS[i]  the counter of check i, then the lease record (KEYS[n + 1]; one hash tag)
-- ARGV     lease id, tombstone ttl (ms), then kind_i for each check
-- Returns  1 if it undid a reservation, 0 if there was none to undo

local TOTAL, OLDEST = '-1', '-2'  -- of an rpm or tpm bucket hash: see reserve.lua
local BUCKETS = 60
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local n = #ARGV - 2
local record = KEYS[n + 1]
local estimate = tonumber(redis.call('HGET', record, 'e'))
local expiry = tonumber(redis.call('HGET', record, 'x'))

-- Take the estimate out of its in-flight field (reserve.lua); a field at 0 goes.
local function unhold(key, field)
  if redis.call('HINCRBY', key, field, -estimate) <= 0 then redis.call('HDEL', key, field) end
end

if estimate then
  for i = 1, n do
    local key, kind = KEYS[i], ARGV[2 + i]
    local window = tonumber(redis.call('HGET', record, i))
    local take = kind == 'rpm' and 1 or estimate
    if kind == 'concurrency' then
      redis.call('ZREM', key, lease)
    elseif (kind == 'rpm' or kind == 'tpm') and take > 0 then  -- reserve charged no bucket for 0
      -- As settle.lua's add(): TOTAL follows what the bucket really lost (nothing, if it
      -- expired meanwhile), and a bucket that goes may have been the oldest.
      local r = redis.call('HINCRBY', key, window, -take)
      local change = -take
      if r <= 0 then
        redis.call('HDEL', key, window)
        redis.call('HDEL', key, OLDEST)
        change = -take - r
      end
      if change ~= 0 then redis.call('HINCRBY', key, TOTAL, change) end
      if kind == 'tpm' and expiry then unhold(key, -math.min(expiry, window + BUCKETS + 1)) end
    elseif (kind == 'day' or kind == 'month') and estimate > 0  -- (Redis reads -0 as no integer)
        and tonumber(redis.call('HGET', key, 'w')) == window then  -- still that window
      if redis.call('HINCRBY', key, 'n', -estimate) < 0 then redis.call('HSET', key, 'n', 0) end
      if expiry then unhold(key, -expiry) end
    end
  end
end
redis.call('DEL', record)
redis.call('HSET', record, 'released', 1)
redis.call('PEXPIRE', record, ttl)
return estimate and 1 or 0
