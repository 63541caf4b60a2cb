-- start_node.lua: a new life of a node, and its epoch.
--
-- KEYS: 1 creditd:node:<node>:epoch (outside every org's slot)
-- ARGV: 1 node_forget_after_ms (the counter's own time to live: see below)
-- Reply: {'ok', epoch}
-- Invariant: the epoch is above every epoch the counter gave before and at least the server's
--   time in ms (OrgRecord lives are ordered by it). If the counter is lost (a failover, a
--   restart from older data), a new life still takes an epoch no earlier life of the node had,
--   so its batches are never taken for an old life's and answered with its grants; only a
--   server clock set back further than the lost increments could repeat one. For the same
--   reason the counter may go: it lives node_forget_after after the last start, so the keys
--   of nodes that are gone (pods renamed) do not stay for ever.
-- Refused: ARGV[1] not a whole number (`invalid`).
return run(function()
  local forget_ms = arg_number(1, 'node_forget_after_ms')
  local epoch = redis.call('INCR', KEYS[1])
  local now = now_ms()
  if epoch < now then
    epoch = now
    redis.call('SET', KEYS[1], fmt(epoch))
  end
  redis.call('PEXPIRE', KEYS[1], fmt(forget_ms))
  return { 'ok', fmt(epoch) }
end)
