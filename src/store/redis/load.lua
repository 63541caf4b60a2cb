-- load.lua: reads an org's whole state in one atomic snapshot (read only).
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger
-- ARGV: 1 org
-- Reply: {'ok', state...} (state_tokens), {'none'} when the org does not exist, or
--        {'err', 'corrupt', why} when what is stored cannot be right.
-- Invariant: what is answered is one consistent state (a script runs alone), checked to be
--   conserved; nothing is written.
return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger' })
  local st = load_state(prefix)
  if st == nil then
    return { 'none' }
  end
  check_conserved(st)
  return state_tokens(st, { 'ok' })
end)
