//! Opening the Redis store: connecting (standalone or cluster), the `maxmemory-policy` check,
//! and the notice subscription.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::conn::{store_error, Conn, Redis, Scripts};
use super::{notices, Inner, RedisStore, SETTLE_ENTRIES_PER_WORKSPACE};
use crate::config::Config;
use crate::store::StoreError;

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
    /// Ledger entries kept per org (`ledger_retain`): every script that appends trims the
    /// oldest beyond it (see `append_ledger` in `common.lua`).
    pub ledger_retain: u64,
    /// A node's record in an org, once it holds nothing, is removed after the node has not
    /// settled the org for this long (`node_forget_after`).
    pub node_forget_after: Duration,
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
            ledger_retain: config.ledger_retain,
            node_forget_after: config.node_forget_after,
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

/// `maxmemory-policy` out of a `CONFIG GET` answer (RESP2 array or RESP3 map).
fn policy_of(value: &redis::Value) -> Option<String> {
    let map: HashMap<String, String> = redis::FromRedisValue::from_redis_value(value).ok()?;
    map.get("maxmemory-policy").cloned()
}

impl RedisStore {
    /// Connects, checks `maxmemory-policy`, and starts listening for notices.
    pub async fn open(options: RedisOptions) -> Result<RedisStore, RedisOpenError> {
        let (clients, conn) = connect(&options).await?;
        let redis = Redis {
            conn,
            call_timeout: options.call_timeout,
        };
        Self::check_eviction(&redis, options.require_noeviction).await?;
        let (tx, _) = broadcast::channel(crate::store::NOTICES_BUFFERED);
        let subscriber = tokio::spawn(notices::subscriber(
            clients,
            tx.clone(),
            options.call_timeout,
        ));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                redis,
                scripts: Scripts::new(options.ledger_retain),
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
}

/// The clients of every URL (the notice subscription uses them) and the connection: a cluster
/// connection for a comma-separated list, else a reconnecting standalone one. Tried a few
/// times with backoff before opening fails.
async fn connect(options: &RedisOptions) -> Result<(Vec<redis::Client>, Conn), RedisOpenError> {
    let bad = |why: String| RedisOpenError::BadUrl {
        url: options.url.clone(),
        why,
    };
    let unreachable = |why: String| RedisOpenError::Unreachable {
        url: options.url.clone(),
        why,
    };
    let urls: Vec<&str> = options
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(bad("no URL".into()));
    }
    let clients = urls
        .iter()
        .map(|u| redis::Client::open(*u).map_err(|e| bad(format!("{u}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = options.call_timeout;
    let open_timeout = timeout * (RECONNECT_RETRIES as u32 + 1) + Duration::from_secs(1);
    let late = |_| unreachable(format!("no answer within {open_timeout:?}"));
    crate::metrics::store_call("redis_connect");
    let conn = if options.url.contains(',') {
        let client = redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let conn = tokio::time::timeout(open_timeout, client.get_async_connection())
            .await
            .map_err(late)?;
        Conn::Cluster(conn.map_err(|e| unreachable(e.to_string()))?)
    } else {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_DELAY_MAX_MS);
        let manager = redis::aio::ConnectionManager::new_with_config(clients[0].clone(), config);
        let conn = tokio::time::timeout(open_timeout, manager)
            .await
            .map_err(late)?;
        Conn::Single(conn.map_err(|e| unreachable(e.to_string()))?)
    };
    Ok((clients, conn))
}
