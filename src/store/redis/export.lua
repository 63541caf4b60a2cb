-- export.lua: reads one org whole in one atomic snapshot (read only): its state, every ledger
-- entry kept (and how many were trimmed before them), and every remembered idempotency key
-- still live.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger, 6 creditd:{org}:idem
-- ARGV: 1 org
-- Reply: {'none'} when the org does not exist, else
--        {'ok', t, n, entry_1 .. entry_n, m, m × (name, fingerprint, returned, state,
--         expires_ms), state...}: t the meta's `ledger_trimmed`, then the ledger's JSON entries
--        kept, oldest first (seq t + 1 to t + n); each key's name is
--        `<scope>:<key>`, its state the remembered state_tokens() joined by spaces; the org's
--        state_tokens() last. Or {'err', 'corrupt', why}.
-- Invariant: one consistent instant of the org (a script runs alone), checked to be conserved;
--   nothing is written.
return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger', 'idem' })
  local st = load_state(prefix)
  if st == nil then
    return { 'none' }
  end
  check_conserved(st)
  local trimmed = counter(redis.call('HGET', KEYS[1], 'ledger_trimmed') or '0', 'ledger_trimmed')
  local reply = { 'ok', fmt(trimmed) }
  local entries = redis.call('LRANGE', KEYS[5], 0, -1)
  reply[#reply + 1] = tostring(#entries)
  for _, e in ipairs(entries) do
    reply[#reply + 1] = e
  end
  local live = redis.call('ZRANGEBYSCORE', KEYS[6], '(' .. fmt(now_ms()), '+inf', 'WITHSCORES')
  local keys = {}
  for i = 1, #live, 2 do
    local h = hgetall_map(live[i])
    if h.fp ~= nil then
      keys[#keys + 1] = { string.sub(live[i], #prefix + 6), h.fp, h.returned, h.state, live[i + 1] }
    end
  end
  reply[#reply + 1] = tostring(#keys)
  for _, k in ipairs(keys) do
    for _, v in ipairs(k) do
      reply[#reply + 1] = v
    end
  end
  return state_tokens(st, reply)
end)
