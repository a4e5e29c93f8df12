-- GCRA for a batch of requests, each all-or-nothing over its own keys. The arithmetic is
-- gcra.py's, line for line; the integration tests run both on the same inputs and compare.
--
-- KEYS:    the keys of every request of the batch, request after request (a TAT each:
--          microseconds since the epoch, as an integer string).
-- ARGV[1]: now in microseconds, or "" to use Redis' own clock (TIME): the one time source all
--          replicas share. Only tests pin it.
-- ARGV[2]: the number of requests. Then per request: op ("take" or "adjust"), its number of
--          keys, and per key:
--            take:   interval_us, tolerance_us, cost, max_wait_us. If any key refuses,
--                    nothing is written for this request.
--            adjust: interval_us, delta (units; > 0 charges, < 0 refunds).
--          interval_us is whole microseconds, as TATs and now are, from a millisecond up
--          (with a fraction in it the last unit of a burst would never fit); below, exact
--          with tolerance_us rounded up (see gcra.Rule.of). TATs are whole either way.
-- Reply: {now, then per request: allowed (1/0), tat_1, ..., tat_n}: the TATs after the call
-- (if refused: as they stand, never earlier than now).
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

local function store(key, tat)
  if tat > now then
    -- The key means nothing once the TAT has passed (an absent key is idle): let it expire.
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  else
    redis.call('DEL', key)
  end
end

local function current(key)
  local tat = tonumber(redis.call('GET', key))
  if tat ~= nil and tat >= now then return tat end
  return now
end

local reply = {now}
local k = 0 -- keys used by the requests before this one
local a = 3 -- the next ARGV
for _ = 1, tonumber(ARGV[2]) do
  local op, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local pos = #reply + 1
  reply[pos] = 1
  if op == 'take' then
    local after = {}
    for i = 1, n do
      local interval, tolerance = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
      local cost, max_wait = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
      a = a + 4
      local base = current(KEYS[k + i])
      after[i] = math.ceil(base + cost * interval)
      if after[i] - tolerance - now > max_wait then reply[pos] = 0 end
      reply[pos + i] = base
    end
    if reply[pos] == 1 then
      for i = 1, n do
        store(KEYS[k + i], after[i])
        reply[pos + i] = after[i]
      end
    end
  elseif op == 'adjust' then
    for i = 1, n do
      local interval, delta = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
      a = a + 2
      local tat = math.ceil(current(KEYS[k + i]) + delta * interval)
      store(KEYS[k + i], tat)
      reply[pos + i] = tat
    end
  else
    return redis.error_reply('gcra: unknown op ' .. tostring(op))
  end
  k = k + n
end
return reply
