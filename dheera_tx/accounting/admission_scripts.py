"""
The Lua scripts that admit calls (L{dheera_tx.accounting.limits}) and the
reservation helpers the settlement script shares
(L{dheera_tx.accounting.spend}).  The Redis keys they touch are described in
L{dheera_tx.accounting.limits}.

The admission script is written for one call (C{KEYS}, C{ARGV}) and run
for all the calls of a reactor turn by L{ADMIT_BATCH_SCRIPT}; the settings
that are the same for every call come once, as C{C}.  Every check comes
before any count or reservation; a new per-call counter (say, a
deployment's calls in flight) is one more key in C{KEYS} and one more step
after the checks.
"""

# Lua shared by the admission and settlement scripts: the reservations in
# flight of one holder (a key or an end user), a hash as described in
# L{dheera_tx.accounting.limits}: a field per call, C{<call id>|<nanos>|
# <tokens>} -> its deadline, and the sums of those calls under C{nanos} and
# C{tokens}; C{due} is never later than the earliest deadline, so the
# lapsed reservations of a crashed proxy are looked for only once it has
# passed.  Admitting or settling a call reads and writes that hash once,
# whatever is in flight.
RESERVATIONS_LUA = r"""
local function amounts(member)
  local n, t = string.match(member, '|(%d+)|(%d+)$')
  return tonumber(n), tonumber(t)
end
-- HDEL in slices (Lua's unpack has a limit).
local function forget(rsv, members)
  for i = 1, #members, 1000 do
    redis.call('HDEL', rsv, unpack(members, i, math.min(i + 999, #members)))
  end
end
-- Take reservations back; each only once (its field says whether it is
-- still held: not once it lapsed, nor after an earlier release).
local function release(rsv, members)
  local list = {}
  for m in string.gmatch(members, '[^,]+') do list[#list + 1] = m end
  if #list == 0 then return end
  local got = redis.call('HMGET', rsv, 'nanos', 'tokens', unpack(list))
  local n, t, held = tonumber(got[1]) or 0, tonumber(got[2]) or 0, {}
  for i = 1, #list do
    if got[i + 2] then
      local a, b = amounts(list[i])
      n, t = n - a, t - b
      held[#held + 1] = list[i]
    end
  end
  if #held == 0 then return end
  forget(rsv, held)
  if redis.call('HLEN', rsv) <= 3 then
    -- Only the sums and 'due' left: nothing in flight, nothing to keep.
    redis.call('DEL', rsv)
  else
    redis.call('HSET', rsv, 'nanos', n, 'tokens', t)
  end
end
"""

# Lua helpers of the admission script, defined once per script run (not
# once per call of a batch).
ADMIT_HELPERS_LUA = r"""
local BUDGET = {'max_budget', 'budget_duration', 'budget_reset_at', 'budget_spend_nanos', 'spend_nanos'}
local function seconds(d)
  if not d then return nil end
  local n, u = string.match(d, "^(%d+)([smhd])$")
  if not n then return nil end
  local mult = {s = 1, m = 60, h = 3600, d = 86400}
  return tonumber(n) * mult[u]
end
-- The holders read in this script run: reservations made by its calls are
-- kept here and written once per holder at its end (write_held), so that
-- the calls of a batch on one key read and write its hash once.
local holders = {}
local function write_held(rsv, h, ttl)
  local w = h[4]
  if #w == 0 then return end
  -- Fields and values, in slices of 1000 (Lua's unpack has a limit).
  redis.call('HSET', rsv, 'nanos', h[1], 'tokens', h[2], 'due', h[3], unpack(w, 1, math.min(1000, #w)))
  for i = 1001, #w, 1000 do
    redis.call('HSET', rsv, unpack(w, i, math.min(i + 999, #w)))
  end
  redis.call('EXPIRE', rsv, ttl)
  h[4] = {}
end
-- A holder's reservations in flight, {nanos, tokens, due, [reservations
-- to write]}, after dropping those whose deadline passed.  One read per
-- script run in the usual case; once 'due' has passed, one look at every
-- reservation, which sets 'due' to the earliest deadline left (a minute
-- or more ahead while calls end within their timeout).
local function in_flight(rsv, now, ttl)
  if rsv == '' then return {0, 0, nil, {}} end
  local h = holders[rsv]
  if h then
    if not (h[3] and h[3] <= now) then return h end
    write_held(rsv, h, ttl)
  end
  local s = redis.call('HMGET', rsv, 'nanos', 'tokens', 'due')
  local n, t, due = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3])
  if due and due <= now then
    local all = redis.call('HGETALL', rsv)
    local lapsed = {}
    due = nil
    for i = 1, #all, 2 do
      local m = all[i]
      if m ~= 'nanos' and m ~= 'tokens' and m ~= 'due' then
        local deadline = tonumber(all[i + 1])
        if deadline <= now then
          local a, b = amounts(m)
          n, t = n - a, t - b
          lapsed[#lapsed + 1] = m
        elseif not due or deadline < due then
          due = deadline
        end
      end
    end
    forget(rsv, lapsed)
    if due then
      redis.call('HSET', rsv, 'nanos', n, 'tokens', t, 'due', due)
    else
      redis.call('DEL', rsv)
      n, t = 0, 0
    end
  end
  h = {n, t, due, {}}
  holders[rsv] = h
  return h
end
-- Hold a call's reservation (member "<call id>|<nanos>|<tokens>") until
-- settlement takes it back or its deadline passes.  h: what in_flight
-- returned for the holder.
local function reserve(h, member, deadline)
  if member == '' then return end
  local n, t = amounts(member)
  h[1], h[2] = h[1] + n, h[2] + t
  if not h[3] or deadline < h[3] then h[3] = deadline end
  local w = h[4]
  w[#w + 1] = member
  w[#w + 1] = deadline
end
-- Write what the run's calls reserved.
local function write_all(ttl)
  for rsv, h in pairs(holders) do write_held(rsv, h, ttl) end
end
-- f: HMGET of max_budget, budget_duration, budget_reset_at,
-- budget_spend_nanos, spend_nanos.  Whether spend plus the reservations in
-- flight reached the budget; nil when the hash sets no budget.
local function over_budget(hash, f, reserved, now)
  if not f[1] then return nil end
  -- Rounded to whole nano-USD: a float budget times 1e9 can land a hair
  -- above the exact amount (1.54e-05 * 1e9 = 15400.000000000002), and a
  -- spend that reached the budget exactly would still be let through.
  local limit = math.floor(tonumber(f[1]) * 1e9 + 0.5)
  local duration = seconds(f[2])
  local spent
  if duration then
    local reset = tonumber(f[3] or '0') or 0
    if now >= reset then
      redis.call('HSET', hash, 'budget_spend_nanos', '0',
                 'budget_reset_at', string.format('%.3f', now + duration))
      spent = 0
    else
      spent = tonumber(f[4] or '0') or 0
    end
  else
    spent = tonumber(f[5] or '0') or 0
  end
  return spent + reserved >= limit
end
-- The rpm and tpm counters, 0 where there is no limit: one read.
local function windows(rpm_counter, rpm, tpm_counter, tpm)
  if rpm > 0 and tpm > 0 then
    local u = redis.call('MGET', rpm_counter, tpm_counter)
    return tonumber(u[1] or '0'), tonumber(u[2] or '0')
  elseif rpm > 0 then
    return tonumber(redis.call('GET', rpm_counter) or '0'), 0
  elseif tpm > 0 then
    return 0, tonumber(redis.call('GET', tpm_counter) or '0')
  end
  return 0, 0
end
-- Milliseconds until a full window has room, or nil when it has room.
local function full(counter, limit, used, reserved, window_ms)
  if limit <= 0 then return nil end
  if used + reserved < limit then return nil end
  -- Full only with the calls in flight: they end (and settle) soon.
  if used < limit then return 1000 end
  local ttl = redis.call('PTTL', counter)
  if ttl < 0 then redis.call('PEXPIRE', counter, window_ms); ttl = tonumber(window_ms) end
  return ttl
end
"""

# KEYS: 1 key hash ("" for none), 2 end-user hash (""), 3 rpm counter,
#       4 tpm counter, 5 parallel set, 6 the key's reservations ("" when
#       the key has no budget and no tpm limit), 7 the end user's
#       reservations, 8 the team's new end user counter of the day,
#       9 the team's overflow end-user hash, 10 its reservations
# ARGV: 1 now (s), 2 call id, 3 rpm limit, 4 tpm limit, 5 parallel limit
#       (0 = none), 6 the reservation "<call id>|<nanos>|<tokens>" ("" for
#       none)
# C (the same for every call, passed once per script run): 1 seconds after
#       which a parallel slot or a reservation is stale, 2 window ms,
#       3 seconds an end user seen only in traffic is kept, 4 new end users
#       a team may name a day, 5 that counter's TTL
# Returns {0} when admitted, {0, 'overflow'} when admitted as the team's
# overflow end user, else {reason, retry_after_ms}.  Every check comes
# before any count or reservation, so a refused call holds nothing (but
# the end user it names is seen).
ADMIT_SCRIPT = r"""
local now = tonumber(ARGV[1])
local stale = tonumber(C[1])
local ttl = math.ceil(stale)
local member = ARGV[6]

-- The end user, scoped to the key's team by its hash name.
local user, user_rsv, overflow = KEYS[2], KEYS[7], false
local user_budgeted, user_held = false, nil
if user ~= '' then
  if redis.call('EXISTS', user) == 0 then
    -- A new id: at most C[4] a team a day leave state of their own.
    local seen = redis.call('INCR', KEYS[8])
    if seen == 1 then redis.call('EXPIRE', KEYS[8], C[5]) end
    if seen > tonumber(C[4]) then
      user, user_rsv, overflow = KEYS[9], KEYS[10], true
    end
  end
  local f = redis.call('HMGET', user, 'blocked', 'created_at', unpack(BUDGET))
  if not f[2] then
    -- Seen only in traffic: kept C[3] seconds after its last call.
    redis.call('HINCRBY', user, 'spend_nanos', 0)
    redis.call('EXPIRE', user, C[3])
  end
  if f[1] == '1' then return {'end_user_blocked', 0} end
  local n = 0
  if f[3] then
    user_held = in_flight(user_rsv, now, ttl)
    n = math.max(user_held[1], 0)
  end
  local over = over_budget(user, {f[3], f[4], f[5], f[6], f[7]}, n, now)
  if over then return {'end_user_budget', 0} end
  user_budgeted = over ~= nil
end
if KEYS[1] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'key_gone', 0} end
  local held = in_flight(KEYS[6], now, ttl)
  local f = redis.call('HMGET', KEYS[1], unpack(BUDGET))
  if over_budget(KEYS[1], f, math.max(held[1], 0), now) then return {'budget', 0} end
  local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
  local rpm_used, tpm_used = windows(KEYS[3], rpm, KEYS[4], tpm)
  local wait = full(KEYS[3], rpm, rpm_used, 0, C[2])
  if wait then return {'rpm', wait} end
  wait = full(KEYS[4], tpm, tpm_used, math.max(held[2], 0), C[2])
  if wait then return {'tpm', wait} end
  local parallel = tonumber(ARGV[5])
  if parallel > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - stale)
    if redis.call('ZCARD', KEYS[5]) >= parallel then return {'parallel', 1000} end
    redis.call('ZADD', KEYS[5], now, ARGV[2])
    redis.call('EXPIRE', KEYS[5], math.ceil(stale))
  end
  if rpm > 0 then
    if redis.call('INCR', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], C[2]) end
  end
  if KEYS[6] ~= '' then reserve(held, member, now + stale) end
end
-- Admitted: hold the worst case where a budget can be overrun.
if user_budgeted then reserve(user_held, member, now + stale) end
if overflow then return {0, 'overflow'} end
return {0}
"""

_KEYS_PER_CALL = 10
_ARGS_PER_CALL = 6
_CONSTANTS = 5

# One call's admission, standing alone (the unbatched path): ARGV holds C,
# then the call's arguments.
ADMIT_ONE_SCRIPT = (
    RESERVATIONS_LUA
    + ADMIT_HELPERS_LUA
    + f"local C = {{unpack(ARGV, 1, {_CONSTANTS})}}\n"
    + "local function admit(KEYS, ARGV)\n"
    + ADMIT_SCRIPT
    + f"\nend\nlocal out = admit(KEYS, {{unpack(ARGV, {_CONSTANTS + 1})}})\n"
    + "write_all(math.ceil(tonumber(C[1])))\nreturn out\n"
)

# The admissions of one reactor tick in one script run: ARGV holds C, then
# the arguments of each call in turn, KEYS the keys of each call in turn;
# returns one reply per call.
ADMIT_BATCH_SCRIPT = (
    RESERVATIONS_LUA
    + ADMIT_HELPERS_LUA
    + f"local C = {{unpack(ARGV, 1, {_CONSTANTS})}}\n"
    + "local function admit(KEYS, ARGV)\n"
    + ADMIT_SCRIPT
    + "\nend\nlocal out = {}\n"
    + f"for i = 0, #KEYS / {_KEYS_PER_CALL} - 1 do\n"
    + "  local k, a = {}, {}\n"
    + f"  for j = 1, {_KEYS_PER_CALL} do k[j] = KEYS[i * {_KEYS_PER_CALL} + j] end\n"
    + f"  for j = 1, {_ARGS_PER_CALL} do a[j] = ARGV[{_CONSTANTS} + i * {_ARGS_PER_CALL} + j] end\n"
    + "  out[i + 1] = admit(k, a)\n"
    + "end\nwrite_all(math.ceil(tonumber(C[1])))\nreturn out\n"
)
