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
//!
//! # Failures of the disk
//!
//! After an I/O error redb refuses every later call until the database is re-opened. So a
//! failed call marks the store failing: calls answer `Unavailable` with the cause (and
//! `/readyz` 503) while the store re-opens the file, with a backoff, proves it can commit
//! again with a small write, and reloads every org from the file (a commit that failed may
//! still have reached the disk: the file, not memory, is the truth). Nothing acknowledged is
//! lost, and a settle batch re-sent after an unknown outcome applies once (its sequence number).
//!
//! A file that is damaged or cannot be read is refused at open with [`StoreError::Corrupt`],
//! naming the file and what to do; redb panics on some damaged pages, so every call into it
//! runs under [`super::quiet::catch`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::export::{KeyDump, OrgDump};
use super::{
    quiet, unix_ms, ControlOp, ControlOutcome, IdempotencyKey, LedgerEntry, LedgerPage, NodeStart,
    Notice, Store, StoreError,
};
use crate::config::DEFAULT_EMBEDDED_CACHE_BYTES;
use crate::model::{
    LedgerEvent, Mode, NodeId, OrgId, OrgRecord, PriorLife, SettleBatch, SettleReply, SettleView,
    WorkspaceId,
};

const ORGS: TableDefinition<&str, &[u8]> = TableDefinition::new("orgs");
const LEDGER: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ledger");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// Node epochs (`epoch:<node>`) and clean-stop markers (`clean:<node>`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "creditd.redb";

/// First and longest wait between two attempts to re-open a failing database.
const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Key of the `meta` table written to prove that the re-opened database commits again.
const PROBE_KEY: &str = "probe";

/// After a "no space left" failure, the store is not used again before this much can be
/// written beside the data file: redb can often still commit into free pages inside its file
/// on a full disk, and a node that flips back to ready only to fail on the next larger
/// commit would make readiness flap while the disk stays full.
const HEADROOM_BYTES: usize = 1 << 20;
const HEADROOM_FILE: &str = "creditd.headroom";

/// Limits of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Control-plane idempotency keys remembered at most; a new key beyond it is refused.
    pub idempotency_keys_max: usize,
    /// How long a control-plane idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// Ledger entries kept per org (`ledger_retain`): once an org's ledger holds more than
    /// [`ledger_trim_at`] of it, the oldest are deleted down to this many, in the transaction
    /// that appends.
    ///
    /// [`ledger_trim_at`]: crate::config::ledger_trim_at
    pub ledger_retain: u64,
    /// Bytes of redb's page cache ([`DEFAULT_EMBEDDED_CACHE_BYTES`]).
    pub cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    /// The defaults of the configuration.
    fn default() -> Self {
        EmbeddedOptions {
            idempotency_keys_max: crate::config::DEFAULT_IDEMPOTENCY_KEYS_MAX,
            idempotency_ttl: crate::config::DEFAULT_IDEMPOTENCY_TTL,
            ledger_retain: crate::config::DEFAULT_LEDGER_RETAIN,
            cache_bytes: DEFAULT_EMBEDDED_CACHE_BYTES,
        }
    }
}

/// An org in memory with the number of its last ledger entry, and how many of its first
/// entries were trimmed (seqs 1 to `ledger_trimmed` are gone; the ledger table holds
/// `ledger_trimmed + 1 ..= ledger_seq`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredOrg {
    record: OrgRecord,
    ledger_seq: u64,
    /// Absent in files written before ledgers were trimmed: nothing was.
    #[serde(default)]
    ledger_trimmed: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RememberedKey {
    fingerprint: String,
    at_ms: u64,
    outcome: ControlOutcome,
}

/// Whether the database can be used.
enum Health {
    Ok,
    /// A call failed with `cause`; no call reaches redb before `next_try`, when the database is
    /// re-opened.
    Failing {
        cause: String,
        next_try: Instant,
        backoff: Duration,
        /// The disk was full: [`HEADROOM_BYTES`] must be writable before the store is used.
        full: bool,
    },
}

struct Inner {
    path: PathBuf,
    /// `None` only while the database is re-opened. Every transaction runs under the read
    /// lock, so that re-opening (under the write lock) never meets an open transaction.
    db: RwLock<Option<Database>>,
    /// Lock order: `health`, then `orgs`, then `db`.
    health: Mutex<Health>,
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

/// The `creditd_store_errors_total` kind of a redb error.
fn error_kind(e: &redb::Error) -> &'static str {
    // ENOSPC and EDQUOT (Linux): `io::ErrorKind::StorageFull` is newer than our rust-version.
    const NO_SPACE: [i32; 2] = [28, 122];
    match e {
        redb::Error::Io(io) if io.raw_os_error().is_some_and(|c| NO_SPACE.contains(&c)) => "full",
        redb::Error::Io(_) | redb::Error::PreviousIo => "io",
        redb::Error::Corrupted(_) => "corrupt",
        _ => "other",
    }
}

/// A failed redb call: counted, and `Unavailable` (the store re-opens the database).
fn io<E: Into<redb::Error>>(e: E) -> StoreError {
    let e: redb::Error = e.into();
    crate::metrics::store_error(error_kind(&e));
    StoreError::Unavailable(format!("embedded store: {e}"))
}

/// What to do about a damaged or unreadable data file, for every message that names one.
fn damaged(path: &Path, why: impl std::fmt::Display) -> StoreError {
    // One line: a panic's message (an assertion's) may span several.
    let why = why
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    StoreError::Corrupt(format!(
        "data file {} is damaged or unreadable ({why}); restore a backup (creditd restore \
         --from FILE into an empty data_dir) or run `creditd check --data-dir {}` for details",
        path.display(),
        path.parent().unwrap_or(Path::new(".")).display()
    ))
}

/// Opens (or creates) the database file and its tables, with a page cache of `cache_bytes`; a
/// damaged file, or a panic of redb on it, is [`damaged`].
fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    // redb turns an empty file into a new database: that would silently be a new, empty
    // store in place of a lost one.
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(damaged(path, "the file is empty"));
    }
    let opened = quiet::catch(|| -> Result<Database, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| {
                let e: redb::Error = e.into();
                match &e {
                    redb::Error::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                        "data file {} is in use by another process (another creditd on this \
                     data_dir?); a running node is backed up with `creditd backup`",
                        path.display()
                    )),
                    redb::Error::Io(io)
                        if io.kind() == std::io::ErrorKind::NotFound
                            || error_kind(&e) == "full" =>
                    {
                        crate::metrics::store_error(error_kind(&e));
                        StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))
                    }
                    _ => damaged(path, &e),
                }
            })?;
        let txn = db.begin_write().map_err(io)?;
        {
            txn.open_table(ORGS).map_err(|e| damaged(path, e))?;
            txn.open_table(LEDGER).map_err(|e| damaged(path, e))?;
            txn.open_table(IDEMPOTENCY).map_err(|e| damaged(path, e))?;
            txn.open_table(META).map_err(|e| damaged(path, e))?;
        }
        txn.commit().map_err(io)?;
        Ok(db)
    });
    match opened {
        Ok(result) => result,
        Err(panic) => {
            crate::metrics::store_error("corrupt");
            Err(damaged(path, format!("redb failed on it: {panic}")))
        }
    }
}

/// What [`EmbeddedStore::check`] found in a sound data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub orgs: usize,
    pub ledger_entries: u64,
    pub keys: usize,
    pub bytes: u64,
}

/// A copy of a data file in the temporary directory, removed when dropped.
struct TempCopy(PathBuf);

impl TempCopy {
    fn of(path: &Path) -> Result<TempCopy, StoreError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let copy = TempCopy(
            std::env::temp_dir().join(format!("creditd-check-{}-{nanos}.redb", std::process::id())),
        );
        std::fs::copy(path, &copy.0).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot copy {} to {} to check it: {e}",
                path.display(),
                copy.0.display()
            ))
        })?;
        Ok(copy)
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An error about a checked copy, told about the original file (and its folder).
fn rename(e: StoreError, copy: &Path, original: &Path) -> StoreError {
    let parent = |p: &Path| p.parent().unwrap_or(Path::new(".")).display().to_string();
    let fix = |m: String| {
        m.replace(&copy.display().to_string(), &original.display().to_string())
            .replace(
                &format!("--data-dir {}`", parent(copy)),
                &format!("--data-dir {}`", parent(original)),
            )
    };
    match e {
        StoreError::Corrupt(m) => StoreError::Corrupt(fix(m)),
        StoreError::Unavailable(m) => StoreError::Unavailable(fix(m)),
        other => other,
    }
}

/// What [`load_all`] read.
struct Loaded {
    orgs: HashMap<OrgId, StoredOrg>,
    keys: usize,
    ledger_entries: u64,
}

/// Reads every org and checks the whole file can be read: every ledger entry, idempotency
/// key and meta value is read and parsed, so that damage anywhere is found at open rather
/// than by a later request.
fn load_all(path: &Path, db: &Database) -> Result<Loaded, StoreError> {
    let loaded = quiet::catch(|| -> Result<Loaded, StoreError> {
        let bad = |e: &dyn std::fmt::Display| damaged(path, e);
        let read = db.begin_read().map_err(io)?;
        let mut orgs = HashMap::new();
        for item in read
            .open_table(ORGS)
            .map_err(|e| bad(&e))?
            .iter()
            .map_err(|e| bad(&e))?
        {
            let (_, value) = item.map_err(|e| bad(&e))?;
            let stored: StoredOrg = serde_json::from_slice(value.value()).map_err(|e| bad(&e))?;
            if !stored.record.is_conserved() {
                return Err(bad(&format!("org {} is not conserved", stored.record.org)));
            }
            orgs.insert(stored.record.org.clone(), stored);
        }
        let mut ledger_entries = 0u64;
        for item in read
            .open_table(LEDGER)
            .map_err(|e| bad(&e))?
            .iter()
            .map_err(|e| bad(&e))?
        {
            let (key, value) = item.map_err(|e| bad(&e))?;
            let (org, seq) = key.value();
            let entry: LedgerEntry = serde_json::from_slice(value.value()).map_err(|e| bad(&e))?;
            let known = orgs.get(org).is_some_and(|s: &StoredOrg| {
                s.ledger_trimmed < seq && seq <= s.ledger_seq && entry.seq == seq
            });
            if !known {
                return Err(bad(&format!(
                    "ledger entry {seq} of org {org} does not fit that org's ledger"
                )));
            }
            ledger_entries += 1;
        }
        let mut keys = 0usize;
        for item in read
            .open_table(IDEMPOTENCY)
            .map_err(|e| bad(&e))?
            .iter()
            .map_err(|e| bad(&e))?
        {
            let (_, value) = item.map_err(|e| bad(&e))?;
            serde_json::from_slice::<RememberedKey>(value.value()).map_err(|e| bad(&e))?;
            keys += 1;
        }
        for item in read
            .open_table(META)
            .map_err(|e| bad(&e))?
            .iter()
            .map_err(|e| bad(&e))?
        {
            item.map_err(|e| bad(&e))?;
        }
        Ok(Loaded {
            orgs,
            keys,
            ledger_entries,
        })
    });
    match loaded {
        Ok(result) => result,
        Err(panic) => {
            crate::metrics::store_error("corrupt");
            Err(damaged(path, format!("redb failed reading it: {panic}")))
        }
    }
}

/// Deletes the oldest entries of an org's ledger down to `retain` once it holds more than
/// [`crate::config::ledger_trim_at`]`(retain)`: a chunk of about a sixteenth at a time, so
/// that the work is amortized O(1) per appended entry. Seqs never change; `ledger_trimmed`
/// counts what is gone.
fn trim_ledger(
    ledger: &mut redb::Table<'_, (&'static str, u64), &'static [u8]>,
    stored: &mut StoredOrg,
    retain: u64,
) -> Result<(), StoreError> {
    let kept = stored.ledger_seq - stored.ledger_trimmed;
    if kept <= crate::config::ledger_trim_at(retain) {
        return Ok(());
    }
    let org = stored.record.org.as_str();
    let first_kept = stored.ledger_seq - retain + 1;
    for seq in stored.ledger_trimmed + 1..first_kept {
        ledger.remove((org, seq)).map_err(io)?;
    }
    stored.ledger_trimmed = first_kept - 1;
    Ok(())
}

fn idem_key(org: &OrgId, key: &IdempotencyKey) -> String {
    format!("{}\u{1f}{}\u{1f}{}", org, key.scope, key.key)
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `dir`.
    /// Opens (or creates) the database in `dir`. A damaged or unreadable file is
    /// `Corrupt`, with a message naming the file and what to do.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let path = dir.join(DB_FILE);
        let db = open_db(&path, options.cache_bytes)?;
        let loaded = load_all(&path, &db)?;
        let store = EmbeddedStore {
            inner: Arc::new(Inner {
                path,
                db: RwLock::new(Some(db)),
                health: Mutex::new(Health::Ok),
                orgs: Mutex::new(loaded.orgs),
                idempotency_keys: Mutex::new(loaded.keys),
                notices: tokio::sync::broadcast::channel(super::NOTICES_BUFFERED).0,
                options,
            }),
        };
        store.inner.update_gauges(&store.inner.orgs.lock());
        Ok(store)
    }

    /// Verifies the data file in `dir` offline, without changing it: redb's integrity check
    /// (on a copy: it repairs what it can), every record, ledger entry and key read back, and
    /// every org's conservation. A damaged file is `Corrupt` with what was found.
    pub fn check(dir: &Path) -> Result<CheckReport, StoreError> {
        let path = dir.join(DB_FILE);
        let bytes = std::fs::metadata(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot read {}: {e}", path.display())))?
            .len();
        let copy = TempCopy::of(&path)?;
        let mut db = open_db(&copy.0, DEFAULT_EMBEDDED_CACHE_BYTES)
            .map_err(|e| rename(e, &copy.0, &path))?;
        let intact = quiet::catch(|| db.check_integrity())
            .map_err(|panic| damaged(&path, format!("redb failed checking it: {panic}")))?
            .map_err(|e| damaged(&path, e))?;
        if !intact {
            return Err(damaged(
                &path,
                "its pages fail redb's integrity check (a repair of a copy would roll back \
                 to an earlier commit)",
            ));
        }
        let loaded = load_all(&copy.0, &db).map_err(|e| rename(e, &copy.0, &path))?;
        Ok(CheckReport {
            orgs: loaded.orgs.len(),
            ledger_entries: loaded.ledger_entries,
            keys: loaded.keys,
            bytes,
        })
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the blocking pool: redb calls block on disk I/O. A failing store answers
    /// `Unavailable` without reaching redb, until it is re-opened; a panic of redb (damaged
    /// pages) is an error, never a crash of the process.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            inner.ensure_healthy()?;
            let result = quiet::catch(|| f(&inner)).unwrap_or_else(|panic| {
                crate::metrics::store_error("corrupt");
                Err(StoreError::Unavailable(format!(
                    "embedded store: redb failed on {} ({panic})",
                    inner.path.display()
                )))
            });
            if let Err(StoreError::Unavailable(cause)) = &result {
                inner.mark_failing(cause);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }
}

impl Inner {
    /// Runs `f` on the open database.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self.db.read().as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Unavailable(
                "embedded store: the database is being re-opened".into(),
            )),
        }
    }

    /// Records that a call failed: calls answer `cause` until the database is re-opened.
    fn mark_failing(&self, cause: &str) {
        let mut health = self.health.lock();
        if matches!(*health, Health::Ok) {
            tracing::error!(file = %self.path.display(), error = cause, "embedded store failing; re-opening it with backoff");
            *health = Health::Failing {
                cause: cause.to_string(),
                next_try: Instant::now() + REOPEN_BACKOFF_MIN,
                backoff: REOPEN_BACKOFF_MIN,
                full: cause.contains("No space left") || cause.contains("quota exceeded"),
            };
        }
    }

    /// `Ok` when the database can be used; else re-opens it if the backoff has passed, or
    /// answers why it cannot be used.
    fn ensure_healthy(&self) -> Result<(), StoreError> {
        let mut health = self.health.lock();
        let (cause, backoff, full) = match &*health {
            Health::Ok => return Ok(()),
            Health::Failing {
                cause,
                next_try,
                backoff,
                full,
            } => {
                if Instant::now() < *next_try {
                    return Err(StoreError::Unavailable(format!(
                        "{cause} (the store cannot write; retrying)"
                    )));
                }
                (cause.clone(), *backoff, *full)
            }
        };
        let attempt = if full {
            self.headroom().and_then(|()| {
                quiet::catch(|| self.reopen()).unwrap_or_else(|panic| {
                    Err(StoreError::Unavailable(format!(
                        "re-opening failed: {panic}"
                    )))
                })
            })
        } else {
            quiet::catch(|| self.reopen()).unwrap_or_else(|panic| {
                Err(StoreError::Unavailable(format!(
                    "re-opening failed: {panic}"
                )))
            })
        };
        match attempt {
            Ok(()) => {
                tracing::info!(file = %self.path.display(), after = %cause, "embedded store re-opened: writing again");
                *health = Health::Ok;
                Ok(())
            }
            Err(e) => {
                let backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
                let cause = match e {
                    StoreError::Unavailable(m) | StoreError::Corrupt(m) => m,
                    other => other.to_string(),
                };
                tracing::warn!(file = %self.path.display(), error = %cause, retry_ms = backoff.as_millis() as u64, "embedded store still failing");
                *health = Health::Failing {
                    full: full || cause.contains("No space left"),
                    cause: cause.clone(),
                    next_try: Instant::now() + backoff,
                    backoff,
                };
                Err(StoreError::Unavailable(format!(
                    "{cause} (the store cannot write; retrying)"
                )))
            }
        }
    }

    /// Writes and removes [`HEADROOM_BYTES`] beside the data file: the disk has room again.
    fn headroom(&self) -> Result<(), StoreError> {
        let file = self.path.with_file_name(HEADROOM_FILE);
        let written = std::fs::File::create(&file).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&vec![0u8; HEADROOM_BYTES])?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&file);
        written.map_err(|e| {
            let kind = if e.raw_os_error() == Some(28) {
                "full"
            } else {
                "io"
            };
            crate::metrics::store_error(kind);
            StoreError::Unavailable(format!(
                "embedded store: the disk of {} has less than {} MiB free: {e}",
                self.path.display(),
                HEADROOM_BYTES >> 20
            ))
        })
    }

    /// Closes and re-opens the database, proves a commit goes through, and reloads every org
    /// from the file: a commit that failed may have reached it.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut orgs = self.orgs.lock();
        let mut slot = self.db.write();
        if let Some(old) = slot.take() {
            // Dropping writes redb's allocator state, which may fail (or panic) again.
            let _ = quiet::catch(move || drop(old));
        }
        let db = open_db(&self.path, self.options.cache_bytes)?;
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(META)
            .map_err(io)?
            .insert(PROBE_KEY, unix_ms())
            .map_err(io)?;
        txn.commit().map_err(io)?;
        let loaded = load_all(&self.path, &db)?;
        for (org, stored) in &loaded.orgs {
            let before = orgs.get(org).map(|s| s.ledger_seq);
            if before != Some(stored.ledger_seq) {
                tracing::warn!(%org, ?before, after = stored.ledger_seq, "a commit whose outcome was unknown reached the disk; the file's state is kept");
            }
        }
        *orgs = loaded.orgs;
        *self.idempotency_keys.lock() = loaded.keys;
        *slot = Some(db);
        drop(slot);
        self.update_gauges(&orgs);
        Ok(())
    }

    /// The data file's size and the ledger's entry count (each org's last `seq` less what was
    /// trimmed).
    fn update_gauges(&self, orgs: &HashMap<OrgId, StoredOrg>) {
        let entries: u64 = orgs.values().map(|s| s.ledger_seq - s.ledger_trimmed).sum();
        metrics::gauge!(crate::metrics::LEDGER_ENTRIES).set(entries as f64);
        if let Ok(meta) = std::fs::metadata(&self.path) {
            metrics::gauge!(crate::metrics::STORE_FILE_BYTES).set(meta.len() as f64);
        }
    }

    /// Writes the new state of some orgs, their ledger entries and an optional idempotency
    /// record in one transaction, then installs the new states in memory. An org's ledger
    /// grown past [`crate::config::ledger_trim_at`] of `ledger_retain` loses its oldest
    /// entries down to `ledger_retain`, in the same transaction.
    fn commit(
        &self,
        orgs: &mut HashMap<OrgId, StoredOrg>,
        changes: Vec<(StoredOrg, Vec<LedgerEvent>)>,
        remembered: Option<(String, RememberedKey)>,
        meta: &[(&str, u64)],
    ) -> Result<(), StoreError> {
        let at_ms = unix_ms();
        let installed = self.with_db(|db| {
            let txn = db.begin_write().map_err(io)?;
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
                    trim_ledger(&mut ledger, &mut stored, self.options.ledger_retain)?;
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
            Ok(installed)
        })?;
        if remembered.is_some() {
            *self.idempotency_keys.lock() += 1;
        }
        for stored in installed {
            orgs.insert(stored.record.org.clone(), stored);
        }
        self.update_gauges(orgs);
        Ok(())
    }

    fn remembered(&self, key: &str) -> Result<Option<RememberedKey>, StoreError> {
        let remembered = self.with_db(|db| {
            let read = db.begin_read().map_err(io)?;
            let table = read.open_table(IDEMPOTENCY).map_err(io)?;
            let Some(value) = table.get(key).map_err(io)? else {
                return Ok(None);
            };
            serde_json::from_slice::<RememberedKey>(value.value())
                .map(Some)
                .map_err(corrupt)
        })?;
        let Some(remembered) = remembered else {
            return Ok(None);
        };
        let ttl_ms = self.options.idempotency_ttl.as_millis() as u64;
        Ok((unix_ms().saturating_sub(remembered.at_ms) <= ttl_ms).then_some(remembered))
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.with_db(|db| {
            let read = db.begin_read().map_err(io)?;
            let table = read.open_table(META).map_err(io)?;
            Ok(table.get(key).map_err(io)?.map(|v| v.value()))
        })
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
                ledger_trimmed: 0,
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
    ) -> Vec<Result<(SettleReply, SettleView), StoreError>> {
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
                            answers.push(Ok((reply, next.record.settle_view(batch))));
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
            // Writers commit under the orgs lock: the read transaction begun under it sees the
            // ledger that this trimmed count describes.
            let orgs = inner.orgs.lock();
            let Some(trimmed) = orgs.get(&org).map(|s| s.ledger_trimmed) else {
                return Err(StoreError::UnknownOrg(org));
            };
            inner.with_db(move |db| {
                let read = db.begin_read().map_err(io)?;
                drop(orgs);
                let table = read.open_table(LEDGER).map_err(io)?;
                // A cursor inside the trimmed part reads on from the first kept entry.
                let start = after.max(trimmed).saturating_add(1);
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
                    entries.push(
                        serde_json::from_slice::<LedgerEntry>(value.value()).map_err(corrupt)?,
                    );
                }
                let next = if more {
                    entries.last().map(|e| e.seq)
                } else {
                    None
                };
                Ok(LedgerPage {
                    entries,
                    next,
                    trimmed,
                })
            })
        })
        .await
    }

    async fn prune(&self, now_ms: u64) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let ttl_ms = inner.options.idempotency_ttl.as_millis() as u64;
            let _orgs = inner.orgs.lock();
            let remaining = inner.with_db(|db| {
                let txn = db.begin_write().map_err(io)?;
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
                Ok(remaining)
            })?;
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
        // Through the blocking pool: a failing store answers its cause, or is re-opened.
        self.blocking(|_| Ok(())).await
    }

    async fn list_orgs(&self) -> Result<Vec<OrgId>, StoreError> {
        Ok(self.inner.orgs.lock().keys().cloned().collect())
    }

    async fn export_org(&self, org: &OrgId) -> Result<Option<OrgDump>, StoreError> {
        let org = org.clone();
        self.blocking(move |inner| {
            let ttl_ms = inner.options.idempotency_ttl.as_millis() as u64;
            let now_ms = unix_ms();
            inner.with_db(|db| {
                // One read transaction: the record, its ledger and its keys of one instant.
                let read = db.begin_read().map_err(io)?;
                let Some(value) = read
                    .open_table(ORGS)
                    .map_err(io)?
                    .get(org.as_str())
                    .map_err(io)?
                else {
                    return Ok(None);
                };
                let stored: StoredOrg = serde_json::from_slice(value.value()).map_err(corrupt)?;
                let kept = stored.ledger_seq - stored.ledger_trimmed;
                let mut ledger = Vec::with_capacity(kept as usize);
                for item in read
                    .open_table(LEDGER)
                    .map_err(io)?
                    .range((org.as_str(), 1)..=(org.as_str(), u64::MAX))
                    .map_err(io)?
                {
                    let (_, value) = item.map_err(io)?;
                    ledger.push(
                        serde_json::from_slice::<LedgerEntry>(value.value()).map_err(corrupt)?,
                    );
                }
                let prefix = format!("{org}\u{1f}");
                let mut keys = Vec::new();
                for item in read
                    .open_table(IDEMPOTENCY)
                    .map_err(io)?
                    .range(prefix.as_str()..)
                    .map_err(io)?
                {
                    let (name, value) = item.map_err(io)?;
                    let Some(rest) = name.value().strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    let Some((scope, key)) = rest.split_once('\u{1f}') else {
                        return Err(corrupt(format!("idempotency key name {rest:?}")));
                    };
                    let r: RememberedKey =
                        serde_json::from_slice(value.value()).map_err(corrupt)?;
                    let expires_ms = r.at_ms.saturating_add(ttl_ms);
                    if expires_ms > now_ms {
                        keys.push(KeyDump {
                            scope: scope.to_string(),
                            key: key.to_string(),
                            fingerprint: r.fingerprint,
                            expires_ms,
                            outcome: ControlOutcome {
                                replayed: false,
                                ..r.outcome
                            },
                        });
                    }
                }
                Ok(Some(OrgDump {
                    record: stored.record,
                    ledger_trimmed: stored.ledger_trimmed,
                    ledger,
                    keys,
                }))
            })
        })
        .await
    }

    async fn import_org(&self, dump: &OrgDump) -> Result<(), StoreError> {
        dump.validate()
            .map_err(|why| corrupt(format!("org {}: {why}", dump.record.org)))?;
        let mut dump = dump.clone();
        // A ledger longer than this store keeps is trimmed as an append would trim it.
        dump.trim_ledger(self.inner.options.ledger_retain);
        self.blocking(move |inner| {
            let ttl_ms = inner.options.idempotency_ttl.as_millis() as u64;
            let mut orgs = inner.orgs.lock();
            let org = dump.record.org.clone();
            if orgs.contains_key(&org) {
                return Err(StoreError::OrgExists(org));
            }
            let stored = StoredOrg {
                record: dump.record.clone(),
                ledger_seq: dump.ledger_trimmed + dump.ledger.len() as u64,
                ledger_trimmed: dump.ledger_trimmed,
            };
            inner.with_db(|db| {
                let txn = db.begin_write().map_err(io)?;
                {
                    let bytes = serde_json::to_vec(&stored).map_err(corrupt)?;
                    txn.open_table(ORGS)
                        .map_err(io)?
                        .insert(org.as_str(), bytes.as_slice())
                        .map_err(io)?;
                    let mut ledger = txn.open_table(LEDGER).map_err(io)?;
                    for entry in &dump.ledger {
                        let bytes = serde_json::to_vec(entry).map_err(corrupt)?;
                        ledger
                            .insert((org.as_str(), entry.seq), bytes.as_slice())
                            .map_err(io)?;
                    }
                    let mut keys = txn.open_table(IDEMPOTENCY).map_err(io)?;
                    for k in &dump.keys {
                        let name = format!("{org}\u{1f}{}\u{1f}{}", k.scope, k.key);
                        let remembered = RememberedKey {
                            fingerprint: k.fingerprint.clone(),
                            at_ms: k.expires_ms.saturating_sub(ttl_ms),
                            outcome: k.outcome.clone(),
                        };
                        let bytes = serde_json::to_vec(&remembered).map_err(corrupt)?;
                        keys.insert(name.as_str(), bytes.as_slice()).map_err(io)?;
                    }
                }
                txn.commit().map_err(io)
            })?;
            *inner.idempotency_keys.lock() += dump.keys.len();
            orgs.insert(org, stored);
            inner.update_gauges(&orgs);
            Ok(())
        })
        .await
    }
}
