//! The settler: collects what each account did since the last batch, reports it to the store
//! (one batch per org, many orgs per store call), and applies the leases the store grants.
//!
//! A batch is kept in the org's settle stream until the store acknowledges it, and re-sent
//! unchanged (same node, epoch and sequence number) before anything new: the store applies each
//! batch exactly once, so a timeout never loses or doubles usage.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Node, NodeError, OrgSlot, OrgState, SettleStream};
use crate::cache::{clock_ms, STORE_LEFT_UNKNOWN};
use crate::metrics as m;
use crate::model::{OrgId, SettleBatch, SettleReply, SettleView, UsageLine, WorkspaceId};

/// What a settle asks of the store besides reporting usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wants {
    /// Usage only.
    None,
    /// Top up every spender the store may still have credits for.
    All,
    /// Give every lease back (before a control-plane change, or at stop).
    Recall,
    /// Lease for one spender, at least this much if the store has it.
    One(WorkspaceId, u64),
    /// Nothing, but name this spender (a want of 0), so that the answer says what the store
    /// and the other nodes have of it.
    Refresh(WorkspaceId),
}

impl Node {
    /// Settles `slots`, asking for `wants`; returns the first failure, after trying them all.
    pub(crate) async fn settle_slots(
        &self,
        slots: &[Arc<OrgSlot>],
        wants: Wants,
    ) -> Result<(), NodeError> {
        let mut streams = Vec::with_capacity(slots.len());
        for slot in slots {
            streams.push(slot.settle.lock().await);
        }
        self.settle_locked(
            slots,
            &mut streams.iter_mut().map(|g| &mut **g).collect::<Vec<_>>(),
            &wants,
        )
        .await
    }

    /// One settle round over orgs whose streams the caller holds.
    pub(super) async fn settle_locked(
        &self,
        slots: &[Arc<OrgSlot>],
        streams: &mut [&mut SettleStream],
        wants: &Wants,
    ) -> Result<(), NodeError> {
        let mut first_error = None;
        // Batches the store has not acknowledged go first, unchanged; an org whose batch is
        // still unacknowledged after that sends nothing new this round.
        let pending: Vec<(usize, SettleBatch)> = (0..slots.len())
            .filter_map(|i| streams[i].pending.clone().map(|b| (i, b)))
            .collect();
        let mut blocked = vec![false; slots.len()];
        for (i, e) in self.send_and_apply(slots, streams, pending).await {
            blocked[i] = true;
            first_error.get_or_insert(e);
        }
        let mut fresh = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            if blocked[i] {
                continue;
            }
            if let Some(batch) = self.build_batch(slot, streams[i], wants) {
                set_pending(slot, streams[i], Some(batch.clone()));
                fresh.push((i, batch));
            }
        }
        for (_, e) in self.send_and_apply(slots, streams, fresh).await {
            first_error.get_or_insert(e);
        }
        for slot in slots {
            drop_drained_retired(slot);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends `batches` (each with its slot's index) in one store call and takes in each
    /// answer; returns the failures.
    async fn send_and_apply(
        &self,
        slots: &[Arc<OrgSlot>],
        streams: &mut [&mut SettleStream],
        batches: Vec<(usize, SettleBatch)>,
    ) -> Vec<(usize, NodeError)> {
        if batches.is_empty() {
            return Vec::new();
        }
        let (indices, calls): (Vec<usize>, Vec<(OrgId, SettleBatch)>) = batches
            .into_iter()
            .map(|(i, b)| (i, (slots[i].org.clone(), b)))
            .unzip();
        let sent_ms = clock_ms();
        let mut failed = Vec::new();
        for (i, result) in indices.into_iter().zip(self.send(&calls).await) {
            match result {
                Ok((reply, view)) => {
                    set_pending(&slots[i], streams[i], None);
                    self.apply_reply(&slots[i], streams[i], &reply, &view, sent_ms);
                }
                Err(e) => {
                    drop_if_refused(&slots[i], streams[i], &e);
                    failed.push((i, e));
                }
            }
        }
        failed
    }

    /// One store call for many batches, with its metrics.
    async fn send(
        &self,
        batches: &[(OrgId, SettleBatch)],
    ) -> Vec<Result<(SettleReply, SettleView), NodeError>> {
        let started = Instant::now();
        m::store_call("settle");
        let results = self.store.settle(batches).await;
        metrics::histogram!(m::SETTLE_DURATION).record(started.elapsed().as_secs_f64());
        results
            .into_iter()
            .map(|r| match r {
                Ok(ok) => {
                    metrics::counter!(m::SETTLE_BATCHES).increment(1);
                    Ok(ok)
                }
                Err(e) => {
                    metrics::counter!(m::SETTLE_ERRORS).increment(1);
                    tracing::warn!(error = %e, "settle failed; the batch is kept and will be re-sent");
                    Err(NodeError::from(e))
                }
            })
            .collect()
    }

    /// Collects usage from the current and retired states and adds lease requests or returns.
    /// `None` when there is nothing to send and no heartbeat is due.
    fn build_batch(
        &self,
        slot: &OrgSlot,
        stream: &mut SettleStream,
        wants: &Wants,
    ) -> Option<SettleBatch> {
        let state = slot.current();
        let retired: Vec<Arc<OrgState>> = slot.retired.lock().clone();
        let lines: Vec<UsageLine> = retired
            .iter()
            .chain(std::iter::once(&state))
            .flat_map(|s| s.accounts.iter().filter_map(|a| a.collect()))
            .collect();
        // One release per spender (the store bounds a batch's entries), in spender order.
        let mut release = Releases::new();
        // What reservations did not charge goes back to the store, not into the lease
        // (`Account::finish_reservation`): each line's release moves it from the reservation
        // to the lease, and this from the lease to the spender's balance.
        for line in &lines {
            add_release(&mut release, &line.spender, line.released);
        }
        // Retired leases give everything back: nothing spends from them any more.
        for lease in retired.iter().flat_map(|s| &s.leases) {
            add_release(&mut release, &lease.spender, lease.drain());
        }
        let want = self.wanted(&state, wants, slot.is_recalled(), &mut release);
        let now = Instant::now();
        let elapsed = now.duration_since(stream.last_batch);
        let first = !stream.sent_any;
        let heartbeat_due = elapsed >= self.options.heartbeat_interval || first;
        if lines.is_empty() && release.is_empty() && want.is_empty() && !heartbeat_due {
            return None;
        }
        observe_rates(&state, &lines, elapsed);
        stream.last_batch = now;
        stream.sent_any = true;
        Some(SettleBatch {
            node: self.node_id.clone(),
            epoch: self.epoch(),
            seq: self.next_seq(),
            version: state.version,
            lines,
            release: release.into_iter().collect(),
            want,
            first,
        })
    }

    /// Takes in the store's answer to a batch sent at `sent_ms` ([`clock_ms`]): what the store
    /// says of this node's holdings comes first (closed by an expiry, or forgotten), then the
    /// grants, the lease term, and what the store and the other nodes have left.
    fn apply_reply(
        &self,
        slot: &OrgSlot,
        stream: &mut SettleStream,
        reply: &SettleReply,
        view: &SettleView,
        sent_ms: u64,
    ) {
        if reply.unbacked > 0 {
            metrics::counter!(m::USAGE_UNBACKED).increment(reply.unbacked);
            tracing::warn!(org = %slot.org, credits = reply.unbacked, "usage reported that no lease of this node backed in the store (already counted as lease_expired): recorded as usage_unbacked, not charged again");
        }
        // The store has no record of this life in the org (forgotten after node_forget_after,
        // or lost): it answers the batch as a new node's, `expired` and with `prev_seq` 0. It
        // holds nothing of this node there, so there is nothing to close with a new life:
        // forfeiting what memory holds of the org (`expired`, below) is enough.
        let forgotten = reply.expired && reply.prev_seq == 0 && stream.acked_seq > 0;
        if reply.prev_seq < stream.acked_seq && !forgotten {
            // The store answered from before writes it had acknowledged: it forgot grants and
            // usage of this life. Spend nothing more of what it may not know, and start a new
            // life (the next round), whose first batches close what the store still records
            // of this one as consumed.
            metrics::counter!(m::STORE_REGRESSIONS).increment(1);
            tracing::error!(org = %slot.org, acknowledged = stream.acked_seq, store_has = reply.prev_seq, "the store forgot acknowledged writes (failover or restart from older data): this node starts a new life");
            self.forfeit(slot);
            self.life_lost.store(true, Ordering::Release);
            return;
        }
        stream.acked_seq = stream.acked_seq.max(reply.prev_seq);
        if view.epoch == self.epoch() {
            stream.acked_seq = stream.acked_seq.max(view.seq);
        }
        if reply.expired {
            // This node was silent past lease_ttl: another node closed its leases and
            // reservations of the org as consumed. What memory still holds of them is paid
            // for; spending it would spend it twice.
            tracing::warn!(org = %slot.org, "this node's leases expired while it was silent (paused or cut off): dropping them");
            self.forfeit(slot);
        }
        let state = slot.current();
        self.take_grants(slot, &state, &reply.grants);
        self.renew_term(&state, reply.version, reply.applied, sent_ms);
        self.note_store(&state, view);
        // Another version means the org changed (or the store forgot a change): rebuild. The
        // store's answer also outranks notices of versions it no longer has.
        slot.seen_version.store(reply.version, Ordering::Release);
        slot.notified_version
            .fetch_min(reply.version, Ordering::AcqRel);
    }

    /// Drops, without giving them back, every lease and reservation this node holds of the
    /// org: the store closed them (as consumed) or no longer knows them.
    pub(crate) fn forfeit(&self, slot: &OrgSlot) {
        let state = slot.current();
        let retired = slot.retired.lock().clone();
        let mut dropped = 0u64;
        for s in retired.iter().chain(std::iter::once(&state)) {
            for lease in &s.leases {
                lease.set_store_left(STORE_LEFT_UNKNOWN);
                dropped = dropped.saturating_add(lease.drain());
            }
        }
        let reservations = self.drop_reservations_of(&slot.org);
        metrics::counter!(m::LEASES_FORFEITED).increment(dropped);
        tracing::warn!(org = %slot.org, credits = dropped, reservations, "leases forfeited");
    }
}

/// A batch the store refused (rather than failed to answer) will never be accepted: keep it
/// and the org's settlement stops for good. It is dropped, loudly; its usage is lost to the
/// store (under-charged, never over-charged). Only a bug or a second process with this node's
/// id can cause it.
fn drop_if_refused(slot: &OrgSlot, stream: &mut SettleStream, e: &NodeError) {
    if matches!(e, NodeError::Unavailable(_)) {
        return;
    }
    if let Some(batch) = stream.pending.take() {
        slot.pending_usage.store(0, Ordering::Release);
        let usage: u64 = batch
            .lines
            .iter()
            .map(|l| l.consumed.saturating_add(l.committed))
            .sum();
        tracing::error!(org = %slot.org, seq = batch.seq, usage, error = %e, "settle batch refused by the store; dropped, its usage uncharged");
    }
}

/// Leases given back in one batch, by spender.
pub(super) type Releases = std::collections::BTreeMap<WorkspaceId, u64>;

/// Adds `n` credits given back for `spender` to `release` (a map: a recall gives back every
/// lease of an org, and a search per lease would be quadratic in the org).
pub(super) fn add_release(release: &mut Releases, spender: &WorkspaceId, n: u64) {
    if n == 0 {
        return;
    }
    match release.get_mut(spender) {
        Some(m) => *m = m.saturating_add(n),
        None => {
            release.insert(spender.clone(), n);
        }
    }
}

/// Spending rates, for lease sizes: what each lease paid for since the last batch (one pass
/// over the lines, one over the leases).
fn observe_rates(state: &OrgState, lines: &[UsageLine], elapsed: Duration) {
    let mut spent: std::collections::HashMap<&WorkspaceId, u64> = std::collections::HashMap::new();
    for l in lines {
        let n = spent.entry(&l.spender).or_default();
        *n = n.saturating_add(l.consumed.saturating_add(l.reserved));
    }
    for lease in &state.leases {
        lease.observe_spending(spent.get(&lease.spender).copied().unwrap_or(0), elapsed);
    }
}

/// Sets (or clears) the batch the store has not acknowledged, and the usage it carries.
pub(super) fn set_pending(slot: &OrgSlot, stream: &mut SettleStream, batch: Option<SettleBatch>) {
    let usage = batch.iter().flat_map(|b| &b.lines).fold(0u64, |n, l| {
        n.saturating_add(l.consumed).saturating_add(l.committed)
    });
    slot.pending_usage.store(usage, Ordering::Release);
    stream.pending = batch;
}

/// Forgets retired states that nothing points at and that have nothing left to report.
fn drop_drained_retired(slot: &OrgSlot) {
    slot.retired.lock().retain(|s| {
        let referenced = s.accounts.iter().any(|a| Arc::strong_count(a) > 1);
        let busy = s.accounts.iter().any(|a| a.has_unreported())
            || s.leases.iter().any(|p| p.credits() > 0);
        referenced || busy
    });
}
