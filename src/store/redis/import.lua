-- import.lua: writes one org of an export into a store that does not have it.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger, 6 creditd:{org}:idem
-- ARGV: 1 org, 2 mode, 3 primary, 4 purchased, 5 used_deleted, 6 version,
--       7 w, then w × (workspace, balance, used),
--       then t (ledger entries trimmed before the first), then n, then n ledger entries (JSON,
--       seq t + 1 .. t + n in order),
--       then m, then m × (name `<scope>:<key>`, fingerprint, returned, state, expires_ms)
-- Reply: {'ok'}, or {'err', 'org_exists'} (nothing written), or {'err', 'invalid', why}.
-- Invariant: an org is written whole or not at all: every argument is read and checked
--   before the first write, and no key of the org may exist (the caller checked the export
--   against the model's rules: conserved, no node holdings, a ledger without gaps; and trimmed
--   it to this store's LEDGER_RETAIN as an append would). Keys already
--   expired are skipped; the others expire when they would have in the exporting store.
return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger', 'idem' })
  local mode = arg_mode(2)
  local primary = arg_id(3, 'primary')
  local purchased = arg_number(4, 'purchased')
  local used_deleted = arg_number(5, 'used_deleted')
  local version = arg_number(6, 'version')
  local i = 7
  local function take_count(what)
    local n = arg_number(i, what)
    i = i + 1
    return n
  end
  local ws_items, used_items = {}, {}
  for _ = 1, take_count('workspaces') do
    local name = arg_id(i, 'workspace')
    ws_items[#ws_items + 1] = name; ws_items[#ws_items + 1] = fmt(arg_number(i + 1, 'balance'))
    used_items[#used_items + 1] = name; used_items[#used_items + 1] = fmt(arg_number(i + 2, 'used'))
    i = i + 3
  end
  local trimmed = take_count('ledger entries trimmed')
  if trimmed > CAP then
    refuse('invalid', 'ledger entries trimmed (ARGV[' .. (i - 1) .. ']) exceed 2^53-1')
  end
  local entries = {}
  for _ = 1, take_count('ledger entries') do
    entries[#entries + 1] = ARGV[i]
    i = i + 1
  end
  local now = now_ms()
  local keys = {}
  for _ = 1, take_count('keys') do
    local expires = arg_number(i + 4, 'expires_ms')
    if type(ARGV[i]) ~= 'string' or type(ARGV[i + 3]) ~= 'string' then
      refuse('invalid', 'key ' .. tostring(ARGV[i]) .. ' is incomplete')
    end
    if expires > now then
      keys[#keys + 1] = { prefix .. 'idem:' .. ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], expires }
    end
    i = i + 5
  end
  if i ~= #ARGV + 1 then
    refuse('invalid', 'wrong number of arguments: ' .. #ARGV)
  end
  for k = 1, 6 do
    if redis.call('EXISTS', KEYS[k]) == 1 then
      refuse('org_exists')
    end
  end

  redis.call('HSET', KEYS[1], 'org', org, 'mode', mode, 'primary', primary,
    'purchased', fmt(purchased), 'used_deleted', fmt(used_deleted), 'version', fmt(version))
  if trimmed > 0 then
    redis.call('HSET', KEYS[1], 'ledger_trimmed', fmt(trimmed))
  end
  call_chunked('HSET', KEYS[2], ws_items)
  call_chunked('HSET', KEYS[3], used_items)
  for s = 1, #entries, CHUNK do
    local part = {}
    for j = s, math.min(s + CHUNK - 1, #entries) do
      part[#part + 1] = entries[j]
    end
    redis.call('RPUSH', KEYS[5], unpack(part))
  end
  for _, k in ipairs(keys) do
    redis.call('HSET', k[1], 'fp', k[2], 'returned', k[3], 'state', k[4])
    redis.call('PEXPIREAT', k[1], fmt(k[5]))
    redis.call('ZADD', KEYS[6], fmt(k[5]), k[1])
  end
  return { 'ok' }
end)
