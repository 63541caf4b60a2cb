-- apply.lua: one control-plane operation on one org, exactly once per call: the call's
-- idempotency key (the caller's, or a unique id the store gives a call without one) is checked
-- and remembered in the same script.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger,
--       6 creditd:{org}:idem (zset: the callers' remembered keys by expiry time, ms),
--       7 creditd:{org}:idem:<scope>:<key> (the key of this call)
-- ARGV: 1 org, 2 op, 3..5 the op's arguments:
--         purchase amount | create_workspace ws | delete_workspace ws |
--         transfer from to amount | set_mode mode
--       6 remember: `key` (a caller's key: counted against keys_max, indexed in KEYS[6]) or
--         `call` (the store's own id for a call without a key: a client that re-sends the
--         command after a lost connection or a timeout gets the outcome, not a second
--         application; not counted, and remembered without the org's state: the re-sent
--         call is answered with the state as it is now),
--       7 fingerprint, 8 ttl_ms, 9 keys_max
-- Reply: {'ok', returned, state...}: applied; `returned` is what a deletion gave back to the
--          Primary (0 otherwise), state as state_tokens();
--        {'replay', returned, state}: the remembered outcome of an earlier call with this
--          caller's key (state is state_tokens() joined by spaces, as remembered); a call id
--          seen before is answered {'ok', returned, state...} with the state as it is now;
--        {'err', code, ...}: refused, nothing written. Codes: unknown_org, unknown_workspace ws,
--          workspace_exists ws, primary_workspace ws, wrong_mode mode, same_workspace,
--          insufficient ws available wanted, leases_outstanding ws leased, overflow,
--          idempotency_mismatch, limit_exceeded max, invalid why, corrupt why.
-- Invariant: the rules of src/model/rules.rs (purchase, create_workspace, delete_workspace,
--   transfer, set_mode), all or nothing: state and ledger change together, conservation holds
--   before and after, `purchased` never exceeds 2^53-1; a key is remembered only with the
--   outcome of the operation it applied, and one key never applies two operations.
-- Work: O(workspaces + nodes' leases) to read and answer the state.
-- An amount of one operation: 1 to CAP.
local function arg_amount(i)
  local amount = arg_number(i, 'amount')
  if amount < 1 or amount > CAP then
    refuse('invalid', 'amount out of range: ' .. ARGV[i])
  end
  return amount
end

-- The operation and its arguments, checked before anything is read.
local function parse_op()
  local op = ARGV[2]
  local a = {}
  if op == 'purchase' then
    a.amount = arg_amount(3)
  elseif op == 'create_workspace' or op == 'delete_workspace' then
    a.ws = arg_id(3, 'workspace')
  elseif op == 'transfer' then
    a.from = arg_id(3, 'from')
    a.to = arg_id(4, 'to')
    a.amount = arg_amount(5)
  elseif op == 'set_mode' then
    a.mode = arg_mode(3)
  else
    refuse('invalid', 'unknown op ' .. tostring(op))
  end
  return op, a
end

-- Marks a change of the org: its version counts control-plane changes.
local function changed(st)
  st.version = st.version + 1
  st.changed = true
end

-- Rule 1 (OrgRecord::purchase); 2^53-1 caps `purchased`, and with it every other counter.
local function purchase(st, amount)
  if st.purchased + amount > CAP then
    refuse('overflow')
  end
  st.purchased = st.purchased + amount
  st.ws[st.primary].balance = st.ws[st.primary].balance + amount
  st.dirty_ws[st.primary] = true
  changed(st)
  return { ev.purchase(st.primary, amount) }
end

-- OrgRecord::create_workspace.
local function create_workspace(st, ws)
  if st.ws[ws] ~= nil then
    refuse('workspace_exists', ws)
  end
  st.ws[ws] = { balance = 0, used = 0 }
  st.dirty_ws[ws] = true
  changed(st)
  return { ev.workspace_created(ws) }
end

-- Rule 5 (OrgRecord::delete_workspace); returns the events and what went back to the Primary.
local function delete_workspace(st, ws)
  if ws == st.primary then
    refuse('primary_workspace', ws)
  end
  local w = st.ws[ws]
  if w == nil then
    refuse('unknown_workspace', ws)
  end
  -- Leased or reserved by nodes: both must be back first.
  local l = leased(st, ws) + held(st, ws)
  if l > 0 then
    refuse('leases_outstanding', ws, fmt(l))
  end
  local returned = w.balance
  st.used_deleted = st.used_deleted + w.used
  st.ws[st.primary].balance = st.ws[st.primary].balance + returned
  st.dirty_ws[st.primary] = true
  st.ws[ws] = nil
  st.dirty_ws[ws] = true
  changed(st)
  return { ev.workspace_deleted(ws, returned) }, returned
end

-- Rule 3 (OrgRecord::check_transfer, then transfer).
local function transfer(st, from, to, amount)
  if st.mode ~= 'budget' then
    refuse('wrong_mode', st.mode)
  end
  if from == to then
    refuse('same_workspace')
  end
  if st.ws[from] == nil then
    refuse('unknown_workspace', from)
  end
  if st.ws[to] == nil then
    refuse('unknown_workspace', to)
  end
  local available = st.ws[from].balance
  if available < amount then
    local l = leased(st, from)
    if available + l >= amount then
      refuse('leases_outstanding', from, fmt(l))
    end
    refuse('insufficient', from, fmt(available + l), fmt(amount))
  end
  st.ws[from].balance = available - amount
  st.ws[to].balance = st.ws[to].balance + amount
  st.dirty_ws[from] = true
  st.dirty_ws[to] = true
  changed(st)
  return { ev.transfer(from, to, amount) }
end

-- shared -> budget: the Primary's leases were the whole org's lease; nodes spend them for
-- every workspace until they learn of the switch, so they must be back first.
local function check_to_budget(st)
  local l = leased_by_ws(st)[st.primary] or 0
  if l > 0 then
    refuse('leases_outstanding', st.primary, fmt(l))
  end
end

-- budget -> shared: every other workspace's balance is swept into the Primary, in byte order.
-- The first non-primary workspace (in byte order) with a lease is named, as in the model;
-- only workspaces with a lease or a balance are sorted.
local function sweep_to_shared(st, events)
  local blocked = {}
  for name, n in pairs(leased_by_ws(st)) do
    if name ~= st.primary and st.ws[name] ~= nil and n > 0 then
      blocked[name] = n
    end
  end
  local first = sorted_keys(blocked)[1]
  if first ~= nil then
    refuse('leases_outstanding', first, fmt(blocked[first]))
  end
  local holding = {}
  for name, w in pairs(st.ws) do
    if name ~= st.primary and w.balance > 0 then
      holding[name] = true
    end
  end
  local swept = 0
  for _, name in ipairs(sorted_keys(holding)) do
    local w = st.ws[name]
    events[#events + 1] = ev.sweep(name, st.primary, w.balance)
    swept = swept + w.balance
    w.balance = 0
    st.dirty_ws[name] = true
  end
  st.ws[st.primary].balance = st.ws[st.primary].balance + swept
  st.dirty_ws[st.primary] = true
end

-- Rule 6 (OrgRecord::set_mode). Setting the current mode again changes nothing and records
-- nothing.
local function set_mode(st, mode)
  if mode == st.mode then
    return {}
  end
  local events = { ev.mode_changed(st.mode, mode) }
  if mode == 'budget' then
    check_to_budget(st)
  else
    sweep_to_shared(st, events)
  end
  st.mode = mode
  changed(st)
  return events
end

-- Remembers the outcome under the call's key (KEYS[7]) for ttl_ms. A caller's key keeps the
-- org's state with it (its retry answers the first outcome), is indexed in KEYS[6] and counted
-- against keys_max; a call id keeps only `returned`: a copy of the org per control-plane call
-- would grow Redis by the org's size on every call.
local function remember(reply, fingerprint, returned, counted, ttl_ms, now)
  if counted then
    local state = {}
    for i = 3, #reply do
      state[#state + 1] = reply[i]
    end
    redis.call('HSET', KEYS[7], 'fp', fingerprint, 'returned', fmt(returned), 'state',
      table.concat(state, ' '))
  else
    redis.call('HSET', KEYS[7], 'fp', fingerprint, 'returned', fmt(returned))
  end
  redis.call('PEXPIRE', KEYS[7], fmt(ttl_ms))
  if counted then
    redis.call('ZADD', KEYS[6], fmt(now + ttl_ms), KEYS[7])
    -- Forget expired keys from the index (their hashes expired by themselves).
    redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', fmt(now))
  end
end

return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger', 'idem' })
  if #KEYS ~= 7 or string.sub(KEYS[7], 1, #prefix + 5) ~= prefix .. 'idem:' then
    refuse('invalid', 'KEYS[7] is not an idempotency key of org ' .. org)
  end
  if #ARGV ~= 9 then
    refuse('invalid', 'wrong number of arguments: ' .. #ARGV)
  end

  -- Arguments first.
  local op, a = parse_op()
  local remember_as = ARGV[6]
  if remember_as ~= 'key' and remember_as ~= 'call' then
    refuse('invalid', 'remember (ARGV[6]) is not key or call: ' .. tostring(remember_as))
  end
  local counted = remember_as == 'key'
  local fingerprint = ARGV[7]
  local ttl_ms = arg_number(8, 'ttl_ms')
  local keys_max = arg_number(9, 'keys_max')
  if ttl_ms < 1 or ttl_ms > CAP or keys_max > CAP then
    refuse('invalid', 'ttl_ms or keys_max out of range')
  end

  -- Then every read.
  local st = load_state(prefix)
  if st == nil then
    refuse('unknown_org')
  end
  local now = now_ms()
  local remembered = hgetall_map(KEYS[7])
  if remembered.fp ~= nil then
    if remembered.fp ~= fingerprint then
      refuse('idempotency_mismatch')
    end
    if remembered.state == nil then
      -- A call id: the call was applied; answer it with the org as it is now.
      return state_tokens(st, { 'ok', remembered.returned })
    end
    return { 'replay', remembered.returned, remembered.state }
  end
  if counted then
    local live = redis.call('ZCOUNT', KEYS[6], '(' .. fmt(now), '+inf')
    if live >= keys_max then
      refuse('limit_exceeded', fmt(keys_max))
    end
  end
  check_conserved(st)

  -- The rule, on the tables only.
  local events, returned
  if op == 'purchase' then
    events = purchase(st, a.amount)
  elseif op == 'create_workspace' then
    events = create_workspace(st, a.ws)
  elseif op == 'delete_workspace' then
    events, returned = delete_workspace(st, a.ws)
  elseif op == 'transfer' then
    events = transfer(st, a.from, a.to, a.amount)
  else
    events = set_mode(st, a.mode)
  end
  returned = returned or 0
  check_conserved(st)

  -- Writes last.
  if st.changed then
    save(st, events, now)
  end
  local reply = state_tokens(st, { 'ok', fmt(returned) })
  remember(reply, fingerprint, returned, counted, ttl_ms, now)
  return reply
end)
