//! The node: what sits between the API and the store. It owns the cache, loads orgs into it,
//! runs the settler that reports usage and tops leases up, and applies control-plane changes
//! with the recall protocol of docs/design.md.
//!
//! Locks per org, never held on the hot path:
//! - `control` (tokio mutex) serializes control-plane changes and lease refills of one org, so
//!   that a refill never takes credits an operation is about to move.
//! - `settle` (tokio mutex) serializes the org's settle stream, so that batches reach the store
//!   in sequence order; it holds the batch the store has not acknowledged yet.
//!
//! Lock order: `control` before `settle`.

mod control;
mod data;
mod lease;
mod settle;
mod settler;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::cache::{Account, Cache, Lease};
use crate::model::{Mode, NodeId, OrgId, OrgRecord, RuleError, SettleBatch, WorkspaceId};
use crate::store::{Store, StoreError};

pub use crate::cache::Decision;
pub use data::Reserved;

/// Longest a control-plane call waits for the org's other control-plane calls.
pub const CONTROL_WAIT_MAX: Duration = Duration::from_secs(30);

/// How many times a control-plane call recalls leases before giving up: leases can only come
/// back from debits that were already past their check when the recall began.
pub const RECALL_ATTEMPTS_MAX: usize = 5;

/// How often a recall still waiting is announced again: a notice may be lost, and a node that
/// was recalling itself when it heard it (with priority) gives back only when asked again.
pub const RECALL_REPEAT: Duration = Duration::from_millis(100);

/// How long a node answers `unknown_org` from memory after the store said so. An org created
/// through another node becomes visible here within this time.
pub const UNKNOWN_ORG_TTL: Duration = Duration::from_secs(1);

/// Unknown orgs remembered at most; the memory is cleared when full.
pub const UNKNOWN_ORGS_MAX: usize = 10_000;

/// How a node sizes the leases it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePolicy {
    /// Lease the spender's whole balance: right when this node is the only spender (embedded
    /// store), so that every decision is exact and made from memory.
    Whole,
    /// Lease about `horizon` of the spender's recent rate, never more than `share_max_percent`
    /// of what the store has left, never less than one debit: right when nodes share a balance.
    Adaptive {
        horizon: Duration,
        share_max_percent: u64,
    },
}

/// Smallest lease a node asks for ahead of need, so an idle spender's first burst does not
/// queue on the store; still capped by the share of what is left.
pub const LEASE_MIN: u64 = 100;

/// The node's limits and policies.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub lease_policy: LeasePolicy,
    pub lease_wait_max: Duration,
    pub accounts_max: usize,
    pub workspaces_max: usize,
    pub idempotency_keys_max: usize,
    pub idempotency_ttl: Duration,
    pub reservations_max: usize,
    pub reservation_ttl: Duration,
    pub reservation_ttl_max: Duration,
    pub settle_batch_orgs_max: usize,
    /// Longest a control-plane change waits for other nodes to give leases back.
    pub recall_wait_max: Duration,
    /// Credits per lease kept leased aside for store outages.
    pub outage_reserve: u64,
    /// An org with nothing to report is still settled this often: the node's heartbeat, so
    /// that its leases do not expire while it lives.
    pub heartbeat_interval: Duration,
    /// How long after sending a settle the node may spend its leases without another answer
    /// from the store; `None` when nobody else can expire them (one node). Shorter than
    /// `lease_ttl`, after which the store may close them: a node that was paused or cut off
    /// asks the store before it spends again, so it never spends a lease the store closed nor
    /// across a change it has not seen.
    pub lease_term: Option<Duration>,
}

impl NodeOptions {
    pub fn from_config(config: &crate::config::Config) -> Self {
        let lease_policy = match config.store {
            crate::config::StoreKind::Embedded => LeasePolicy::Whole,
            crate::config::StoreKind::Redis => LeasePolicy::Adaptive {
                horizon: config.lease_horizon,
                share_max_percent: config.lease_share_max_percent,
            },
        };
        NodeOptions {
            lease_policy,
            lease_wait_max: config.lease_wait_max,
            accounts_max: config.accounts_max,
            workspaces_max: config.workspaces_max,
            idempotency_keys_max: config.idempotency_keys_max,
            idempotency_ttl: config.idempotency_ttl,
            reservations_max: config.reservations_max,
            reservation_ttl: config.reservation_ttl,
            reservation_ttl_max: config.reservation_ttl_max,
            settle_batch_orgs_max: config.settle_batch_orgs_max,
            recall_wait_max: config.recall_wait_max,
            outage_reserve: config.outage_reserve_credits,
            heartbeat_interval: config.lease_ttl / 3,
            lease_term: match config.store {
                crate::config::StoreKind::Embedded => None,
                // A fifth of the TTL is the margin for clock rates and the request's trip.
                crate::config::StoreKind::Redis => Some(config.lease_ttl * 4 / 5),
            },
        }
    }
}

/// Why the node could not answer (a refusal for lack of credits is a [`Decision`], not this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("unknown org {0}")]
    UnknownOrg(String),
    #[error("unknown workspace {0}")]
    UnknownWorkspace(String),
    #[error("unknown or finished reservation {0}")]
    UnknownReservation(String),
    #[error("commit of {wanted} credits exceeds the {reserved} reserved")]
    ExceedsReservation { reserved: u64, wanted: u64 },
    #[error("org {0} already exists")]
    OrgExists(String),
    #[error("idempotency key {0} was used with a different request")]
    IdempotencyMismatch(String),
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// A configured capacity is full; `limit` is the metric label.
    #[error("{message}")]
    LimitExceeded {
        limit: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rule(r) => NodeError::Rule(r),
            StoreError::OrgExists(o) => NodeError::OrgExists(o.to_string()),
            StoreError::UnknownOrg(o) => NodeError::UnknownOrg(o.to_string()),
            StoreError::IdempotencyMismatch(k) => NodeError::IdempotencyMismatch(k),
            StoreError::LimitExceeded(message) => NodeError::LimitExceeded {
                limit: "idempotency_keys",
                message,
            },
            StoreError::Unavailable(m) | StoreError::Corrupt(m) => NodeError::Unavailable(m),
        }
    }
}

/// One org as this node has it in its cache: built from a store record, replaced whole when
/// the org changes (the old one is retired and drained by the settler).
#[derive(Debug)]
pub(crate) struct OrgState {
    pub mode: Mode,
    /// The org version this state was built from: every batch carries it, and a node whose
    /// store answers another version rebuilds.
    pub version: u64,
    pub accounts: Vec<Arc<Account>>,
    pub leases: Vec<Arc<Lease>>,
}

impl OrgState {
    /// The state of `record`; with `lapsed`, its leases start outside their lease term (a
    /// settle must answer before they are spent).
    fn build(record: &OrgRecord, lapsed: bool) -> OrgState {
        let mut leases: Vec<Arc<Lease>> = Vec::new();
        let primary_lease = Arc::new(Lease::new(record.primary.clone()));
        leases.push(Arc::clone(&primary_lease));
        let accounts = record
            .workspaces
            .keys()
            .map(|ws| {
                let lease = if record.mode == Mode::Shared || *ws == record.primary {
                    Arc::clone(&primary_lease)
                } else {
                    let lease = Arc::new(Lease::new(ws.clone()));
                    leases.push(Arc::clone(&lease));
                    lease
                };
                Arc::new(Account::new(record.org.clone(), ws.clone(), lease))
            })
            .collect();
        if lapsed {
            for lease in &leases {
                lease.set_valid_until(0);
            }
        }
        // In spender order, for `lease`.
        leases.sort_unstable_by(|a, b| a.spender.cmp(&b.spender));
        OrgState {
            mode: record.mode,
            version: record.version,
            accounts,
            leases,
        }
    }

    /// The lease of `spender`: a binary search, since a settle answer names spenders one by
    /// one and an org may have many.
    pub fn lease(&self, spender: &WorkspaceId) -> Option<&Arc<Lease>> {
        self.leases
            .binary_search_by(|p| p.spender.cmp(spender))
            .ok()
            .map(|i| &self.leases[i])
    }
}

/// The settle stream of one org.
#[derive(Debug)]
pub(crate) struct SettleStream {
    /// A batch sent but not acknowledged: re-sent unchanged before anything new.
    pub pending: Option<SettleBatch>,
    /// When the last batch was built: spending rates are measured over it, heartbeats
    /// timed from it.
    pub last_batch: tokio::time::Instant,
    /// False until this life sent the org a batch: the first is sent even with nothing in
    /// it, since it closes what a previous life of the node still holds there.
    pub sent_any: bool,
    /// The highest sequence number of this life the store acknowledged for the org: a reply
    /// that says the store had less forgot acknowledged writes.
    pub acked_seq: u64,
}

impl Default for SettleStream {
    fn default() -> Self {
        SettleStream {
            pending: None,
            last_batch: tokio::time::Instant::now(),
            sent_any: false,
            acked_seq: 0,
        }
    }
}

/// Another node's recall this node is answering: no new lease of the org until that node
/// resumes (a notice with the same id) or `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pause {
    pub from: Option<NodeId>,
    pub id: u64,
    pub until: tokio::time::Instant,
}

/// One org's place on this node.
#[derive(Debug)]
pub(crate) struct OrgSlot {
    pub org: OrgId,
    pub state: RwLock<Arc<OrgState>>,
    /// States replaced by a rebuild, kept until nothing points at them and they are drained.
    pub retired: Mutex<Vec<Arc<OrgState>>>,
    pub control: tokio::sync::Mutex<()>,
    pub settle: tokio::sync::Mutex<SettleStream>,
    /// The org version the store last answered (settle replies; newer ones from notices):
    /// different from the state's means the org changed (or the store lost writes), and the
    /// next round rebuilds it.
    pub seen_version: AtomicU64,
    /// The newest version a `Changed` notice announced. Kept apart from `seen_version`, which
    /// a rebuild from an older read would otherwise overwrite: the notice would be lost.
    pub notified_version: AtomicU64,
    /// Recalls of this node in progress: while any is, recalls from nodes with a higher id
    /// wait for it (two nodes recalling each other would otherwise both wait until timeout).
    pub recalling: AtomicUsize,
    /// Recalls of other nodes being answered: leases are taken only on demand meanwhile.
    pub pauses: Mutex<Vec<Pause>>,
    /// Usage in the settle stream's unacknowledged batch (readable while a settle runs).
    pub pending_usage: AtomicU64,
}

impl OrgSlot {
    pub fn current(&self) -> Arc<OrgState> {
        Arc::clone(&self.state.read())
    }

    /// True while another node's recall asks this node not to lease the org.
    pub fn is_recalled(&self) -> bool {
        let now = tokio::time::Instant::now();
        let mut pauses = self.pauses.lock();
        pauses.retain(|p| now < p.until);
        !pauses.is_empty()
    }

    /// True when the store answered another version of the org than the state's.
    pub fn is_stale(&self) -> bool {
        let current = self.current().version;
        self.seen_version.load(Ordering::Acquire) != current
            || self.notified_version.load(Ordering::Acquire) > current
    }
}

/// A creditd node.
pub struct Node {
    store: Arc<dyn Store>,
    node_id: NodeId,
    /// The node's life: every batch carries it. A new one is taken when the store is found to
    /// have forgotten acknowledged writes.
    epoch: AtomicU64,
    /// Set when a settle reply showed the store forgot writes of this life: the next round
    /// starts a new life.
    life_lost: AtomicBool,
    /// Ids of this node's recall notices.
    recall_ids: AtomicU64,
    options: NodeOptions,
    cache: Cache,
    orgs: DashMap<OrgId, Arc<OrgSlot>>,
    /// Serializes loading orgs into the cache, so that one org is loaded once.
    loading: tokio::sync::Mutex<()>,
    /// Orgs the store did not know, recently: answered from memory for [`UNKNOWN_ORG_TTL`].
    unknown_orgs: DashMap<Box<str>, tokio::time::Instant>,
    reservations: DashMap<String, data::Reservation>,
    idempotency: DashMap<String, Arc<data::Remembered>>,
    /// Settle sequence numbers: one increasing counter for all orgs of this node's life.
    /// (The store only needs them increasing per org; per-org settles are serialized.)
    seq: AtomicU64,
    /// Reservation ids: a counter for uniqueness, a random salt so ids are not guessable.
    reservation_counter: AtomicU64,
    reservation_salt: u64,
    ready: AtomicBool,
    /// `creditd_credits_debited_total`, registered once: the hot path does no registry lookup.
    credits_debited: metrics::Counter,
}

impl Node {
    /// Starts a new life of this node on `store`.
    pub async fn start(
        store: Arc<dyn Store>,
        node_id: NodeId,
        options: NodeOptions,
    ) -> Result<Arc<Node>, NodeError> {
        crate::metrics::store_call("start_node");
        let start = store.start_node(&node_id).await?;
        if start.unclean {
            metrics::counter!(crate::metrics::UNCLEAN_RESTARTS).increment(1);
            tracing::warn!(node = %node_id, "previous run did not stop cleanly: its unsettled usage (at most one settle interval) is lost");
        }
        let salt = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(start.epoch);
            h.finish()
        };
        let node = Arc::new(Node {
            store,
            node_id,
            epoch: AtomicU64::new(start.epoch),
            life_lost: AtomicBool::new(false),
            // Ids of this life's recalls start above every earlier life's (an epoch is at
            // least the start time in ms, and no life makes 2^20 recalls a millisecond), so a
            // late Resume of a dead life lifts nothing.
            recall_ids: AtomicU64::new(start.epoch.saturating_mul(1 << 20)),
            options,
            cache: Cache::new(),
            orgs: DashMap::new(),
            loading: tokio::sync::Mutex::new(()),
            unknown_orgs: DashMap::new(),
            reservations: DashMap::new(),
            idempotency: DashMap::new(),
            seq: AtomicU64::new(0),
            reservation_counter: AtomicU64::new(0),
            reservation_salt: salt,
            ready: AtomicBool::new(true),
            credits_debited: metrics::counter!(crate::metrics::CREDITS_DEBITED),
        });
        metrics::gauge!(crate::metrics::READY).set(1.0);
        if let Some(notices) = node.store.subscribe() {
            tokio::spawn(Node::listen(Arc::downgrade(&node), notices));
        }
        Ok(node)
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    pub fn options(&self) -> &NodeOptions {
        &self.options
    }

    /// True while the node answers debits.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Readiness: ready and the store answers.
    pub async fn check_ready(&self) -> bool {
        self.readiness().await.is_ok()
    }

    /// Readiness with the reason it is missing: stopping, or why the store cannot be used
    /// (a full disk, a store being re-opened, Redis unreachable).
    pub async fn readiness(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err("the node is stopping".into());
        }
        crate::metrics::store_call("ping");
        self.store.ping().await.map_err(|e| e.to_string())
    }

    /// The store, for exports and backups.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Turns readiness off (the first step of a stop).
    pub fn set_unready(&self) {
        self.ready.store(false, Ordering::Release);
        metrics::gauge!(crate::metrics::READY).set(0.0);
    }

    /// The org's slot, loading the org from the store on first use.
    pub(crate) async fn slot(&self, org: &str) -> Result<Arc<OrgSlot>, NodeError> {
        if let Some(slot) = self.orgs.get(org) {
            return Ok(Arc::clone(slot.value()));
        }
        let org_id =
            OrgId::parse(org, "org").map_err(|_| NodeError::UnknownOrg(org.to_string()))?;
        if self
            .unknown_orgs
            .get(org)
            .is_some_and(|t| t.elapsed() < UNKNOWN_ORG_TTL)
        {
            return Err(NodeError::UnknownOrg(org.to_string()));
        }
        let loading = self.loading.lock().await;
        if let Some(slot) = self.orgs.get(org) {
            return Ok(Arc::clone(slot.value()));
        }
        crate::metrics::store_call("load_org");
        let record = self.store.load_org(&org_id).await?.ok_or_else(|| {
            // Remember the miss briefly: a flood of requests for an org that does not
            // exist must not become a flood of store calls.
            if self.unknown_orgs.len() >= UNKNOWN_ORGS_MAX {
                self.unknown_orgs.clear();
            }
            self.unknown_orgs
                .insert(org.into(), tokio::time::Instant::now());
            NodeError::UnknownOrg(org.to_string())
        })?;
        if self.cache.len() + record.workspaces.len() > self.options.accounts_max {
            crate::metrics::limit_hit("accounts");
            return Err(NodeError::LimitExceeded {
                limit: "accounts",
                message: format!(
                    "accounts cached reached the limit of {}",
                    self.options.accounts_max
                ),
            });
        }
        let state = Arc::new(OrgState::build(&record, self.options.lease_term.is_some()));
        for account in &state.accounts {
            self.cache.insert(Arc::clone(account));
        }
        let slot = Arc::new(OrgSlot {
            org: org_id.clone(),
            state: RwLock::new(state),
            retired: Mutex::new(Vec::new()),
            control: tokio::sync::Mutex::new(()),
            settle: tokio::sync::Mutex::new(SettleStream::default()),
            seen_version: AtomicU64::new(record.version),
            notified_version: AtomicU64::new(0),
            recalling: AtomicUsize::new(0),
            pauses: Mutex::new(Vec::new()),
            pending_usage: AtomicU64::new(0),
        });
        // Nobody else can hold the new slot's control lock yet: take it, so that debits arriving
        // before the first lease wait for it instead of asking the store themselves.
        let control = slot.control.lock().await;
        self.orgs.insert(org_id, Arc::clone(&slot));
        drop(loading);
        // Take the first leases now, so that the first debits decide from memory. A failure
        // here is not fatal: debits will ask again.
        if let Err(e) = self
            .settle_slots(&[Arc::clone(&slot)], settle::Wants::All)
            .await
        {
            tracing::warn!(org, error = %e, "first lease failed");
        }
        drop(control);
        Ok(slot)
    }

    /// Replaces the org's state by one built from `record`, retiring the old one.
    pub(crate) fn rebuild(&self, slot: &OrgSlot, record: &OrgRecord) {
        let state = Arc::new(OrgState::build(record, self.options.lease_term.is_some()));
        let previous = slot.current();
        for lease in &state.leases {
            if let Some(old) = previous.lease(&lease.spender) {
                lease.carry_rate(old);
            }
        }
        let old = {
            let mut current = slot.state.write();
            std::mem::replace(&mut *current, Arc::clone(&state))
        };
        for account in &state.accounts {
            self.cache.insert(Arc::clone(account));
        }
        for account in &old.accounts {
            self.cache.remove(account);
        }
        // Nothing spends from a retired lease any more: its lease goes back with the next batch.
        for lease in &old.leases {
            lease.set_valid_until(0);
        }
        // The record just read is the freshest word on the org's version, even if lower (a
        // store that forgot writes).
        slot.seen_version.store(record.version, Ordering::Release);
        slot.retired.lock().push(old);
    }

    /// A new settle sequence number.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::AcqRel) + 1
    }
}

impl Node {
    /// One line on how this node holds an org (its view's version, pauses, each lease's lease,
    /// what the store had left, other nodes' leases, the lease term): for diagnostics.
    pub fn describe_org(&self, org: &str) -> String {
        let Some(slot) = self.orgs.get(org).map(|s| Arc::clone(s.value())) else {
            return "not loaded".into();
        };
        let state = slot.current();
        let mut out = format!(
            "version {} seen {} recalled {} leases:",
            state.version,
            slot.seen_version.load(Ordering::Acquire),
            slot.is_recalled()
        );
        for p in &state.leases {
            out += &format!(
                " [{} lease {} left {} others {} term {}]",
                p.spender,
                p.credits(),
                p.store_left(),
                p.others(),
                p.in_term()
            );
        }
        out += &format!(" retired {}", slot.retired.lock().len());
        out
    }
}
