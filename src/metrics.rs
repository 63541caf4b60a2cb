//! Every metric creditd exposes: name, type, unit and help in one place. The README's metrics
//! table follows this file. No label carries an org, workspace or key: those are unbounded.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub const DEBIT_REQUESTS: &str = "creditd_debit_requests_total";
pub const DEBIT_DURATION: &str = "creditd_debit_duration_seconds";
pub const CREDITS_DEBITED: &str = "creditd_credits_debited_total";
pub const SETTLE_BATCHES: &str = "creditd_settle_batches_total";
pub const SETTLE_DURATION: &str = "creditd_settle_duration_seconds";
pub const SETTLE_ERRORS: &str = "creditd_settle_errors_total";
pub const BLOCKED_SPENDERS: &str = "creditd_blocked_spenders";
pub const UNSETTLED_CREDITS: &str = "creditd_unsettled_credits";
pub const LEASED_CREDITS: &str = "creditd_leased_credits";
pub const RESERVATIONS_OPEN: &str = "creditd_reservations_open";
pub const RESERVATIONS_EXPIRED: &str = "creditd_reservations_expired_total";
pub const LIMIT_HITS: &str = "creditd_limit_hits_total";
pub const STORE_CALLS: &str = "creditd_store_calls_total";
pub const ADMIN_OPERATIONS: &str = "creditd_admin_operations_total";
pub const HTTP_REQUESTS: &str = "creditd_http_requests_total";
pub const CONNECTIONS_OPEN: &str = "creditd_connections_open";
pub const READY: &str = "creditd_ready";
pub const OUTAGE_DEBITS: &str = "creditd_outage_debits_total";
pub const UNCLEAN_RESTARTS: &str = "creditd_unclean_restarts_total";
pub const BUILD_INFO: &str = "creditd_build_info";
pub const LEASES_FORFEITED: &str = "creditd_leases_forfeited_total";
pub const USAGE_UNBACKED: &str = "creditd_usage_unbacked_credits_total";
pub const STORE_REGRESSIONS: &str = "creditd_store_regressions_total";
pub const STORE_ERRORS: &str = "creditd_store_errors_total";
pub const STORE_FILE_BYTES: &str = "creditd_store_file_bytes";
pub const LEDGER_ENTRIES: &str = "creditd_ledger_entries";

/// Every value of [`STORE_ERRORS`]'s `kind` label: `full` (no space left), `io` (any other
/// I/O failure), `corrupt` (damaged data, or an answer that cannot be right), `unavailable`
/// (Redis unreachable or too slow), `other`.
pub const STORE_ERROR_KINDS: [&str; 5] = ["full", "io", "corrupt", "unavailable", "other"];

/// Every value of [`LIMIT_HITS`]'s `limit` label (the README's metrics table lists them too).
pub const LIMITS: [&str; 7] = [
    "body_bytes",
    "accounts",
    "workspaces",
    "idempotency_keys",
    "reservations",
    "connections",
    "header_timeout",
];

/// Counters that exist at 0 from the start. A counter first rendered at 1 looks unchanged to
/// `rate()` and `increase()`: an unclean restart (counted during start-up) or a first settle
/// error would never fire the alerts of docker/prometheus/alerts.yml.
const COUNTERS_FROM_ZERO: [&str; 9] = [
    OUTAGE_DEBITS,
    CREDITS_DEBITED,
    SETTLE_BATCHES,
    SETTLE_ERRORS,
    RESERVATIONS_EXPIRED,
    UNCLEAN_RESTARTS,
    LEASES_FORFEITED,
    USAGE_UNBACKED,
    STORE_REGRESSIONS,
];

/// Hot-path latency buckets: the handler answers in microseconds, so most buckets are below a
/// millisecond. Without explicit buckets the exporter would render a summary.
const DEBIT_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.1, 0.5,
];

/// Settle latency buckets: one store round trip, with fsync or network.
const SETTLE_BUCKETS: &[f64] = &[
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Bounded outcome label of a data-plane request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Insufficient,
    Unknown,
    Invalid,
    Unavailable,
    Limited,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Insufficient => "insufficient",
            Outcome::Unknown => "unknown",
            Outcome::Invalid => "invalid",
            Outcome::Unavailable => "unavailable",
            Outcome::Limited => "limited",
        }
    }
}

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DEBIT_DURATION.into()), DEBIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SETTLE_DURATION.into()), SETTLE_BUCKETS)?
        .install_recorder()?;
    describe();
    for name in COUNTERS_FROM_ZERO {
        metrics::counter!(name).increment(0);
    }
    for limit in LIMITS {
        metrics::counter!(LIMIT_HITS, "limit" => limit).increment(0);
    }
    for kind in STORE_ERROR_KINDS {
        metrics::counter!(STORE_ERRORS, "kind" => kind).increment(0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// What kind of metric a name is.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric's name, kind, unit and help text, as `/metrics` describes it.
const DESCRIPTIONS: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        DEBIT_REQUESTS,
        Kind::Counter,
        None,
        "Data-plane decisions (debit, authorize, reservation) by outcome: allowed, insufficient, unknown, invalid, unavailable, limited",
    ),
    (
        DEBIT_DURATION,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time to decide a debit in the handler (hot path)",
    ),
    (CREDITS_DEBITED, Kind::Counter, None, "Credits allowed by debits and committed reservations"),
    (
        SETTLE_BATCHES,
        Kind::Counter,
        None,
        "Settle batches acknowledged by the store (one per org per settle)",
    ),
    (SETTLE_DURATION, Kind::Histogram, Some(Unit::Seconds), "Time of one settle call to the store"),
    (
        SETTLE_ERRORS,
        Kind::Counter,
        None,
        "Settle calls that failed; the batch is kept and re-sent unchanged",
    ),
    (
        BLOCKED_SPENDERS,
        Kind::Gauge,
        None,
        "Spenders (workspaces in budget mode, the Primary of a shared-mode org) with no credit left, refused from memory",
    ),
    (
        UNSETTLED_CREDITS,
        Kind::Gauge,
        None,
        "Credits consumed on this node that the store has not recorded yet (lost on a hard crash)",
    ),
    (
        LEASED_CREDITS,
        Kind::Gauge,
        None,
        "Credits this node holds as leases (its outage reserve included), spendable without a store call",
    ),
    (RESERVATIONS_OPEN, Kind::Gauge, None, "Reservations open on this node"),
    (RESERVATIONS_EXPIRED, Kind::Counter, None, "Reservations released because their TTL passed"),
    (
        LIMIT_HITS,
        Kind::Counter,
        None,
        "Requests or connections refused or cut by a configured limit, by limit",
    ),
    (STORE_CALLS, Kind::Counter, None, "Calls made to the store, by operation"),
    (ADMIN_OPERATIONS, Kind::Counter, None, "Control-plane changes applied, by operation"),
    (
        HTTP_REQUESTS,
        Kind::Counter,
        None,
        "HTTP requests answered, by plane (data, control, ops, console) and status",
    ),
    (CONNECTIONS_OPEN, Kind::Gauge, None, "HTTP connections open"),
    (
        READY,
        Kind::Gauge,
        None,
        "1 when the node answers debits (store reachable, state loaded), else 0",
    ),
    (
        OUTAGE_DEBITS,
        Kind::Counter,
        None,
        "Debits allowed from the outage reserve because the store could not be asked",
    ),
    (
        UNCLEAN_RESTARTS,
        Kind::Counter,
        None,
        "Starts that found the previous life of this node had not stopped cleanly",
    ),
    (
        LEASES_FORFEITED,
        Kind::Counter,
        None,
        "Credits this node dropped from memory because the store had closed its leases (it was silent past lease_ttl) or forgot them",
    ),
    (
        USAGE_UNBACKED,
        Kind::Counter,
        None,
        "Credits of usage this node reported that no lease of its own backed in the store (already counted as lease_expired): recorded, not charged again",
    ),
    (
        STORE_REGRESSIONS,
        Kind::Counter,
        None,
        "Times the store answered with an older state than it had acknowledged (writes lost in a failover or a restart from older data); the node then starts a new life",
    ),
    (
        STORE_ERRORS,
        Kind::Counter,
        None,
        "Store calls that failed, by kind: full (no space left), io, corrupt, unavailable, other",
    ),
    (STORE_FILE_BYTES, Kind::Gauge, Some(Unit::Bytes), "Size of the embedded store's data file"),
    (
        LEDGER_ENTRIES,
        Kind::Gauge,
        None,
        "Ledger entries the embedded store holds (at most about ledger_retain per org; older ones are trimmed)",
    ),
    (BUILD_INFO, Kind::Gauge, None, "Always 1; the version label says which creditd runs"),
];

fn describe() {
    for &(name, kind, unit, help) in DESCRIPTIONS {
        match (kind, unit) {
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Kind::Histogram, None) => describe_histogram!(name, help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(name, unit, help),
        }
    }
}

/// Counts a hit of the named limit.
pub fn limit_hit(limit: &'static str) {
    debug_assert!(
        LIMITS.contains(&limit),
        "limit label {limit:?} is missing from metrics::LIMITS"
    );
    metrics::counter!(LIMIT_HITS, "limit" => limit).increment(1);
}

/// Counts one store call.
pub fn store_call(op: &'static str) {
    metrics::counter!(STORE_CALLS, "op" => op).increment(1);
}

/// Counts one failed store call.
pub fn store_error(kind: &'static str) {
    debug_assert!(
        STORE_ERROR_KINDS.contains(&kind),
        "store error kind {kind:?} is missing from metrics::STORE_ERROR_KINDS"
    );
    metrics::counter!(STORE_ERRORS, "kind" => kind).increment(1);
}
