-- ledger.lua: reads a page of an org's ledger (read only).
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:ledger
-- ARGV: 1 org, 2 cursor (entries with a larger seq are read), 3 count (entries read at most;
--       the caller asks for one entry more than its page to learn whether more remain)
-- Reply: {'ok', trimmed, entry...} (the meta's `ledger_trimmed`, then JSON entries oldest
--        first), or {'none'} when the org does not exist.
-- Invariant: entry i of the list (1-based) is the ledger entry with seq ledger_trimmed + i
--   (append_ledger in common.lua); a cursor inside the trimmed part reads on from the first
--   kept entry. Entries are appended and trimmed from the head only, so a kept entry never
--   changes.
return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'ledger' })
  local after = arg_number(2, 'cursor')
  local count = arg_number(3, 'count')
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return { 'none' }
  end
  local trimmed = counter(redis.call('HGET', KEYS[1], 'ledger_trimmed') or '0', 'ledger_trimmed')
  local reply = { 'ok', fmt(trimmed) }
  if count == 0 then
    return reply
  end
  local first = math.max(after, trimmed) - trimmed
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], fmt(first), fmt(first + count - 1))) do
    reply[#reply + 1] = e
  end
  return reply
end)
