-- create_org.lua: creates an org holding only its Primary Workspace, with no credits.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger
-- ARGV: 1 org, 2 mode (shared | budget), 3 primary workspace, 4 call id (unique per call; kept
--       in the meta as `created_by`, so that a client re-sending this very command after a
--       lost connection or a timeout is answered `ok`, not `org_exists`)
-- Reply: {'ok', state...} (state_tokens), or {'err', 'org_exists'}, or {'err', 'corrupt', why}
--        when keys of the org exist without its meta.
-- Invariant: an org is created once, whole (meta, Primary balance and usage at 0, version 1,
--   one `org_created` ledger entry), and is conserved (purchased 0 == every sum 0).
return run(function()
  local org = arg_id(1, 'org')
  local mode = arg_mode(2)
  local primary = arg_id(3, 'primary')
  local call = ARGV[4]
  if type(call) ~= 'string' or #call < 16 then
    refuse('invalid', 'call id (ARGV[4]) is missing or shorter than 16 characters')
  end
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger' })
  if redis.call('EXISTS', KEYS[1]) == 1 then
    if redis.call('HGET', KEYS[1], 'created_by') == call then
      local st = load_state(prefix)
      check_conserved(st)
      return state_tokens(st, { 'ok' })
    end
    refuse('org_exists')
  end
  for i = 2, 5 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      refuse('corrupt', KEYS[i] .. ' exists but the org has no meta')
    end
  end
  local at = now_ms()
  local st = {
    prefix = prefix,
    org = org,
    mode = mode,
    primary = primary,
    purchased = 0,
    used_deleted = 0,
    version = 1,
    ws = { [primary] = { balance = 0, used = 0 } },
    nodes = {},
    dirty_ws = { [primary] = true },
    dirty_nodes = {},
    changed = true,
  }
  check_conserved(st)
  save(st, { ev.org_created(mode, primary) }, at)
  redis.call('HSET', KEYS[1], 'created_by', call)
  return state_tokens(st, { 'ok' })
end)
