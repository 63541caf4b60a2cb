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
//! | `creditd:{org}:meta` | hash | `org`, `mode`, `primary`, `purchased`, `used_deleted`, `version`, `created_by` (call id) |
//! | `creditd:{org}:bal` | hash | workspace → balance no node has leased |
//! | `creditd:{org}:used` | hash | workspace → credits consumed |
//! | `creditd:{org}:nodes` | set | nodes that ever settled the org |
//! | `creditd:{org}:node:<node>` | hash | `epoch`, `seq`, `seen_ms`, `grants` (last batch's, for retries), `l:<spender>` lease, `h:<workspace>` held, `f:<spender>` held by the lease it came from |
//! | `creditd:{org}:ledger` | list | JSON ledger entries; the i-th (1-based) has `seq` i |
//! | `creditd:{org}:idem` | sorted set | remembered idempotency keys, scored by expiry (ms) |
//! | `creditd:{org}:idem:<scope>:<key>` | hash, `PX` TTL | fingerprint, outcome (`returned`, state) |
//! | `creditd:{org}:idem:call:<call id>` | hash, `PX` TTL | the same, for a call without a key |
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
mod reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use self::conn::{store_error, Conn, Redis, Scripts};
use self::reply::{refusal, Tokens};
use super::{
    AdminOp, AdminOutcome, IdempotencyKey, LedgerEntry, LedgerPage, NodeStart, Notice, Store,
    StoreError,
};
use crate::config::Config;
use crate::model::{Mode, NodeId, OrgId, OrgRecord, SettleBatch, SettleReply, WorkspaceId};

/// Settle entries (lines, releases and wants) per workspace an org may have: a line per
/// account of the current state and of a retired one, a release and a want per spender.
const SETTLE_ENTRIES_PER_WORKSPACE: usize = 4;

/// Largest ledger page read in one call; a caller asking for more gets this many and a cursor.
const LEDGER_PAGE_MAX: usize = 100_000;

/// How long the store remembers the outcome of a call that came without an idempotency key:
/// longer than any re-send of the same command by the client (the cluster client re-sends
/// after a lost connection or a response timeout, within a few call timeouts).
const CALL_ID_TTL: Duration = Duration::from_secs(300);

/// Reconnection attempts of the standalone connection per failure, and their longest delay;
/// every call is bounded by `redis_call_timeout` anyway.
const RECONNECT_RETRIES: usize = 3;
const RECONNECT_DELAY_MAX_MS: u64 = 1_000;

/// How a Redis store connects and what it enforces.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// One `redis://` URL (standalone), or a comma-separated list of seed URLs of a Redis
    /// Cluster (one seed followed by a comma is a cluster too).
    pub url: String,
    /// A node that has not settled an org for this long loses its leases there.
    pub lease_ttl: Duration,
    /// Longest one Redis command may take; then its outcome is unknown.
    pub call_timeout: Duration,
    /// Refuse to open when `maxmemory-policy` is not `noeviction` (else warn).
    pub require_noeviction: bool,
    /// How long a control-plane idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// Idempotency keys remembered at most, per org.
    pub idempotency_keys_max: usize,
    /// Entries (lines, releases, wants) one settle batch may carry.
    pub settle_entries_max: usize,
}

impl RedisOptions {
    pub fn from_config(config: &Config) -> Self {
        RedisOptions {
            url: config.redis_url.clone(),
            lease_ttl: config.lease_ttl,
            call_timeout: config.redis_call_timeout,
            require_noeviction: config.redis_require_noeviction,
            idempotency_ttl: config.idempotency_ttl,
            idempotency_keys_max: config.idempotency_keys_max,
            settle_entries_max: config
                .workspaces_max
                .saturating_mul(SETTLE_ENTRIES_PER_WORKSPACE),
        }
    }
}

/// Why a Redis store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RedisOpenError {
    #[error("redis_url `{url}`: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot reach redis at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error(
        "redis {node} has maxmemory-policy `{policy}`, so it may evict balances; set it to \
         noeviction (or redis_require_noeviction = false to only warn)"
    )]
    Eviction { node: String, policy: String },
    #[error(
        "cannot check maxmemory-policy of redis: {0} (redis_require_noeviction = false only warns)"
    )]
    PolicyUnknown(String),
}

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

fn unexpected(script: &str, status: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected status `{status}` from {script}"))
}

/// `maxmemory-policy` out of a `CONFIG GET` answer (RESP2 array or RESP3 map).
fn policy_of(value: &redis::Value) -> Option<String> {
    let map: HashMap<String, String> = redis::FromRedisValue::from_redis_value(value).ok()?;
    map.get("maxmemory-policy").cloned()
}

impl RedisStore {
    /// Connects, checks `maxmemory-policy`, and starts listening for notices.
    pub async fn open(options: RedisOptions) -> Result<RedisStore, RedisOpenError> {
        let urls: Vec<&str> = options
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let bad = |why: String| RedisOpenError::BadUrl {
            url: options.url.clone(),
            why,
        };
        if urls.is_empty() {
            return Err(bad("no URL".into()));
        }
        let clients = urls
            .iter()
            .map(|u| redis::Client::open(*u).map_err(|e| bad(format!("{u}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = options.call_timeout;
        // A connection is tried a few times with backoff before opening fails.
        let open_timeout = timeout * (RECONNECT_RETRIES as u32 + 1) + Duration::from_secs(1);
        let unreachable = |why: String| RedisOpenError::Unreachable {
            url: options.url.clone(),
            why,
        };
        let conn = if options.url.contains(',') {
            let client = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            crate::metrics::store_call("redis_connect");
            let conn = tokio::time::timeout(open_timeout, client.get_async_connection())
                .await
                .map_err(|_| unreachable(format!("no answer within {open_timeout:?}")))?
                .map_err(|e| unreachable(e.to_string()))?;
            Conn::Cluster(conn)
        } else {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout)
                .set_number_of_retries(RECONNECT_RETRIES)
                .set_max_delay(RECONNECT_DELAY_MAX_MS);
            crate::metrics::store_call("redis_connect");
            let conn = tokio::time::timeout(
                open_timeout,
                redis::aio::ConnectionManager::new_with_config(clients[0].clone(), config),
            )
            .await
            .map_err(|_| unreachable(format!("no answer within {open_timeout:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
            Conn::Single(conn)
        };
        let redis = Redis {
            conn,
            call_timeout: timeout,
        };
        Self::check_eviction(&redis, options.require_noeviction).await?;
        let (tx, _) = broadcast::channel(notices::NOTICES_BUFFERED);
        let subscriber = tokio::spawn(notices::subscriber(clients, tx.clone(), timeout));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                redis,
                scripts: Scripts::new(),
                options,
                notices: tx,
                subscriber: subscriber.abort_handle(),
            }),
        })
    }

    /// Refuses (or warns about) a Redis that may evict keys: eviction would delete balances.
    /// In a cluster every master is asked.
    async fn check_eviction(redis: &Redis, require: bool) -> Result<(), RedisOpenError> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let answers: Result<Vec<(String, Option<String>)>, StoreError> = match &redis.conn {
            Conn::Single(_) => redis
                .call::<redis::Value>("redis_config_get", &cmd)
                .await
                .map(|v| vec![("redis".to_string(), policy_of(&v))]),
            Conn::Cluster(c) => {
                use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                crate::metrics::store_call("redis_config_get");
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match tokio::time::timeout(
                    redis.call_timeout,
                    c.clone().route_command(&cmd, routing),
                )
                .await
                {
                    Err(_) => Err(StoreError::Unavailable("CONFIG GET timed out".into())),
                    Ok(Err(e)) => Err(store_error("redis_config_get", &e)),
                    Ok(Ok(redis::Value::Map(nodes))) => Ok(nodes
                        .iter()
                        .map(|(node, v)| {
                            let node = redis::from_redis_value::<String>(node)
                                .unwrap_or_else(|_| format!("{node:?}"));
                            (node, policy_of(v))
                        })
                        .collect()),
                    Ok(Ok(other)) => Ok(vec![("cluster".to_string(), policy_of(&other))]),
                }
            }
        };
        let problem = match answers {
            Err(e) => Some(RedisOpenError::PolicyUnknown(e.to_string())),
            Ok(answers) if answers.is_empty() => Some(RedisOpenError::PolicyUnknown(
                "no master answered CONFIG GET".into(),
            )),
            Ok(answers) => answers.into_iter().find_map(|(node, policy)| match policy {
                Some(p) if p == "noeviction" => None,
                Some(policy) => Some(RedisOpenError::Eviction { node, policy }),
                None => Some(RedisOpenError::PolicyUnknown(format!(
                    "{node} did not answer maxmemory-policy"
                ))),
            }),
        };
        match problem {
            None => Ok(()),
            Some(e) if require => Err(e),
            Some(e) => {
                tracing::warn!(problem = %e, "redis may evict keys: balances could be lost");
                Ok(())
            }
        }
    }

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
        op: &AdminOp,
        call: &str,
    ) -> Result<AdminOutcome, StoreError> {
        self.apply_once(org, op, Once::Call(call)).await
    }

    async fn apply_once(
        &self,
        org: &OrgId,
        op: &AdminOp,
        once: Once<'_>,
    ) -> Result<AdminOutcome, StoreError> {
        let mut keys = org_keys(org);
        keys.push(format!("{}idem", prefix(org)));
        let mut args = vec![org.to_string(), op.name().to_string()];
        match op {
            AdminOp::Purchase { amount } => args.extend([amount.get().to_string(), "".into()]),
            AdminOp::CreateWorkspace { workspace } | AdminOp::DeleteWorkspace { workspace } => {
                args.extend([workspace.to_string(), "".into()])
            }
            AdminOp::Transfer { from, to, amount } => {
                args.extend([from.to_string(), to.to_string()]);
                args.push(amount.get().to_string());
            }
            AdminOp::SetMode { mode } => args.extend([mode.as_str().to_string(), "".into()]),
        }
        if args.len() == 4 {
            args.push(String::new());
        }
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
        match status(org, key_name, &tokens)? {
            ("ok", rest) => {
                let mut t = Tokens::new(rest, "apply");
                let returned = t.u64()?;
                let record = t.record(org)?;
                self.announce_later(Notice::Changed {
                    org: org.clone(),
                    version: record.version,
                });
                Ok(AdminOutcome {
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
                Ok(AdminOutcome {
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
    ) -> Result<(SettleReply, OrgRecord), StoreError> {
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
        let record = t.record(org)?;
        Ok((
            SettleReply {
                applied,
                grants,
                version: record.version,
                expired,
                unbacked,
                prev_seq,
            },
            record,
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
            .eval(&self.inner.scripts.start_node, &[epoch_key(node)], &[])
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
        op: &AdminOp,
        key: Option<&IdempotencyKey>,
    ) -> Result<AdminOutcome, StoreError> {
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
    ) -> Vec<Result<(SettleReply, OrgRecord), StoreError>> {
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
        let limit = limit.min(LEDGER_PAGE_MAX);
        // Far beyond any ledger, and small enough for Lua and LRANGE to read exactly.
        let after = after.min(crate::model::CREDITS_MAX / 2);
        let keys = [
            format!("{}meta", prefix(org)),
            format!("{}ledger", prefix(org)),
        ];
        let args = [
            org.to_string(),
            after.to_string(),
            (after + limit as u64).to_string(),
        ];
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.ledger, &keys, &args)
            .await?;
        let rest = match status(org, None, &tokens)? {
            ("none", _) => return Err(StoreError::UnknownOrg(org.clone())),
            ("ok", rest) => rest,
            (other, _) => return Err(unexpected("ledger", other)),
        };
        let more = rest.len() > limit;
        let mut entries = Vec::with_capacity(rest.len().min(limit));
        for (i, json) in rest.iter().take(limit).enumerate() {
            let entry: LedgerEntry = serde_json::from_str(json)
                .map_err(|e| StoreError::Corrupt(format!("ledger entry of {org}: {e}")))?;
            if entry.seq != after + i as u64 + 1 {
                return Err(StoreError::Corrupt(format!(
                    "ledger entry of {org} at position {} has seq {}",
                    after + i as u64 + 1,
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
        Ok(LedgerPage { entries, next })
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
