//! The hot path: a sharded concurrent map of accounts, each debited with one compare-and-swap
//! on its spender's lease. No lock is taken and nothing is allocated per debit.
//!
//! A [`Lease`] is one spender's lease on this node: credits the store handed over to spend
//! locally. An [`Account`] is one workspace: it points at the lease it spends from (its own in
//! budget mode, the Primary's in shared mode) and counts, in atomics, what happened since the
//! settler last collected (consumed, reserved, committed, released). The settler reports those
//! counts to the store and tops the leases up.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::model::{OrgId, UsageLine, WorkspaceId};

/// `store_left` before the store has been asked: unknown, so a refusal must ask it.
pub const STORE_LEFT_UNKNOWN: u64 = u64::MAX;

/// A lease term that never ends (one node, the embedded store: nobody else can expire it).
pub const TERM_FOREVER: u64 = u64::MAX;

/// Milliseconds on this process's monotonic clock (tokio's, so that a simulation controls it):
/// lease terms are measured on it.
pub fn clock_ms() -> u64 {
    static BASE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(tokio::time::Instant::now);
    let since = tokio::time::Instant::now().saturating_duration_since(base);
    // Not `as_millis()`: its u128 division is most of this function's cost.
    since.as_secs() * 1000 + u64::from(since.subsec_millis())
}

/// One spender's lease on this node.
#[derive(Debug)]
pub struct Lease {
    /// The workspace whose balance the lease came from.
    pub spender: WorkspaceId,
    /// Credits this node may still spend without asking the store.
    credits: AtomicU64,
    /// What the store had left for the spender beyond all leases at the last settle, or
    /// [`STORE_LEFT_UNKNOWN`]. Zero (with `others` zero) means exhausted: refusals are decided
    /// from memory.
    store_left: AtomicU64,
    /// Credits of the spender leased to other nodes at the last settle: while some are out
    /// there, a short lease asks the store (and a recall) instead of refusing.
    others: AtomicU64,
    /// Recent spending rate, credits per second, to size leases (cluster policy).
    rate_per_s: AtomicU64,
    /// The outage reserve: credits leased like the rest, but spent only when the lease is
    /// short and the store cannot be asked (unreachable) or has nothing more. They belong to
    /// the spender, so spending them can never overspend it: this is how a node keeps
    /// answering, boundedly, while the store is down (`outage_reserve_credits`).
    outage_reserve: AtomicU64,
    /// End of the lease term ([`clock_ms`]): after it the node spends nothing from this lease
    /// until a settle renews the term. A node that was silent (paused, partitioned) could have
    /// had its lease expired by the store and an org change applied meanwhile; the term ends
    /// before the store may expire it, so the node never spends a lease across a change it
    /// has not seen. [`TERM_FOREVER`] on one node.
    valid_until: AtomicU64,
    /// Set when a debit was refused from memory (store and other nodes said to have nothing):
    /// the next batch names the spender, so that the store's answer about it is refreshed. A
    /// settle answers only the spenders its batch names.
    refresh: AtomicBool,
}

/// The answer to a debit or a reservation. A refusal is an answer, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Taken; `remaining` is what this node knows the spender can still use.
    Allowed { remaining: u64 },
    /// Not enough anywhere: blocked until credits are assigned.
    Insufficient { remaining: u64 },
}

/// A lease cannot decide from memory: it cannot cover the amount but the store may have more,
/// or its term is over. The caller asks the store (a settle), then takes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AskStore;

/// What a take from a lease is for: it decides which usage counter of the account grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// A debit: consumed at once.
    Consume,
    /// A reservation: held until committed or released.
    Reserve,
}

impl Lease {
    pub fn new(spender: WorkspaceId) -> Self {
        Lease {
            spender,
            credits: AtomicU64::new(0),
            store_left: AtomicU64::new(STORE_LEFT_UNKNOWN),
            others: AtomicU64::new(0),
            rate_per_s: AtomicU64::new(0),
            outage_reserve: AtomicU64::new(0),
            valid_until: AtomicU64::new(TERM_FOREVER),
            refresh: AtomicBool::new(false),
        }
    }

    /// True (once) when a debit was refused from memory since the last call: the store's
    /// answer about this spender should be refreshed.
    pub fn take_refresh(&self) -> bool {
        self.refresh.load(Ordering::Acquire) && self.refresh.swap(false, Ordering::AcqRel)
    }

    /// Sets the end of the lease term ([`clock_ms`], or [`TERM_FOREVER`]).
    pub fn set_valid_until(&self, until_ms: u64) {
        self.valid_until.store(until_ms, Ordering::Release);
    }

    /// True while the lease term lasts: the lease may be spent from memory.
    #[inline]
    pub fn in_term(&self) -> bool {
        let until = self.valid_until.load(Ordering::Acquire);
        until == TERM_FOREVER || clock_ms() <= until
    }

    pub fn credits(&self) -> u64 {
        self.credits.load(Ordering::Acquire)
    }

    pub fn store_left(&self) -> u64 {
        self.store_left.load(Ordering::Acquire)
    }

    /// What this node knows the spender can still use.
    pub fn remaining(&self) -> u64 {
        self.credits()
            .saturating_add(self.outage_reserve())
            .saturating_add(self.beyond_lease())
    }

    /// Credits of the outage reserve.
    pub fn outage_reserve(&self) -> u64 {
        self.outage_reserve.load(Ordering::Acquire)
    }

    /// Moves credits from the lease into the outage reserve until it holds `target`.
    pub fn fill_outage_reserve(&self, target: u64) {
        let mut lease = self.credits.load(Ordering::Acquire);
        loop {
            let moved = target.saturating_sub(self.outage_reserve()).min(lease);
            if moved == 0 {
                return;
            }
            match self.credits.compare_exchange_weak(
                lease,
                lease - moved,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.outage_reserve.fetch_add(moved, Ordering::AcqRel);
                    return;
                }
                Err(seen) => lease = seen,
            }
        }
    }

    /// Takes `amount` from the outage reserve, all or nothing; the remaining on success. Not
    /// after the lease term: the store may have closed the outage reserve with the lease.
    pub fn take_outage_reserve(&self, amount: u64) -> Option<u64> {
        if !self.in_term() {
            return None;
        }
        let mut current = self.outage_reserve.load(Ordering::Acquire);
        loop {
            if current < amount {
                return None;
            }
            match self.outage_reserve.compare_exchange_weak(
                current,
                current - amount,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(
                        self.credits()
                            .saturating_add(current - amount)
                            .saturating_add(self.beyond_lease()),
                    )
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// What the spender has beyond this node's lease, as of the last settle: the store's
    /// unleased balance and other nodes' leases (a recall can bring those here). Zero on one
    /// node once the whole balance is leased, so `remaining` is exact there.
    fn beyond_lease(&self) -> u64 {
        let left = self.store_left();
        let left = if left == STORE_LEFT_UNKNOWN { 0 } else { left };
        left.saturating_add(self.others())
    }

    /// True when the store said it has nothing beyond the leases and this node's is empty.
    pub fn is_blocked(&self) -> bool {
        self.is_exhausted() && self.credits() == 0 && self.outage_reserve() == 0
    }

    /// True when neither the store nor another node has anything left for the spender.
    fn is_exhausted(&self) -> bool {
        self.store_left() == 0 && self.others.load(Ordering::Acquire) == 0
    }

    /// Credits of the spender other nodes held at the last settle.
    pub fn others(&self) -> u64 {
        self.others.load(Ordering::Acquire)
    }

    pub fn set_others(&self, others: u64) {
        self.others.store(others, Ordering::Release);
    }

    pub fn rate_per_s(&self) -> u64 {
        self.rate_per_s.load(Ordering::Relaxed)
    }

    /// Starts from the spending rate of `old`, the same spender's lease in a state this one
    /// replaces: a change to the org does not make a busy spender look idle.
    pub fn carry_rate(&self, old: &Lease) {
        self.rate_per_s.store(old.rate_per_s(), Ordering::Relaxed);
    }

    /// Folds the spending of the last `elapsed` into the rate (an average weighted half to the
    /// newest observation, so a lease follows a change of load within a few settles).
    pub fn observe_spending(&self, spent: u64, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64().max(0.001);
        let now = spent as f64 / secs;
        let old = self.rate_per_s() as f64;
        self.rate_per_s
            .store(((old + now) / 2.0).ceil() as u64, Ordering::Relaxed);
    }

    /// Takes `amount` from the lease, all or nothing: one CAS loop, no lock. After the lease
    /// term the store must be asked first.
    pub fn take(&self, amount: u64) -> Result<Decision, AskStore> {
        if !self.in_term() {
            return Err(AskStore);
        }
        let mut current = self.credits.load(Ordering::Acquire);
        loop {
            if current < amount {
                if !self.is_exhausted() {
                    return Err(AskStore);
                }
                // Nothing more anywhere: the outage reserve is the spender's last credits.
                return Ok(match self.take_outage_reserve(amount) {
                    Some(remaining) => Decision::Allowed { remaining },
                    None => {
                        if !self.refresh.load(Ordering::Relaxed) {
                            self.refresh.store(true, Ordering::Release);
                        }
                        Decision::Insufficient {
                            remaining: current.saturating_add(self.outage_reserve()),
                        }
                    }
                });
            }
            match self.credits.compare_exchange_weak(
                current,
                current - amount,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let left = self.beyond_lease().saturating_add(self.outage_reserve());
                    return Ok(Decision::Allowed {
                        remaining: (current - amount).saturating_add(left),
                    });
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Adds credits to the lease (a grant, or credits a reservation gave back).
    pub fn give(&self, amount: u64) {
        let before = self.credits.fetch_add(amount, Ordering::AcqRel);
        debug_assert!(before.checked_add(amount).is_some(), "lease overflow");
    }

    /// Takes the whole lease, to give it back to the store.
    pub fn drain(&self) -> u64 {
        let lease = self.credits.swap(0, Ordering::AcqRel);
        lease.saturating_add(self.outage_reserve.swap(0, Ordering::AcqRel))
    }

    /// Counts credits on their way back to the store as left there.
    pub fn add_store_left(&self, n: u64) {
        let _ = self
            .store_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left != STORE_LEFT_UNKNOWN)
                    .then(|| left.saturating_add(n).min(STORE_LEFT_UNKNOWN - 1))
            });
    }

    /// Records what the store had left at the last settle.
    pub fn set_store_left(&self, left: u64) {
        self.store_left.store(left, Ordering::Release);
    }
}

/// One workspace on this node: its lease and what it did since the last collection.
#[derive(Debug)]
pub struct Account {
    pub org: OrgId,
    pub workspace: WorkspaceId,
    pub lease: Arc<Lease>,
    consumed: AtomicU64,
    reserved: AtomicU64,
    committed: AtomicU64,
    released: AtomicU64,
}

impl Account {
    pub fn new(org: OrgId, workspace: WorkspaceId, lease: Arc<Lease>) -> Self {
        Account {
            org,
            workspace,
            lease,
            consumed: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }

    /// Takes `amount` from the lease for `spend`, counted on this account when allowed.
    pub fn debit(&self, amount: u64, spend: Spend) -> Result<Decision, AskStore> {
        let decision = self.lease.take(amount)?;
        if let Decision::Allowed { .. } = decision {
            self.count(amount, spend);
        }
        Ok(decision)
    }

    /// Takes from the outage reserve (the store cannot be asked); `None` if it cannot cover.
    pub fn debit_from_outage_reserve(&self, amount: u64, spend: Spend) -> Option<u64> {
        let remaining = self.lease.take_outage_reserve(amount)?;
        self.count(amount, spend);
        Some(remaining)
    }

    fn count(&self, amount: u64, spend: Spend) {
        let counter = match spend {
            Spend::Consume => &self.consumed,
            Spend::Reserve => &self.reserved,
        };
        counter.fetch_add(amount, Ordering::AcqRel);
    }

    /// Ends a reservation of `reserved` credits made on this account: `charged` is consumed,
    /// the rest goes back to the store with the next settle, never into the lease: the
    /// reservation may have been made under rules (a mode) that no longer hold, and credits
    /// spent again from this node's memory would cross a change it may not have seen yet.
    pub fn finish_reservation(&self, reserved: u64, charged: u64) {
        debug_assert!(charged <= reserved);
        let back = reserved - charged;
        self.committed.fetch_add(charged, Ordering::AcqRel);
        self.released.fetch_add(back, Ordering::AcqRel);
        // The store will have them: a debit the lease cannot cover asks it.
        self.lease.add_store_left(back);
    }

    /// Takes the counts since the last collection as one usage line (`None` if idle). An
    /// idle account costs four loads: nothing is written or allocated.
    pub fn collect(&self) -> Option<UsageLine> {
        if !self.has_unreported() {
            return None;
        }
        let line = UsageLine {
            workspace: self.workspace.clone(),
            spender: self.lease.spender.clone(),
            consumed: self.consumed.swap(0, Ordering::AcqRel),
            reserved: self.reserved.swap(0, Ordering::AcqRel),
            committed: self.committed.swap(0, Ordering::AcqRel),
            released: self.released.swap(0, Ordering::AcqRel),
        };
        let idle =
            line.consumed == 0 && line.reserved == 0 && line.committed == 0 && line.released == 0;
        (!idle).then_some(line)
    }

    /// True when something happened that the settler has not collected yet.
    pub fn has_unreported(&self) -> bool {
        [
            &self.consumed,
            &self.reserved,
            &self.committed,
            &self.released,
        ]
        .iter()
        .any(|c| c.load(Ordering::Acquire) > 0)
    }

    /// Credits this account used or moved that the store has not heard of yet.
    pub fn unsettled(&self) -> u64 {
        self.consumed
            .load(Ordering::Acquire)
            .saturating_add(self.committed.load(Ordering::Acquire))
    }
}

/// The map key of an account: its org and workspace.
#[derive(Debug, PartialEq, Eq)]
struct AccountKey {
    org: Box<str>,
    ws: Box<str>,
}

impl Hash for AccountKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        Query {
            org: &self.org,
            ws: &self.ws,
        }
        .hash(h)
    }
}

/// A borrowed key, to look an account up without building (or allocating) a key. It hashes
/// exactly as [`AccountKey`]: `str` hashing ends each string with a terminator, so
/// ("ab", "c") and ("a", "bc") differ.
struct Query<'a> {
    org: &'a str,
    ws: &'a str,
}

impl Hash for Query<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.org.hash(h);
        self.ws.hash(h);
    }
}

impl papaya::Equivalent<AccountKey> for Query<'_> {
    fn equivalent(&self, key: &AccountKey) -> bool {
        *key.org == *self.org && *key.ws == *self.ws
    }
}

/// Every account this node has loaded, keyed by (org, workspace).
///
/// papaya with foldhash, measured against DashMap (`benches/map_choice.rs`, BENCHMARKS.md):
/// its reads take no lock (an epoch guard, no shared write), so two threads debiting one
/// account contend only on the account's own atomics; foldhash halves the cost of hashing the
/// key. Keys of a lookup come from requests, but only operators insert accounts, so a flood of
/// crafted keys cannot grow a collision chain.
pub struct Cache {
    accounts: papaya::HashMap<AccountKey, Arc<Account>, foldhash::fast::RandomState>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            accounts: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
        }
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("accounts", &self.accounts.len())
            .finish()
    }
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The hot path: debits an account in place, without allocating or touching its
    /// reference count. `None` if the account is not cached.
    pub fn debit(
        &self,
        org: &str,
        ws: &str,
        amount: u64,
        spend: Spend,
    ) -> Option<Result<Decision, AskStore>> {
        self.accounts
            .pin()
            .get(&Query { org, ws })
            .map(|a| a.debit(amount, spend))
    }

    /// Looks an account up without allocating (for the slow path, which keeps it).
    pub fn get(&self, org: &str, ws: &str) -> Option<Arc<Account>> {
        self.accounts.pin().get(&Query { org, ws }).cloned()
    }

    /// Installs or replaces an account.
    pub fn insert(&self, account: Arc<Account>) {
        let key = AccountKey {
            org: account.org.as_str().into(),
            ws: account.workspace.as_str().into(),
        };
        self.accounts.pin().insert(key, account);
    }

    /// Removes an account if it is still the one given.
    pub fn remove(&self, account: &Arc<Account>) {
        let key = Query {
            org: account.org.as_str(),
            ws: account.workspace.as_str(),
        };
        let _ = self
            .accounts
            .pin()
            .remove_if(&key, |_, v| Arc::ptr_eq(v, account));
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(credits: u64, store_left: u64) -> Account {
        let lease = Arc::new(Lease::new(WorkspaceId::parse("ws", "ws").unwrap()));
        lease.give(credits);
        lease.set_store_left(store_left);
        Account::new(
            OrgId::parse("org", "org").unwrap(),
            WorkspaceId::parse("ws", "ws").unwrap(),
            lease,
        )
    }

    #[test]
    fn debit_takes_from_the_lease_and_counts_it() {
        let a = account(10, 0);
        assert_eq!(
            a.debit(4, Spend::Consume),
            Ok(Decision::Allowed { remaining: 6 })
        );
        assert_eq!(
            a.debit(6, Spend::Consume),
            Ok(Decision::Allowed { remaining: 0 })
        );
        assert_eq!(
            a.debit(1, Spend::Consume),
            Ok(Decision::Insufficient { remaining: 0 })
        );
        let line = a.collect().unwrap();
        assert_eq!(line.consumed, 10);
        assert!(a.collect().is_none());
    }

    #[test]
    fn a_short_lease_asks_the_store_unless_it_is_exhausted() {
        assert_eq!(
            account(1, STORE_LEFT_UNKNOWN).debit(2, Spend::Consume),
            Err(AskStore)
        );
        assert_eq!(account(1, 5).debit(2, Spend::Consume), Err(AskStore));
        assert_eq!(
            account(1, 0).debit(2, Spend::Consume),
            Ok(Decision::Insufficient { remaining: 1 })
        );
    }

    #[test]
    fn the_outage_reserve_is_spent_last_and_returned_with_the_lease() {
        let a = account(10, 0);
        a.lease.fill_outage_reserve(4);
        assert_eq!((a.lease.credits(), a.lease.outage_reserve()), (6, 4));
        assert_eq!(
            a.debit(6, Spend::Consume),
            Ok(Decision::Allowed { remaining: 4 })
        );
        // Nothing more anywhere: the outage reserve pays, then the spender is blocked.
        assert_eq!(
            a.debit(3, Spend::Consume),
            Ok(Decision::Allowed { remaining: 1 })
        );
        assert_eq!(
            a.debit(2, Spend::Consume),
            Ok(Decision::Insufficient { remaining: 1 })
        );
        assert_eq!(a.collect().unwrap().consumed, 9);
        assert_eq!(a.lease.drain(), 1);
        // The store may have more: the outage reserve is kept for when it cannot be asked.
        let b = account(5, STORE_LEFT_UNKNOWN);
        b.lease.fill_outage_reserve(3);
        assert_eq!(b.debit(3, Spend::Consume), Err(AskStore));
        assert_eq!(b.debit_from_outage_reserve(3, Spend::Consume), Some(2));
        assert_eq!(b.debit_from_outage_reserve(1, Spend::Consume), None);
    }

    #[test]
    fn reservations_give_what_they_did_not_charge_back_to_the_store() {
        let a = account(10, 0);
        assert_eq!(
            a.debit(8, Spend::Reserve),
            Ok(Decision::Allowed { remaining: 2 })
        );
        a.finish_reservation(8, 3);
        assert_eq!(a.lease.credits(), 2);
        // The 5 released are the store's again: a debit beyond the lease asks for them.
        assert_eq!(a.lease.store_left(), 5);
        assert_eq!(a.debit(4, Spend::Consume), Err(AskStore));
        let line = a.collect().unwrap();
        assert_eq!(
            (line.reserved, line.committed, line.released, line.consumed),
            (8, 3, 5, 0)
        );
    }

    #[test]
    fn keys_are_unambiguous() {
        let cache = Cache::new();
        cache.insert(Arc::new(account(1, 0)));
        assert!(cache.get("org", "ws").is_some());
        assert!(cache.get("orgw", "s").is_none());
        assert!(cache.get("or", "gws").is_none());
        assert!(cache.debit("org", "ws", 1, Spend::Consume).is_some());
        assert!(cache.debit("org", "w", 1, Spend::Consume).is_none());
        let account = cache.get("org", "ws").unwrap();
        cache.remove(&account);
        assert!(cache.is_empty());
    }
}
