-- settle.lua: applies one node's settle batch to one org, exactly once, then closes the
-- leases of other nodes of the org that stopped settling.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger
--       (and, named from the prefix, creditd:{org}:node:<node> for every node of the org)
-- ARGV: 1 org, 2 node, 3 epoch, 4 seq, 5 lease_ttl_ms,
--       6 L = number of usage lines, then L times: workspace, spender, consumed, reserved,
--         committed, released;
--       then R = number of releases, then R times: spender, amount;
--       then W = number of wants, then W times: spender, amount.
-- Reply: {'ok', applied (1 | 0), G, G times (spender, granted), state...} (state_tokens),
--        or {'err', code, ...}: unknown_org, stale_epoch batch current, batch_refused why,
--        overflow, invalid why, corrupt why. A refusal writes nothing.
-- Invariant: OrgRecord::settle with PriorLife::CountAsConsumed, then
--   OrgRecord::expire_nodes(now, lease_ttl_ms, node), now from the server's TIME (never a
--   node's clock). Exactly once per (node, epoch, seq): a batch at or below the node's last
--   seq of the same epoch changes nothing and is answered with the grants of that seq (none
--   for a lower seq); a lower epoch is refused; a higher epoch first closes the previous life
--   (its leases and reservations count as consumed, `lease_expired`). Conservation holds
--   before and after; a lease or reservation never goes negative; nothing exceeds 2^53-1.
-- Work: a batch has at most one line per account and one release and want per spender of the
--   org (the store refuses longer batches before sending them), so the script does
--   O(workspaces + nodes' leases) work, like reading the state it answers.
return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger' })
  local node = arg_id(2, 'node')
  local epoch = arg_number(3, 'epoch')
  local seq = arg_number(4, 'seq')
  local ttl_ms = arg_number(5, 'lease_ttl_ms')
  if epoch > CAP or seq > CAP or ttl_ms > CAP then
    refuse('batch_refused', 'epoch, seq or lease_ttl above 2^53-1')
  end

  -- Amounts of lines and releases: above 2^53-1 no real batch can be right (a node holds at
  -- most what was purchased), and Lua could not count them exactly.
  local function amount(i, what)
    local n = arg_number(i, what)
    if n > CAP then
      refuse('batch_refused', what .. ' above 2^53-1')
    end
    return n
  end
  local i = 6
  local function count(what)
    local n = arg_number(i, what)
    if n > #ARGV then
      refuse('invalid', what .. ' count ' .. ARGV[i] .. ' exceeds the arguments')
    end
    i = i + 1
    return n
  end
  local lines = {}
  for _ = 1, count('lines') do
    lines[#lines + 1] = {
      ws = arg_id(i, 'line workspace'),
      spender = arg_id(i + 1, 'line spender'),
      consumed = amount(i + 2, 'consumed'),
      reserved = amount(i + 3, 'reserved'),
      committed = amount(i + 4, 'committed'),
      released = amount(i + 5, 'released'),
    }
    i = i + 6
  end
  local releases = {}
  for _ = 1, count('releases') do
    releases[#releases + 1] = { arg_id(i, 'release spender'), amount(i + 1, 'release') }
    i = i + 2
  end
  local wants = {}
  for _ = 1, count('wants') do
    -- A want is capped by a balance: asking for more than 2^53-1 is asking for 2^53-1.
    wants[#wants + 1] = { arg_id(i, 'want spender'), math.min(arg_number(i + 1, 'want'), CAP) }
    i = i + 2
  end
  if i ~= #ARGV + 1 then
    refuse('invalid', 'batch has ' .. #ARGV .. ' arguments, expected ' .. (i - 1))
  end

  local st = load_state(prefix)
  if st == nil then
    refuse('unknown_org')
  end
  local now = now_ms()
  check_conserved(st)

  -- Exactly once.
  local share = st.nodes[node]
  if share ~= nil then
    if epoch < share.epoch then
      refuse('stale_epoch', fmt(epoch), fmt(share.epoch))
    end
    if epoch == share.epoch and seq <= share.seq then
      local reply = { 'ok', '0' }
      local grants = seq == share.seq and share.grants or {}
      reply[#reply + 1] = tostring(#grants)
      for _, g in ipairs(grants) do
        reply[#reply + 1] = g[1]
        reply[#reply + 1] = fmt(g[2])
      end
      return state_tokens(st, reply)
    end
  end

  local events = {}
  if share ~= nil and share.epoch < epoch then
    close_node(st, node, events)
  end
  if share == nil then
    share = { epoch = 0, seq = 0, seen = 0, grants = {}, leases = {}, held = {}, held_from = {} }
    st.nodes[node] = share
  end
  share.epoch = epoch
  share.seq = seq
  share.seen = now
  st.dirty_nodes[node] = true
  st.changed = true

  -- Every line's credits before any line's debits (several lines may share a spender).
  for _, l in ipairs(lines) do
    local lease = (share.leases[l.spender] or 0) + l.released
    local held = (share.held[l.ws] or 0) + l.reserved
    local from = (share.held_from[l.spender] or 0) + l.reserved
    if lease > CAP or held > CAP or from > CAP then
      refuse('batch_refused', 'a lease or reservation would exceed 2^53-1')
    end
    share.leases[l.spender] = lease
    share.held[l.ws] = held
    share.held_from[l.spender] = from
  end
  for _, l in ipairs(lines) do
    -- Subtract one amount at a time: each step is exact, and a negative result keeps its sign.
    local lease = share.leases[l.spender] - l.consumed - l.reserved
    if lease < 0 then
      refuse('batch_refused', 'lease would go negative')
    end
    share.leases[l.spender] = lease
    local held = share.held[l.ws] - l.committed - l.released
    local from = share.held_from[l.spender] - l.committed - l.released
    if held < 0 or from < 0 then
      refuse('batch_refused', 'held would go negative')
    end
    share.held[l.ws] = held
    share.held_from[l.spender] = from
    local used = l.consumed + l.committed
    if used > 0 then
      add_used(st, l.ws, used)
      events[#events + 1] = ev.usage(node, l.ws, used)
    end
  end
  for _, r in ipairs(releases) do
    local lease = (share.leases[r[1]] or 0) - r[2]
    if lease < 0 then
      refuse('batch_refused', 'lease would go negative')
    end
    share.leases[r[1]] = lease
    local home = home_of(st, r[1])
    st.ws[home].balance = st.ws[home].balance + r[2]
    st.dirty_ws[home] = true
  end
  local grants = {}
  for _, w in ipairs(wants) do
    -- Only a spender under the current mode may be leased.
    local spender = w[1]
    if spender_of(st, spender) == spender then
      local balance = st.ws[spender].balance
      local granted = math.min(w[2], balance)
      if granted > 0 then
        st.ws[spender].balance = balance - granted
        st.dirty_ws[spender] = true
        share.leases[spender] = (share.leases[spender] or 0) + granted
        grants[#grants + 1] = { spender, granted }
      end
    end
  end
  for k, n in pairs(share.leases) do
    if n <= 0 then share.leases[k] = nil end
  end
  for k, n in pairs(share.held) do
    if n <= 0 then share.held[k] = nil end
  end
  for k, n in pairs(share.held_from) do
    if n <= 0 then share.held_from[k] = nil end
  end
  share.grants = grants

  -- Other nodes silent for longer than lease_ttl: what they hold counts as consumed.
  for _, id in ipairs(sorted_keys(st.nodes)) do
    local other = st.nodes[id]
    if id ~= node and not is_empty(other) and now - other.seen > ttl_ms then
      close_node(st, id, events)
    end
  end
  check_conserved(st)

  save(st, events, now)
  local reply = { 'ok', '1', tostring(#grants) }
  for _, g in ipairs(grants) do
    reply[#reply + 1] = g[1]
    reply[#reply + 1] = fmt(g[2])
  end
  return state_tokens(st, reply)
end)
