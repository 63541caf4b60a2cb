//! One connection to Redis or to a Redis Cluster, and the only way the store talks to it:
//! every command goes through [`Redis::call`] (a timeout, a metric, errors mapped once) and
//! every script through [`Redis::eval`] (EVALSHA, and EVAL of the source on `NOSCRIPT`).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError};

use crate::store::StoreError;

/// The connection: a `ConnectionManager` (one multiplexed connection that reconnects by
/// itself) for a standalone Redis, a `ClusterConnection` (follows `MOVED`/`ASK`, refreshes the
/// slot map, reconnects) for a cluster. Both are cheap handles to one shared connection.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}

/// A Lua script: its source (the constants, the common prelude, then the script) and SHA1.
/// The constants include the store's `ledger_retain`, so the source (and its SHA1) depends on
/// that setting: nodes configured alike share one cached script.
pub(super) struct LuaScript {
    /// Metric label of one EVALSHA of it (`redis_<script>`).
    op: &'static str,
    source: String,
    sha: String,
}

macro_rules! lua {
    ($constants:expr, $op:literal, $file:literal) => {
        LuaScript::new($constants, $op, include_str!($file))
    };
}

impl LuaScript {
    fn new(constants: &str, op: &'static str, script: &str) -> Self {
        let source = format!("{constants}{}{script}", include_str!("common.lua"));
        LuaScript {
            op,
            sha: redis::Script::new(&source).get_hash().to_string(),
            source,
        }
    }
}

/// The model's bounds as Lua locals, so that the scripts enforce the same numbers without
/// writing them a second time; and the ledger's retention (`ledger_retain`, and the length at
/// which `append_ledger` trims back to it, [`crate::config::ledger_trim_at`]), a setting of
/// the deployment that every appending script needs: as a constant it reaches them without
/// an argument of its own.
fn constants(ledger_retain: u64) -> String {
    format!(
        "local CAP = {}\nlocal ID_BYTES_MAX = {}\nlocal LEDGER_RETAIN = {}\nlocal LEDGER_TRIM_AT = {}\n",
        crate::model::CREDITS_MAX,
        crate::model::ID_BYTES_MAX,
        ledger_retain,
        crate::config::ledger_trim_at(ledger_retain)
    )
}

/// Every script of the store (see each `.lua` file's header).
pub(super) struct Scripts {
    pub create_org: LuaScript,
    pub load: LuaScript,
    pub ledger: LuaScript,
    pub apply: LuaScript,
    pub settle: LuaScript,
    pub start_node: LuaScript,
    pub export: LuaScript,
    pub import: LuaScript,
}

impl Scripts {
    /// The scripts of a store keeping `ledger_retain` ledger entries per org.
    pub fn new(ledger_retain: u64) -> Self {
        let c = &constants(ledger_retain);
        Scripts {
            create_org: lua!(c, "redis_create_org", "create_org.lua"),
            load: lua!(c, "redis_load_org", "load.lua"),
            ledger: lua!(c, "redis_ledger", "ledger.lua"),
            apply: lua!(c, "redis_apply", "apply.lua"),
            settle: lua!(c, "redis_settle", "settle.lua"),
            start_node: lua!(c, "redis_start_node", "start_node.lua"),
            export: lua!(c, "redis_export_org", "export.lua"),
            import: lua!(c, "redis_import_org", "import.lua"),
        }
    }
}

/// The SHA1 under which Redis caches the script with metric label `op` (`redis_settle`…), to
/// look for it in `SCRIPT EXISTS`, as built for the default `ledger_retain`.
pub fn script_sha(op: &str) -> Option<String> {
    let scripts = Scripts::new(crate::config::DEFAULT_LEDGER_RETAIN);
    [
        scripts.create_org,
        scripts.load,
        scripts.ledger,
        scripts.apply,
        scripts.settle,
        scripts.start_node,
    ]
    .into_iter()
    .find(|s| s.op == op)
    .map(|s| s.sha)
}

/// Why a call failed, before it becomes a [`StoreError`].
enum Failure {
    /// The server does not have the script (restart, failover, `SCRIPT FLUSH`).
    NoScript,
    Store(StoreError),
}

/// The connection with its call timeout.
pub(super) struct Redis {
    pub conn: Conn,
    /// Longest one command may take; then its outcome is unknown (`Unavailable`).
    pub call_timeout: Duration,
}

impl Redis {
    async fn try_call<T: FromRedisValue>(&self, op: &'static str, cmd: &Cmd) -> Result<T, Failure> {
        crate::metrics::store_call(op);
        match tokio::time::timeout(self.call_timeout, self.conn.query(cmd)).await {
            Err(_) => {
                crate::metrics::store_error("unavailable");
                Err(Failure::Store(StoreError::Unavailable(format!(
                    "redis did not answer {op} within {}ms; its outcome is unknown",
                    self.call_timeout.as_millis()
                ))))
            }
            Ok(Err(e)) if e.kind() == ErrorKind::NoScriptError => Err(Failure::NoScript),
            Ok(Err(e)) => {
                let e = store_error(op, &e);
                crate::metrics::store_error(match e {
                    StoreError::Unavailable(_) => "unavailable",
                    _ => "corrupt",
                });
                Err(Failure::Store(e))
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Sends one command, within the call timeout; `op` labels the metric (`redis_…`).
    pub async fn call<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.try_call(op, cmd).await.map_err(|f| match f {
            Failure::NoScript => StoreError::Corrupt(format!("redis answered NOSCRIPT to {op}")),
            Failure::Store(e) => e,
        })
    }

    /// Runs a script: EVALSHA, and on `NOSCRIPT` EVAL with the source (which also caches it
    /// again). EVAL rather than SCRIPT LOAD + EVALSHA: one round trip, and in a cluster it goes
    /// to the node that owns the keys, which is the one that lost its cache.
    pub async fn eval(
        &self,
        script: &LuaScript,
        keys: &[String],
        args: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&script.sha).arg(keys.len()).arg(keys).arg(args);
        match self.try_call(script.op, &cmd).await {
            Ok(v) => Ok(v),
            Err(Failure::Store(e)) => Err(e),
            Err(Failure::NoScript) => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(&script.source).arg(keys.len()).arg(keys).arg(args);
                self.call("redis_eval_reload", &cmd).await
            }
        }
    }
}

/// Maps a Redis error once: what a retry may cure (connection, timeout, a cluster in motion,
/// a server out of memory or loading) is `Unavailable`; anything else (a script error, an
/// answer of the wrong shape) cannot be cured by retrying and is `Corrupt`.
pub(super) fn store_error(op: &str, e: &RedisError) -> StoreError {
    const RETRYABLE_CODES: &[&str] = &[
        "OOM",
        "BUSY",
        "LOADING",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "READONLY",
        "NOREPLICAS",
        "MOVED",
        "ASK",
    ];
    let retryable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || e.code().is_some_and(|c| RETRYABLE_CODES.contains(&c))
        || matches!(
            e.kind(),
            ErrorKind::IoError
                | ErrorKind::ClusterDown
                | ErrorKind::TryAgain
                | ErrorKind::BusyLoadingError
                | ErrorKind::MasterDown
                | ErrorKind::ReadOnly
                | ErrorKind::ClusterConnectionNotFound
        );
    if retryable {
        StoreError::Unavailable(format!("redis {op}: {e}"))
    } else {
        StoreError::Corrupt(format!("redis {op}: {e}"))
    }
}
