//! Configuration: defaults, then `config/default.toml`-style file, then `CREDITD_*` environment
//! variables; parsed, then validated before any port is bound. Unknown keys and bad values are
//! refused with every problem named at once (the binary exits with 64, `EX_USAGE`).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::model::{is_valid_id, NodeId};

/// Exit code for a bad configuration (`EX_USAGE` of sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
pub const DEFAULT_DATA_DIR: &str = "./creditd-data";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_NODE_ID: &str = "node-1";
pub const DEFAULT_SETTLE_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_LEASE_WAIT_MAX: Duration = Duration::from_millis(500);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// A node record of an org that holds nothing is removed once its node has not settled the org
/// for this long (cluster only): pods come and go under new names.
pub const DEFAULT_NODE_FORGET_AFTER: Duration = Duration::from_secs(3600);
pub const DEFAULT_BODY_BYTES_MAX: usize = 64 * 1024;
pub const DEFAULT_ACCOUNTS_MAX: usize = 1_000_000;
pub const DEFAULT_WORKSPACES_MAX: usize = 10_000;
pub const DEFAULT_IDEMPOTENCY_KEYS_MAX: usize = 1_000_000;
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_RESERVATIONS_MAX: usize = 100_000;
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_RESERVATION_TTL_MAX: Duration = Duration::from_secs(3600);
pub const DEFAULT_CONNECTIONS_MAX: usize = 4096;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_AUTHORIZE_DENY_STATUS: u16 = 403;
pub const DEFAULT_LEDGER_PAGE_MAX: usize = 1000;
/// Ledger entries kept per org (the oldest are trimmed beyond it; see [`ledger_trim_at`]).
pub const DEFAULT_LEDGER_RETAIN: u64 = 100_000;
pub const DEFAULT_VIEW_PAGE_MAX: usize = 1000;
pub const DEFAULT_SETTLE_BATCH_ORGS_MAX: usize = 256;
/// redb's page cache of the embedded store (its own default is 1 GiB, which a large store fills
/// at start, when every org is read).
pub const DEFAULT_EMBEDDED_CACHE_BYTES: usize = 64 << 20;
pub const DEFAULT_LEASE_HORIZON: Duration = Duration::from_secs(2);
pub const DEFAULT_LEASE_SHARE_MAX_PERCENT: u64 = 25;
pub const DEFAULT_RECALL_WAIT_MAX: Duration = Duration::from_secs(2);
pub const DEFAULT_OUTAGE_RESERVE_CREDITS: u64 = 0;
pub const DEFAULT_REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The contract: the connection limit is at least 1,024 by default.
const _: () = assert!(DEFAULT_CONNECTIONS_MAX >= 1024);
const _: () =
    assert!(DEFAULT_RESERVATION_TTL.as_millis() <= DEFAULT_RESERVATION_TTL_MAX.as_millis());

/// The accepted range of every bounded setting: one definition each, checked by
/// [`Config::validate`] before anything starts, and quoted in its refusal.
pub mod bounds {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    const SECOND: u64 = 1000;
    const MINUTE: u64 = 60 * SECOND;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;

    pub const SETTLE_INTERVAL: RangeInclusive<Duration> = ms(10)..=ms(HOUR);
    pub const LEASE_WAIT_MAX: RangeInclusive<Duration> = ms(1)..=ms(MINUTE);
    /// Also more than twice `settle_interval`.
    pub const LEASE_TTL: RangeInclusive<Duration> = ms(1)..=ms(DAY);
    pub const NODE_FORGET_AFTER: RangeInclusive<Duration> = ms(1)..=ms(365 * DAY);
    pub const LEASE_HORIZON: RangeInclusive<Duration> = ms(1)..=ms(HOUR);
    pub const RECALL_WAIT_MAX: RangeInclusive<Duration> = ms(1)..=ms(MINUTE);
    pub const IDEMPOTENCY_TTL: RangeInclusive<Duration> = ms(SECOND)..=ms(30 * DAY);
    /// Both `reservation_ttl` and `reservation_ttl_max`.
    pub const RESERVATION_TTL: RangeInclusive<Duration> = ms(1)..=ms(7 * DAY);
    pub const HEADER_READ_TIMEOUT: RangeInclusive<Duration> = ms(1)..=ms(10 * MINUTE);
    pub const SHUTDOWN_GRACE: RangeInclusive<Duration> = ms(0)..=ms(10 * MINUTE);
    pub const REDIS_CALL_TIMEOUT: RangeInclusive<Duration> = ms(1)..=ms(MINUTE);

    pub const LEASE_SHARE_MAX_PERCENT: RangeInclusive<u64> = 1..=100;
    pub const OUTAGE_RESERVE_CREDITS: RangeInclusive<u64> = 0..=crate::model::AMOUNT_MAX;
    pub const BODY_BYTES_MAX: RangeInclusive<u64> = 1..=16 * 1024 * 1024;
    pub const ACCOUNTS_MAX: RangeInclusive<u64> = 1..=100_000_000;
    pub const WORKSPACES_MAX: RangeInclusive<u64> = 1..=1_000_000;
    pub const IDEMPOTENCY_KEYS_MAX: RangeInclusive<u64> = 1..=100_000_000;
    pub const RESERVATIONS_MAX: RangeInclusive<u64> = 1..=10_000_000;
    /// Open connections; each holds a file descriptor, so far below what the semaphore could
    /// count (a larger number once panicked inside the accept loop).
    pub const CONNECTIONS_MAX: RangeInclusive<u64> = 1..=1_048_576;
    pub const LEDGER_PAGE_MAX: RangeInclusive<u64> = 1..=100_000;
    /// Entries kept per org: at least one, and at most what one Redis script can still trim
    /// or export in one piece.
    pub const LEDGER_RETAIN: RangeInclusive<u64> = 1..=100_000_000;
    pub const VIEW_PAGE_MAX: RangeInclusive<u64> = 1..=100_000;
    pub const SETTLE_BATCH_ORGS_MAX: RangeInclusive<u64> = 1..=100_000;
    pub const EMBEDDED_CACHE_BYTES: RangeInclusive<u64> = (1 << 20)..=(64 << 30);
    pub const AUTHORIZE_DENY_STATUS: [u16; 3] = [402, 403, 429];

    /// "`key`: must be from 10ms to 1h", in the units a person would write.
    pub(super) fn duration_refusal(key: &str, range: &RangeInclusive<Duration>) -> String {
        format!(
            "{key}: must be from {} to {}",
            human(*range.start()),
            human(*range.end())
        )
    }

    fn human(d: Duration) -> String {
        let n = d.as_millis() as u64;
        for (unit, size) in [("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", SECOND)] {
            if n >= size && n % size == 0 {
                return format!("{}{unit}", n / size);
            }
        }
        format!("{n}ms")
    }
}

/// How many entries an org's ledger may hold before the store trims it back to `retain`:
/// `retain` plus a slack of a sixteenth (at least 1), so that entries are deleted in chunks
/// (amortized O(1) per append) rather than one at every write. Both stores use this number,
/// so that they trim at the same appends.
pub const fn ledger_trim_at(retain: u64) -> u64 {
    let slack = retain / 16;
    retain + if slack == 0 { 1 } else { slack }
}

/// Which store keeps the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Embedded,
    Redis,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting, with its unit in its name or type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server binds (loopback by default: creditd sits beside the gateway).
    pub listen: SocketAddr,
    pub store: StoreKind,
    /// Folder of the embedded store's database.
    pub data_dir: PathBuf,
    /// `redis://` URL, or comma-separated seed URLs of a Redis Cluster.
    pub redis_url: String,
    /// This node's id in a cluster: leases and settle batches are kept per node.
    pub node_id: String,
    /// Bearer token of the control plane; without one the control plane refuses every call.
    pub admin_token: Option<String>,
    /// How often the settler reports usage to the store and tops up leases.
    #[serde(deserialize_with = "de_duration")]
    pub settle_interval: Duration,
    /// Longest a debit waits for the store when its lease is short; then `503`.
    #[serde(deserialize_with = "de_duration")]
    pub lease_wait_max: Duration,
    /// A node that has not settled for this long loses its leases (cluster only).
    #[serde(deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// Cluster: a node's record in an org, once it holds nothing, is removed after the node has
    /// not settled the org for this long; a batch of that life is then refused and the node
    /// starts a new life. More than twice `lease_ttl`.
    #[serde(deserialize_with = "de_duration")]
    pub node_forget_after: Duration,
    /// Cluster: a lease covers about this much of the spender's recent spending rate.
    #[serde(deserialize_with = "de_duration")]
    pub lease_horizon: Duration,
    /// Cluster: a lease never takes more than this share (percent) of what the store has left
    /// for the spender, so a nearly empty balance is not stranded on one node.
    pub lease_share_max_percent: u64,
    /// Credits per spender a node keeps leased aside, spent only when the store cannot be
    /// asked (or has nothing more): how long a node keeps answering through a store outage.
    /// 0 (the default) fails closed as soon as the lease runs out.
    pub outage_reserve_credits: u64,
    /// Cluster: longest a control-plane change waits for other nodes to give leases back.
    #[serde(deserialize_with = "de_duration")]
    pub recall_wait_max: Duration,
    pub body_bytes_max: usize,
    /// Accounts (org, workspace) kept in this node's cache.
    pub accounts_max: usize,
    /// Workspaces one org may have.
    pub workspaces_max: usize,
    /// Idempotency keys remembered (per node for debits and reservations; per store for
    /// purchases and transfers).
    pub idempotency_keys_max: usize,
    #[serde(deserialize_with = "de_duration")]
    pub idempotency_ttl: Duration,
    pub reservations_max: usize,
    /// TTL of a reservation that does not give `ttl_ms`.
    #[serde(deserialize_with = "de_duration")]
    pub reservation_ttl: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub reservation_ttl_max: Duration,
    pub connections_max: usize,
    /// A connection that has not delivered a whole request head and body within this is closed.
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// How long a stopping node lets open connections finish.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Status of a `/v1/authorize` denial: 403 (nginx understands it), 402 or 429.
    pub authorize_deny_status: u16,
    pub ledger_page_max: usize,
    /// Ledger entries kept per org: beyond it (plus a slack, [`ledger_trim_at`]) the oldest are
    /// trimmed, in the same atomic write as the append. Totals are counters and do not change.
    pub ledger_retain: u64,
    /// Largest page of workspaces in an org view (`GET /v1/orgs/{org}?limit=`).
    pub view_page_max: usize,
    /// Orgs settled in one store call.
    pub settle_batch_orgs_max: usize,
    /// Bytes of the embedded store's page cache (redb's read and write caches together).
    pub embedded_cache_bytes: usize,
    pub log_format: LogFormat,
    /// Longest one Redis call may take; then its outcome is unknown and it is retried unchanged.
    #[serde(deserialize_with = "de_duration")]
    pub redis_call_timeout: Duration,
    /// Refuse to start when Redis may evict keys (`maxmemory-policy` other than `noeviction`);
    /// `false` only warns.
    pub redis_require_noeviction: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid address"),
            store: StoreKind::Embedded,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            redis_url: DEFAULT_REDIS_URL.to_string(),
            node_id: DEFAULT_NODE_ID.to_string(),
            admin_token: None,
            settle_interval: DEFAULT_SETTLE_INTERVAL,
            lease_wait_max: DEFAULT_LEASE_WAIT_MAX,
            lease_ttl: DEFAULT_LEASE_TTL,
            node_forget_after: DEFAULT_NODE_FORGET_AFTER,
            lease_horizon: DEFAULT_LEASE_HORIZON,
            lease_share_max_percent: DEFAULT_LEASE_SHARE_MAX_PERCENT,
            outage_reserve_credits: DEFAULT_OUTAGE_RESERVE_CREDITS,
            recall_wait_max: DEFAULT_RECALL_WAIT_MAX,
            body_bytes_max: DEFAULT_BODY_BYTES_MAX,
            accounts_max: DEFAULT_ACCOUNTS_MAX,
            workspaces_max: DEFAULT_WORKSPACES_MAX,
            idempotency_keys_max: DEFAULT_IDEMPOTENCY_KEYS_MAX,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            reservations_max: DEFAULT_RESERVATIONS_MAX,
            reservation_ttl: DEFAULT_RESERVATION_TTL,
            reservation_ttl_max: DEFAULT_RESERVATION_TTL_MAX,
            connections_max: DEFAULT_CONNECTIONS_MAX,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            authorize_deny_status: DEFAULT_AUTHORIZE_DENY_STATUS,
            ledger_page_max: DEFAULT_LEDGER_PAGE_MAX,
            ledger_retain: DEFAULT_LEDGER_RETAIN,
            view_page_max: DEFAULT_VIEW_PAGE_MAX,
            settle_batch_orgs_max: DEFAULT_SETTLE_BATCH_ORGS_MAX,
            embedded_cache_bytes: DEFAULT_EMBEDDED_CACHE_BYTES,
            log_format: LogFormat::Text,
            redis_call_timeout: DEFAULT_REDIS_CALL_TIMEOUT,
            redis_require_noeviction: true,
        }
    }
}

/// The type of a key, to read its environment variable.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
}

/// Every key, for environment overrides (`CREDITD_<KEY>`).
const KEYS: &[(&str, Kind)] = &[
    ("listen", Kind::Str),
    ("store", Kind::Str),
    ("data_dir", Kind::Str),
    ("redis_url", Kind::Str),
    ("node_id", Kind::Str),
    ("admin_token", Kind::Str),
    ("settle_interval", Kind::Str),
    ("lease_wait_max", Kind::Str),
    ("lease_ttl", Kind::Str),
    ("node_forget_after", Kind::Str),
    ("lease_horizon", Kind::Str),
    ("lease_share_max_percent", Kind::Int),
    ("outage_reserve_credits", Kind::Int),
    ("recall_wait_max", Kind::Str),
    ("body_bytes_max", Kind::Int),
    ("accounts_max", Kind::Int),
    ("workspaces_max", Kind::Int),
    ("idempotency_keys_max", Kind::Int),
    ("idempotency_ttl", Kind::Str),
    ("reservations_max", Kind::Int),
    ("reservation_ttl", Kind::Str),
    ("reservation_ttl_max", Kind::Str),
    ("connections_max", Kind::Int),
    ("header_read_timeout", Kind::Str),
    ("shutdown_grace", Kind::Str),
    ("authorize_deny_status", Kind::Int),
    ("ledger_page_max", Kind::Int),
    ("ledger_retain", Kind::Int),
    ("view_page_max", Kind::Int),
    ("settle_batch_orgs_max", Kind::Int),
    ("embedded_cache_bytes", Kind::Int),
    ("log_format", Kind::Str),
    ("redis_call_timeout", Kind::Str),
    ("redis_require_noeviction", Kind::Bool),
];

/// Environment variables that are not settings.
const ENV_NOT_KEYS: &[&str] = &["CREDITD_CONFIG"];

/// The refusals found so far, in the order checked.
#[derive(Default)]
struct Refusals(Vec<String>);

impl Refusals {
    fn duration(&mut self, key: &str, value: Duration, range: RangeInclusive<Duration>) {
        if !range.contains(&value) {
            self.0.push(bounds::duration_refusal(key, &range));
        }
    }

    fn count(&mut self, key: &str, value: u64, range: RangeInclusive<u64>) {
        if !range.contains(&value) {
            let (min, max) = range.into_inner();
            self.0.push(format!("{key}: must be from {min} to {max}"));
        }
    }

    fn rule(&mut self, ok: bool, refusal: impl Into<String>) {
        if !ok {
            self.0.push(refusal.into());
        }
    }
}

/// Every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// The settings file as a TOML table.
fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))
}

/// Puts every `CREDITD_<KEY>` of `env` into `table` as the key's type; names what is unknown or
/// does not parse.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<String>,
    bad: &mut Vec<String>,
) {
    for (name, value) in env {
        let Some(key) = name.strip_prefix("CREDITD_") else {
            continue;
        };
        if ENV_NOT_KEYS.contains(&name.as_str()) {
            continue;
        }
        let key = key.to_ascii_lowercase();
        let parsed = match KEYS.iter().find(|(k, _)| *k == key) {
            None => {
                errors.push(format!("{name}: unknown setting `{key}`"));
                continue;
            }
            Some((_, Kind::Str)) => Ok(toml::Value::String(value)),
            Some((_, Kind::Bool)) => match value.trim() {
                "true" | "1" => Ok(toml::Value::Boolean(true)),
                "false" | "0" => Ok(toml::Value::Boolean(false)),
                _ => Err(format!("{name}: `{value}` is not true or false")),
            },
            Some((_, Kind::Int)) => value
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| format!("{name}: `{value}` is not an integer")),
        };
        match parsed {
            Ok(v) => {
                table.insert(key, v);
            }
            Err(e) => {
                errors.push(e);
                bad.push(key);
            }
        }
    }
}

/// Deserializes key by key, so that every bad key is reported, not just the first; returns the
/// keys that parsed.
fn parse_each(table: &toml::Table, errors: &mut Vec<String>, bad: &mut Vec<String>) -> toml::Table {
    let mut good = toml::Table::new();
    for (key, value) in table {
        if !KEYS.iter().any(|(k, _)| k == key) {
            errors.push(format!("{key}: unknown setting"));
            continue;
        }
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        match toml::Value::Table(one).try_into::<Config>() {
            Ok(_) => {
                good.insert(key.clone(), value.clone());
            }
            Err(e) => {
                errors.push(format!("{key}: {}", e.message().trim()));
                bad.push(key.clone());
            }
        }
    }
    good
}

/// Parses a duration such as `250ms`, `5s`, `2m`, `24h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }?;
    Some(Duration::from_millis(ms))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration such as 250ms, 5s, 2m or 24h"
        ))
    })
}

impl Config {
    /// Loads the file (if any), applies `CREDITD_*` variables from `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        let mut errors = Vec::new();
        // Keys refused while parsing, so that validation does not judge them a second time.
        let mut bad: Vec<String> = Vec::new();
        apply_env(&mut table, env, &mut errors, &mut bad);
        let good = parse_each(&table, &mut errors, &mut bad);
        if !errors.is_empty() {
            // Validate the keys that did parse as well, so that one run names every bad key
            // (`authorize_deny_status = 500` beside `settle_interval = "fast"`). A check that
            // mentions a refused key is left out: it would judge the default standing in for it.
            if let Ok(partial) = toml::Value::Table(good).try_into::<Config>() {
                if let Err(ConfigError(more)) = partial.validate() {
                    errors.extend(
                        more.into_iter()
                            .filter(|m| !bad.iter().any(|k| m.contains(k.as_str()))),
                    );
                }
            }
            return Err(ConfigError(errors));
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| ConfigError(vec![e.to_string()]))?;
        config.validate()
    }

    /// Checks values that parse but make no sense, against the bounds in [`bounds`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut refusals = Refusals::default();
        self.check_bounds(&mut refusals);
        self.check_rules(&mut refusals);
        if refusals.0.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError(refusals.0))
        }
    }

    /// Every bounded setting within its range.
    fn check_bounds(&self, r: &mut Refusals) {
        use bounds as b;
        r.duration("settle_interval", self.settle_interval, b::SETTLE_INTERVAL);
        r.duration("lease_wait_max", self.lease_wait_max, b::LEASE_WAIT_MAX);
        r.duration("lease_ttl", self.lease_ttl, b::LEASE_TTL);
        r.duration(
            "node_forget_after",
            self.node_forget_after,
            b::NODE_FORGET_AFTER,
        );
        r.duration("lease_horizon", self.lease_horizon, b::LEASE_HORIZON);
        r.duration("recall_wait_max", self.recall_wait_max, b::RECALL_WAIT_MAX);
        r.duration("idempotency_ttl", self.idempotency_ttl, b::IDEMPOTENCY_TTL);
        r.duration(
            "reservation_ttl_max",
            self.reservation_ttl_max,
            b::RESERVATION_TTL,
        );
        r.duration(
            "header_read_timeout",
            self.header_read_timeout,
            b::HEADER_READ_TIMEOUT,
        );
        r.duration("shutdown_grace", self.shutdown_grace, b::SHUTDOWN_GRACE);
        r.duration(
            "redis_call_timeout",
            self.redis_call_timeout,
            b::REDIS_CALL_TIMEOUT,
        );
        let share = self.lease_share_max_percent;
        r.count("lease_share_max_percent", share, b::LEASE_SHARE_MAX_PERCENT);
        let reserve = self.outage_reserve_credits;
        r.count("outage_reserve_credits", reserve, b::OUTAGE_RESERVE_CREDITS);
        r.count(
            "body_bytes_max",
            self.body_bytes_max as u64,
            b::BODY_BYTES_MAX,
        );
        r.count("accounts_max", self.accounts_max as u64, b::ACCOUNTS_MAX);
        r.count(
            "workspaces_max",
            self.workspaces_max as u64,
            b::WORKSPACES_MAX,
        );
        let keys = self.idempotency_keys_max as u64;
        r.count("idempotency_keys_max", keys, b::IDEMPOTENCY_KEYS_MAX);
        let reservations = self.reservations_max as u64;
        r.count("reservations_max", reservations, b::RESERVATIONS_MAX);
        r.count(
            "connections_max",
            self.connections_max as u64,
            b::CONNECTIONS_MAX,
        );
        r.count(
            "ledger_page_max",
            self.ledger_page_max as u64,
            b::LEDGER_PAGE_MAX,
        );
        r.count("ledger_retain", self.ledger_retain, b::LEDGER_RETAIN);
        r.count("view_page_max", self.view_page_max as u64, b::VIEW_PAGE_MAX);
        let orgs = self.settle_batch_orgs_max as u64;
        r.count("settle_batch_orgs_max", orgs, b::SETTLE_BATCH_ORGS_MAX);
        let cache = self.embedded_cache_bytes as u64;
        r.count("embedded_cache_bytes", cache, b::EMBEDDED_CACHE_BYTES);
    }

    /// Settings judged against each other, and values that are not numbers.
    fn check_rules(&self, r: &mut Refusals) {
        r.rule(
            self.lease_ttl > self.settle_interval * 2,
            "lease_ttl: must be more than twice settle_interval",
        );
        // Only a cluster forgets node records (one embedded node never does).
        r.rule(
            self.store != StoreKind::Redis || self.node_forget_after > self.lease_ttl * 2,
            "node_forget_after: must be more than twice lease_ttl",
        );
        r.rule(
            self.reservation_ttl <= self.reservation_ttl_max
                && bounds::RESERVATION_TTL.contains(&self.reservation_ttl),
            "reservation_ttl: must be from 1ms to reservation_ttl_max",
        );
        r.rule(
            bounds::AUTHORIZE_DENY_STATUS.contains(&self.authorize_deny_status),
            format!(
                "authorize_deny_status: must be 402, 403 or 429, not {}",
                self.authorize_deny_status
            ),
        );
        r.rule(
            is_valid_id(&self.node_id),
            format!("node_id: {}", crate::model::ID_RULE),
        );
        if let Some(token) = &self.admin_token {
            r.rule(
                !token.is_empty(),
                "admin_token: must not be empty (leave it unset to turn the control plane off)",
            );
        }
        if self.store == StoreKind::Redis {
            // rediss:// (TLS) would pass here and fail at connect: this build has no TLS.
            let urls_ok = self
                .redis_url
                .split(',')
                .all(|u| u.trim().starts_with("redis://"));
            r.rule(
                urls_ok,
                format!(
                    "redis_url: `{}` is not a redis:// URL or list of them (rediss:// is not \
                     supported: this build has no TLS)",
                    self.redis_url
                ),
            );
        }
    }

    /// The node id as a typed id (validated by [`Config::validate`]).
    pub fn node(&self) -> NodeId {
        NodeId::parse(&self.node_id, "node_id").unwrap_or_else(|_| {
            NodeId::parse(DEFAULT_NODE_ID, "node_id").expect("DEFAULT_NODE_ID is a valid id")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_shipped_default_file_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let from_file = Config::load(Some(&path), Vec::new()).unwrap();
        let built_in = Config::default();
        assert_eq!(format!("{from_file:?}"), format!("{built_in:?}"));
    }

    #[test]
    fn every_key_is_listed_for_the_environment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let text = std::fs::read_to_string(path).unwrap();
        for (key, _) in KEYS {
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("# {key} =")),
                "{key} undocumented"
            );
        }
    }

    #[test]
    fn every_key_is_in_the_readme_table() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let text = std::fs::read_to_string(path).unwrap();
        for (key, _) in KEYS {
            assert!(
                text.contains(&format!("| `{key}` |")),
                "{key} missing from README's config table"
            );
        }
    }

    #[test]
    fn environment_overrides_and_durations_parse() {
        let c = Config::load(
            None,
            env(&[
                ("CREDITD_SETTLE_INTERVAL", "250ms"),
                ("CREDITD_BODY_BYTES_MAX", "1024"),
            ]),
        )
        .unwrap();
        assert_eq!(c.settle_interval, Duration::from_millis(250));
        assert_eq!(c.body_bytes_max, 1024);
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("ms"), None);
    }

    #[test]
    fn every_bad_key_is_named_at_once() {
        let err = Config::load(
            None,
            env(&[
                ("CREDITD_BODY_BYTES_MAX", "lots"),
                ("CREDITD_NO_SUCH_THING", "1"),
                ("CREDITD_SETTLE_INTERVAL", "fast"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("CREDITD_BODY_BYTES_MAX"), "{text}");
        assert!(text.contains("no_such_thing"), "{text}");
        assert!(text.contains("settle_interval"), "{text}");
    }

    #[test]
    fn the_ledger_is_trimmed_in_chunks_of_a_sixteenth() {
        assert_eq!(ledger_trim_at(1), 2);
        assert_eq!(ledger_trim_at(15), 16);
        assert_eq!(ledger_trim_at(32), 34);
        assert_eq!(ledger_trim_at(DEFAULT_LEDGER_RETAIN), 106_250);
        let max = *bounds::LEDGER_RETAIN.end();
        assert!(ledger_trim_at(max) < crate::model::CREDITS_MAX);
    }

    #[test]
    fn values_out_of_range_are_refused() {
        let err = Config::load(
            None,
            env(&[
                ("CREDITD_AUTHORIZE_DENY_STATUS", "500"),
                ("CREDITD_NODE_ID", "a b"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("authorize_deny_status"), "{err}");
        assert!(err.contains("node_id"), "{err}");
    }

    #[test]
    fn values_out_of_range_are_named_beside_values_that_do_not_parse() {
        let err = Config::load(
            None,
            env(&[
                ("CREDITD_SETTLE_INTERVAL", "fast"),
                ("CREDITD_LEASE_TTL", "1s"),
                ("CREDITD_AUTHORIZE_DENY_STATUS", "500"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("settle_interval: `fast`"), "{err}");
        assert!(err.contains("authorize_deny_status"), "{err}");
        // lease_ttl is judged against settle_interval, which did not parse: not named twice.
        assert!(!err.contains("lease_ttl"), "{err}");
    }
}
