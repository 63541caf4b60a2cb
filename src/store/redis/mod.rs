//! The Redis store: many nodes sharing one Redis (or Redis Cluster). Every state change is one
//! Lua script, atomic on the server, in one round trip; the scripts implement the rules of
//! [`crate::model`] exactly (the conformance tests run the same operations on both stores).
//!
//! # Keys
//!
//! Every key of one org carries the hash tag `{org}`, so every script touches one slot and
//! orgs spread over a cluster:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `creditd:{org}:meta` | hash | `org`, `mode`, `primary`, `purchased`, `used_deleted`, `version`, `created_by` (call id), `ledger_trimmed` (ledger entries trimmed from the head; absent: 0) |
//! | `creditd:{org}:bal` | hash | workspace → balance no node has leased |
//! | `creditd:{org}:used` | hash | workspace → credits consumed |
//! | `creditd:{org}:nodes` | set | nodes that settled the org and are not forgotten |
//! | `creditd:{org}:gone` | hash | node → `epoch seq at_ms` of a forgotten life (its record removed after `node_forget_after` once it held nothing), kept `node_forget_after`, so that a re-sent batch of it is answered, not applied again |
//! | `creditd:{org}:node:<node>` | hash | `epoch`, `seq`, `seen_ms`, `grants` (last batch's, for retries), `l:<spender>` lease, `h:<workspace>` held, `f:<spender>` held by the lease it came from |
//! | `creditd:{org}:ledger` | list | JSON ledger entries kept (at most about `ledger_retain`); the i-th (1-based) has `seq` `ledger_trimmed` + i |
//! | `creditd:{org}:idem` | sorted set | remembered idempotency keys, scored by expiry (ms) |
//! | `creditd:{org}:idem:<scope>:<key>` | hash, `PX` TTL | fingerprint, outcome (`returned`, state) |
//! | `creditd:{org}:idem:call:<call id>` | hash, `PX` TTL | `fp`, `returned` only, for a call without a key (no copy of the state) |
//! | `creditd:node:<node>:epoch` | string | the node's life counter (`INCR` at start) |
//!
//! There is no list of orgs: exports find them by `SCAN` of every master (see `export.rs`).
//!
//! Counters are decimal strings. Lua numbers are doubles, exact only up to 2^53, so no
//! counter may exceed [`CREDITS_MAX`] = 2^53 - 1: a purchase beyond it is refused (the model
//! refuses it too), and every other counter is a part of `purchased`.
//!
//! # Scripts
//!
//! Each `.lua` file here starts with its KEYS, ARGV, reply and invariant; `common.lua` is
//! prepended to each. `create_org`, `apply` (every control-plane op, with the idempotency key
//! checked and remembered in the same script), `settle` (one org's batch, exactly once by
//! (node, epoch, seq), then expiry of silent nodes' leases), `load` and `ledger` (reads),
//! `export` (one org whole, read only) and `import` (one org of an export into a store
//! without it). Every script reads and validates everything before its first write: Redis does not roll a
//! script back.
//!
//! # Failures
//!
//! Every command has a timeout (`redis_call_timeout`); a timeout or a connection error is
//! [`StoreError::Unavailable`]: the outcome is unknown and the node re-sends the same call
//! (a settle batch keeps its (node, epoch, seq), so it applies once). A server that lost its
//! script cache (restart, failover, `SCRIPT FLUSH`) answers `NOSCRIPT`, and the script is sent
//! again with EVAL. The cluster client itself re-sends a command after a lost connection or
//! a response timeout, so every command must be safe to run twice: a settle is applied once by
//! its (node, epoch, seq), and every `apply` and `create_org` carries a call id that the script
//! remembers with its outcome (the caller's idempotency key, or a unique id kept
//! [`CALL_ID_TTL`]). At start the store refuses a Redis whose `maxmemory-policy` is not
//! `noeviction` (eviction could delete balances), or only warns if so configured.
//!
//! # What differs from the embedded store, on purpose
//!
//! - A node's previous life is closed with [`PriorLife::CountAsConsumed`]
//!   (`lease_expired`), not given back: in a cluster its leases may have been spent.
//! - Every applied settle also closes the leases of other nodes silent for longer than
//!   `lease_ttl` ([`OrgRecord::expire_nodes`]), with Redis `TIME` as the clock.
//! - A heartbeat (an empty batch) is written: it is what keeps a node's leases alive.
//! - A settle batch with more than `settle_entries_max` entries, or an amount (or a lease or
//!   reservation summed over one batch) above 2^53 - 1, is refused (`BatchRefused`); no real
//!   node sends one.
//! - `idempotency_keys_max` is enforced per org (one org's keys live in its slot), and keys
//!   expire with Redis TTLs; [`Store::prune`] has nothing to do.
//! - `start_node` cannot know whether the previous life stopped cleanly: `unclean` is false.
//!
//! [`CREDITS_MAX`]: crate::model::CREDITS_MAX
//! [`PriorLife::CountAsConsumed`]: crate::model::PriorLife::CountAsConsumed
//! [`OrgRecord::expire_nodes`]: crate::model::OrgRecord::expire_nodes

mod conn;
mod export;
mod notices;
mod open;
mod reply;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

pub use self::conn::script_sha;
use self::conn::{Redis, Scripts};
pub use self::open::{RedisOpenError, RedisOptions};
use self::reply::{refusal, Tokens};
use super::{
    ControlOp, ControlOutcome, IdempotencyKey, LedgerEntry, LedgerPage, NodeStart, Notice, Store,
    StoreError,
};
use crate::model::{
    Mode, NodeId, OrgId, OrgRecord, SettleBatch, SettleReply, SettleView, WorkspaceId,
};

/// Settle entries (lines, releases and wants) per workspace an org may have: a line per
/// account of the current state and of a retired one, a release and a want per spender.
const SETTLE_ENTRIES_PER_WORKSPACE: usize = 4;

/// How long the store remembers the outcome of a call that came without an idempotency key:
/// longer than any re-send of the same command by the client (the cluster client re-sends
/// after a lost connection or a response timeout, within a few call timeouts).
const CALL_ID_TTL: Duration = Duration::from_secs(300);

/// What makes one `apply` call apply once.
enum Once<'a> {
    /// The caller's idempotency key.
    Key(&'a IdempotencyKey),
    /// The store's own id for a call without a key.
    Call(&'a str),
}

struct Inner {
    redis: Redis,
    scripts: Scripts,
    options: RedisOptions,
    notices: broadcast::Sender<Notice>,
    /// The subscription task; stopped with the store.
    subscriber: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// The Redis store; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// `creditd:{org}:`, the prefix of every key of the org.
fn prefix(org: &OrgId) -> String {
    format!("creditd:{{{org}}}:")
}

/// The fixed keys of an org, in the order every script takes them.
fn org_keys(org: &OrgId) -> Vec<String> {
    let p = prefix(org);
    ["meta", "bal", "used", "nodes", "ledger"]
        .iter()
        .map(|k| format!("{p}{k}"))
        .collect()
}

/// A unique id for one store call (32 hex digits): the scripts remember it with the call's
/// outcome, so that a command re-sent by the client is not applied twice.
fn call_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Two independently keyed hashes (std seeds each RandomState at random) of the process,
    // the time and a counter.
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u32(std::process::id());
        h.write_u64(now);
        h.write_u64(n);
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

fn epoch_key(node: &NodeId) -> String {
    format!("creditd:node:{node}:epoch")
}

/// Splits a script's reply into its status and the rest; `err` becomes its error.
fn status<'a>(
    org: &OrgId,
    key: Option<&str>,
    tokens: &'a [String],
) -> Result<(&'a str, &'a [String]), StoreError> {
    match tokens.split_first() {
        Some((s, rest)) if s == "err" => Err(refusal(org, key, rest)),
        Some((s, rest)) => Ok((s.as_str(), rest)),
        None => Err(StoreError::Corrupt("empty reply from a script".into())),
    }
}

/// ARGV 3 to 5 of the apply script: the op's arguments, empty where it has fewer.
fn op_args(op: &ControlOp) -> [String; 3] {
    match op {
        ControlOp::Purchase { amount } => [amount.get().to_string(), String::new(), String::new()],
        ControlOp::CreateWorkspace { workspace } | ControlOp::DeleteWorkspace { workspace } => {
            [workspace.to_string(), String::new(), String::new()]
        }
        ControlOp::Transfer { from, to, amount } => {
            [from.to_string(), to.to_string(), amount.get().to_string()]
        }
        ControlOp::SetMode { mode } => [mode.as_str().to_string(), String::new(), String::new()],
    }
}

fn unexpected(script: &str, status: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected status `{status}` from {script}"))
}

impl RedisStore {
    /// Publishes `notice` in the background after a change (best effort: a lost notice only
    /// delays other nodes until their next settle).
    fn announce_later(&self, notice: Notice) {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            if let Err(e) = inner.publish(&notice).await {
                tracing::debug!(error = %e, "notice not published");
            }
        });
    }

    /// [`Store::create_org`] as the call `call`: the same call sent twice (as a client does
    /// after a lost connection) creates the org once and answers `Ok` both times. Public for
    /// the tests that re-send a call.
    #[doc(hidden)]
    pub async fn create_org_as_call(
        &self,
        org: &OrgId,
        mode: Mode,
        primary: &WorkspaceId,
        call: &str,
    ) -> Result<OrgRecord, StoreError> {
        let args = [
            org.to_string(),
            mode.as_str().to_string(),
            primary.to_string(),
            call.to_string(),
        ];
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.create_org, &org_keys(org), &args)
            .await?;
        let record = match status(org, None, &tokens)? {
            ("ok", rest) => Tokens::new(rest, "create_org").record(org)?,
            (other, _) => return Err(unexpected("create_org", other)),
        };
        self.announce_later(Notice::Changed {
            org: org.clone(),
            version: record.version,
        });
        Ok(record)
    }

    /// [`Store::apply`] without an idempotency key, as the call `call` (see
    /// [`RedisStore::create_org_as_call`]).
    #[doc(hidden)]
    pub async fn apply_as_call(
        &self,
        org: &OrgId,
        op: &ControlOp,
        call: &str,
    ) -> Result<ControlOutcome, StoreError> {
        self.apply_once(org, op, Once::Call(call)).await
    }

    async fn apply_once(
        &self,
        org: &OrgId,
        op: &ControlOp,
        once: Once<'_>,
    ) -> Result<ControlOutcome, StoreError> {
        let mut keys = org_keys(org);
        keys.push(format!("{}idem", prefix(org)));
        let mut args = vec![org.to_string(), op.name().to_string()];
        args.extend(op_args(op));
        let options = &self.inner.options;
        let key_name = match once {
            Once::Key(k) => {
                keys.push(format!("{}idem:{}:{}", prefix(org), k.scope, k.key));
                args.push("key".into());
                args.push(k.fingerprint.clone());
                args.push(options.idempotency_ttl.as_millis().to_string());
                Some(k.key.as_str())
            }
            Once::Call(call) => {
                keys.push(format!("{}idem:call:{call}", prefix(org)));
                args.push("call".into());
                args.push(String::new());
                args.push(CALL_ID_TTL.as_millis().to_string());
                None
            }
        };
        args.push(options.idempotency_keys_max.to_string());
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.apply, &keys, &args)
            .await?;
        self.apply_outcome(org, key_name, &tokens)
    }

    /// The apply script's answer: applied now (other nodes are told), or the remembered
    /// outcome of the same key.
    fn apply_outcome(
        &self,
        org: &OrgId,
        key_name: Option<&str>,
        tokens: &[String],
    ) -> Result<ControlOutcome, StoreError> {
        match status(org, key_name, tokens)? {
            ("ok", rest) => {
                let mut t = Tokens::new(rest, "apply");
                let returned = t.u64()?;
                let record = t.record(org)?;
                self.announce_later(Notice::Changed {
                    org: org.clone(),
                    version: record.version,
                });
                Ok(ControlOutcome {
                    view: record.view(),
                    returned,
                    replayed: false,
                })
            }
            ("replay", [returned, state]) => {
                let returned = returned.parse::<u64>().map_err(|_| {
                    StoreError::Corrupt(format!("remembered outcome: `{returned}`"))
                })?;
                let state: Vec<String> = state.split(' ').map(str::to_string).collect();
                let record = Tokens::new(&state, "remembered outcome").record(org)?;
                Ok(ControlOutcome {
                    view: record.view(),
                    returned,
                    // A re-sent call is the same call: only a caller's key replays.
                    replayed: key_name.is_some(),
                })
            }
            (other, _) => Err(unexpected("apply", other)),
        }
    }

    /// Arguments of the settle script for one batch.
    fn settle_args(&self, org: &OrgId, batch: &SettleBatch) -> Vec<String> {
        let mut args = Vec::with_capacity(
            8 + 6 * batch.lines.len() + 2 * (batch.release.len() + batch.want.len()),
        );
        args.push(org.to_string());
        args.push(batch.node.to_string());
        args.push(batch.epoch.to_string());
        args.push(batch.seq.to_string());
        args.push(batch.version.to_string());
        args.push(self.inner.options.lease_ttl.as_millis().to_string());
        args.push(self.inner.options.node_forget_after.as_millis().to_string());
        args.push(if batch.first { "1" } else { "0" }.to_string());
        args.push(batch.lines.len().to_string());
        for l in &batch.lines {
            args.push(l.workspace.to_string());
            args.push(l.spender.to_string());
            args.push(l.consumed.to_string());
            args.push(l.reserved.to_string());
            args.push(l.committed.to_string());
            args.push(l.released.to_string());
        }
        for list in [&batch.release, &batch.want] {
            args.push(list.len().to_string());
            for (spender, amount) in list.iter() {
                args.push(spender.to_string());
                args.push(amount.to_string());
            }
        }
        args
    }

    async fn settle_one(
        &self,
        org: &OrgId,
        batch: &SettleBatch,
    ) -> Result<(SettleReply, SettleView), StoreError> {
        let entries = batch.lines.len() + batch.release.len() + batch.want.len();
        let max = self.inner.options.settle_entries_max;
        if entries > max {
            return Err(crate::model::RuleError::BatchRefused(format!(
                "batch has {entries} entries, more than the limit of {max}"
            ))
            .into());
        }
        let args = self.settle_args(org, batch);
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.settle, &org_keys(org), &args)
            .await?;
        let (status, rest) = status(org, None, &tokens)?;
        if status != "ok" {
            return Err(unexpected("settle", status));
        }
        let mut t = Tokens::new(rest, "settle");
        let applied = t.flag()?;
        let expired = t.flag()?;
        let unbacked = t.u64()?;
        let prev_seq = t.u64()?;
        let grants = t.pairs()?;
        let (version, view) = t.settle_view()?;
        Ok((
            SettleReply {
                applied,
                grants,
                version,
                expired,
                unbacked,
                prev_seq,
            },
            view,
        ))
    }
}

impl Inner {
    async fn publish(&self, notice: &Notice) -> Result<(), StoreError> {
        let payload = serde_json::to_string(notice)
            .map_err(|e| StoreError::Corrupt(format!("notice: {e}")))?;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(notices::CHANNEL).arg(payload);
        self.redis
            .call::<redis::Value>("redis_publish", &cmd)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// A new life: `start_node.lua` takes an epoch that never repeats (one key, outside every org's slot). What the
    /// previous life still holds in an org is closed by this life's first settle there (as
    /// consumed), or by another node once `lease_ttl` has passed.
    async fn start_node(&self, node: &NodeId) -> Result<NodeStart, StoreError> {
        let tokens = self
            .inner
            .redis
            .eval(
                &self.inner.scripts.start_node,
                &[epoch_key(node)],
                &[self.inner.options.node_forget_after.as_millis().to_string()],
            )
            .await?;
        let epoch = match tokens.as_slice() {
            [ok, epoch] if ok == "ok" => epoch
                .parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("node epoch `{epoch}`")))?,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "start_node replied {tokens:?}"
                )))
            }
        };
        Ok(NodeStart {
            epoch,
            unclean: false,
        })
    }

    /// Nothing to record: the node's final settle already gave its leases back.
    async fn stop_node(&self, _node: &NodeId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn list_orgs(&self) -> Result<Vec<OrgId>, StoreError> {
        self.scan_orgs().await
    }

    async fn export_org(
        &self,
        org: &OrgId,
    ) -> Result<Option<crate::store::export::OrgDump>, StoreError> {
        self.export_one(org).await
    }

    async fn import_org(&self, dump: &crate::store::export::OrgDump) -> Result<(), StoreError> {
        self.import_one(dump).await
    }

    async fn load_org(&self, org: &OrgId) -> Result<Option<OrgRecord>, StoreError> {
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.load, &org_keys(org), &[org.to_string()])
            .await?;
        match status(org, None, &tokens)? {
            ("none", _) => Ok(None),
            ("ok", rest) => Ok(Some(Tokens::new(rest, "load").record(org)?)),
            (other, _) => Err(unexpected("load", other)),
        }
    }

    async fn create_org(
        &self,
        org: &OrgId,
        mode: Mode,
        primary: &WorkspaceId,
    ) -> Result<OrgRecord, StoreError> {
        self.create_org_as_call(org, mode, primary, &call_id())
            .await
    }

    async fn apply(
        &self,
        org: &OrgId,
        op: &ControlOp,
        key: Option<&IdempotencyKey>,
    ) -> Result<ControlOutcome, StoreError> {
        match key {
            Some(key) => self.apply_once(org, op, Once::Key(key)).await,
            None => self.apply_once(org, op, Once::Call(&call_id())).await,
        }
    }

    /// One script per org, all sent at once on the multiplexed connection (pipelined on the
    /// wire, each recovering from `NOSCRIPT` on its own), answered in order.
    async fn settle(
        &self,
        batches: &[(OrgId, SettleBatch)],
    ) -> Vec<Result<(SettleReply, SettleView), StoreError>> {
        futures::future::join_all(
            batches
                .iter()
                .map(|(org, batch)| self.settle_one(org, batch)),
        )
        .await
    }

    async fn ledger(
        &self,
        org: &OrgId,
        after: u64,
        limit: usize,
    ) -> Result<LedgerPage, StoreError> {
        let limit = limit.min(super::LEDGER_PAGE_MAX);
        // Far beyond any ledger, and small enough for Lua and LRANGE to read exactly.
        let after = after.min(crate::model::CREDITS_MAX / 2);
        let keys = [
            format!("{}meta", prefix(org)),
            format!("{}ledger", prefix(org)),
        ];
        let args = [org.to_string(), after.to_string(), (limit + 1).to_string()];
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.ledger, &keys, &args)
            .await?;
        let (trimmed, rest) = match status(org, None, &tokens)? {
            ("none", _) => return Err(StoreError::UnknownOrg(org.clone())),
            ("ok", [trimmed, rest @ ..]) => (trimmed, rest),
            (other, _) => return Err(unexpected("ledger", other)),
        };
        let trimmed = trimmed
            .parse::<u64>()
            .map_err(|_| StoreError::Corrupt(format!("ledger_trimmed of {org}: `{trimmed}`")))?;
        // A cursor inside the trimmed part reads on from the first kept entry.
        let start = after.max(trimmed);
        let more = rest.len() > limit;
        let mut entries = Vec::with_capacity(rest.len().min(limit));
        for (i, json) in rest.iter().take(limit).enumerate() {
            let entry: LedgerEntry = serde_json::from_str(json)
                .map_err(|e| StoreError::Corrupt(format!("ledger entry of {org}: {e}")))?;
            if entry.seq != start + i as u64 + 1 {
                return Err(StoreError::Corrupt(format!(
                    "ledger entry of {org} at position {} has seq {}",
                    start + i as u64 + 1,
                    entry.seq
                )));
            }
            entries.push(entry);
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
    }

    /// Nothing to do: remembered keys expire with their Redis TTL, and `apply` trims the
    /// per-org index of expired ones.
    async fn prune(&self, _now_ms: u64) -> Result<(), StoreError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner
            .redis
            .call::<redis::Value>("redis_ping", &redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    async fn announce(&self, notice: &Notice) -> Result<(), StoreError> {
        self.inner.publish(notice).await
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<Notice>> {
        Some(self.inner.notices.subscribe())
    }
}
