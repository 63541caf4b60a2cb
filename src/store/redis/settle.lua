-- settle.lua: applies one node's settle batch to one org, exactly once, then closes the
-- leases of other nodes of the org that stopped settling. It reads and writes only what the
-- batch touches, never the whole org.
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:bal, 3 creditd:{org}:used,
--       4 creditd:{org}:nodes, 5 creditd:{org}:ledger
--       (and, named from the prefix, creditd:{org}:node:<node> for every node of the org, and
--       creditd:{org}:gone, the tombstones of forgotten node lives)
-- ARGV: 1 org, 2 node, 3 epoch, 4 seq, 5 version (of the org, as the node's view was built),
--       6 lease_ttl_ms, 7 node_forget_after_ms, 8 first (1 | 0: the life's first batch in the
--       org), 9 L = number of usage lines, then L times: workspace, spender, consumed, reserved,
--         committed, released;
--       then R = number of releases, then R times: spender, amount;
--       then W = number of wants, then W times: spender, amount.
-- Reply: {'ok', applied (1 | 0), expired (1 | 0), unbacked, prev_seq, G,
--         G times (spender, granted), version, epoch, seq, seen_ms, S,
--         S times (spender, left, K, K times (node, seen_ms, leased))} (SettleView: the
--        spenders the batch names, in byte order; other nodes leasing each, in id order),
--        or {'err', code, ...}: unknown_org, stale_epoch batch current, batch_refused why,
--        overflow, invalid why, corrupt why. A refusal writes nothing.
-- Invariant: OrgRecord::settle with PriorLife::CountAsConsumed, then
--   OrgRecord::expire_nodes(now, lease_ttl_ms, node) and OrgRecord::forget_nodes(now,
--   node_forget_after_ms, node), now from the server's TIME (never a node's clock), answered
--   with OrgRecord::settle_view. A batch from a node the org has no record of that is not the
--   life's first in the org (the store forgot the life) is applied without its wants: its
--   usage is recorded as unbacked, and nothing is granted (SettleBatch::first). The functions below mirror the
--   model's by name and order: settle_lines (lines_exact, else lines_capped),
--   settle_releases, grant. Exactly once per (node, epoch, seq): a batch at or below the
--   node's last seq of the same epoch changes nothing and is answered with the grants (and
--   expired flag) of that seq (none for a lower seq); a lower epoch is refused; a higher epoch
--   first closes the previous life (its leases and reservations count as consumed,
--   `lease_expired`). Grants only to a batch of the current version. Usage no lease or
--   reservation of the node backs is recorded as `usage_unbacked`, never charged twice,
--   never refused. A lease or reservation never goes negative; nothing exceeds 2^53-1.
--   Conservation: the script checks that what it changed adds up to zero (every credit it
--   moved left one counter for another), which keeps a conserved org conserved; the
--   control-plane scripts check the whole org.
-- Work: O(batch entries + nodes of the org × spenders the batch names), whatever the number
--   of workspaces: the settling node's holdings are read field by field (all of them only to
--   close a previous life), other nodes' by their header and size (all of them only to
--   close an expired node). A batch has at most one line per account and one release and
--   want per spender (the store refuses longer batches before sending them).

-- The batch's arguments, every one checked before anything is read.
local function parse_batch()
  local b = {
    node = arg_id(2, 'node'),
    epoch = arg_number(3, 'epoch'),
    seq = arg_number(4, 'seq'),
    version = arg_number(5, 'version'),
    ttl_ms = arg_number(6, 'lease_ttl_ms'),
    forget_ms = arg_number(7, 'node_forget_after_ms'),
    first = ARGV[8] == '1',
    lines = {},
    releases = {},
    wants = {},
  }
  if b.epoch > CAP or b.seq > CAP or b.ttl_ms > CAP or b.version > CAP or b.forget_ms > CAP then
    refuse('batch_refused', 'epoch, seq, version, lease_ttl or node_forget_after above 2^53-1')
  end
  if ARGV[8] ~= '1' and ARGV[8] ~= '0' then
    refuse('invalid', 'first (ARGV[8]) is not 1 or 0: ' .. tostring(ARGV[8]))
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
  local i = 9
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

-- The spenders the batch names (lines, releases, wants), in byte order: what the answer
-- tells the node about.
local function named_spenders(b)
  local set = {}
  for _, l in ipairs(b.lines) do set[l.spender] = true end
  for _, r in ipairs(b.releases) do set[r[1]] = true end
  for _, w in ipairs(b.wants) do set[w[1]] = true end
  return sorted_keys(set)
end

-- The org's header, or nil if the org does not exist. Workspaces are read on demand
-- (load_workspaces), nodes one by one.
local function load_header(prefix)
  return new_state(prefix, hmget_map(prefix .. 'meta',
    { 'org', 'mode', 'primary', 'used_deleted', 'version' }))
end

-- Reads the balance and usage of each workspace of `names` not read yet; a workspace without
-- a balance does not exist. The Primary must exist.
local function load_workspaces(st, names)
  local want = {}
  for name in pairs(names) do
    if st.ws[name] == nil then
      want[#want + 1] = name
    end
  end
  if #want == 0 then
    return
  end
  local bal = redis.call('HMGET', st.prefix .. 'bal', unpack(want))
  local used = redis.call('HMGET', st.prefix .. 'used', unpack(want))
  for i, name in ipairs(want) do
    if bal[i] then
      st.ws[name] = {
        balance = counter(bal[i], 'balance of ' .. name),
        used = counter(used[i], 'used of ' .. name),
      }
    end
  end
end

-- A node's header (epoch, seq, seen, grants, flags) and `holds`, the number of its holding
-- fields, from the size of its hash: or nil if the node never settled the org. Holdings are
-- read later, only those needed (load_fields) or all of them (load_holdings).
local function load_node(prefix, id)
  local key = prefix .. 'node:' .. id
  local h = hmget_map(key, NODE_HEADER)
  local size = redis.call('HLEN', key)
  if size == 0 then
    return nil
  end
  local share = share_of(id, h)
  local present = 0
  for _ in pairs(h) do present = present + 1 end
  share.holds = size - present
  share.full = false
  return share
end

-- Reads every holding of a node (to close its life): the share becomes `full`, and is
-- written back whole.
local function load_holdings(prefix, id, share)
  add_holdings(id, share, hgetall_map(prefix .. 'node:' .. id))
  share.full = true
end

-- Reads the holdings `fields` ({kind letter, workspace} pairs) of a node; a missing one is 0.
-- Returns the list, which names the fields to write back.
local function load_fields(prefix, id, share, fields)
  if #fields == 0 then
    return fields
  end
  local names = {}
  for i, f in ipairs(fields) do
    names[i] = f[1] .. ':' .. f[2]
  end
  local values = redis.call('HMGET', prefix .. 'node:' .. id, unpack(names))
  for i, f in ipairs(fields) do
    share[HOLDING_KINDS[f[1]]][f[2]] = values[i] and counter(values[i], 'holding ' .. names[i]) or 0
  end
  return fields
end

-- The holdings a batch can change: per line the spender's lease and reservations and the
-- workspace's reservations; the lease of each release and want.
local function batch_fields(b)
  local seen, fields = {}, {}
  local function add(kind, ws)
    local name = kind .. ':' .. ws
    if not seen[name] then
      seen[name] = true
      fields[#fields + 1] = { kind, ws }
    end
  end
  for _, l in ipairs(b.lines) do
    add('l', l.spender); add('h', l.ws); add('f', l.spender)
  end
  for _, r in ipairs(b.releases) do add('l', r[1]) end
  for _, w in ipairs(b.wants) do add('l', w[1]) end
  return fields
end

-- What the loaded part of the org holds: (balances + used + leases + held, held - held_from).
-- Taken before and after the batch: a batch only moves credits, so both must not change.
local function loaded_totals(st)
  local total, skew = st.used_deleted, 0
  for _, w in pairs(st.ws) do
    total = total + w.balance + w.used
  end
  for _, share in pairs(st.nodes) do
    for _, n in pairs(share.leases) do total = total + n end
    for _, n in pairs(share.held) do
      total = total + n
      skew = skew + n
    end
    for _, n in pairs(share.held_from) do skew = skew - n end
  end
  return total, skew
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

-- OrgRecord::settle_view, appended to `reply`: the version, the settling node's life, and for
-- each named spender what the store has left of it and which other nodes lease it. `others`
-- are the other nodes' shares by id (headers; holdings read here, one HMGET per node).
local function settle_view(st, node, share, named, others, reply)
  local function push(v) reply[#reply + 1] = v end
  push(fmt(st.version))
  push(fmt(share and share.epoch or 0)); push(fmt(share and share.seq or 0))
  push(fmt(share and share.seen or 0))
  local leasing = {}
  if #named > 0 then
    local fields = {}
    for i, s in ipairs(named) do fields[i] = 'l:' .. s end
    for _, id in ipairs(sorted_keys(others)) do
      local other = others[id]
      if other.holds > 0 then
        local values = redis.call('HMGET', st.prefix .. 'node:' .. id, unpack(fields))
        for i, s in ipairs(named) do
          local n = values[i] and counter(values[i], 'lease of node ' .. id) or 0
          if n > 0 then
            leasing[s] = leasing[s] or {}
            local l = leasing[s]
            l[#l + 1] = { id, other.seen, n }
          end
        end
      end
    end
  end
  push(tostring(#named))
  for _, s in ipairs(named) do
    local w = st.ws[s]
    push(s)
    push(fmt((spender_of(st, s) == s and w) and w.balance or 0))
    local l = leasing[s] or {}
    push(tostring(#l))
    for _, o in ipairs(l) do
      push(o[1]); push(fmt(o[2])); push(fmt(o[3]))
    end
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

-- OrgRecord::expire_nodes, part one: the other nodes silent for longer than lease_ttl that
-- still hold something, in id order. Their holdings are read whole (to be closed).
local function silent_nodes(st, node, others, now, ttl_ms)
  local silent = {}
  for _, id in ipairs(sorted_keys(others)) do
    local other = others[id]
    if id ~= node and other.holds > 0 and now - other.seen > ttl_ms then
      load_holdings(st.prefix, id, other)
      st.nodes[id] = other
      silent[#silent + 1] = id
    end
  end
  return silent
end

-- OrgRecord::expire_nodes, part two: what the silent nodes held counts as consumed.
local function expire_nodes(st, silent, events)
  for _, id in ipairs(silent) do
    close_node(st, id, events)
    st.nodes[id].expired = true
    st.nodes[id].holds = 0
  end
end

-- OrgRecord::forget_nodes: the other nodes that hold nothing (after the expiry) and have not
-- settled for longer than node_forget_after; returns them as a set.
local function forget_nodes(node, others, now, forget_ms)
  local gone = {}
  for id, other in pairs(others) do
    if id ~= node and other.holds == 0 and now - other.seen > forget_ms then
      gone[id] = true
    end
  end
  return gone
end

-- Workspaces whose counters the batch and the closes may change.
local function touched_workspaces(st, b, closing)
  local names = { [st.primary] = true }
  for _, l in ipairs(b.lines) do
    names[l.ws] = true; names[l.spender] = true
  end
  for _, r in ipairs(b.releases) do names[r[1]] = true end
  for _, w in ipairs(b.wants) do names[w[1]] = true end
  for _, share in ipairs(closing) do
    for _, map in ipairs({ share.leases, share.held }) do
      for ws in pairs(map) do names[ws] = true end
    end
  end
  return names
end

-- What the store kept of a forgotten life of `node` (OrgRecord::replay_forgotten): nil, or
-- { epoch, seq, at }.
local function tombstone(prefix, node)
  local t = redis.call('HGET', prefix .. 'gone', node)
  if not t then
    return nil
  end
  local e, s, at = string.match(t, '^(%d+) (%d+) (%d+)$')
  if not e then
    refuse('corrupt', 'tombstone of node ' .. node .. ' is ' .. t)
  end
  return { epoch = counter(e, 'tombstone epoch'), seq = counter(s, 'tombstone seq'),
    at = counter(at, 'tombstone time') }
end

-- Forgets the nodes of `gone` (their records go, a tombstone stays: epoch, seq, time), and
-- drops the tombstones older than forget_ms.
local function forget(prefix, gone, others, now, forget_ms)
  if next(gone) == nil then
    return
  end
  local key = prefix .. 'gone'
  local old = {}
  for id, t in pairs(hgetall_map(key)) do
    local at = tonumber(string.match(t, ' (%d+)$') or '0')
    if now - at > forget_ms then
      old[#old + 1] = id
    end
  end
  for i = 1, #old, CHUNK do
    redis.call('HDEL', key, unpack(old, i, math.min(i + CHUNK - 1, #old)))
  end
  for id in pairs(gone) do
    local o = others[id]
    redis.call('DEL', prefix .. 'node:' .. id)
    redis.call('SREM', prefix .. 'nodes', id)
    redis.call('HSET', key, id, fmt(o.epoch) .. ' ' .. fmt(o.seq) .. ' ' .. fmt(now))
  end
end

-- Writes what changed: workspace counters, used_deleted, the settling node (field by field,
-- or whole after a new life), closed nodes (whole).
-- The ledger is appended first.
local function save_settle(st, node, share, fields, events, now, gone, others, forget_ms)
  local prefix = st.prefix
  -- First: the only step that may refuse (a corrupt ledger_trimmed), before any write.
  append_ledger(prefix, events, now)
  local set_bal, set_used = {}, {}
  for name in pairs(st.dirty_ws) do
    local w = st.ws[name]
    set_bal[#set_bal + 1] = name; set_bal[#set_bal + 1] = fmt(w.balance)
    set_used[#set_used + 1] = name; set_used[#set_used + 1] = fmt(w.used)
  end
  call_chunked('HSET', prefix .. 'bal', set_bal)
  call_chunked('HSET', prefix .. 'used', set_used)
  redis.call('HSET', prefix .. 'meta', 'used_deleted', fmt(st.used_deleted))
  for id, s in pairs(st.nodes) do
    if id ~= node and not gone[id] then
      write_node(prefix, id, s)
    end
  end
  forget(prefix, gone, others, now, forget_ms)
  if share.full then
    write_node(prefix, node, share)
  else
    local key = prefix .. 'node:' .. node
    local set, gone = header_fields(share), {}
    for _, f in ipairs(fields) do
      local n = share[HOLDING_KINDS[f[1]]][f[2]] or 0
      if n > 0 then
        set[#set + 1] = f[1] .. ':' .. f[2]; set[#set + 1] = fmt(n)
      else
        gone[#gone + 1] = f[1] .. ':' .. f[2]
      end
    end
    call_chunked('HSET', key, set)
    for i = 1, #gone, CHUNK do
      redis.call('HDEL', key, unpack(gone, i, math.min(i + CHUNK - 1, #gone)))
    end
    redis.call('SADD', prefix .. 'nodes', node)
  end
end

return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'bal', 'used', 'nodes', 'ledger' })
  local b = parse_batch()

  local st = load_header(prefix)
  if st == nil then
    refuse('unknown_org')
  end
  local now = now_ms()
  local named = named_spenders(b)
  local others = {}
  for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
    if id ~= b.node then
      others[id] = load_node(prefix, id)
    end
  end
  local share = load_node(prefix, b.node)

  -- Exactly once. A life the store has no record of is granted nothing unless this is its
  -- first batch here.
  local forgotten = share == nil and not b.first
  if share == nil then
    -- OrgRecord::replay_forgotten: a batch of a life the store forgot, applied before.
    local t = tombstone(prefix, b.node)
    if t and b.epoch < t.epoch then
      refuse('stale_epoch', fmt(b.epoch), fmt(t.epoch))
    end
    if t and b.epoch == t.epoch and b.seq <= t.seq then
      load_workspaces(st, touched_workspaces(st, b, {}))
      return settle_view(st, b.node, nil, named, others, reply_head(false, true, 0, 0, {}))
    end
  end
  if share ~= nil then
    if b.epoch < share.epoch then
      refuse('stale_epoch', fmt(b.epoch), fmt(share.epoch))
    end
    if b.epoch == share.epoch and b.seq <= share.seq then
      load_workspaces(st, touched_workspaces(st, b, {}))
      return settle_view(st, b.node, share, named, others, replay(share, b.seq))
    end
  end

  -- Read what the batch and the closes can change, then check it adds up after.
  local new_life = share ~= nil and share.epoch < b.epoch
  local prev_seq = 0
  if share ~= nil and share.epoch == b.epoch then
    prev_seq = share.seq
  end
  if share == nil then
    share = { epoch = 0, seq = 0, seen = 0, grants = {}, leases = {}, held = {}, held_from = {},
      expired = false, last_expired = false, last_prev_seq = 0, holds = 0, full = false }
  end
  if new_life then
    load_holdings(prefix, b.node, share)
  end
  local fields = load_fields(prefix, b.node, share, share.full and {} or batch_fields(b))
  st.nodes[b.node] = share
  local silent = silent_nodes(st, b.node, others, now, b.ttl_ms)
  local closing = { share }
  for _, id in ipairs(silent) do closing[#closing + 1] = st.nodes[id] end
  load_workspaces(st, touched_workspaces(st, b, closing))
  if st.ws[st.primary] == nil then
    refuse('corrupt', 'the Primary Workspace ' .. tostring(st.primary) .. ' has no balance')
  end
  local total_before, skew_before = loaded_totals(st)

  local events = {}
  if new_life then
    close_node(st, b.node, events)
  end
  -- A new life starts with nothing in memory: nothing to forfeit.
  -- A forgotten life is told so as an expiry (SettleBatch::first).
  local expired = (share.expired and not new_life) or forgotten
  share.expired = false
  share.epoch = b.epoch
  share.seq = b.seq
  share.seen = now

  -- OrgRecord::settle_lines, settle_releases, grant.
  local unbacked = 0
  if not lines_exact(st, b.node, share, b.lines, events) then
    unbacked = lines_capped(st, b.node, share, b.lines, events)
  end
  settle_releases(st, share, b.releases)
  local grants = grant(st, share, b.version, forgotten and {} or b.wants)
  share.grants = grants
  share.last_expired = expired
  share.last_prev_seq = prev_seq

  expire_nodes(st, silent, events)
  local total_after, skew_after = loaded_totals(st)
  if total_after ~= total_before or skew_after ~= skew_before then
    refuse('corrupt', 'org ' .. org .. ': the batch would not conserve credits ('
      .. fmt(total_before) .. ' before, ' .. fmt(total_after) .. ' after)')
  end

  local gone = forget_nodes(b.node, others, now, b.forget_ms)
  save_settle(st, b.node, share, fields, events, now, gone, others, b.forget_ms)
  for id in pairs(gone) do others[id] = nil end
  return settle_view(st, b.node, share, named, others,
    reply_head(true, expired, unbacked, prev_seq, grants))
end)
