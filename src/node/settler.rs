//! The settler's rounds: every `settle_interval` a round over every org (usage, refills,
//! expired reservations, gauges), a new life after the store forgot acknowledged writes, and
//! the clean stop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::settle::{set_pending, Wants};
use super::{Node, NodeError, OrgSlot, SettleStream};
use crate::metrics as m;

impl Node {
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
            stream.sent_any = false;
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
