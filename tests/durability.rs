//! Proves that the real binary's state survives stops and crashes: a SIGTERM exits 0 and a
//! restart restores exactly the settled state, admin operations are on disk before they are
//! answered, and a SIGKILL loses at most the unsettled usage (under-charged, never over-charged).

mod common;

use std::time::Duration;

use common::{assert_conserved, balance, eventually, metric, used, workspace, Process, TestNode};
use creditd::model::OrgId;
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore};
use creditd::store::Store;
use serde_json::{json, Value};

const UNCLEAN_RESTARTS: &str = "creditd_unclean_restarts_total";
const UNSETTLED: &str = "creditd_unsettled_credits";
const LEASED: &str = "creditd_leased_credits";

/// A settle interval no test outlives: usage stays unsettled until the process stops or dies.
/// `lease_ttl` must be more than twice the settle interval, so it is raised with it.
const NEVER_SETTLE: &[(&str, &str)] = &[
    ("CREDITD_SETTLE_INTERVAL", "1h"),
    ("CREDITD_LEASE_TTL", "3h"),
];

fn assert_exit_zero(status: std::process::ExitStatus) {
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must exit 0, got {status:?}"
    );
}

async fn debit_ok(p: &Process, org: &str, ws: &str, amount: u64) {
    let a = p.client.debit(org, ws, amount).await;
    assert_eq!(a.status, 200, "debit {amount} on {ws}: {}", a.text);
}

async fn transfer_ok(p: &Process, org: &str, from: &str, to: &str, amount: u64) {
    let a = p.client.transfer(org, from, to, amount).await;
    assert_eq!(a.status, 200, "transfer {from}->{to} {amount}: {}", a.text);
}

async fn unclean_restarts(p: &Process) -> f64 {
    metric(&p.client.metrics_text().await, UNCLEAN_RESTARTS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_a_restart_restores_exactly_the_settled_state() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::spawn(dir.path(), &[]).await;
    let c = &p.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 10_000).await;
    for ws in ["ws-a", "ws-b", "ws-c"] {
        c.create_workspace("acme", ws).await;
    }
    transfer_ok(&p, "acme", "primary", "ws-a", 3_000).await;
    transfer_ok(&p, "acme", "primary", "ws-b", 2_000).await;
    transfer_ok(&p, "acme", "primary", "ws-c", 1_000).await;
    for _ in 0..7 {
        debit_ok(&p, "acme", "ws-a", 10).await;
    }
    for _ in 0..3 {
        debit_ok(&p, "acme", "ws-b", 5).await;
    }
    debit_ok(&p, "acme", "primary", 100).await;
    debit_ok(&p, "acme", "ws-c", 40).await;
    // Reservations committed: one in part (300 released), one in full.
    let r1 = c.reserve("acme", "ws-a", 500, 600_000).await;
    let a = c.commit(&r1, 200).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        (a.body["charged"].as_u64(), a.body["released"].as_u64()),
        (Some(200), Some(300))
    );
    let r2 = c.reserve("acme", "ws-b", 100, 600_000).await;
    assert_eq!(c.commit(&r2, 100).await.status, 200);
    transfer_ok(&p, "acme", "ws-a", "ws-b", 250).await;
    let deleted = c.delete("/v1/orgs/acme/workspaces/ws-c").await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.body["returned_to_primary"], 960);
    c.set_mode("acme", "shared").await;
    debit_ok(&p, "acme", "ws-a", 33).await;
    c.purchase("acme", 500).await;

    let before = c.org("acme").await;
    let ledger_before = c.ledger_all("acme").await;
    // The state is what the operations say, so that "identical after restart" means something.
    assert_eq!(before["mode"], "shared");
    assert_eq!(before["purchased"], 10_500);
    assert_eq!(before["used"], 70 + 15 + 100 + 40 + 200 + 100 + 33);
    assert_eq!(before["held"], 0);
    assert_eq!(used(&before, "ws-a"), 70 + 200 + 33);
    assert_eq!(used(&before, "ws-b"), 15 + 100);
    assert_eq!(used(&before, "primary"), 100);
    assert_eq!(balance(&before, "primary"), 10_500 - 558);
    assert_eq!(balance(&before, "ws-a"), 0);
    assert_eq!(balance(&before, "ws-b"), 0);
    let names: Vec<&str> = before["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["workspace"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["primary", "ws-a", "ws-b"]);
    assert_conserved(&before);
    let kinds = |ledger: &[Value], kind: &str| ledger.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(kinds(&ledger_before, "purchase"), 2);
    assert_eq!(kinds(&ledger_before, "transfer"), 4);
    assert_eq!(kinds(&ledger_before, "workspace_deleted"), 1);
    assert_eq!(kinds(&ledger_before, "mode_changed"), 1);
    assert_eq!(kinds(&ledger_before, "sweep"), 2);

    assert_exit_zero(p.terminate());

    let p = Process::spawn(dir.path(), &[]).await;
    let after = p.client.org("acme").await;
    assert_eq!(after, before, "org view changed across a clean restart");
    let ledger_after = p.client.ledger_all("acme").await;
    assert_eq!(
        ledger_after, ledger_before,
        "ledger changed across a clean restart"
    );
    assert_eq!(unclean_restarts(&p).await, 0.0);
    // The restored node keeps working from the restored balances.
    let a = p.client.debit("acme", "ws-b", 42).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["remaining"], 10_500 - 558 - 42);
    assert_exit_zero(p.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_are_durable_before_they_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::spawn(dir.path(), &[]).await;
    let c = &p.client;
    c.create_org("acme", "budget").await;
    c.create_org("globex", "shared").await;
    let keyed = c
        .post(
            "/v1/orgs/acme/credits",
            json!({"amount": 1_000, "idempotency_key": "buy-1"}),
        )
        .await;
    assert_eq!(keyed.status, 200, "{}", keyed.text);
    c.create_workspace("acme", "ws-a").await;
    c.create_workspace("acme", "ws-b").await;
    transfer_ok(&p, "acme", "primary", "ws-a", 300).await;
    transfer_ok(&p, "acme", "primary", "ws-b", 200).await;
    transfer_ok(&p, "acme", "ws-a", "ws-b", 50).await;
    c.purchase("globex", 777).await;
    // The last answer is the org view the operator was shown; nothing else is read before the
    // crash, so nothing but the operations themselves can have written it.
    let answered = c.purchase("acme", 250).await;
    p.kill();

    let p = Process::spawn(dir.path(), &[]).await;
    let c = &p.client;
    let acme = c.org("acme").await;
    assert_eq!(
        acme, answered,
        "an answered admin operation was lost by SIGKILL"
    );
    assert_eq!(acme["purchased"], 1_250);
    assert_eq!(balance(&acme, "primary"), 750);
    assert_eq!(balance(&acme, "ws-a"), 250);
    assert_eq!(balance(&acme, "ws-b"), 250);
    assert_conserved(&acme);
    let globex = c.org("globex").await;
    assert_eq!(globex["mode"], "shared");
    assert_eq!(balance(&globex, "primary"), 777);
    let ledger = c.ledger_all("acme").await;
    let moves: Vec<(String, u64)> = ledger
        .iter()
        .filter(|e| e["kind"] == "purchase" || e["kind"] == "transfer")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["amount"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = [
        ("purchase", 1_000),
        ("transfer", 300),
        ("transfer", 200),
        ("transfer", 50),
        ("purchase", 250),
    ]
    .iter()
    .map(|(k, a)| (k.to_string(), *a))
    .collect();
    assert_eq!(moves, expected);
    // The idempotency key was made durable with the purchase: a retry does not charge twice.
    let retry = c
        .post(
            "/v1/orgs/acme/credits",
            json!({"amount": 1_000, "idempotency_key": "buy-1"}),
        )
        .await;
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert_eq!(c.org("acme").await["purchased"], 1_250);
    assert_eq!(unclean_restarts(&p).await, 1.0);
    assert_exit_zero(p.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_crash_loses_only_unsettled_usage_and_never_overcharges() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::spawn(dir.path(), NEVER_SETTLE).await;
    let c = &p.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1_000).await;
    c.create_workspace("acme", "ws-a").await;
    transfer_ok(&p, "acme", "primary", "ws-a", 400).await;
    let before = c.org("acme").await;
    for _ in 0..5 {
        debit_ok(&p, "acme", "ws-a", 10).await;
    }
    debit_ok(&p, "acme", "primary", 20).await;
    // Debits are decided from the lease: the node knows, the store does not yet.
    let a = c.get("/v1/balance?org=acme&workspace=ws-a").await;
    assert_eq!(a.body["remaining"], 350, "{}", a.text);
    // No org view, no ledger read, no settle: those would settle the usage before the crash.
    p.kill();

    let p = Process::spawn(dir.path(), &[]).await;
    let after = p.client.org("acme").await;
    assert_eq!(
        used(&after, "ws-a"),
        0,
        "unsettled usage must be lost, not invented"
    );
    assert_eq!(used(&after, "primary"), 0);
    assert_eq!(
        balance(&after, "ws-a"),
        400,
        "the lease must come back to the balance"
    );
    assert_eq!(balance(&after, "primary"), 600);
    assert_eq!(after, before);
    assert_conserved(&after);
    assert_eq!(unclean_restarts(&p).await, 1.0);
    let ledger = p.client.ledger_all("acme").await;
    assert!(
        ledger.iter().all(|e| e["kind"] != "usage"),
        "no usage may be recorded for the lost debits: {ledger:?}"
    );
    assert_exit_zero(p.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_crash_after_the_settler_ran_keeps_all_usage() {
    let dir = tempfile::tempdir().unwrap();
    // The harness default: settle every 50ms.
    let p = Process::spawn(dir.path(), &[]).await;
    let c = &p.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1_000).await;
    c.create_workspace("acme", "ws-a").await;
    transfer_ok(&p, "acme", "primary", "ws-a", 400).await;
    for _ in 0..5 {
        debit_ok(&p, "acme", "ws-a", 10).await;
    }
    debit_ok(&p, "acme", "primary", 20).await;
    // The gauges are written at the end of a settle round. The embedded node leases each
    // spender's whole balance, so a round that came after every debit shows the leases down by
    // 70 (930 of 1,000); if that same round shows nothing unsettled, all 70 are on disk.
    // (Unsettled 0 alone could come from a round that ran before the debits.)
    eventually(
        Duration::from_secs(10),
        "a settle round after the debits with nothing unsettled",
        || async {
            let text = c.metrics_text().await;
            metric(&text, LEASED) == 930.0 && metric(&text, UNSETTLED) == 0.0
        },
    )
    .await;
    p.kill();

    let p = Process::spawn(dir.path(), &[]).await;
    let after = p.client.org("acme").await;
    assert_eq!(used(&after, "ws-a"), 50);
    assert_eq!(used(&after, "primary"), 20);
    assert_eq!(balance(&after, "ws-a"), 350);
    assert_eq!(balance(&after, "primary"), 580);
    assert_eq!(after["used"], 70);
    assert_conserved(&after);
    assert_eq!(unclean_restarts(&p).await, 1.0);
    assert_exit_zero(p.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reservations_are_released_by_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::spawn(dir.path(), &[]).await;
    let c = &p.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1_000).await;
    c.create_workspace("acme", "ws-a").await;
    transfer_ok(&p, "acme", "primary", "ws-a", 500).await;
    let open_a = c.reserve("acme", "ws-a", 200, 3_600_000).await;
    let _open_p = c.reserve("acme", "primary", 100, 3_600_000).await;
    debit_ok(&p, "acme", "ws-a", 5).await;
    let view = c.org("acme").await;
    assert_eq!(view["held"], 300);
    assert_eq!(workspace(&view, "ws-a")["held"], 200);
    assert_eq!(balance(&view, "ws-a"), 295);
    assert_conserved(&view);

    assert_exit_zero(p.terminate());

    // Before any restart could tidy up: the stop itself gave back every reservation and lease.
    {
        let store = EmbeddedStore::open(
            dir.path(),
            EmbeddedOptions {
                idempotency_keys_max: 1_000,
                idempotency_ttl: Duration::from_secs(3600),
                ledger_retain: creditd::config::DEFAULT_LEDGER_RETAIN,
                ..EmbeddedOptions::default()
            },
        )
        .expect("open the stopped node's store");
        let record = store
            .load_org(&OrgId::parse("acme", "org").unwrap())
            .await
            .unwrap()
            .expect("acme on disk");
        for (node, share) in &record.nodes {
            assert!(
                share.held.values().all(|&h| h == 0) && share.leases.values().all(|&l| l == 0),
                "node {node} still holds credits after a clean stop: {share:?}"
            );
        }
        assert!(record.is_conserved());
    }

    let p = Process::spawn(dir.path(), &[]).await;
    let c = &p.client;
    let after = c.org("acme").await;
    assert_eq!(
        after["held"], 0,
        "reservations must be released at stop: {after}"
    );
    assert_eq!(workspace(&after, "ws-a")["held"], 0);
    assert_eq!(
        balance(&after, "ws-a"),
        495,
        "held credits go back to their balance"
    );
    assert_eq!(balance(&after, "primary"), 500);
    assert_eq!(after["used"], 5);
    assert_conserved(&after);
    // The released reservation is finished: it cannot be charged after the restart.
    let a = c.commit(&open_a, 1).await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(a.error_code(), "unknown_reservation");
    assert_eq!(
        unclean_restarts(&p).await,
        0.0,
        "a clean stop is not an unclean restart"
    );
    assert_exit_zero(p.terminate());
}

/// Shutdown itself cannot be caught answering 503: the listener closes in the same step and
/// hyper closes idle connections. What is tested is the first step of a stop: once the node is
/// marked unready, `/readyz` answers 503 while the node still answers the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_503_once_the_stop_has_begun() {
    let node = TestNode::start().await;
    assert_eq!(node.client.get("/readyz").await.status, 200);
    node.server.node().set_unready();
    let a = node.client.get("/readyz").await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(node.client.get("/healthz").await.status, 200);
    node.stop().await;
}
