//! The data plane on a node: debits, reservations and balances. A debit is decided from the
//! cache; it waits on the store only when its spender's lease is short and the store may have
//! more, and then for at most `lease_wait_max`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::settle::Wants;
use super::{Node, NodeError};
use crate::cache::{Account, AskStore, Decision, Spend, STORE_LEFT_UNKNOWN};
use crate::model::{Amount, Mode, WorkspaceId};

/// A reservation made, or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub decision: Decision,
    /// The reservation id when allowed.
    pub id: Option<String>,
    pub expires_in_ms: u64,
}

/// An open reservation: credits taken from a lease, not yet charged or given back.
#[derive(Debug)]
pub(crate) struct Reservation {
    account: Arc<Account>,
    amount: u64,
    deadline: Instant,
}

/// A remembered data-plane answer for an idempotency key. Concurrent calls with the same key
/// wait for the first one's answer instead of charging twice.
#[derive(Debug)]
pub(crate) struct Remembered {
    fingerprint: String,
    created: Instant,
    answer: OnceCell<Reserved>,
}

impl Node {
    /// Takes `amount` from `org`/`ws`.
    pub async fn debit(&self, org: &str, ws: &str, amount: Amount) -> Result<Decision, NodeError> {
        // The hot path: in place in the cache, no lock, no allocation, no store call.
        let decision = match self.cache.debit(org, ws, amount.get(), Spend::Consume) {
            Some(Ok(decision)) => decision,
            Some(Err(AskStore)) | None => self.take(org, ws, amount, Spend::Consume).await?.0,
        };
        if let Decision::Allowed { .. } = decision {
            self.credits_debited.increment(amount.get());
        }
        Ok(decision)
    }

    /// Debits with an idempotency key: the same key and request give the first answer, once.
    pub async fn debit_once(
        &self,
        org: &str,
        ws: &str,
        amount: Amount,
        key: &str,
    ) -> Result<Decision, NodeError> {
        let fingerprint = format!("{ws}\u{1f}{}", amount.get());
        let answer = self
            .once(org, "debit", key, fingerprint, || async {
                let decision = self.debit(org, ws, amount).await?;
                Ok(Reserved {
                    decision,
                    id: None,
                    expires_in_ms: 0,
                })
            })
            .await?;
        Ok(answer.decision)
    }

    /// Sets `amount` aside for `ttl` (or the default TTL), to commit or release later.
    pub async fn reserve(
        &self,
        org: &str,
        ws: &str,
        amount: Amount,
        ttl: Option<std::time::Duration>,
        key: Option<&str>,
    ) -> Result<Reserved, NodeError> {
        let ttl = ttl.unwrap_or(self.options.reservation_ttl);
        match key {
            None => self.reserve_now(org, ws, amount, ttl).await,
            Some(key) => {
                let fingerprint = format!("{ws}\u{1f}{}\u{1f}{}", amount.get(), ttl.as_millis());
                self.once(org, "reservation", key, fingerprint, || {
                    self.reserve_now(org, ws, amount, ttl)
                })
                .await
            }
        }
    }

    async fn reserve_now(
        &self,
        org: &str,
        ws: &str,
        amount: Amount,
        ttl: std::time::Duration,
    ) -> Result<Reserved, NodeError> {
        if self.reservations.len() >= self.options.reservations_max {
            return Err(self.reservations_full());
        }
        let (decision, account) = self.take(org, ws, amount, Spend::Reserve).await?;
        let expires_in_ms = ttl.as_millis() as u64;
        if let Decision::Insufficient { .. } = decision {
            return Ok(Reserved {
                decision,
                id: None,
                expires_in_ms,
            });
        }
        let n = self.reservation_counter.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "r-{:x}-{:x}-{:016x}",
            self.epoch(),
            n,
            self.reservation_salt ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        let reservation = Reservation {
            account,
            amount: amount.get(),
            deadline: Instant::now() + ttl,
        };
        self.reservations.insert(id.clone(), reservation);
        // The check above and this insert are not one step: concurrent reservations can pass
        // the check together. Give back the ones that went over, so that the limit holds.
        if self.reservations.len() > self.options.reservations_max {
            if let Some((_, r)) = self.reservations.remove(&id) {
                r.account.finish_reservation(r.amount, 0);
                return Err(self.reservations_full());
            }
        }
        metrics::gauge!(crate::metrics::RESERVATIONS_OPEN).set(self.reservations.len() as f64);
        Ok(Reserved {
            decision,
            id: Some(id),
            expires_in_ms,
        })
    }

    /// Charges `amount` of a reservation and gives the rest back. Returns (charged, released).
    pub fn commit(&self, id: &str, amount: u64) -> Result<(u64, u64), NodeError> {
        let reserved = self
            .reservations
            .get(id)
            .map(|r| r.amount)
            .ok_or_else(|| NodeError::UnknownReservation(id.to_string()))?;
        if amount > reserved {
            return Err(NodeError::ExceedsReservation {
                reserved,
                wanted: amount,
            });
        }
        let (_, r) = self
            .reservations
            .remove(id)
            .ok_or_else(|| NodeError::UnknownReservation(id.to_string()))?;
        r.account.finish_reservation(r.amount, amount);
        self.credits_debited.increment(amount);
        Ok((amount, r.amount - amount))
    }

    /// Gives a whole reservation back. Returns the credits released.
    pub fn release(&self, id: &str) -> Result<u64, NodeError> {
        let (_, r) = self
            .reservations
            .remove(id)
            .ok_or_else(|| NodeError::UnknownReservation(id.to_string()))?;
        r.account.finish_reservation(r.amount, 0);
        Ok(r.amount)
    }

    /// What `org`/`ws` can still spend, as this node knows it, and the org's mode.
    pub async fn balance(&self, org: &str, ws: &str) -> Result<(u64, Mode), NodeError> {
        let account = self.account(org, ws).await?;
        let slot = self.slot(org).await?;
        if account.lease.store_left() == STORE_LEFT_UNKNOWN {
            // No answer named this spender yet (a settle answers only the spenders its batch
            // names, and an idle one is not leased ahead): ask, without taking a lease. On
            // failure the answer is what the node knows.
            let spender = account.lease.spender.clone();
            let _ = self
                .settle_slots(std::slice::from_ref(&slot), Wants::Refresh(spender))
                .await;
        }
        Ok((account.lease.remaining(), slot.current().mode))
    }

    /// The account, loading its org into the cache on first use.
    async fn account(&self, org: &str, ws: &str) -> Result<Arc<Account>, NodeError> {
        if let Some(account) = self.cache.get(org, ws) {
            return Ok(account);
        }
        self.slot(org).await?;
        self.cache
            .get(org, ws)
            .ok_or_else(|| NodeError::UnknownWorkspace(ws.to_string()))
    }

    /// The hot path, and its slow path when the lease is short.
    async fn take(
        &self,
        org: &str,
        ws: &str,
        amount: Amount,
        spend: Spend,
    ) -> Result<(Decision, Arc<Account>), NodeError> {
        let account = self.account(org, ws).await?;
        if let Ok(decision) = account.debit(amount.get(), spend) {
            return Ok((decision, account));
        }
        let wait = self.options.lease_wait_max;
        let asked = tokio::time::timeout(wait, self.refill_and_take(org, ws, amount, spend))
            .await
            .unwrap_or_else(|_| {
                Err(NodeError::Unavailable(format!(
                    "lease wait exceeded {}ms",
                    wait.as_millis()
                )))
            });
        match asked {
            // The store cannot be asked: the outage reserve answers while it lasts (these
            // credits are leased: spending them never overspends), then 503.
            Err(NodeError::Unavailable(why)) => {
                match account.debit_from_outage_reserve(amount.get(), spend) {
                    Some(remaining) => {
                        metrics::counter!(crate::metrics::OUTAGE_DEBITS).increment(1);
                        tracing::debug!(org, ws, why, "debit from the outage reserve");
                        Ok((Decision::Allowed { remaining }, account))
                    }
                    None => Err(NodeError::Unavailable(why)),
                }
            }
            other => other,
        }
    }

    /// Waits for the org's control-plane changes, then asks the store for a lease and tries
    /// once more. What is still short afterwards is refused.
    async fn refill_and_take(
        &self,
        org: &str,
        ws: &str,
        amount: Amount,
        spend: Spend,
    ) -> Result<(Decision, Arc<Account>), NodeError> {
        let slot = self.slot(org).await?;
        // Another node is recalling this org's leases: wait until it is done (the caller's
        // lease wait bounds this) rather than take back what it asked for.
        while slot.is_recalled() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let _control = slot.control.lock().await;
        // A state the store no longer answers (the org changed): rebuild it first.
        if slot.is_stale() {
            self.reload(&slot).await?;
        }
        // The org may have been rebuilt while we waited: look the account up again.
        let mut account = self.account(org, ws).await?;
        if let Ok(decision) = account.debit(amount.get(), spend) {
            return Ok((decision, account));
        }
        let wants = |a: &Account| Wants::One(a.lease.spender.clone(), amount.get());
        self.settle_slots(&[Arc::clone(&slot)], wants(&account))
            .await?;
        // The answer may show a change this node had not seen: rebuild and ask again.
        if slot.is_stale() {
            self.reload(&slot).await?;
            account = self.account(org, ws).await?;
            self.settle_slots(&[Arc::clone(&slot)], wants(&account))
                .await?;
        }
        let mut debit = account.debit(amount.get(), spend);
        // Still short, but other nodes hold leases of this spender: ask them to give them back
        // and try again until they do (the caller's lease wait bounds this).
        if debit == Err(AskStore) && account.lease.others() > 0 {
            let recall = self.announce_recall(&slot, None).await;
            while debit == Err(AskStore) && account.lease.others() > 0 && !slot.is_stale() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                self.repeat_recall(&recall, None).await;
                self.settle_slots(&[Arc::clone(&slot)], wants(&account))
                    .await?;
                debit = account.debit(amount.get(), spend);
            }
            self.announce_resume(&recall).await;
            // A change arrived meanwhile: ask once more under the new view.
            if debit == Err(AskStore) && slot.is_stale() {
                self.reload(&slot).await?;
                account = self.account(org, ws).await?;
                self.settle_slots(&[Arc::clone(&slot)], wants(&account))
                    .await?;
                debit = account.debit(amount.get(), spend);
            }
        }
        // What the store could not cover after asking is refused.
        let decision = debit.unwrap_or(Decision::Insufficient {
            remaining: account.lease.remaining(),
        });
        Ok((decision, account))
    }

    /// Runs `f` once per (org, scope, key) within the retention window.
    async fn once<F, Fut>(
        &self,
        org: &str,
        scope: &'static str,
        key: &str,
        fingerprint: String,
        f: F,
    ) -> Result<Reserved, NodeError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Reserved, NodeError>>,
    {
        let name = format!("{org}\u{1f}{scope}\u{1f}{key}");
        let ttl = self.options.idempotency_ttl;
        let (remembered, fresh) = {
            let full = self.idempotency.len() >= self.options.idempotency_keys_max;
            let entry = self.idempotency.entry(name.clone());
            match entry {
                dashmap::Entry::Occupied(mut e) => {
                    if e.get().created.elapsed() > ttl {
                        e.insert(Arc::new(Remembered {
                            fingerprint: fingerprint.clone(),
                            created: Instant::now(),
                            answer: OnceCell::new(),
                        }));
                    }
                    (Arc::clone(e.get()), false)
                }
                dashmap::Entry::Vacant(e) => {
                    if full {
                        return Err(self.idempotency_keys_full());
                    }
                    let r = Arc::new(Remembered {
                        fingerprint: fingerprint.clone(),
                        created: Instant::now(),
                        answer: OnceCell::new(),
                    });
                    e.insert(Arc::clone(&r));
                    (r, true)
                }
            }
        };
        // `full` and the insert are not one step: concurrent new keys can pass the check
        // together. Take this key back if it went over, unless a call with the same key already
        // holds it or has answered with it (forgetting it then could charge twice).
        if fresh && self.idempotency.len() > self.options.idempotency_keys_max {
            let unused = |_: &String, r: &Arc<Remembered>| {
                Arc::ptr_eq(r, &remembered) && Arc::strong_count(r) == 2 && !r.answer.initialized()
            };
            if self.idempotency.remove_if(&name, unused).is_some() {
                return Err(self.idempotency_keys_full());
            }
        }
        if remembered.fingerprint != fingerprint {
            return Err(NodeError::IdempotencyMismatch(key.to_string()));
        }
        // A failed attempt (store unavailable) leaves the cell empty: a retry runs again.
        remembered.answer.get_or_try_init(f).await.cloned()
    }

    /// The refusal of a reservation beyond `reservations_max`, counted.
    fn reservations_full(&self) -> NodeError {
        crate::metrics::limit_hit("reservations");
        NodeError::LimitExceeded {
            limit: "reservations",
            message: format!(
                "open reservations reached the limit of {}",
                self.options.reservations_max
            ),
        }
    }

    /// The refusal of a new idempotency key beyond `idempotency_keys_max`, counted.
    fn idempotency_keys_full(&self) -> NodeError {
        crate::metrics::limit_hit("idempotency_keys");
        NodeError::LimitExceeded {
            limit: "idempotency_keys",
            message: format!(
                "idempotency keys remembered reached the limit of {}",
                self.options.idempotency_keys_max
            ),
        }
    }

    /// Releases reservations whose TTL passed.
    pub(crate) fn expire_reservations(&self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .reservations
            .iter()
            .filter(|r| r.deadline <= now)
            .map(|r| r.key().clone())
            .collect();
        for id in expired {
            if let Some((_, r)) = self.reservations.remove_if(&id, |_, r| r.deadline <= now) {
                r.account.finish_reservation(r.amount, 0);
                metrics::counter!(crate::metrics::RESERVATIONS_EXPIRED).increment(1);
            }
        }
    }

    /// Forgets data-plane idempotency keys older than the retention window.
    pub(crate) fn expire_idempotency(&self) {
        let ttl = self.options.idempotency_ttl;
        self.idempotency.retain(|_, r| r.created.elapsed() <= ttl);
    }

    /// Releases the open reservations of one workspace (it is being deleted).
    pub(crate) fn release_reservations_of(&self, org: &crate::model::OrgId, ws: &WorkspaceId) {
        let ids: Vec<String> = self
            .reservations
            .iter()
            .filter(|r| r.account.org == *org && r.account.workspace == *ws)
            .map(|r| r.key().clone())
            .collect();
        for id in ids {
            let _ = self.release(&id);
        }
    }

    /// Forgets the open reservations of one org without giving anything back: the store closed
    /// them (as consumed) or no longer knows them. A later commit or release of one answers
    /// `unknown_reservation`. Returns how many were dropped.
    pub(crate) fn drop_reservations_of(&self, org: &crate::model::OrgId) -> usize {
        let before = self.reservations.len();
        self.reservations.retain(|_, r| r.account.org != *org);
        before.saturating_sub(self.reservations.len())
    }

    /// Releases every open reservation (the node is stopping).
    pub(crate) fn release_all_reservations(&self) {
        let ids: Vec<String> = self.reservations.iter().map(|r| r.key().clone()).collect();
        for id in ids {
            let _ = self.release(&id);
        }
    }
}
