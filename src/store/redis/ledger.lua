-- ledger.lua: reads a page of an org's ledger (read only).
--
-- KEYS: 1 creditd:{org}:meta, 2 creditd:{org}:ledger
-- ARGV: 1 org, 2 first index (0-based: entries after seq N start at index N),
--       3 last index (inclusive; the caller asks for one entry more than its page to learn
--       whether more remain)
-- Reply: {'ok', entry...} (JSON entries, oldest first), or {'none'} when the org does not
--        exist.
-- Invariant: entry i of the list (1-based) is the ledger entry with seq i; entries are only
--   ever appended, so a page never changes once written.
return run(function()
  local org = arg_id(1, 'org')
  local prefix = prefix_of(org)
  check_keys(prefix, { 'meta', 'ledger' })
  local first = arg_number(2, 'first index')
  local last = arg_number(3, 'last index')
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return { 'none' }
  end
  local reply = { 'ok' }
  if last < first then
    return reply
  end
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], fmt(first), fmt(last))) do
    reply[#reply + 1] = e
  end
  return reply
end)
