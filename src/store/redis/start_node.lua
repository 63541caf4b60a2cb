-- start_node.lua: a new life of a node, and its epoch.
--
-- KEYS: 1 creditd:node:<node>:epoch (outside every org's slot)
-- ARGV: none
-- Reply: {'ok', epoch}
-- Invariant: the epoch is above every epoch the counter gave before and at least the server's
--   time in ms (OrgRecord lives are ordered by it). If the counter is lost (a failover, a
--   restart from older data), a new life still takes an epoch no earlier life of the node had,
--   so its batches are never taken for an old life's and answered with its grants; only a
--   server clock set back further than the lost increments could repeat one.
return run(function()
  local epoch = redis.call('INCR', KEYS[1])
  local now = now_ms()
  if epoch < now then
    epoch = now
    redis.call('SET', KEYS[1], fmt(epoch))
  end
  return { 'ok', fmt(epoch) }
end)
