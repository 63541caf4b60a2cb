//! Settles: a node's batch of usage, leases given back and leases wanted, applied exactly
//! once; and the end of a node's life (a restart, a stop, an expiry).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{NodeId, WorkspaceId};
use super::org::{add, sub};
use super::{LedgerEvent, NodeShare, OrgRecord, RuleError, CREDITS_MAX};

/// What one node reports for one workspace since its last batch. All fields are increments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageLine {
    pub workspace: WorkspaceId,
    /// The spender whose lease paid: the workspace itself in budget mode, the Primary in shared.
    pub spender: WorkspaceId,
    /// Debited straight from the lease.
    pub consumed: u64,
    /// Moved from the lease into reservations.
    pub reserved: u64,
    /// Charged from reservations.
    pub committed: u64,
    /// Given back from reservations into the lease.
    pub released: u64,
}

/// One node's settle call for one org: usage, lease given back, lease wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleBatch {
    pub node: NodeId,
    pub epoch: u64,
    pub seq: u64,
    /// The org version the node's view (its accounts and leases) was built from. The store
    /// grants leases only to a batch of the current version: a node that has not applied a
    /// change yet is granted nothing and learns the new version from the reply.
    pub version: u64,
    pub lines: Vec<UsageLine>,
    /// Unspent lease given back, by spender.
    pub release: Vec<(WorkspaceId, u64)>,
    /// Lease wanted, by spender; the store grants what it can.
    pub want: Vec<(WorkspaceId, u64)>,
    /// The first batch of the node's life in this org. A store with no record of the node
    /// grants the wants of such a batch only. Any other means the store forgot the life here
    /// (its record removed after `node_forget_after`, or writes lost in a failover): it is
    /// applied as a new node's without its wants (its usage is recorded as `usage_unbacked`,
    /// since the store holds nothing of the node), and answered `expired` with `prev_seq` 0, so
    /// that the node forfeits what its memory holds of the org and goes on.
    #[serde(default)]
    pub first: bool,
}

impl SettleBatch {
    /// True when the batch changes nothing but the heartbeat.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.release.is_empty() && self.want.is_empty()
    }
}

/// The store's answer to a settle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleReply {
    /// False when the batch had been applied before (a retry): nothing changed this time.
    pub applied: bool,
    /// Lease granted, by spender (for a retry: the grants of the first application).
    pub grants: Vec<(WorkspaceId, u64)>,
    /// The org's version after the batch.
    pub version: u64,
    /// True when an expiry closed the node's holdings since its previous batch: they were
    /// counted as consumed, and the node must forfeit what it still holds in memory.
    pub expired: bool,
    /// Usage in the batch that nothing the node holds in the store backed (recorded as
    /// `usage_unbacked`, not charged again); 0 for a retry.
    pub unbacked: u64,
    /// The sequence number the store had for the node's life before this batch (0 for a new
    /// life). Lower than what the node knows was acknowledged: the store forgot writes.
    pub prev_seq: u64,
}

/// What a settle answers of the org besides its [`SettleReply`]: the settling node as the
/// store now has it, and each spender the batch names (in its lines, releases or wants) with
/// what the store has left of it and what other nodes lease of it. Only what the batch
/// touched: the answer, like the store's work, does not grow with the org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleView {
    /// The settling node's life and last applied seq, as the store has them.
    pub epoch: u64,
    pub seq: u64,
    /// The settling node's heartbeat: the store's clock at its last applied batch.
    pub seen_ms: u64,
    /// The spenders the batch names, in byte order.
    pub spenders: Vec<SpenderView>,
}

/// One spender in a [`SettleView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpenderView {
    pub spender: WorkspaceId,
    /// Its unleased balance if it spends for itself under the current mode; 0 if it does not
    /// (it was deleted, or it spends from the Primary now).
    pub left: u64,
    /// Other nodes that lease it, in id order: (node, its heartbeat, credits leased).
    pub others: Vec<(NodeId, u64, u64)>,
}

/// What a store keeps of a node life whose record it forgot ([`OrgRecord::forget_nodes`]):
/// a batch of that life at or below `seq` was applied already, and a re-sent one is answered
/// without being applied again. Kept `node_forget_after` after `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub epoch: u64,
    pub seq: u64,
    /// Store time of the forgetting.
    pub at_ms: u64,
}

/// What happens to what a node held when its life ends without a clean stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorLife {
    /// Give it back to the balances: right when the node was the only spender (embedded store),
    /// since nobody else could have spent it. Its unsettled usage is lost (under-charged).
    ReturnToBalance,
    /// Count it as consumed (`lease_expired`): right in a cluster, where the node may have
    /// spent it and nobody may spend it twice.
    CountAsConsumed,
}

impl OrgRecord {
    /// Applies one node's settle batch: usage, lease given back, lease granted. A batch already
    /// applied (same node, epoch and sequence number or lower) changes nothing and is answered
    /// with its first grants; a batch from an older epoch is refused. A batch from a newer epoch
    /// first closes the node's previous life as `prior_life` says.
    pub fn settle(
        &mut self,
        batch: &SettleBatch,
        now_ms: u64,
        prior_life: PriorLife,
    ) -> Result<(SettleReply, Vec<LedgerEvent>), RuleError> {
        if let Some(reply) = self.replay(batch)? {
            return Ok((reply, Vec::new()));
        }
        let mut events = Vec::new();
        let forgotten = !batch.first && !self.nodes.contains_key(&batch.node);
        let mut next = self.clone();
        let prev_seq = next
            .nodes
            .get(&batch.node)
            .filter(|s| s.epoch == batch.epoch)
            .map_or(0, |s| s.seq);
        let is_new_life = next
            .nodes
            .get(&batch.node)
            .is_some_and(|s| s.epoch < batch.epoch);
        if is_new_life {
            events.extend(next.close_node(&batch.node, prior_life)?);
        }
        let mut share = next.nodes.remove(&batch.node).unwrap_or_default();
        // A new life starts with nothing in memory: nothing to forfeit.
        // A forgotten life is told so as an expiry: whatever the node holds in memory of the
        // org, the store holds nothing of (its leases expired before it was forgotten, or
        // their grants were lost), so it is forfeited.
        let expired = (share.expired && !is_new_life) || forgotten;
        share.expired = false;
        share.epoch = batch.epoch;
        share.seq = batch.seq;
        share.seen_ms = now_ms;

        let unbacked = next.settle_lines(&mut share, batch, &mut events)?;
        next.settle_releases(&mut share, &batch.release)?;
        // A batch built on an older (or forgotten) version of the org is granted nothing: its
        // node may still map workspaces to spenders as they were before the change.
        let grants = if batch.version == next.version && !forgotten {
            next.grant(&mut share, &batch.want)?
        } else {
            Vec::new()
        };
        share.drop_zeros();
        share.last_grants = grants.clone();
        share.last_expired = expired;
        share.last_prev_seq = prev_seq;
        next.nodes.insert(batch.node.clone(), share);
        debug_assert!(next.is_conserved(), "settle broke conservation: {next:?}");
        *self = next;
        Ok((
            SettleReply {
                applied: true,
                grants,
                version: self.version,
                expired,
                unbacked,
                prev_seq,
            },
            events,
        ))
    }

    /// What a settle of `batch` answers of this record (after the batch and any expiry):
    /// see [`SettleView`]. The work is O(spenders named × nodes), whatever the org's size.
    pub fn settle_view(&self, batch: &SettleBatch) -> SettleView {
        let mut named: Vec<&WorkspaceId> = batch
            .lines
            .iter()
            .map(|l| &l.spender)
            .chain(batch.release.iter().map(|(s, _)| s))
            .chain(batch.want.iter().map(|(s, _)| s))
            .collect();
        named.sort_unstable();
        named.dedup();
        let own = self.nodes.get(&batch.node);
        let spenders = named
            .into_iter()
            .map(|spender| SpenderView {
                spender: spender.clone(),
                left: match self.spender_of(spender) {
                    Some(s) if s == spender => {
                        self.workspaces.get(spender).map_or(0, |w| w.balance)
                    }
                    _ => 0,
                },
                others: self
                    .nodes
                    .iter()
                    .filter(|(id, _)| **id != batch.node)
                    .filter_map(|(id, n)| {
                        let leased = n.leases.get(spender).copied().unwrap_or(0);
                        (leased > 0).then(|| (id.clone(), n.seen_ms, leased))
                    })
                    .collect(),
            })
            .collect();
        SettleView {
            epoch: own.map_or(0, |n| n.epoch),
            seq: own.map_or(0, |n| n.seq),
            seen_ms: own.map_or(0, |n| n.seen_ms),
            spenders,
        }
    }

    /// A batch from a node the org has no record of, against what the store kept of a life it
    /// forgot: a batch of an older epoch is refused, one at or below the forgotten seq was
    /// applied before and is answered (nothing granted, `expired`, `prev_seq` 0: the node
    /// forfeits what it holds of the org) without being applied again. `None`: settle it.
    pub fn replay_forgotten(
        &self,
        batch: &SettleBatch,
        tombstone: Option<&Tombstone>,
    ) -> Option<Result<SettleReply, RuleError>> {
        let t = tombstone?;
        if self.nodes.contains_key(&batch.node) {
            return None;
        }
        if batch.epoch < t.epoch {
            return Some(Err(RuleError::StaleEpoch {
                batch: batch.epoch,
                current: t.epoch,
            }));
        }
        (batch.epoch == t.epoch && batch.seq <= t.seq).then(|| {
            Ok(SettleReply {
                applied: false,
                grants: Vec::new(),
                version: self.version,
                expired: true,
                unbacked: 0,
                prev_seq: 0,
            })
        })
    }

    /// Exactly once: a batch at or below the node's last seq of the same epoch changes nothing
    /// and is answered again (the grants and flags of that seq; none for a lower seq); a batch
    /// of an older epoch is refused. `None` for a batch to apply.
    fn replay(&self, batch: &SettleBatch) -> Result<Option<SettleReply>, RuleError> {
        let Some(share) = self.nodes.get(&batch.node) else {
            return Ok(None);
        };
        if batch.epoch < share.epoch {
            return Err(RuleError::StaleEpoch {
                batch: batch.epoch,
                current: share.epoch,
            });
        }
        if batch.epoch != share.epoch || batch.seq > share.seq {
            return Ok(None);
        }
        let last = batch.seq == share.seq;
        Ok(Some(SettleReply {
            applied: false,
            grants: if last {
                share.last_grants.clone()
            } else {
                Vec::new()
            },
            version: self.version,
            expired: last && share.last_expired,
            unbacked: 0,
            prev_seq: if last { share.last_prev_seq } else { share.seq },
        }))
    }

    /// The usage lines of a batch; returns the usage nothing in the store backed.
    ///
    /// Lines are increments over one interval and several lines may share a spender (every
    /// workspace spends the Primary's lease in shared mode): one workspace may have spent what
    /// another's reservation gave back. So every line's credits apply before any line's
    /// debits, and only the net result per lease and per reservation must not go negative.
    /// When it would (the node's lease expired while it lived, or the store forgot a grant),
    /// the lines are applied flow by flow instead, each capped at what the node holds in the
    /// store: what no lease or reservation backs is recorded as `usage_unbacked` and not
    /// charged (it was paid for when the lease expired), and nothing is created.
    fn settle_lines(
        &mut self,
        share: &mut NodeShare,
        batch: &SettleBatch,
        events: &mut Vec<LedgerEvent>,
    ) -> Result<u64, RuleError> {
        let (mut exact_record, mut exact_share, mut exact_events) =
            (self.clone(), share.clone(), Vec::new());
        match exact_record.lines_exact(&mut exact_share, batch, &mut exact_events) {
            Ok(()) => {
                *self = exact_record;
                *share = exact_share;
                events.extend(exact_events);
                Ok(0)
            }
            Err(RuleError::BatchRefused(_)) => self.lines_capped(share, batch, events),
            Err(e) => Err(e),
        }
    }

    /// Every line's credits, then every line's debits; refused if a net result goes negative,
    /// or if the credits or the debits of one lease or reservation add up beyond
    /// [`CREDITS_MAX`] (no real batch does; the Redis scripts compute with doubles, exact only
    /// below it). A refusal here sends the batch to [`Self::lines_capped`].
    fn lines_exact(
        &mut self,
        share: &mut NodeShare,
        batch: &SettleBatch,
        events: &mut Vec<LedgerEvent>,
    ) -> Result<(), RuleError> {
        let mut sums: BTreeMap<(u8, &WorkspaceId), (u128, u128)> = BTreeMap::new();
        for line in &batch.lines {
            // A line whose amounts do not even add up in a u64 is refused outright.
            add(line.consumed, line.reserved)?;
            add(line.committed, line.released)?;
            add(line.consumed, line.committed)?;
        }
        for line in &batch.lines {
            let (c, d) = sums.entry((0, &line.spender)).or_default();
            *c += line.released as u128;
            *d += line.consumed as u128 + line.reserved as u128;
            let (c, d) = sums.entry((1, &line.workspace)).or_default();
            *c += line.reserved as u128;
            *d += line.committed as u128 + line.released as u128;
            let (c, d) = sums.entry((2, &line.spender)).or_default();
            *c += line.reserved as u128;
            *d += line.committed as u128 + line.released as u128;
        }
        if sums
            .values()
            .any(|&(c, d)| c > CREDITS_MAX as u128 || d > CREDITS_MAX as u128)
        {
            return Err(RuleError::BatchRefused("a batch sum above 2^53-1".into()));
        }
        for line in &batch.lines {
            let lease = share.leases.entry(line.spender.clone()).or_default();
            *lease = add(*lease, line.released)?;
            let held = share.held.entry(line.workspace.clone()).or_default();
            *held = add(*held, line.reserved)?;
            let from = share.held_from.entry(line.spender.clone()).or_default();
            *from = add(*from, line.reserved)?;
        }
        for line in &batch.lines {
            let lease = share.leases.entry(line.spender.clone()).or_default();
            *lease = sub(*lease, add(line.consumed, line.reserved)?, "lease")?;
            let held = share.held.entry(line.workspace.clone()).or_default();
            *held = sub(*held, add(line.committed, line.released)?, "held")?;
            let from = share.held_from.entry(line.spender.clone()).or_default();
            *from = sub(*from, add(line.committed, line.released)?, "held")?;
            let used = add(line.consumed, line.committed)?;
            if used > 0 {
                self.add_used(&line.workspace, used)?;
                events.push(LedgerEvent::Usage {
                    node: batch.node.clone(),
                    workspace: line.workspace.clone(),
                    amount: used,
                });
            }
        }
        Ok(())
    }

    /// The lines flow by flow, each capped at what the node holds: reservations made (lease
    /// to held), then reservations ended (held to lease, held to used), then debits (lease to
    /// used), each pass in line order. Returns the usage that was not backed.
    fn lines_capped(
        &mut self,
        share: &mut NodeShare,
        batch: &SettleBatch,
        events: &mut Vec<LedgerEvent>,
    ) -> Result<u64, RuleError> {
        fn take(map: &mut BTreeMap<WorkspaceId, u64>, key: &WorkspaceId, wanted: u64) -> u64 {
            let have = map.entry(key.clone()).or_default();
            let taken = wanted.min(*have);
            *have -= taken;
            taken
        }
        fn put(
            map: &mut BTreeMap<WorkspaceId, u64>,
            key: &WorkspaceId,
            n: u64,
        ) -> Result<(), RuleError> {
            let have = map.entry(key.clone()).or_default();
            *have = add(*have, n)?;
            Ok(())
        }
        // Ends up to `wanted` of a reservation: held by workspace and by spender alike.
        fn take_held(share: &mut NodeShare, line: &UsageLine, wanted: u64) -> u64 {
            let held = share.held.get(&line.workspace).copied().unwrap_or(0);
            let from = share.held_from.get(&line.spender).copied().unwrap_or(0);
            let taken = wanted.min(held.min(from));
            take(&mut share.held, &line.workspace, taken);
            take(&mut share.held_from, &line.spender, taken);
            taken
        }
        let mut backed = vec![0u64; batch.lines.len()];
        for line in &batch.lines {
            let n = take(&mut share.leases, &line.spender, line.reserved);
            put(&mut share.held, &line.workspace, n)?;
            put(&mut share.held_from, &line.spender, n)?;
        }
        for (i, line) in batch.lines.iter().enumerate() {
            let released = take_held(share, line, line.released);
            put(&mut share.leases, &line.spender, released)?;
            backed[i] = take_held(share, line, line.committed);
        }
        for (i, line) in batch.lines.iter().enumerate() {
            backed[i] += take(&mut share.leases, &line.spender, line.consumed);
        }
        let mut unbacked_total = 0u64;
        for (line, backed) in batch.lines.iter().zip(backed) {
            let used = add(line.consumed, line.committed)?;
            if backed > 0 {
                self.add_used(&line.workspace, backed)?;
                events.push(LedgerEvent::Usage {
                    node: batch.node.clone(),
                    workspace: line.workspace.clone(),
                    amount: backed,
                });
            }
            let unbacked = used - backed;
            if unbacked > 0 {
                unbacked_total = add(unbacked_total, unbacked)?;
                events.push(LedgerEvent::UsageUnbacked {
                    node: batch.node.clone(),
                    workspace: line.workspace.clone(),
                    amount: unbacked,
                });
            }
        }
        Ok(unbacked_total)
    }

    /// Counts `n` as consumed by `ws` (by deleted workspaces if it is gone).
    fn add_used(&mut self, ws: &WorkspaceId, n: u64) -> Result<(), RuleError> {
        match self.workspaces.get_mut(ws) {
            Some(w) => w.used = add(w.used, n)?,
            None => self.used_deleted = add(self.used_deleted, n)?,
        }
        Ok(())
    }

    /// Leases given back: each capped at what the store records the node holding (a node
    /// cannot give back credits the store never leased to it); they go to the spender's
    /// balance, or to the Primary if the spender no longer spends for itself.
    fn settle_releases(
        &mut self,
        share: &mut NodeShare,
        release: &[(WorkspaceId, u64)],
    ) -> Result<(), RuleError> {
        for (spender, amount) in release {
            let lease = share.leases.entry(spender.clone()).or_default();
            let back = (*amount).min(*lease);
            *lease -= back;
            let home = self.home_of(spender);
            let w = self.ws_mut(&home)?;
            w.balance = add(w.balance, back)?;
        }
        Ok(())
    }

    /// Leases granted, up to each spender's unleased balance, only for a spender that is one
    /// under the current mode: a node asking for a workspace that now spends from the Primary
    /// gets nothing and learns the change from `version`.
    fn grant(
        &mut self,
        share: &mut NodeShare,
        want: &[(WorkspaceId, u64)],
    ) -> Result<Vec<(WorkspaceId, u64)>, RuleError> {
        let mut grants = Vec::new();
        for (spender, wanted) in want {
            if self.spender_of(spender) != Some(spender) {
                continue;
            }
            let w = self.ws_mut(spender)?;
            let granted = (*wanted).min(w.balance);
            if granted == 0 {
                continue;
            }
            w.balance -= granted;
            let lease = share.leases.entry(spender.clone()).or_default();
            *lease = add(*lease, granted)?;
            grants.push((spender.clone(), granted));
        }
        Ok(grants)
    }

    /// Ends a node's holdings: its leases and reservations go back to balances or count as
    /// consumed, as `prior_life` says. Used for a node that restarted or stopped heartbeating.
    pub fn close_node(
        &mut self,
        node: &NodeId,
        prior_life: PriorLife,
    ) -> Result<Vec<LedgerEvent>, RuleError> {
        let Some(share) = self.nodes.get(node).cloned() else {
            return Ok(Vec::new());
        };
        let mut next = self.clone();
        let mut events = Vec::new();
        // Reservations were taken from their spender's lease: given back, they go where the
        // lease goes. Counted as consumed, they are the workspace's usage.
        let mut returns: BTreeMap<WorkspaceId, u64> = share.leases.clone();
        if prior_life == PriorLife::ReturnToBalance {
            for (spender, held) in &share.held_from {
                let r = returns.entry(spender.clone()).or_default();
                *r = add(*r, *held)?;
            }
        }
        if prior_life == PriorLife::CountAsConsumed {
            for (ws, held) in &share.held {
                next.add_used(ws, *held)?;
                events.push(LedgerEvent::LeaseExpired {
                    node: node.clone(),
                    workspace: ws.clone(),
                    amount: *held,
                });
            }
        }
        for (spender, amount) in returns.into_iter().filter(|(_, a)| *a > 0) {
            match prior_life {
                PriorLife::ReturnToBalance => {
                    let home = next.home_of(&spender);
                    let w = next.ws_mut(&home)?;
                    w.balance = add(w.balance, amount)?;
                    events.push(LedgerEvent::LeaseReturned {
                        node: node.clone(),
                        workspace: spender,
                        amount,
                    });
                }
                PriorLife::CountAsConsumed => {
                    next.add_used(&spender, amount)?;
                    events.push(LedgerEvent::LeaseExpired {
                        node: node.clone(),
                        workspace: spender,
                        amount,
                    });
                }
            }
        }
        if let Some(s) = next.nodes.get_mut(node) {
            s.leases.clear();
            s.held.clear();
            s.held_from.clear();
        }
        debug_assert!(
            next.is_conserved(),
            "close_node broke conservation: {next:?}"
        );
        *self = next;
        Ok(events)
    }

    /// A copy in which every node's leases are back in the balances they came from (held
    /// reservations stay held): what a recall would leave, for previews.
    pub fn with_leases_returned(&self) -> Result<OrgRecord, RuleError> {
        let mut copy = self.clone();
        for share in copy.nodes.values_mut() {
            for (spender, amount) in std::mem::take(&mut share.leases) {
                let home = self.home_of(&spender);
                let w = copy
                    .workspaces
                    .get_mut(&home)
                    .ok_or(RuleError::UnknownWorkspace(home))?;
                w.balance = add(w.balance, amount)?;
            }
        }
        debug_assert!(copy.is_conserved());
        Ok(copy)
    }

    /// Closes every node but `except` whose last settle is older than `lease_ttl_ms` and that
    /// still holds something: what it held counts as consumed (`lease_expired`), since it may
    /// have spent it and nobody may spend it twice. Nodes are closed in id order. The Redis store
    /// runs this after every applied settle (`except` is the settling node); the embedded store
    /// never does, since its one node cannot be silent while it settles.
    pub fn expire_nodes(
        &mut self,
        now_ms: u64,
        lease_ttl_ms: u64,
        except: &NodeId,
    ) -> Result<Vec<LedgerEvent>, RuleError> {
        let mut next = self.clone();
        let mut events = Vec::new();
        for node in self.expired_nodes(now_ms, lease_ttl_ms) {
            if node != *except {
                events.extend(next.close_node(&node, PriorLife::CountAsConsumed)?);
                if let Some(share) = next.nodes.get_mut(&node) {
                    share.expired = true;
                }
            }
        }
        *self = next;
        Ok(events)
    }

    /// Forgets every node but `except` that holds nothing and whose last settle is older than
    /// `forget_after_ms` (`node_forget_after`): nodes come and go under new names, and every
    /// settle reads the org's node records. A later batch of a forgotten life is granted
    /// nothing (see [`SettleBatch::first`]); a re-sent one is answered from the node's
    /// [`Tombstone`], which the store keeps ([`Self::replay_forgotten`]). Returns the nodes
    /// forgotten, with their tombstones.
    /// The Redis store runs this after every applied settle, after `expire_nodes`.
    pub fn forget_nodes(
        &mut self,
        now_ms: u64,
        forget_after_ms: u64,
        except: &NodeId,
    ) -> Vec<(NodeId, Tombstone)> {
        let gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, s)| {
                *id != except && s.is_empty() && now_ms.saturating_sub(s.seen_ms) > forget_after_ms
            })
            .map(|(id, _)| id.clone())
            .collect();
        gone.into_iter()
            .filter_map(|id| {
                let share = self.nodes.remove(&id)?;
                let t = Tombstone {
                    epoch: share.epoch,
                    seq: share.seq,
                    at_ms: now_ms,
                };
                Some((id, t))
            })
            .collect()
    }

    /// Nodes whose last settle is older than `lease_ttl_ms` and that still hold something.
    pub fn expired_nodes(&self, now_ms: u64, lease_ttl_ms: u64) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, s)| !s.is_empty() && now_ms.saturating_sub(s.seen_ms) > lease_ttl_ms)
            .map(|(n, _)| n.clone())
            .collect()
    }
}
