//! The truth behind the cache: one trait, two backends with the same semantics.
//!
//! - [`embedded`]: one node, a redb file on disk; the default.
//! - [`redis`]: many nodes sharing one Redis or Redis Cluster; every change is one Lua script.
//!
//! The store is never called per request. The node calls it for control-plane operations and,
//! from its settler, once per org per batch to report usage and take leases (docs/design.md).
//!
//! [`export`] reads and writes every org as JSON lines (backups, moving between stores)
//! through three methods of the trait: [`Store::list_orgs`], [`Store::export_org`] and
//! [`Store::import_org`].

pub mod embedded;
pub mod export;
mod quiet;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{
    Amount, LedgerEvent, Mode, NodeId, OrgId, OrgRecord, OrgView, RuleError, SettleBatch,
    SettleReply, SettleView, WorkspaceId,
};

/// A control-plane change to one org. Each is applied atomically and durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlOp {
    Purchase {
        amount: Amount,
    },
    CreateWorkspace {
        workspace: WorkspaceId,
    },
    DeleteWorkspace {
        workspace: WorkspaceId,
    },
    Transfer {
        from: WorkspaceId,
        to: WorkspaceId,
        amount: Amount,
    },
    SetMode {
        mode: Mode,
    },
}

impl ControlOp {
    /// Bounded label for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ControlOp::Purchase { .. } => "purchase",
            ControlOp::CreateWorkspace { .. } => "create_workspace",
            ControlOp::DeleteWorkspace { .. } => "delete_workspace",
            ControlOp::Transfer { .. } => "transfer",
            ControlOp::SetMode { .. } => "set_mode",
        }
    }

    /// Applies the op to a record (on success the record is the new state).
    pub fn apply(&self, record: &mut OrgRecord) -> Result<(u64, Vec<LedgerEvent>), RuleError> {
        match self {
            ControlOp::Purchase { amount } => Ok((0, vec![record.purchase(*amount)?])),
            ControlOp::CreateWorkspace { workspace } => {
                Ok((0, vec![record.create_workspace(workspace.clone())?]))
            }
            ControlOp::DeleteWorkspace { workspace } => {
                let (returned, event) = record.delete_workspace(workspace)?;
                Ok((returned, vec![event]))
            }
            ControlOp::Transfer { from, to, amount } => {
                Ok((0, vec![record.transfer(from, to, *amount)?]))
            }
            ControlOp::SetMode { mode } => Ok((0, record.set_mode(*mode)?)),
        }
    }
}

/// An idempotency key on a control-plane call: the same key and fingerprint return the first
/// outcome; the same key with another fingerprint is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The kind of call the key is scoped to (`purchase`, `transfer`).
    pub scope: &'static str,
    pub key: String,
    /// A canonical form of the request body: equal bodies give equal fingerprints.
    pub fingerprint: String,
}

/// What an applied control-plane operation left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlOutcome {
    /// The org after the operation.
    pub view: OrgView,
    /// Credits a deletion returned to the Primary (0 for other operations).
    pub returned: u64,
    /// True when this is the remembered outcome of an earlier call with the same key.
    #[serde(default)]
    pub replayed: bool,
}

/// One ledger entry as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub seq: u64,
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: LedgerEvent,
}

/// A page of an org's ledger, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    /// Cursor for the next page, if there may be more.
    pub next: Option<u64>,
    /// Entries trimmed from the start of the org's ledger (`ledger_retain`): those with seq 1
    /// to `trimmed` are no longer kept, and the first kept has seq `trimmed + 1`. A page after
    /// a cursor below that starts at the first kept entry. The org's totals are counters and
    /// still count what the trimmed entries recorded.
    #[serde(default)]
    pub trimmed: u64,
}

/// What the store says when a node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeStart {
    /// The node's new life; every settle batch carries it.
    pub epoch: u64,
    /// True when the previous life did not stop cleanly (its unsettled usage is lost).
    pub unclean: bool,
}

/// Notices kept for a slow receiver before it skips ahead (it loses nothing it cannot learn
/// from the next settle).
pub(crate) const NOTICES_BUFFERED: usize = 1024;

/// Largest ledger page a store reads in one call (the most `ledger_page_max` may be); a caller
/// asking for more gets this many and a cursor.
pub(crate) const LEDGER_PAGE_MAX: usize = *crate::config::bounds::LEDGER_PAGE_MAX.end() as usize;

/// A change announced to every node through the store (Redis pub/sub). Delivery is best effort:
/// the org version returned on every settle is the guarantee, a notice only makes it faster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// The org changed (a control-plane operation): reload it.
    Changed { org: OrgId, version: u64 },
    /// A node needs credits that other nodes hold as leases: settle and give them back, and
    /// take no new lease of the org until the matching `Resume`, at most `recall_wait_max`.
    Recall {
        org: OrgId,
        /// The recalling node and its id for this recall (`Resume` names the same pair).
        #[serde(default)]
        from: Option<NodeId>,
        #[serde(default)]
        id: u64,
        /// A workspace being deleted: open reservations of it are released too.
        #[serde(default)]
        cancel: Option<WorkspaceId>,
    },
    /// The recall `id` of node `from` is over: lift the pause it caused (only that one).
    Resume {
        org: OrgId,
        #[serde(default)]
        from: Option<NodeId>,
        #[serde(default)]
        id: u64,
    },
}

/// A failure of the store (a refusal by the rules is `Rule`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("org {0} already exists")]
    OrgExists(OrgId),
    #[error("unknown org {0}")]
    UnknownOrg(OrgId),
    #[error("idempotency key {0} was used with a different request")]
    IdempotencyMismatch(String),
    #[error("{0}")]
    LimitExceeded(String),
    /// The store could not be reached or did not answer in time: the outcome may be unknown.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something that cannot be right (corrupt data, a bug).
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

/// The operations a node needs from its store. Implementations apply each call atomically;
/// `Unavailable` means the outcome is unknown and the caller retries the very same call.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `embedded` or `redis`, for logs and `/metrics`.
    fn kind(&self) -> &'static str;

    /// Registers a new life of `node`, closing what its previous life still held.
    async fn start_node(&self, node: &NodeId) -> Result<NodeStart, StoreError>;

    /// Marks a clean stop of `node` after its final settle.
    async fn stop_node(&self, node: &NodeId) -> Result<(), StoreError>;

    /// Reads an org, or `None` if it does not exist.
    async fn load_org(&self, org: &OrgId) -> Result<Option<OrgRecord>, StoreError>;

    /// Creates an org with its Primary Workspace; `OrgExists` if the id is taken.
    async fn create_org(
        &self,
        org: &OrgId,
        mode: Mode,
        primary: &WorkspaceId,
    ) -> Result<OrgRecord, StoreError>;

    /// Applies one control-plane operation durably, with its ledger entries.
    async fn apply(
        &self,
        org: &OrgId,
        op: &ControlOp,
        key: Option<&IdempotencyKey>,
    ) -> Result<ControlOutcome, StoreError>;

    /// Applies settle batches, one per org; each is atomic on its own and answered in order,
    /// with what the batch touched of the org ([`OrgRecord::settle_view`]), never the whole org.
    async fn settle(
        &self,
        batches: &[(OrgId, SettleBatch)],
    ) -> Vec<Result<(SettleReply, SettleView), StoreError>>;

    /// Reads a page of an org's ledger: entries with `seq > after`, at most `limit`.
    async fn ledger(&self, org: &OrgId, after: u64, limit: usize)
        -> Result<LedgerPage, StoreError>;

    /// Forgets idempotency keys older than the retention window.
    async fn prune(&self, now_ms: u64) -> Result<(), StoreError>;

    /// Cheap reachability check for `/readyz`; the error says why the store cannot be used.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Every org the store holds, in no particular order (exports; an empty list is an empty
    /// store). Not for the request path: it reads the whole key space on Redis. A store that
    /// cannot export (a test double) answers `Unavailable` to this and the next two methods.
    async fn list_orgs(&self) -> Result<Vec<OrgId>, StoreError> {
        Err(no_export(self.kind()))
    }

    /// One org as it is at one instant (record, ledger as kept, live idempotency keys), or
    /// `None` if it does not exist. Node holdings are left in the record as stored.
    async fn export_org(&self, _org: &OrgId) -> Result<Option<export::OrgDump>, StoreError> {
        Err(no_export(self.kind()))
    }

    /// Writes one org of an export, atomically; `OrgExists` if the id is taken. The dump
    /// must pass [`export::OrgDump::validate`].
    async fn import_org(&self, _dump: &export::OrgDump) -> Result<(), StoreError> {
        Err(no_export(self.kind()))
    }

    /// Announces a notice to every node of the store, this one included. The default tells
    /// nobody: a store no other node shares may keep it; both stores here deliver it.
    async fn announce(&self, _notice: &Notice) -> Result<(), StoreError> {
        Ok(())
    }

    /// Notices announced by any node, this one included; `None` (the default) for a store
    /// that delivers none.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        None
    }
}

fn no_export(kind: &str) -> StoreError {
    StoreError::Unavailable(format!("the {kind} store cannot export or import"))
}

/// Milliseconds since the Unix epoch, for ledger timestamps.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
