-- GCRA over several keys, all-or-nothing. The arithmetic is gcra.py's, line for line; the
-- integration tests run both on the same inputs and compare.
--
-- KEYS: one per limit (its TAT: microseconds since the epoch, as an integer string).
-- ARGV[1]: "take" or "adjust".
-- ARGV[2]: now in microseconds, or "" to use Redis' own clock (TIME): the one time source all
--          replicas share. Only tests pin it.
-- take:   4 numbers per key: interval_us, tolerance_us, cost, max_wait_us. If any key refuses,
--         nothing is written.
-- adjust: 2 numbers per key: interval_us, delta (units; > 0 charges, < 0 refunds).
-- Reply: {allowed (1/0), now, tat_1, ..., tat_n}: the TATs after the call (if refused: as they
-- stand, never earlier than now).
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
end

local function store(key, tat)
  if tat > now then
    -- The key means nothing once the TAT has passed (an absent key is idle): let it expire.
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  else
    redis.call('DEL', key)
  end
end

local reply = {1, now}
local n = #KEYS
if ARGV[1] == 'take' then
  local after = {}
  for i = 1, n do
    local j = 3 + (i - 1) * 4
    local interval, tolerance = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
    local cost, max_wait = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
    local tat = tonumber(redis.call('GET', KEYS[i]))
    local base = now
    if tat ~= nil and tat >= now then base = tat end
    after[i] = math.ceil(base + cost * interval)
    if after[i] - tolerance - now > max_wait then reply[1] = 0 end
    reply[2 + i] = base
  end
  if reply[1] == 1 then
    for i = 1, n do
      store(KEYS[i], after[i])
      reply[2 + i] = after[i]
    end
  end
elseif ARGV[1] == 'adjust' then
  for i = 1, n do
    local j = 3 + (i - 1) * 2
    local interval, delta = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
    local tat = tonumber(redis.call('GET', KEYS[i]))
    local base = now
    if tat ~= nil and tat >= now then base = tat end
    local a = math.ceil(base + delta * interval)
    store(KEYS[i], a)
    reply[2 + i] = a
  end
else
  return redis.error_reply('gcra: unknown op ' .. tostring(ARGV[1]))
end
return reply
