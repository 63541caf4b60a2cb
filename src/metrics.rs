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

fn describe() {
    describe_counter!(
        DEBIT_REQUESTS,
        "Data-plane decisions (debit, authorize, reservation) by outcome: allowed, insufficient, unknown, invalid, unavailable, limited"
    );
    describe_histogram!(
        DEBIT_DURATION,
        Unit::Seconds,
        "Time to decide a debit in the handler (hot path)"
    );
    describe_counter!(
        CREDITS_DEBITED,
        "Credits allowed by debits and committed reservations"
    );
    describe_counter!(
        SETTLE_BATCHES,
        "Settle batches acknowledged by the store (one per org per settle)"
    );
    describe_histogram!(
        SETTLE_DURATION,
        Unit::Seconds,
        "Time of one settle call to the store"
    );
    describe_counter!(
        SETTLE_ERRORS,
        "Settle calls that failed; the batch is kept and re-sent unchanged"
    );
    describe_gauge!(
        BLOCKED_SPENDERS,
        "Spenders (workspaces, or shared pools) with no credit left, refused from memory"
    );
    describe_gauge!(
        UNSETTLED_CREDITS,
        "Credits consumed on this node that the store has not recorded yet (lost on a hard crash)"
    );
    describe_gauge!(
        LEASED_CREDITS,
        "Credits this node holds as leases (its outage reserve included), spendable without a store call"
    );
    describe_gauge!(RESERVATIONS_OPEN, "Reservations open on this node");
    describe_counter!(
        RESERVATIONS_EXPIRED,
        "Reservations released because their TTL passed"
    );
    describe_counter!(
        LIMIT_HITS,
        "Requests or connections refused or cut by a configured limit, by limit"
    );
    describe_counter!(STORE_CALLS, "Calls made to the store, by operation");
    describe_counter!(
        ADMIN_OPERATIONS,
        "Control-plane changes applied, by operation"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by plane (data, control, ops, console) and status"
    );
    describe_gauge!(CONNECTIONS_OPEN, "HTTP connections open");
    describe_gauge!(
        READY,
        "1 when the node answers debits (store reachable, state loaded), else 0"
    );
    describe_counter!(
        OUTAGE_DEBITS,
        "Debits allowed from the outage reserve because the store could not be asked"
    );
    describe_counter!(
        UNCLEAN_RESTARTS,
        "Starts that found the previous life of this node had not stopped cleanly"
    );
    describe_counter!(
        LEASES_FORFEITED,
        "Credits this node dropped from memory because the store had closed its leases (it was silent past lease_ttl) or forgot them"
    );
    describe_counter!(
        USAGE_UNBACKED,
        "Credits of usage this node reported that no lease of its own backed in the store (already counted as lease_expired): recorded, not charged again"
    );
    describe_counter!(
        STORE_REGRESSIONS,
        "Times the store answered with an older state than it had acknowledged (writes lost in a failover or a restart from older data); the node then starts a new life"
    );
    describe_counter!(
        STORE_ERRORS,
        "Store calls that failed, by kind: full (no space left), io, corrupt, unavailable, other"
    );
    describe_gauge!(
        STORE_FILE_BYTES,
        Unit::Bytes,
        "Size of the embedded store's data file"
    );
    describe_gauge!(
        LEDGER_ENTRIES,
        "Ledger entries the embedded store holds (they are never deleted)"
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which creditd runs"
    );
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
