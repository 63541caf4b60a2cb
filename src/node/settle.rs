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

use super::{LeasePolicy, Node, NodeError, OrgSlot, OrgState, SettleStream, LEASE_MIN};
use crate::cache::{clock_ms, STORE_LEFT_UNKNOWN};
use crate::metrics as m;
use crate::model::{OrgId, OrgRecord, SettleBatch, SettleReply, WorkspaceId};

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
    async fn settle_locked(
        &self,
        slots: &[Arc<OrgSlot>],
        streams: &mut [&mut SettleStream],
        wants: &Wants,
    ) -> Result<(), NodeError> {
        let mut first_error = None;
        // Batches the store has not acknowledged go first, unchanged.
        let pending: Vec<usize> = (0..slots.len())
            .filter(|&i| streams[i].pending.is_some())
            .collect();
        let mut blocked = vec![false; slots.len()];
        if !pending.is_empty() {
            let batches: Vec<(OrgId, SettleBatch)> = pending
                .iter()
                .filter_map(|&i| {
                    streams[i]
                        .pending
                        .clone()
                        .map(|b| (slots[i].org.clone(), b))
                })
                .collect();
            let sent_ms = clock_ms();
            for (k, result) in self.send(&batches).await.into_iter().enumerate() {
                let i = pending[k];
                match result {
                    Ok((reply, record)) => {
                        set_pending(&slots[i], streams[i], None);
                        self.apply_reply(&slots[i], streams[i], &reply, &record, sent_ms);
                    }
                    Err(e) => {
                        blocked[i] = true;
                        drop_if_refused(&slots[i], streams[i], &e);
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        let mut fresh = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            if blocked[i] {
                continue;
            }
            let Some(batch) = self.build_batch(slot, streams[i], wants) else {
                continue;
            };
            set_pending(slot, streams[i], Some(batch.clone()));
            fresh.push((i, (slot.org.clone(), batch)));
        }
        if !fresh.is_empty() {
            let batches: Vec<(OrgId, SettleBatch)> = fresh.iter().map(|(_, b)| b.clone()).collect();
            let sent_ms = clock_ms();
            for (k, result) in self.send(&batches).await.into_iter().enumerate() {
                let i = fresh[k].0;
                match result {
                    Ok((reply, record)) => {
                        set_pending(&slots[i], streams[i], None);
                        self.apply_reply(&slots[i], streams[i], &reply, &record, sent_ms);
                    }
                    Err(e) => {
                        drop_if_refused(&slots[i], streams[i], &e);
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        for slot in slots {
            drop_drained_retired(slot);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One store call for many batches, with its metrics.
    async fn send(
        &self,
        batches: &[(OrgId, SettleBatch)],
    ) -> Vec<Result<(SettleReply, OrgRecord), NodeError>> {
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
        let mut lines = Vec::new();
        let mut release = Vec::new();
        for s in retired.iter().chain(std::iter::once(&state)) {
            lines.extend(s.accounts.iter().filter_map(|a| a.collect()));
        }
        // What reservations did not charge goes back to the store, not into the lease
        // (`Account::finish_reservation`): each line's release moves it from the reservation
        // to the lease, and this from the lease to the spender's balance.
        for line in lines.iter().filter(|l| l.released > 0) {
            match release.iter_mut().find(|(s, _)| *s == line.spender) {
                Some((_, n)) => *n += line.released,
                None => release.push((line.spender.clone(), line.released)),
            }
        }
        // Retired leases give everything back: nothing spends from them any more.
        for s in &retired {
            for lease in &s.leases {
                let r = lease.drain();
                if r > 0 {
                    release.push((lease.spender.clone(), r));
                }
            }
        }
        let recalled = slot.is_recalled();
        let mut want = Vec::new();
        match wants {
            Wants::None => {}
            Wants::All if recalled => {}
            Wants::All => {
                for lease in &state.leases {
                    if lease.store_left() == 0 {
                        continue;
                    }
                    let target = self.lease_target(lease);
                    let short_reserve = self
                        .options
                        .outage_reserve
                        .saturating_sub(lease.outage_reserve());
                    // Refill ahead: top up below half the target, before the lease runs out;
                    // and fill the outage reserve.
                    if lease.credits() < target / 2 + 1 || short_reserve > 0 {
                        let wanted = target
                            .saturating_sub(lease.credits())
                            .saturating_add(short_reserve);
                        want.push((lease.spender.clone(), wanted.max(1)));
                    }
                }
            }
            Wants::One(spender, at_least) => {
                if let Some(lease) = state.lease(spender) {
                    let target = if recalled {
                        0
                    } else {
                        self.lease_target(lease)
                    };
                    want.push((lease.spender.clone(), target.max(*at_least)));
                }
            }
            Wants::Recall => {
                for lease in &state.leases {
                    // Unknown first: a debit that finds the lease gone must ask the store (and
                    // wait for this change), not conclude the spender is exhausted.
                    lease.set_store_left(STORE_LEFT_UNKNOWN);
                    let r = lease.drain();
                    if r > 0 {
                        release.push((lease.spender.clone(), r));
                    }
                }
            }
        }
        let now = Instant::now();
        let elapsed = now.duration_since(stream.last_batch);
        let heartbeat_due = elapsed >= self.options.heartbeat_interval;
        if lines.is_empty() && release.is_empty() && want.is_empty() && !heartbeat_due {
            return None;
        }
        // Spending rates, for lease sizes: what each lease paid for since the last batch.
        for lease in &state.leases {
            let spent: u64 = lines
                .iter()
                .filter(|l| l.spender == lease.spender)
                .map(|l| l.consumed.saturating_add(l.reserved))
                .sum();
            lease.observe_spending(spent, elapsed);
        }
        stream.last_batch = now;
        // One release per spender (the store bounds a batch's entries).
        let mut merged: Vec<(WorkspaceId, u64)> = Vec::with_capacity(release.len());
        for (spender, n) in release {
            match merged.iter_mut().find(|(s, _)| *s == spender) {
                Some((_, m)) => *m = m.saturating_add(n),
                None => merged.push((spender, n)),
            }
        }
        let release = merged;
        Some(SettleBatch {
            node: self.node_id.clone(),
            epoch: self.epoch(),
            seq: self.next_seq(),
            version: state.version,
            lines,
            release,
            want,
        })
    }

    /// The lease a lease should hold ahead of need.
    fn lease_target(&self, lease: &crate::cache::Lease) -> u64 {
        match self.options.lease_policy {
            LeasePolicy::Whole => u64::MAX,
            LeasePolicy::Adaptive {
                horizon,
                share_max_percent,
            } => {
                let by_rate = (lease.rate_per_s() as f64 * horizon.as_secs_f64()).ceil() as u64;
                let left = lease.store_left();
                let cap = if left == STORE_LEFT_UNKNOWN {
                    u64::MAX
                } else {
                    (left as u128 * share_max_percent as u128 / 100).max(1) as u64
                };
                by_rate.max(LEASE_MIN).min(cap)
            }
        }
    }

    /// Takes in the store's answer to a batch sent at `sent_ms` ([`clock_ms`]): what the store
    /// says of this node's holdings comes first (closed by an expiry, or forgotten), then the
    /// grants, the lease term, and what the store and the other nodes have left.
    fn apply_reply(
        &self,
        slot: &OrgSlot,
        stream: &mut SettleStream,
        reply: &SettleReply,
        record: &OrgRecord,
        sent_ms: u64,
    ) {
        debug_assert!(record.is_conserved());
        if reply.unbacked > 0 {
            metrics::counter!(m::USAGE_UNBACKED).increment(reply.unbacked);
            tracing::warn!(org = %slot.org, credits = reply.unbacked, "usage reported that no lease of this node backed in the store (already counted as lease_expired): recorded as usage_unbacked, not charged again");
        }
        if reply.prev_seq < stream.acked_seq {
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
        if let Some(share) = record.nodes.get(&self.node_id) {
            if share.epoch == self.epoch() {
                stream.acked_seq = stream.acked_seq.max(share.seq);
            }
        }
        if reply.expired {
            // This node was silent past lease_ttl: another node closed its leases and
            // reservations of the org as consumed. What memory still holds of them is paid
            // for; spending it would spend it twice.
            tracing::warn!(org = %slot.org, "this node's leases expired while it was silent (paused or cut off): dropping them");
            self.forfeit(slot);
        }
        let state = slot.current();
        for (spender, granted) in &reply.grants {
            match state.lease(spender) {
                Some(lease) => lease.give(*granted),
                None => {
                    // The org was rebuilt while the grant was on its way: park it in a retired
                    // lease, whose lease the next batch gives back.
                    let retired = slot.retired.lock();
                    match retired.iter().rev().find_map(|s| s.lease(spender)) {
                        Some(lease) => lease.give(*granted),
                        None => {
                            tracing::error!(org = %slot.org, %spender, granted, "grant for no lease")
                        }
                    }
                }
            }
        }
        // The lease term: renewed by an applied batch (the store took it as this node's
        // heartbeat, at or after `sent_ms`) for the state's own version. A retry's answer
        // says nothing of when the store last heard from the node.
        if let Some(term) = self.options.lease_term {
            if record.version != state.version {
                // The org changed under this state: nothing more is spent from it until it is
                // rebuilt (a debit that finds its term over asks the store, which rebuilds).
                for lease in &state.leases {
                    lease.set_valid_until(0);
                }
            } else if reply.applied {
                let until = sent_ms.saturating_add(term.as_millis() as u64);
                for lease in &state.leases {
                    lease.set_valid_until(until);
                }
            }
        }
        // The outage reserve is filled first from what was granted (and from the lease).
        if self.options.outage_reserve > 0 {
            for lease in &state.leases {
                lease.fill_outage_reserve(self.options.outage_reserve);
            }
        }
        // Other nodes' leases count only while those nodes live: a recall cannot bring back
        // what a dead node holds (its leases expire after lease_ttl, as consumed).
        let now_ms = record.nodes.get(&self.node_id).map_or(0, |n| n.seen_ms);
        let alive_ms = 2 * self.options.heartbeat_interval.as_millis() as u64;
        let others = |spender: &WorkspaceId| -> u64 {
            record
                .nodes
                .iter()
                .filter(|(id, n)| {
                    **id != self.node_id && now_ms.saturating_sub(n.seen_ms) <= alive_ms
                })
                .filter_map(|(_, n)| n.leases.get(spender))
                .sum()
        };
        for lease in &state.leases {
            let left = if record.spender_of(&lease.spender) == Some(&lease.spender) {
                record
                    .workspaces
                    .get(&lease.spender)
                    .map_or(0, |w| w.balance)
            } else {
                0
            };
            lease.set_others(others(&lease.spender));
            lease.set_store_left(left);
        }
        // Another version means the org changed (or the store forgot a change): rebuild. The
        // store's answer also outranks notices of versions it no longer has.
        slot.seen_version.store(record.version, Ordering::Release);
        slot.notified_version
            .fetch_min(record.version, Ordering::AcqRel);
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

    /// Starts a new life after the store forgot acknowledged writes: a new epoch (the store's
    /// next batch of each org closes what it records of the old life as consumed), and every
    /// org's memory of the old life dropped: leases, reservations, unsent usage (the store
    /// forgot part of it; the close counts the rest).
    async fn start_new_life(&self) -> Result<(), NodeError> {
        m::store_call("start_node");
        let start = self.store.start_node(&self.node_id).await?;
        let slots: Vec<Arc<OrgSlot>> = self.orgs.iter().map(|e| Arc::clone(e.value())).collect();
        let mut streams = Vec::with_capacity(slots.len());
        for slot in &slots {
            streams.push(slot.settle.lock().await);
        }
        for (slot, stream) in slots.iter().zip(streams.iter_mut()) {
            set_pending(slot, stream, None);
            stream.acked_seq = 0;
            self.forfeit(slot);
            let state = slot.current();
            let retired = slot.retired.lock().clone();
            for s in retired.iter().chain(std::iter::once(&state)) {
                for account in &s.accounts {
                    let _ = account.collect();
                }
            }
        }
        self.epoch.store(start.epoch, Ordering::Release);
        self.life_lost.store(false, Ordering::Release);
        tracing::warn!(epoch = start.epoch, "new life started");
        Ok(())
    }

    /// One settler round over every org: usage, top-ups, expired reservations, gauges.
    pub async fn tick(&self) {
        self.expire_reservations();
        self.expire_idempotency();
        if self.life_lost.load(Ordering::Acquire) {
            if let Err(e) = self.start_new_life().await {
                tracing::warn!(error = %e, "starting a new life failed; retried next round");
                return;
            }
        }
        let slots: Vec<Arc<OrgSlot>> = self.orgs.iter().map(|e| Arc::clone(e.value())).collect();
        for slot in slots.iter().filter(|s| s.is_stale()) {
            if let Ok(_control) = slot.control.try_lock() {
                if let Err(e) = self.reload(slot).await {
                    tracing::warn!(org = %slot.org, error = %e, "reloading a changed org failed");
                }
            }
        }
        for chunk in slots.chunks(self.options.settle_batch_orgs_max) {
            // An org busy with a control-plane change or a refill is settled next round.
            let mut control_guards = Vec::new();
            let mut stream_guards = Vec::new();
            let mut ready = Vec::new();
            for slot in chunk {
                let Ok(control) = slot.control.try_lock() else {
                    continue;
                };
                let Ok(stream) = slot.settle.try_lock() else {
                    continue;
                };
                control_guards.push(control);
                stream_guards.push(stream);
                ready.push(Arc::clone(slot));
            }
            let mut streams: Vec<&mut SettleStream> =
                stream_guards.iter_mut().map(|g| &mut **g).collect();
            if let Err(e) = self.settle_locked(&ready, &mut streams, &Wants::All).await {
                tracing::debug!(error = %e, "settle round incomplete");
            }
        }
        self.update_gauges();
    }

    /// Credits this node's accounts used that the store has not heard of yet: what a crash
    /// right now would leave uncharged.
    pub fn unsettled_credits(&self) -> u64 {
        let mut unsettled = 0u64;
        for slot in self.orgs.iter() {
            let retired = slot.retired.lock().clone();
            for state in retired.iter().chain(std::iter::once(&slot.current())) {
                for account in &state.accounts {
                    unsettled = unsettled.saturating_add(account.unsettled());
                }
            }
            unsettled = unsettled.saturating_add(slot.pending_usage.load(Ordering::Acquire));
        }
        unsettled
    }

    fn update_gauges(&self) {
        let (mut leased, mut blocked) = (0u64, 0u64);
        for slot in self.orgs.iter() {
            let state = slot.current();
            for lease in &state.leases {
                leased = leased
                    .saturating_add(lease.credits())
                    .saturating_add(lease.outage_reserve());
                blocked += lease.is_blocked() as u64;
            }
        }
        let unsettled = self.unsettled_credits();
        metrics::gauge!(m::LEASED_CREDITS).set(leased as f64);
        metrics::gauge!(m::BLOCKED_SPENDERS).set(blocked as f64);
        metrics::gauge!(m::UNSETTLED_CREDITS).set(unsettled as f64);
        metrics::gauge!(m::RESERVATIONS_OPEN).set(self.reservations.len() as f64);
    }

    /// Runs the settler every `interval` until `shutdown` resolves.
    pub async fn run_settler(
        self: Arc<Self>,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds: u64 = 0;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick() => {}
            }
            self.tick().await;
            rounds += 1;
            // Forgetting old control-plane keys is housekeeping: once a minute at 1s rounds.
            if rounds % 60 == 0 {
                m::store_call("prune");
                if let Err(e) = self.store.prune(crate::store::unix_ms()).await {
                    tracing::warn!(error = %e, "pruning idempotency keys failed");
                }
            }
        }
    }

    /// A clean stop: releases open reservations, gives every lease back with the last usage,
    /// and tells the store the node stopped cleanly. Retries a failing store within `deadline`.
    pub async fn stop(&self, deadline: Duration) -> Result<(), NodeError> {
        self.set_unready();
        self.release_all_reservations();
        let slots: Vec<Arc<OrgSlot>> = self.orgs.iter().map(|e| Arc::clone(e.value())).collect();
        let until = Instant::now() + deadline;
        let mut first_error = None;
        for chunk in slots.chunks(self.options.settle_batch_orgs_max) {
            let mut control_guards = Vec::new();
            for slot in chunk {
                control_guards.push(slot.control.lock().await);
            }
            loop {
                // A second round picks up debits that were in flight during the first.
                let mut result = self.settle_slots(chunk, Wants::Recall).await;
                if result.is_ok() {
                    result = self.settle_slots(chunk, Wants::Recall).await;
                }
                match result {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= until => {
                        first_error.get_or_insert(e);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        m::store_call("stop_node");
        self.store.stop_node(&self.node_id).await?;
        Ok(())
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

/// Sets (or clears) the batch the store has not acknowledged, and the usage it carries.
fn set_pending(slot: &OrgSlot, stream: &mut SettleStream, batch: Option<SettleBatch>) {
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
