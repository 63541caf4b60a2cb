//! The embedded store: one node, one redb file. The default, so that a single machine needs no
//! server at all.
//!
//! Every org lives in memory as an [`OrgRecord`] and on disk as its JSON in the `orgs` table.
//! A call computes the new record on a copy with the pure rules of [`crate::model`], writes it
//! with its ledger entries (and idempotency key) in one redb transaction, and only then replaces
//! the copy in memory: what is answered is on disk (redb commits with fsync by default).
//!
//! There is one node, so what a previous life of it still held when it died is given back to
//! the balances ([`PriorLife::ReturnToBalance`]): the usage it had not settled is lost
//! (under-charged, never over-charged), at most one settle interval of it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    unix_ms, ControlOp, ControlOutcome, IdempotencyKey, LedgerEntry, LedgerPage, NodeStart, Notice,
    Store, StoreError,
};
use crate::model::{
    LedgerEvent, Mode, NodeId, OrgId, OrgRecord, PriorLife, SettleBatch, SettleReply, WorkspaceId,
};

const ORGS: TableDefinition<&str, &[u8]> = TableDefinition::new("orgs");
const LEDGER: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ledger");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// Node epochs (`epoch:<node>`) and clean-stop markers (`clean:<node>`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "creditd.redb";

/// Limits of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Control-plane idempotency keys remembered at most; a new key beyond it is refused.
    pub idempotency_keys_max: usize,
    /// How long a control-plane idempotency key is remembered.
    pub idempotency_ttl: Duration,
}

/// An org in memory with the number of its last ledger entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredOrg {
    record: OrgRecord,
    ledger_seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RememberedKey {
    fingerprint: String,
    at_ms: u64,
    outcome: ControlOutcome,
}

struct Inner {
    db: Database,
    /// Every org, as last committed. The lock serializes writers (redb has one writer at a
    /// time anyway) and is never held across an `.await`: calls run on the blocking pool.
    orgs: Mutex<HashMap<OrgId, StoredOrg>>,
    idempotency_keys: Mutex<usize>,
    options: EmbeddedOptions,
    /// Notices between nodes sharing this store in one process (tests of the cluster
    /// protocol); a lone node receives only its own.
    notices: tokio::sync::broadcast::Sender<Notice>,
}

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

fn idem_key(org: &OrgId, key: &IdempotencyKey) -> String {
    format!("{}\u{1f}{}\u{1f}{}", org, key.scope, key.key)
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::create(dir.join(DB_FILE)).map_err(io)?;
        let txn = db.begin_write().map_err(io)?;
        {
            txn.open_table(ORGS).map_err(io)?;
            txn.open_table(LEDGER).map_err(io)?;
            txn.open_table(IDEMPOTENCY).map_err(io)?;
            txn.open_table(META).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        let read = db.begin_read().map_err(io)?;
        let mut orgs = HashMap::new();
        for item in read.open_table(ORGS).map_err(io)?.iter().map_err(io)? {
            let (_, value) = item.map_err(io)?;
            let stored: StoredOrg = serde_json::from_slice(value.value()).map_err(corrupt)?;
            if !stored.record.is_conserved() {
                return Err(corrupt(format!(
                    "org {} is not conserved on disk",
                    stored.record.org
                )));
            }
            orgs.insert(stored.record.org.clone(), stored);
        }
        let keys = read
            .open_table(IDEMPOTENCY)
            .map_err(io)?
            .len()
            .map_err(io)? as usize;
        drop(read);
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                orgs: Mutex::new(orgs),
                idempotency_keys: Mutex::new(keys),
                notices: tokio::sync::broadcast::channel(super::NOTICES_BUFFERED).0,
                options,
            }),
        })
    }

    /// Runs `f` on the blocking pool: redb calls block on disk I/O.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }
}

impl Inner {
    /// Writes the new state of some orgs, their ledger entries and an optional idempotency
    /// record in one transaction, then installs the new states in memory.
    fn commit(
        &self,
        orgs: &mut HashMap<OrgId, StoredOrg>,
        changes: Vec<(StoredOrg, Vec<LedgerEvent>)>,
        remembered: Option<(String, RememberedKey)>,
        meta: &[(&str, u64)],
    ) -> Result<(), StoreError> {
        let at_ms = unix_ms();
        let txn = self.db.begin_write().map_err(io)?;
        let mut installed = Vec::with_capacity(changes.len());
        {
            let mut org_table = txn.open_table(ORGS).map_err(io)?;
            let mut ledger = txn.open_table(LEDGER).map_err(io)?;
            for (mut stored, events) in changes {
                let org = stored.record.org.clone();
                for event in events {
                    stored.ledger_seq += 1;
                    let entry = LedgerEntry {
                        seq: stored.ledger_seq,
                        at_ms,
                        event,
                    };
                    let bytes = serde_json::to_vec(&entry).map_err(corrupt)?;
                    ledger
                        .insert((org.as_str(), stored.ledger_seq), bytes.as_slice())
                        .map_err(io)?;
                }
                let bytes = serde_json::to_vec(&stored).map_err(corrupt)?;
                org_table
                    .insert(org.as_str(), bytes.as_slice())
                    .map_err(io)?;
                installed.push(stored);
            }
            if let Some((key, value)) = &remembered {
                let bytes = serde_json::to_vec(value).map_err(corrupt)?;
                txn.open_table(IDEMPOTENCY)
                    .map_err(io)?
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(io)?;
            }
            let mut meta_table = txn.open_table(META).map_err(io)?;
            for (k, v) in meta {
                meta_table.insert(*k, *v).map_err(io)?;
            }
        }
        txn.commit().map_err(io)?;
        if remembered.is_some() {
            *self.idempotency_keys.lock() += 1;
        }
        for stored in installed {
            orgs.insert(stored.record.org.clone(), stored);
        }
        Ok(())
    }

    fn remembered(&self, key: &str) -> Result<Option<RememberedKey>, StoreError> {
        let read = self.db.begin_read().map_err(io)?;
        let table = read.open_table(IDEMPOTENCY).map_err(io)?;
        let Some(value) = table.get(key).map_err(io)? else {
            return Ok(None);
        };
        let remembered: RememberedKey = serde_json::from_slice(value.value()).map_err(corrupt)?;
        let ttl_ms = self.options.idempotency_ttl.as_millis() as u64;
        Ok((unix_ms().saturating_sub(remembered.at_ms) <= ttl_ms).then_some(remembered))
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let read = self.db.begin_read().map_err(io)?;
        let table = read.open_table(META).map_err(io)?;
        Ok(table.get(key).map_err(io)?.map(|v| v.value()))
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn start_node(&self, node: &NodeId) -> Result<NodeStart, StoreError> {
        let node = node.clone();
        self.blocking(move |inner| {
            let epoch_key = format!("epoch:{node}");
            let clean_key = format!("clean:{node}");
            let previous = inner.meta(&epoch_key)?;
            let unclean = previous.is_some() && inner.meta(&clean_key)? != Some(1);
            // Above every earlier epoch, and at least the clock in ms: an epoch never repeats,
            // even if the counter were lost (as on the Redis store).
            let epoch = (previous.unwrap_or(0) + 1).max(unix_ms());
            let mut orgs = inner.orgs.lock();
            let mut changes = Vec::new();
            for stored in orgs.values() {
                let mut next = stored.clone();
                let events = next.record.close_node(&node, PriorLife::ReturnToBalance)?;
                if !events.is_empty() {
                    changes.push((next, events));
                }
            }
            inner.commit(
                &mut orgs,
                changes,
                None,
                &[(&epoch_key, epoch), (&clean_key, 0)],
            )?;
            Ok(NodeStart { epoch, unclean })
        })
        .await
    }

    async fn stop_node(&self, node: &NodeId) -> Result<(), StoreError> {
        let clean_key = format!("clean:{node}");
        self.blocking(move |inner| {
            let mut orgs = inner.orgs.lock();
            inner.commit(&mut orgs, Vec::new(), None, &[(&clean_key, 1)])
        })
        .await
    }

    async fn load_org(&self, org: &OrgId) -> Result<Option<OrgRecord>, StoreError> {
        Ok(self.inner.orgs.lock().get(org).map(|s| s.record.clone()))
    }

    async fn create_org(
        &self,
        org: &OrgId,
        mode: Mode,
        primary: &WorkspaceId,
    ) -> Result<OrgRecord, StoreError> {
        let (org, primary) = (org.clone(), primary.clone());
        self.blocking(move |inner| {
            let mut orgs = inner.orgs.lock();
            if orgs.contains_key(&org) {
                return Err(StoreError::OrgExists(org));
            }
            let (record, event) = OrgRecord::new(org, mode, primary);
            let stored = StoredOrg {
                record: record.clone(),
                ledger_seq: 0,
            };
            inner.commit(&mut orgs, vec![(stored, vec![event])], None, &[])?;
            Ok(record)
        })
        .await
    }

    async fn apply(
        &self,
        org: &OrgId,
        op: &ControlOp,
        key: Option<&IdempotencyKey>,
    ) -> Result<ControlOutcome, StoreError> {
        let (org, op, key) = (org.clone(), op.clone(), key.cloned());
        self.blocking(move |inner| {
            let mut orgs = inner.orgs.lock();
            let stored = orgs
                .get(&org)
                .ok_or_else(|| StoreError::UnknownOrg(org.clone()))?;
            let remember_as = key.as_ref().map(|k| idem_key(&org, k));
            if let (Some(k), Some(name)) = (&key, &remember_as) {
                if let Some(remembered) = inner.remembered(name)? {
                    if remembered.fingerprint != k.fingerprint {
                        return Err(StoreError::IdempotencyMismatch(k.key.clone()));
                    }
                    return Ok(ControlOutcome {
                        replayed: true,
                        ..remembered.outcome
                    });
                }
                if *inner.idempotency_keys.lock() >= inner.options.idempotency_keys_max {
                    return Err(StoreError::LimitExceeded(format!(
                        "idempotency keys remembered reached the limit of {}",
                        inner.options.idempotency_keys_max
                    )));
                }
            }
            let mut next = stored.clone();
            let (returned, events) = op.apply(&mut next.record)?;
            let outcome = ControlOutcome {
                view: next.record.view(),
                returned,
                replayed: false,
            };
            let remembered = match (key, remember_as) {
                (Some(k), Some(name)) => Some((
                    name,
                    RememberedKey {
                        fingerprint: k.fingerprint,
                        at_ms: unix_ms(),
                        outcome: outcome.clone(),
                    },
                )),
                _ => None,
            };
            let version = next.record.version;
            inner.commit(&mut orgs, vec![(next, events)], remembered, &[])?;
            let _ = inner.notices.send(Notice::Changed { org, version });
            Ok(outcome)
        })
        .await
    }

    async fn settle(
        &self,
        batches: &[(OrgId, SettleBatch)],
    ) -> Vec<Result<(SettleReply, OrgRecord), StoreError>> {
        let batches = batches.to_vec();
        let count = batches.len();
        let result = self
            .blocking(move |inner| {
                let now_ms = unix_ms();
                let mut orgs = inner.orgs.lock();
                let mut answers = Vec::with_capacity(batches.len());
                let mut changes = Vec::new();
                for (org, batch) in &batches {
                    let Some(stored) = orgs.get(org) else {
                        answers.push(Err(StoreError::UnknownOrg(org.clone())));
                        continue;
                    };
                    let mut next = stored.clone();
                    match next
                        .record
                        .settle(batch, now_ms, PriorLife::ReturnToBalance)
                    {
                        Ok((reply, events)) => {
                            let applied = reply.applied;
                            answers.push(Ok((reply, next.record.clone())));
                            // A retried batch changes nothing. An applied one is written, a
                            // bare heartbeat too: its sequence number is what the next reply
                            // answers as `prev_seq`, and a node takes a lower one for a store
                            // that forgot acknowledged writes.
                            if applied {
                                changes.push((next, events));
                            }
                        }
                        Err(e) => answers.push(Err(StoreError::Rule(e))),
                    }
                }
                // One transaction for the whole tick: one fsync however many orgs settled.
                inner.commit(&mut orgs, changes, None, &[])?;
                Ok(answers)
            })
            .await;
        match result {
            Ok(answers) => answers,
            Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
        }
    }

    async fn ledger(
        &self,
        org: &OrgId,
        after: u64,
        limit: usize,
    ) -> Result<LedgerPage, StoreError> {
        let org = org.clone();
        let limit = limit.min(super::LEDGER_PAGE_MAX);
        self.blocking(move |inner| {
            if !inner.orgs.lock().contains_key(&org) {
                return Err(StoreError::UnknownOrg(org));
            }
            let read = inner.db.begin_read().map_err(io)?;
            let table = read.open_table(LEDGER).map_err(io)?;
            let start = after.saturating_add(1);
            let mut entries = Vec::with_capacity(limit.min(1024));
            let mut more = false;
            for item in table
                .range((org.as_str(), start)..=(org.as_str(), u64::MAX))
                .map_err(io)?
            {
                let (_, value) = item.map_err(io)?;
                if entries.len() == limit {
                    more = true;
                    break;
                }
                entries
                    .push(serde_json::from_slice::<LedgerEntry>(value.value()).map_err(corrupt)?);
            }
            let next = if more {
                entries.last().map(|e| e.seq)
            } else {
                None
            };
            Ok(LedgerPage { entries, next })
        })
        .await
    }

    async fn prune(&self, now_ms: u64) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let ttl_ms = inner.options.idempotency_ttl.as_millis() as u64;
            let _orgs = inner.orgs.lock();
            let txn = inner.db.begin_write().map_err(io)?;
            let remaining;
            {
                let mut table = txn.open_table(IDEMPOTENCY).map_err(io)?;
                table
                    .retain(|_, value| {
                        serde_json::from_slice::<RememberedKey>(value)
                            .map(|r| now_ms.saturating_sub(r.at_ms) <= ttl_ms)
                            .unwrap_or(false)
                    })
                    .map_err(io)?;
                remaining = table.len().map_err(io)? as usize;
            }
            txn.commit().map_err(io)?;
            *inner.idempotency_keys.lock() = remaining;
            Ok(())
        })
        .await
    }

    async fn announce(&self, notice: &Notice) -> Result<(), StoreError> {
        // No receiver is not an error: nobody needs to hear it.
        let _ = self.inner.notices.send(notice.clone());
        Ok(())
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        Some(self.inner.notices.subscribe())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
