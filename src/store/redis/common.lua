-- common.lua: helpers shared by every script of the Redis store. It is not run on its own:
-- each script is built as the model's constants (CAP, ID_BYTES_MAX, and the store's ledger
-- retention LEDGER_RETAIN and LEDGER_TRIM_AT: `constants()` in conn.rs),
-- this file, then the script's own file, so that every script is one self-contained EVAL. Each script's own header names
-- its KEYS, ARGV, reply and the invariant it keeps.
--
-- Conventions of every script:
-- * Every key of one org carries the hash tag {org}. KEYS[1] is always `creditd:{org}:meta`;
--   the other keys of the org are named from the prefix `creditd:{org}:` (the node hashes
--   `creditd:{org}:node:<node>` too, since their names come from stored data), so a script
--   touches one slot of a cluster. The fixed keys are also passed in KEYS and checked.
-- * Counters are decimal strings. Lua numbers are doubles, exact up to 2^53; no counter may
--   exceed CAP = 2^53 - 1 (CREDITS_MAX of the model). Numbers are written with fmt(), never
--   with tostring(), which keeps 14 significant digits only.
-- * Ids are compared and sorted by bytes (lt), never with Lua's `<` on strings, which follows
--   the server's locale (strcoll): orders must match the model's BTreeMap.
-- * A refusal calls refuse(code, ...), which raises {creditd = {'err', code, ...}}; run()
--   turns it into that reply. Every script reads and checks everything before its first
--   write, so a refusal leaves nothing written (a script is not rolled back).
-- * Replies are flat arrays of strings; state_tokens() gives the org's whole state.

if redis.replicate_commands then
  -- Redis 3.2 to 4: TIME may be called before writes only with effects replication (the
  -- default from Redis 5 on, where this call does nothing).
  redis.replicate_commands()
end

-- Pairs of fields or items per HSET or RPUSH call: keeps unpack() far below Lua's C stack.
local CHUNK = 500

local function refuse(code, ...)
  error({ creditd = { 'err', code, ... } })
end

local function fmt(n)
  return string.format('%.0f', n)
end

-- Byte order of two strings (the model's BTreeMap order).
local function lt(a, b)
  local la, lb = #a, #b
  local n = la < lb and la or lb
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return la < lb
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  table.sort(keys, lt)
  return keys
end

local function is_id(s)
  return type(s) == 'string' and #s >= 1 and #s <= ID_BYTES_MAX and string.match(s, '^[A-Za-z0-9%._:%-]+$') ~= nil
end

-- A stored counter: a whole number from 0 to CAP. Only the scripts write counters (with fmt),
-- so this is a guard against corruption, kept cheap: it runs once per stored number.
local function counter(s, what)
  local n = tonumber(s)
  if n == nil or n < 0 or n > CAP or n % 1 ~= 0 then
    refuse('corrupt', what .. ' is not a counter from 0 to 2^53-1: ' .. tostring(s))
  end
  return n
end

-- An argument that must be an id.
local function arg_id(i, what)
  local s = ARGV[i]
  if not is_id(s) then
    refuse('invalid', what .. ' (ARGV[' .. i .. ']) is not an id: ' .. tostring(s))
  end
  return s
end

-- An argument that must be a decimal integer. Up to 20 digits are accepted (a u64); the value
-- may then exceed CAP, and the caller decides what that means.
local function arg_number(i, what)
  local s = ARGV[i]
  if type(s) ~= 'string' or #s > 20 or not string.match(s, '^%d+$') then
    refuse('invalid', what .. ' (ARGV[' .. i .. ']) is not a whole number: ' .. tostring(s))
  end
  return tonumber(s)
end

local function arg_mode(i)
  local s = ARGV[i]
  if s ~= 'shared' and s ~= 'budget' then
    refuse('invalid', 'mode (ARGV[' .. i .. ']) is not shared or budget: ' .. tostring(s))
  end
  return s
end

-- Milliseconds from the server's clock: the one clock every node shares.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- `creditd:{org}:` from KEYS[1] = `creditd:{org}:meta`, checked against the org id.
local function prefix_of(org)
  local prefix = 'creditd:{' .. org .. '}:'
  if KEYS[1] ~= prefix .. 'meta' then
    refuse('invalid', 'KEYS[1] is not the meta key of org ' .. org)
  end
  return prefix
end

-- Checks that KEYS[i] is the key `name` of the org.
local function check_keys(prefix, names)
  for i, name in ipairs(names) do
    if KEYS[i] ~= prefix .. name then
      refuse('invalid', 'KEYS[' .. i .. '] is not ' .. prefix .. name)
    end
  end
end

local function hgetall_map(key)
  local flat = redis.call('HGETALL', key)
  local map = {}
  for i = 1, #flat, 2 do
    map[flat[i]] = flat[i + 1]
  end
  return map
end

-- The fields `fields` of a hash, as a map by field name (a missing field is absent).
local function hmget_map(key, fields)
  local values = redis.call('HMGET', key, unpack(fields))
  local map = {}
  for i, field in ipairs(fields) do
    if values[i] then
      map[field] = values[i]
    end
  end
  return map
end

-- An org's state from its meta fields (a map by field name), with no workspace or node read
-- yet, or nil if the org does not exist.
local function new_state(prefix, meta)
  if meta.org == nil then
    return nil
  end
  local st = {
    prefix = prefix,
    org = meta.org,
    mode = meta.mode,
    primary = meta.primary,
    used_deleted = counter(meta.used_deleted, 'used_deleted'),
    version = counter(meta.version, 'version'),
    ws = {},
    nodes = {},
    dirty_ws = {},
    dirty_nodes = {},
    changed = false,
  }
  if st.mode ~= 'shared' and st.mode ~= 'budget' then
    refuse('corrupt', 'mode is ' .. tostring(st.mode))
  end
  return st
end

-- A node's hash (written by write_node): the header fields below, and one field per holding
-- above zero: l:<spender> its lease, h:<workspace> held by its reservations, f:<spender> the
-- same held credits by the lease they came from.
local NODE_HEADER = { 'epoch', 'seq', 'seen_ms', 'grants', 'expired', 'last_expired',
  'last_prev_seq' }
local HOLDING_KINDS = { l = 'leases', h = 'held', f = 'held_from' }

-- A node's share from its header fields (a map by field name), with no holdings yet.
local function share_of(id, h)
  local share = {
    epoch = counter(h.epoch, 'epoch of node ' .. id),
    seq = counter(h.seq, 'seq of node ' .. id),
    seen = counter(h.seen_ms, 'seen_ms of node ' .. id),
    grants = {},
    leases = {},
    held = {},
    held_from = {},
    expired = h.expired == '1',
    last_expired = h.last_expired == '1',
    last_prev_seq = counter(h.last_prev_seq or '0', 'last_prev_seq of node ' .. id),
  }
  for ws, n in string.gmatch(h.grants or '', '(%S+) (%d+)') do
    share.grants[#share.grants + 1] = { ws, counter(n, 'grant of node ' .. id) }
  end
  return share
end

-- Adds to `share` the holdings among the fields of `h` (a map by field name).
local function add_holdings(id, share, h)
  for field, value in pairs(h) do
    local kind, ws = string.match(field, '^([lhf]):(.+)$')
    if kind then
      share[HOLDING_KINDS[kind]][ws] = counter(value, field .. ' of node ' .. id)
    end
  end
end

-- The whole state of an org, read into tables, or nil if the org does not exist.
--   st.ws[name]      = { balance =, used = }
--   st.nodes[id]     = { epoch =, seq =, seen =, grants = {{ws, n}, ...}, leases = {ws = n},
--                        held = {ws = n}, held_from = {spender = n}, expired =, last_expired =,
--                        last_prev_seq = }
-- The work is one HGETALL per key: O(workspaces + nodes + their leases and reservations).
local function load_state(prefix)
  local meta = hgetall_map(prefix .. 'meta')
  local st = new_state(prefix, meta)
  if st == nil then
    return nil
  end
  st.purchased = counter(meta.purchased, 'purchased')
  local used = hgetall_map(prefix .. 'used')
  for name, balance in pairs(hgetall_map(prefix .. 'bal')) do
    st.ws[name] = {
      balance = counter(balance, 'balance of ' .. name),
      used = counter(used[name], 'used of ' .. name),
    }
  end
  if st.ws[st.primary] == nil then
    refuse('corrupt', 'the Primary Workspace ' .. tostring(st.primary) .. ' has no balance')
  end
  for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
    local h = hgetall_map(prefix .. 'node:' .. id)
    local share = share_of(id, h)
    add_holdings(id, share, h)
    st.nodes[id] = share
  end
  return st
end

-- Rule 7, checked before every write: purchased == balances + leases + held + used.
-- Every term is at most CAP, so every partial sum below 2^53 * (terms) is compared exactly
-- as long as the state is conserved; a broken state is refused, never written over.
local function check_conserved(st)
  local total = st.used_deleted
  for _, w in pairs(st.ws) do
    total = total + w.balance + w.used
  end
  for _, share in pairs(st.nodes) do
    for _, n in pairs(share.leases) do
      total = total + n
    end
    local held, from = 0, 0
    for _, n in pairs(share.held) do
      held = held + n
    end
    for _, n in pairs(share.held_from) do
      from = from + n
    end
    if held ~= from then
      refuse('corrupt', 'org ' .. st.org .. ': held by workspace ' .. fmt(held)
        .. ' but by spender ' .. fmt(from))
    end
    total = total + held
  end
  if total ~= st.purchased then
    refuse('corrupt', 'org ' .. st.org .. ' is not conserved: purchased ' .. fmt(st.purchased)
      .. ' but found ' .. fmt(total))
  end
end

-- The org's whole state as a flat array of strings (parsed by reply.rs):
--   'org', org, mode, primary, purchased, used_deleted, version,
--   #ws, then per workspace: name, balance, used,
--   #nodes, then per node: id, epoch, seq, seen_ms, expired (0 | 1), last_expired (0 | 1),
--     last_prev_seq,
--     #leases, (spender, n)..., #held, (ws, n)..., #held_from, (spender, n)...,
--     #grants, (spender, n)... (grants in order)
-- Maps come out in no particular order: the reader builds ordered maps, and sorting here would
-- cost more than everything else the script does for an org with many workspaces.
local function state_tokens(st, out)
  out = out or {}
  local k = #out
  local function count(t)
    local c = 0
    for _ in pairs(t) do c = c + 1 end
    return c
  end
  local function push(v)
    k = k + 1
    out[k] = v
  end
  push('org'); push(st.org); push(st.mode); push(st.primary)
  push(fmt(st.purchased)); push(fmt(st.used_deleted)); push(fmt(st.version))
  push(tostring(count(st.ws)))
  for name, w in pairs(st.ws) do
    push(name); push(fmt(w.balance)); push(fmt(w.used))
  end
  push(tostring(count(st.nodes)))
  for id, s in pairs(st.nodes) do
    push(id); push(fmt(s.epoch)); push(fmt(s.seq)); push(fmt(s.seen))
    push(s.expired and '1' or '0'); push(s.last_expired and '1' or '0'); push(fmt(s.last_prev_seq))
    for _, map in ipairs({ s.leases, s.held, s.held_from }) do
      push(tostring(count(map)))
      for ws, n in pairs(map) do
        push(ws); push(fmt(n))
      end
    end
    push(tostring(#s.grants))
    for _, g in ipairs(s.grants) do
      push(g[1]); push(fmt(g[2]))
    end
  end
  return out
end

local function call_chunked(command, key, items)
  for i = 1, #items, 2 * CHUNK do
    local part = {}
    for j = i, math.min(i + 2 * CHUNK - 1, #items) do
      part[#part + 1] = items[j]
    end
    redis.call(command, key, unpack(part))
  end
end

-- The header fields of a node's share, as HSET arguments.
local function header_fields(s)
  local grants = {}
  for _, g in ipairs(s.grants) do
    grants[#grants + 1] = g[1] .. ' ' .. fmt(g[2])
  end
  return { 'epoch', fmt(s.epoch), 'seq', fmt(s.seq), 'seen_ms', fmt(s.seen),
    'grants', table.concat(grants, ' '), 'expired', s.expired and '1' or '0',
    'last_expired', s.last_expired and '1' or '0', 'last_prev_seq', fmt(s.last_prev_seq) }
end

-- Writes a node's whole share (header and every holding above zero) over its hash.
local function write_node(prefix, id, s)
  local key = prefix .. 'node:' .. id
  local fields = header_fields(s)
  for ws, n in pairs(s.leases) do
    if n > 0 then
      fields[#fields + 1] = 'l:' .. ws; fields[#fields + 1] = fmt(n)
    end
  end
  for ws, n in pairs(s.held) do
    if n > 0 then
      fields[#fields + 1] = 'h:' .. ws; fields[#fields + 1] = fmt(n)
    end
  end
  for spender, n in pairs(s.held_from) do
    if n > 0 then
      fields[#fields + 1] = 'f:' .. spender; fields[#fields + 1] = fmt(n)
    end
  end
  redis.call('DEL', key)
  call_chunked('HSET', key, fields)
  redis.call('SADD', prefix .. 'nodes', id)
end

-- Appends ledger entries to the org's ledger and keeps it bounded; self-contained (it reads
-- what it needs, so any script that appends calls only this). `events` are the JSON members
-- after seq and at_ms (see ev below); entries are JSON built here, numbers written with fmt();
-- ids need no escaping (their characters are A-Z a-z 0-9 . _ : -).
--   The list `ledger` holds the entries kept; the meta field `ledger_trimmed` (absent: 0)
--   counts the entries trimmed from its head. Entry i of the list (1-based) has seq
--   ledger_trimmed + i, so a new entry's seq is ledger_trimmed + LLEN + 1 and a seq never
--   changes or repeats.
--   Once the list holds more than LEDGER_TRIM_AT entries, the oldest are trimmed down to
--   LEDGER_RETAIN in chunks (LTRIM is O(entries removed): amortized O(1) per entry appended),
--   and ledger_trimmed grows by as many. The org's totals are counters: trimming changes none.
-- It may refuse (a corrupt ledger_trimmed) before its first write only: call it before the
-- script's other writes.
local function append_ledger(prefix, events, at_ms)
  if #events == 0 then
    return
  end
  local key = prefix .. 'ledger'
  local trimmed = counter(redis.call('HGET', prefix .. 'meta', 'ledger_trimmed') or '0',
    'ledger_trimmed')
  local len = redis.call('LLEN', key)
  local entries = {}
  for i, e in ipairs(events) do
    entries[#entries + 1] = '{"seq":' .. fmt(trimmed + len + i) .. ',"at_ms":' .. fmt(at_ms)
      .. ',' .. e .. '}'
  end
  for i = 1, #entries, CHUNK do
    local part = {}
    for j = i, math.min(i + CHUNK - 1, #entries) do
      part[#part + 1] = entries[j]
    end
    redis.call('RPUSH', key, unpack(part))
  end
  len = len + #entries
  if len > LEDGER_TRIM_AT then
    local drop = len - LEDGER_RETAIN
    redis.call('LTRIM', key, drop, -1)
    redis.call('HSET', prefix .. 'meta', 'ledger_trimmed', fmt(trimmed + drop))
  end
end

-- Writes what changed (st.changed, st.dirty_ws, st.dirty_nodes) and appends the ledger
-- entries (append_ledger, first: it is the one step here that may refuse).
local function save(st, events, at_ms)
  local prefix = st.prefix
  append_ledger(prefix, events, at_ms)
  redis.call('HSET', prefix .. 'meta', 'org', st.org, 'mode', st.mode, 'primary', st.primary,
    'purchased', fmt(st.purchased), 'used_deleted', fmt(st.used_deleted),
    'version', fmt(st.version))
  local set_bal, set_used, gone = {}, {}, {}
  for name in pairs(st.dirty_ws) do
    local w = st.ws[name]
    if w then
      set_bal[#set_bal + 1] = name; set_bal[#set_bal + 1] = fmt(w.balance)
      set_used[#set_used + 1] = name; set_used[#set_used + 1] = fmt(w.used)
    else
      gone[#gone + 1] = name
    end
  end
  call_chunked('HSET', prefix .. 'bal', set_bal)
  call_chunked('HSET', prefix .. 'used', set_used)
  for i = 1, #gone, CHUNK do
    local part = {}
    for j = i, math.min(i + CHUNK - 1, #gone) do
      part[#part + 1] = gone[j]
    end
    redis.call('HDEL', prefix .. 'bal', unpack(part))
    redis.call('HDEL', prefix .. 'used', unpack(part))
  end
  for id in pairs(st.dirty_nodes) do
    write_node(prefix, id, st.nodes[id])
  end
end

-- Ledger events: the JSON members after seq and at_ms (LedgerEvent, tagged by "kind").
local function q(s)
  return '"' .. s .. '"'
end

local ev = {}
function ev.org_created(mode, primary)
  return '"kind":"org_created","mode":' .. q(mode) .. ',"primary":' .. q(primary)
end
function ev.purchase(ws, n)
  return '"kind":"purchase","workspace":' .. q(ws) .. ',"amount":' .. fmt(n)
end
function ev.transfer(from, to, n)
  return '"kind":"transfer","from":' .. q(from) .. ',"to":' .. q(to) .. ',"amount":' .. fmt(n)
end
function ev.workspace_created(ws)
  return '"kind":"workspace_created","workspace":' .. q(ws)
end
function ev.workspace_deleted(ws, n)
  return '"kind":"workspace_deleted","workspace":' .. q(ws) .. ',"returned_to_primary":' .. fmt(n)
end
function ev.mode_changed(from, to)
  return '"kind":"mode_changed","from":' .. q(from) .. ',"to":' .. q(to)
end
function ev.sweep(ws, to, n)
  return '"kind":"sweep","workspace":' .. q(ws) .. ',"to":' .. q(to) .. ',"amount":' .. fmt(n)
end
function ev.usage(node, ws, n)
  return '"kind":"usage","node":' .. q(node) .. ',"workspace":' .. q(ws) .. ',"amount":' .. fmt(n)
end
function ev.usage_unbacked(node, ws, n)
  return '"kind":"usage_unbacked","node":' .. q(node) .. ',"workspace":' .. q(ws) .. ',"amount":'
    .. fmt(n)
end
function ev.lease_expired(node, ws, n)
  return '"kind":"lease_expired","node":' .. q(node) .. ',"workspace":' .. q(ws) .. ',"amount":'
    .. fmt(n)
end

-- The rules that several scripts share, as in src/model/org.rs.

-- The workspace whose balance `ws` spends from under the current mode, or nil.
local function spender_of(st, ws)
  if st.ws[ws] == nil then
    return nil
  end
  if st.mode == 'shared' then
    return st.primary
  end
  return ws
end

-- Where credits given back for `spender` go now.
local function home_of(st, spender)
  return spender_of(st, spender) or st.primary
end

-- Credits of `ws` in one kind of node holding (`leases` or `held`), summed over all nodes.
local function on_nodes(st, kind, ws)
  local total = 0
  for _, share in pairs(st.nodes) do
    total = total + (share[kind][ws] or 0)
  end
  return total
end

-- Credits of `ws` leased to all nodes (OrgRecord::leased).
local function leased(st, ws)
  return on_nodes(st, 'leases', ws)
end

-- Credits of `ws` held by open reservations on all nodes (OrgRecord::held).
local function held(st, ws)
  return on_nodes(st, 'held', ws)
end


-- Credits leased to all nodes, by workspace: one pass over every lease.
local function leased_by_ws(st)
  local total = {}
  for _, share in pairs(st.nodes) do
    for ws, n in pairs(share.leases) do
      total[ws] = (total[ws] or 0) + n
    end
  end
  return total
end

-- Counts `n` as consumed by `ws` (by deleted workspaces if it is gone).
local function add_used(st, ws, n)
  local w = st.ws[ws]
  if w then
    w.used = w.used + n
    st.dirty_ws[ws] = true
  else
    st.used_deleted = st.used_deleted + n
  end
  st.changed = true
end

local function is_empty(share)
  for _, n in pairs(share.leases) do
    if n ~= 0 then return false end
  end
  for _, n in pairs(share.held) do
    if n ~= 0 then return false end
  end
  for _, n in pairs(share.held_from) do
    if n ~= 0 then return false end
  end
  return true
end

-- OrgRecord::close_node with PriorLife::CountAsConsumed: what the node held (reservations,
-- then leases, each in byte order) counts as consumed, marked lease_expired.
local function close_node(st, id, events)
  local share = st.nodes[id]
  if share == nil then
    return
  end
  for _, ws in ipairs(sorted_keys(share.held)) do
    local n = share.held[ws]
    add_used(st, ws, n)
    events[#events + 1] = ev.lease_expired(id, ws, n)
  end
  for _, ws in ipairs(sorted_keys(share.leases)) do
    local n = share.leases[ws]
    if n > 0 then
      add_used(st, ws, n)
      events[#events + 1] = ev.lease_expired(id, ws, n)
    end
  end
  share.leases = {}
  share.held = {}
  share.held_from = {}
  st.dirty_nodes[id] = true
  st.changed = true
end

-- Runs main() and turns a refusal into its reply; any other error is raised again.
local function run(main)
  local ok, result = pcall(main)
  if ok then
    return result
  end
  if type(result) == 'table' and result.creditd then
    return result.creditd
  end
  error(result)
end
