-- settle.lua: applies one node's settle batch to one org, exactly once, then closes the
-- leases of other nodes of the org that stopped settling.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger
--       (and, named from the prefix, creditd:{org}:node:<node> for every node of the org)
-- ARGV: 1 org, 2 node, 3 epoch, 4 seq, 5 version (of the org, as the node's view was built),
--       6 lease_ttl_ms,
--       7 L = number of usage lines, then L times: workspace, spender, consumed, reserved,
--         committed, released;
--       then R = number of releases, then R times: spender, amount;
--       then W = number of wants, then W times: spender, amount.
-- Reply: {'ok', applied (1 | 0), expired (1 | 0), unbacked, prev_seq, G,
--         G times (spender, granted), state...} (state_tokens),
--        or {'err', code, ...}: unknown_org, stale_epoch batch current, batch_refused why,
--        overflow, invalid why, corrupt why. A refusal writes nothing.
-- Invariant: OrgRecord::settle with PriorLife::CountAsConsumed, then
--   OrgRecord::expire_nodes(now, lease_ttl_ms, node), now from the server's TIME (never a
--   node's clock). The functions below mirror the model's by name and order: settle_lines
--   (lines_exact, else lines_capped), settle_releases, grant. Exactly once per (node, epoch,
--   seq): a batch at or below the node's last seq of the same epoch changes nothing and is
--   answered with the grants (and expired flag) of that seq (none for a lower seq); a lower
--   epoch is refused; a higher epoch first closes the previous life (its leases and
--   reservations count as consumed, `lease_expired`). Grants only to a batch of the org's
--   current version. Usage no lease or reservation of the node backs is recorded as
--   `usage_unbacked`, never charged twice, never refused. Conservation holds before and
--   after; a lease or reservation never goes negative; nothing exceeds 2^53-1.
-- Work: a batch has at most one line per account and one release and want per spender of the
--   org (the store refuses longer batches before sending them), so the script does
--   O(workspaces + nodes' leases) work, like reading the state it answers.
-- The batch's arguments, every one checked before anything is read.
local function parse_batch()
  local b = {
    node = arg_id(2, 'node'),
    epoch = arg_number(3, 'epoch'),
    seq = arg_number(4, 'seq'),
    version = arg_number(5, 'version'),
    ttl_ms = arg_number(6, 'lease_ttl_ms'),
    lines = {},
    releases = {},
    wants = {},
  }
  if b.epoch > CAP or b.seq > CAP or b.ttl_ms > CAP or b.version > CAP then
    refuse('batch_refused', 'epoch, seq, version or lease_ttl above 2^53-1')
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
  local i = 7
  local function count(what)
    local n = arg_number(i, what)
    if n > #ARGV then
      refuse('invalid', what .. ' count ' .. ARGV[i] .. ' exceeds the arguments')
    end
    i = i + 1
    return n
  end
  for _ = 1, count('lines') do
    b.lines[#b.lines + 1] = {
      ws = arg_id(i, 'line workspace'),
      spender = arg_id(i + 1, 'line spender'),
      consumed = amount(i + 2, 'consumed'),
      reserved = amount(i + 3, 'reserved'),
      committed = amount(i + 4, 'committed'),
      released = amount(i + 5, 'released'),
    }
    i = i + 6
  end
  for _ = 1, count('releases') do
    b.releases[#b.releases + 1] = { arg_id(i, 'release spender'), amount(i + 1, 'release') }
    i = i + 2
  end
  for _ = 1, count('wants') do
    -- A want is capped by a balance: asking for more than 2^53-1 is asking for 2^53-1.
    b.wants[#b.wants + 1] = { arg_id(i, 'want spender'), math.min(arg_number(i + 1, 'want'), CAP) }
    i = i + 2
  end
  if i ~= #ARGV + 1 then
    refuse('invalid', 'batch has ' .. #ARGV .. ' arguments, expected ' .. (i - 1))
  end
  return b
end

-- The reply's head: {'ok', applied, expired, unbacked, prev_seq, G, G times (spender, granted)}.
local function reply_head(applied, expired, unbacked, prev_seq, grants)
  local reply = { 'ok', applied and '1' or '0', expired and '1' or '0', fmt(unbacked),
    fmt(prev_seq), tostring(#grants) }
  for _, g in ipairs(grants) do
    reply[#reply + 1] = g[1]
    reply[#reply + 1] = fmt(g[2])
  end
  return reply
end

-- A batch at or below the node's last seq of the same epoch: answered again, nothing changed
-- (the grants and flags of that seq; none for a lower seq).
local function replay(share, seq)
  local last = seq == share.seq
  local grants = last and share.grants or {}
  return reply_head(false, last and share.last_expired, 0,
    last and share.last_prev_seq or share.seq, grants)
end

-- OrgRecord::lines_exact: every line's credits before any line's debits (several lines may
-- share a spender), so only the net result per lease and per reservation must not go
-- negative; false (and nothing changed) if one would, or if the credits or the debits of one
-- of them add up beyond 2^53-1. Each net result is computed from two sums below 2^53: exact
-- in doubles.
local function lines_exact(st, node, share, lines, events)
  local sums = { l = {}, h = {}, f = {} }
  local function count(kind, key, plus, minus)
    local e = sums[kind][key]
    if e == nil then
      e = { 0, 0 }
      sums[kind][key] = e
    end
    e[1] = e[1] + plus
    e[2] = e[2] + minus
  end
  for _, l in ipairs(lines) do
    count('l', l.spender, l.released, l.consumed + l.reserved)
    count('h', l.ws, l.reserved, l.committed + l.released)
    count('f', l.spender, l.reserved, l.committed + l.released)
  end
  local maps = { l = share.leases, h = share.held, f = share.held_from }
  local final = { l = {}, h = {}, f = {} }
  for kind, t in pairs(sums) do
    for key, e in pairs(t) do
      if e[1] > CAP or e[2] > CAP then
        return false
      end
      local have = maps[kind][key] or 0
      local n
      if e[1] >= e[2] then
        n = have + (e[1] - e[2])
        if n > CAP then
          return false
        end
      else
        n = have - (e[2] - e[1])
        if n < 0 then
          return false
        end
      end
      final[kind][key] = n
    end
  end
  for kind, t in pairs(final) do
    for key, n in pairs(t) do
      maps[kind][key] = n
    end
  end
  for _, l in ipairs(lines) do
    local used = l.consumed + l.committed
    if used > 0 then
      add_used(st, l.ws, used)
      events[#events + 1] = ev.usage(node, l.ws, used)
    end
  end
  return true
end

-- OrgRecord::lines_capped: flow by flow, each capped at what the node holds; returns the
-- usage nothing backed.
local function lines_capped(st, node, share, lines, events)
  local function take(map, key, wanted)
    local have = map[key] or 0
    local taken = math.min(wanted, have)
    map[key] = have - taken
    return taken
  end
  local backed = {}
  for _, l in ipairs(lines) do
    local n = take(share.leases, l.spender, l.reserved)
    share.held[l.ws] = (share.held[l.ws] or 0) + n
    share.held_from[l.spender] = (share.held_from[l.spender] or 0) + n
  end
  for k, l in ipairs(lines) do
    local released = math.min(l.released, share.held[l.ws] or 0, share.held_from[l.spender] or 0)
    take(share.held, l.ws, released)
    take(share.held_from, l.spender, released)
    share.leases[l.spender] = (share.leases[l.spender] or 0) + released
    local committed = math.min(l.committed, share.held[l.ws] or 0, share.held_from[l.spender] or 0)
    take(share.held, l.ws, committed)
    take(share.held_from, l.spender, committed)
    backed[k] = committed
  end
  for k, l in ipairs(lines) do
    backed[k] = backed[k] + take(share.leases, l.spender, l.consumed)
  end
  local total = 0
  for k, l in ipairs(lines) do
    if backed[k] > 0 then
      add_used(st, l.ws, backed[k])
      events[#events + 1] = ev.usage(node, l.ws, backed[k])
    end
    local unbacked = l.consumed + l.committed - backed[k]
    if unbacked > 0 then
      total = total + unbacked
      events[#events + 1] = ev.usage_unbacked(node, l.ws, unbacked)
    end
  end
  return total
end

-- OrgRecord::settle_releases: each capped at what the node holds.
local function settle_releases(st, share, releases)
  for _, r in ipairs(releases) do
    local back = math.min(r[2], share.leases[r[1]] or 0)
    share.leases[r[1]] = (share.leases[r[1]] or 0) - back
    local home = home_of(st, r[1])
    st.ws[home].balance = st.ws[home].balance + back
    st.dirty_ws[home] = true
  end
end

-- OrgRecord::grant: only to a batch of the current version, only for a spender under the
-- current mode.
local function grant(st, share, version, wants)
  local grants = {}
  if version ~= st.version then
    return grants
  end
  for _, w in ipairs(wants) do
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
  return grants
end

-- Drops the node's entries that reached zero.
local function drop_zeros(share)
  for _, map in ipairs({ share.leases, share.held, share.held_from }) do
    for k, n in pairs(map) do
      if n <= 0 then map[k] = nil end
    end
  end
end

-- OrgRecord::expire_nodes: other nodes silent for longer than lease_ttl; what they hold counts
-- as consumed, in id order.
local function expire_nodes(st, node, now, ttl_ms, events)
  for _, id in ipairs(sorted_keys(st.nodes)) do
    local other = st.nodes[id]
    if id ~= node and not is_empty(other) and now - other.seen > ttl_ms then
      close_node(st, id, events)
      other.expired = true
    end
  end
end

return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger' })
  local b = parse_batch()

  local st = load_state(prefix)
  if st == nil then
    refuse('unknown_org')
  end
  local now = now_ms()
  check_conserved(st)

  -- Exactly once.
  local share = st.nodes[b.node]
  if share ~= nil then
    if b.epoch < share.epoch then
      refuse('stale_epoch', fmt(b.epoch), fmt(share.epoch))
    end
    if b.epoch == share.epoch and b.seq <= share.seq then
      return state_tokens(st, replay(share, b.seq))
    end
  end

  local events = {}
  local prev_seq = 0
  if share ~= nil and share.epoch == b.epoch then
    prev_seq = share.seq
  end
  local new_life = share ~= nil and share.epoch < b.epoch
  if new_life then
    close_node(st, b.node, events)
  end
  if share == nil then
    share = { epoch = 0, seq = 0, seen = 0, grants = {}, leases = {}, held = {}, held_from = {},
      expired = false, last_expired = false, last_prev_seq = 0 }
    st.nodes[b.node] = share
  end
  -- A new life starts with nothing in memory: nothing to forfeit.
  local expired = share.expired and not new_life
  share.expired = false
  share.epoch = b.epoch
  share.seq = b.seq
  share.seen = now
  st.dirty_nodes[b.node] = true
  st.changed = true

  -- OrgRecord::settle_lines, settle_releases, grant.
  local unbacked = 0
  if not lines_exact(st, b.node, share, b.lines, events) then
    unbacked = lines_capped(st, b.node, share, b.lines, events)
  end
  settle_releases(st, share, b.releases)
  local grants = grant(st, share, b.version, b.wants)
  drop_zeros(share)
  share.grants = grants
  share.last_expired = expired
  share.last_prev_seq = prev_seq

  expire_nodes(st, b.node, now, b.ttl_ms, events)
  check_conserved(st)

  save(st, events, now)
  return state_tokens(st, reply_head(true, expired, unbacked, prev_seq, grants))
end)
