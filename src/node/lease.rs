//! What a node holds of each spender: how much to ask for (lease sizing, refills, the outage
//! reserve), and what a settle answer changes in it (grants, the lease term, what the store
//! and the other nodes have left).

use super::settle::Wants;
use super::{LeasePolicy, Node, OrgSlot, OrgState, LEASE_MIN};
use crate::cache::{Lease, STORE_LEFT_UNKNOWN};
use crate::model::{SettleView, WorkspaceId};

impl Node {
    /// The leases a batch asks for under `wants`; a recall drains every lease into `release`.
    pub(super) fn wanted(
        &self,
        state: &OrgState,
        wants: &Wants,
        recalled: bool,
        release: &mut super::settle::Releases,
    ) -> Vec<(WorkspaceId, u64)> {
        let mut want = Vec::new();
        match wants {
            Wants::None => {}
            Wants::All if recalled => {}
            Wants::All => {
                let adaptive = matches!(self.options.lease_policy, LeasePolicy::Adaptive { .. });
                for lease in &state.leases {
                    // A dry spender is asked for again only after a refusal: the answer
                    // refreshes what this node knows of it (and grants what came back).
                    let refresh = lease.store_left() == 0 && lease.take_refresh();
                    if lease.store_left() == 0 && !refresh {
                        continue;
                    }
                    // In a cluster a spender this node has never spent from is not leased
                    // ahead of need: its first debit asks. Otherwise every node would hold a
                    // lease of every workspace of every org it loaded, and each settle after a
                    // change would lease the whole org again.
                    if adaptive && !refresh && lease.rate_per_s() == 0 && lease.credits() == 0 {
                        continue;
                    }
                    let target = self.lease_target(lease);
                    let outage_short = self
                        .options
                        .outage_reserve
                        .saturating_sub(lease.outage_reserve());
                    // Refill ahead: top up below half the target, before the lease runs out;
                    // and fill the outage reserve.
                    if lease.credits() < target / 2 + 1 || outage_short > 0 {
                        let wanted = target
                            .saturating_sub(lease.credits())
                            .saturating_add(outage_short);
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
            Wants::Refresh(spender) => want.push((spender.clone(), 0)),
            Wants::Recall => {
                for lease in &state.leases {
                    // Unknown first: a debit that finds the lease gone must ask the store (and
                    // wait for this change), not conclude the spender is exhausted.
                    lease.set_store_left(STORE_LEFT_UNKNOWN);
                    super::settle::add_release(release, &lease.spender, lease.drain());
                }
            }
        }
        want
    }

    /// The credits a lease should hold ahead of need.
    fn lease_target(&self, lease: &Lease) -> u64 {
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

    /// Puts granted credits into the leases they were asked for; a grant for a spender the
    /// org no longer has (it was rebuilt while the grant was on its way) is parked in a retired
    /// lease, which the next batch gives back.
    pub(super) fn take_grants(
        &self,
        slot: &OrgSlot,
        state: &OrgState,
        grants: &[(WorkspaceId, u64)],
    ) {
        for (spender, granted) in grants {
            if let Some(lease) = state.lease(spender) {
                lease.give(*granted);
                continue;
            }
            let retired = slot.retired.lock();
            match retired.iter().rev().find_map(|s| s.lease(spender)) {
                Some(lease) => lease.give(*granted),
                None => tracing::error!(org = %slot.org, %spender, granted, "grant for no lease"),
            }
        }
    }

    /// The lease term: renewed by an applied batch (the store took it as this node's heartbeat,
    /// at or after `sent_ms`) for the state's own version. A retry's answer says nothing of
    /// when the store last heard from the node.
    pub(super) fn renew_term(&self, state: &OrgState, version: u64, applied: bool, sent_ms: u64) {
        let Some(term) = self.options.lease_term else {
            return;
        };
        if version != state.version {
            // The org changed under this state: nothing more is spent from it until it is
            // rebuilt (a debit that finds its term over asks the store, which rebuilds).
            for lease in &state.leases {
                lease.set_valid_until(0);
            }
        } else if applied {
            let until = sent_ms.saturating_add(term.as_millis() as u64);
            for lease in &state.leases {
                lease.set_valid_until(until);
            }
        }
    }

    /// For each spender the batch named (the answer says nothing of the others): fills its
    /// outage reserve, and records what the store and the other nodes have left of it. A debit
    /// the lease cannot cover is refused from memory only when both are zero; such a refusal
    /// names the spender in the next batch ([`crate::cache::Lease::take_refresh`]), so a
    /// spender that is not settled is never refused for long on what an old answer said.
    pub(super) fn note_store(&self, state: &OrgState, view: &SettleView) {
        // The outage reserve is filled first from what was granted (and from the lease).
        if self.options.outage_reserve > 0 {
            for lease in &state.leases {
                lease.fill_outage_reserve(self.options.outage_reserve);
            }
        }
        // Other nodes' leases count only while those nodes live: a recall cannot bring back
        // what a dead node holds (its leases expire after lease_ttl, as consumed).
        let alive_ms = 2 * self.options.heartbeat_interval.as_millis() as u64;
        for named in &view.spenders {
            let Some(lease) = state.lease(&named.spender) else {
                continue;
            };
            let others = named
                .others
                .iter()
                .filter(|(_, seen_ms, _)| view.seen_ms.saturating_sub(*seen_ms) <= alive_ms)
                .fold(0u64, |sum, (_, _, n)| sum.saturating_add(*n));
            lease.set_others(others);
            lease.set_store_left(named.left);
        }
    }
}
