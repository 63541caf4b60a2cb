//! Proves rules 1-8 of docs/api.md through the HTTP API, one test per rule, named after the rule.

mod common;

use std::time::Duration;

use common::{assert_conserved, assert_error, balance, budget_org, used, Client, TestNode};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinSet;

async fn set_mode(c: &Client, org: &str, mode: &str) -> Value {
    let a = c
        .put(&format!("/v1/orgs/{org}/mode"), json!({ "mode": mode }))
        .await;
    assert_eq!(a.status, StatusCode::OK, "set mode: {}", a.text);
    a.body
}

async fn remaining(c: &Client, org: &str, ws: &str) -> u64 {
    let a = c
        .get(&format!("/v1/balance?org={org}&workspace={ws}"))
        .await;
    assert_eq!(a.status, StatusCode::OK, "balance: {}", a.text);
    a.body["remaining"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_1_all_purchased_credits_go_to_the_primary_workspace() {
    let node = TestNode::start().await;
    let c = &node.client;
    for (org, mode, primary) in [("a", "budget", "primary"), ("s", "shared", "main")] {
        let a = c
            .post(
                "/v1/orgs",
                json!({"org": org, "mode": mode, "primary": primary}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        c.create_workspace(org, "ws-a").await;
        c.create_workspace(org, "ws-b").await;
        for (i, amount) in [700u64, 300, 1].into_iter().enumerate() {
            let view = c.purchase(org, amount).await;
            let total = [700u64, 300, 1][..=i].iter().sum::<u64>();
            assert_eq!(balance(&view, primary), total, "{view}");
            assert_eq!(balance(&view, "ws-a"), 0);
            assert_eq!(balance(&view, "ws-b"), 0);
            assert_eq!(view["purchased"], total);
        }
    }
    // After a mode switch too, and with credits already assigned elsewhere.
    c.transfer("a", "primary", "ws-a", 100).await;
    set_mode(c, "a", "shared").await;
    set_mode(c, "a", "budget").await;
    let view = c.purchase("a", 50).await;
    assert_eq!(balance(&view, "primary"), 1_051);
    assert_eq!(balance(&view, "ws-a"), 0);
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_2_primary_balance_is_the_credits_not_allocated_to_other_workspaces() {
    let node = TestNode::start().await;
    let c = &node.client;
    let view = budget_org(c, "acme", 10_000, &[("ws-a", 2_000), ("ws-b", 3_000)]).await;
    assert_eq!(balance(&view, "primary"), 5_000);
    assert_eq!(remaining(c, "acme", "primary").await, 5_000);

    // Spending by other workspaces does not touch the Primary.
    c.debit("acme", "ws-a", 500).await;
    c.debit("acme", "ws-b", 3_000).await;
    let view = c.org("acme").await;
    assert_eq!(balance(&view, "primary"), 5_000);
    // Unallocated = total credits held - what the others hold.
    let others: u64 = ["ws-a", "ws-b"].iter().map(|w| balance(&view, w)).sum();
    assert_eq!(
        balance(&view, "primary"),
        view["total_credits"].as_u64().unwrap() - others
    );

    // Moving credits back and buying more changes it accordingly.
    c.transfer("acme", "ws-a", "primary", 1_000).await;
    let view = c.purchase("acme", 250).await;
    assert_eq!(balance(&view, "primary"), 6_250);
    assert_eq!(balance(&view, "ws-a"), 500);
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_3_transfers_move_credits_between_any_two_workspaces_in_budget_mode_only() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 0), ("ws-b", 0)]).await;

    // Any two workspaces, in every direction.
    for (from, to, amount) in [
        ("primary", "ws-a", 600),
        ("ws-a", "ws-b", 250),
        ("ws-b", "primary", 50),
        ("ws-b", "ws-a", 100),
        ("ws-a", "primary", 1),
    ] {
        let a = c.transfer("acme", from, to, amount).await;
        assert_eq!(a.status, StatusCode::OK, "{from}->{to}: {}", a.text);
    }
    let view = c.org("acme").await;
    assert_eq!(
        (
            balance(&view, "primary"),
            balance(&view, "ws-a"),
            balance(&view, "ws-b")
        ),
        (451, 449, 100)
    );

    // Never more than the source can give: 409, and nothing moves.
    assert_error(
        &c.transfer("acme", "ws-b", "ws-a", 101).await,
        409,
        "insufficient_credits",
        "fewer than 101",
    );
    assert_eq!(c.org("acme").await, view);

    // The change applies at once: the receiver can spend it all, the giver no longer can.
    c.transfer("acme", "ws-b", "ws-a", 100).await;
    assert_eq!(remaining(c, "acme", "ws-a").await, 549);
    assert_eq!(remaining(c, "acme", "ws-b").await, 0);
    assert_eq!(c.debit("acme", "ws-a", 549).await.status, StatusCode::OK);
    assert_eq!(
        c.debit("acme", "ws-b", 1).await.status,
        StatusCode::PAYMENT_REQUIRED
    );

    // Budget mode only.
    set_mode(c, "acme", "shared").await;
    let before = c.org("acme").await;
    assert_error(
        &c.transfer("acme", "primary", "ws-a", 1).await,
        409,
        "wrong_mode",
        "shared mode",
    );
    assert_eq!(c.org("acme").await, before);
    assert_conserved(&before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_4_in_budget_mode_an_uncovered_debit_is_blocked_until_credits_are_assigned() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 10_000, &[("ws-a", 10)]).await;

    assert_eq!(c.debit("acme", "ws-a", 10).await.status, StatusCode::OK);
    // The Primary has plenty, but ws-a spends only its own balance.
    let before = c.org("acme").await;
    for _ in 0..3 {
        let a = c.debit("acme", "ws-a", 1).await;
        assert_error(&a, 402, "insufficient_credits", "not enough credits");
        assert_eq!(a.body["remaining"], 0);
        let a = c
            .send(
                Method::GET,
                "/v1/authorize",
                None,
                &[("x-credits-org", "acme"), ("x-credits-workspace", "ws-a")],
            )
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        let r = c
            .post(
                "/v1/reservations",
                json!({"org": "acme", "workspace": "ws-a", "amount": 1}),
            )
            .await;
        assert_error(&r, 402, "insufficient_credits", "reservation");
    }
    assert_eq!(c.org("acme").await, before, "blocked calls charge nothing");

    // Succeeds again as soon as credits are assigned.
    c.transfer("acme", "primary", "ws-a", 5).await;
    let a = c.debit("acme", "ws-a", 5).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["remaining"], 0);
    assert_eq!(
        c.debit("acme", "ws-a", 1).await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), 15);
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_5_deleting_a_workspace_returns_its_credits_and_the_primary_cannot_be_deleted() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 300), ("ws-b", 0)]).await;
    c.debit("acme", "ws-a", 100).await;
    // An open reservation of the deleted workspace is released into what is returned.
    let r = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-a", "amount": 50}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.body["reservation"].as_str().unwrap().to_string();

    let a = c.delete("/v1/orgs/acme/workspaces/ws-a").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["returned_to_primary"], 200);
    assert_eq!(balance(&a.body, "primary"), 900);
    assert_eq!(a.body["used"], 100);
    assert_eq!(a.body["held"], 0);
    assert_conserved(&a.body);
    let view = c.org("acme").await;
    assert!(view["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["workspace"] != "ws-a"));
    assert_error(
        &c.post(
            &format!("/v1/reservations/{id}/commit"),
            json!({"amount": 1}),
        )
        .await,
        404,
        "unknown_reservation",
        &id,
    );
    assert_error(
        &c.debit("acme", "ws-a", 1).await,
        404,
        "unknown_workspace",
        "ws-a",
    );

    // An empty workspace returns 0.
    let a = c.delete("/v1/orgs/acme/workspaces/ws-b").await;
    assert_eq!(a.body["returned_to_primary"], 0);

    // The Primary is never deleted, whatever its name.
    let before = c.org("acme").await;
    assert_error(
        &c.delete("/v1/orgs/acme/workspaces/primary").await,
        409,
        "primary_workspace",
        "cannot be deleted",
    );
    assert_eq!(c.org("acme").await, before);
    c.post("/v1/orgs", json!({"org": "named", "primary": "hq"}))
        .await;
    assert_error(
        &c.delete("/v1/orgs/named/workspaces/hq").await,
        409,
        "primary_workspace",
        "hq",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_6_budget_to_shared_sweeps_into_the_primary_and_shared_to_budget_moves_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 300), ("ws-b", 200)]).await;
    c.debit("acme", "ws-a", 40).await;

    let view = set_mode(c, "acme", "shared").await;
    assert_eq!(view["mode"], "shared");
    assert_eq!(balance(&view, "primary"), 960);
    assert_eq!(balance(&view, "ws-a"), 0);
    assert_eq!(balance(&view, "ws-b"), 0);
    assert_eq!(used(&view, "ws-a"), 40, "usage stays with the workspace");
    assert_conserved(&view);
    // Shared: every workspace spends from the Primary, with no per-workspace limit.
    assert_eq!(remaining(c, "acme", "ws-b").await, 960);
    assert_eq!(c.debit("acme", "ws-b", 600).await.status, StatusCode::OK);
    assert_eq!(remaining(c, "acme", "ws-a").await, 360);

    let view = set_mode(c, "acme", "budget").await;
    assert_eq!(view["mode"], "budget");
    assert_eq!(balance(&view, "primary"), 360, "nothing moves");
    assert_eq!(balance(&view, "ws-a"), 0);
    assert_eq!(balance(&view, "ws-b"), 0);
    assert_conserved(&view);
    // Non-primary workspaces hold 0 until credits are assigned.
    assert_eq!(
        c.debit("acme", "ws-a", 1).await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    c.transfer("acme", "primary", "ws-a", 10).await;
    assert_eq!(c.debit("acme", "ws-a", 10).await.status, StatusCode::OK);
    let view = c.org("acme").await;
    assert_eq!(view["used"], 650);
    let ledger = c.get("/v1/orgs/acme/ledger").await;
    let sweeps: Vec<(String, u64)> = ledger.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "sweep")
        .map(|e| {
            (
                e["workspace"].as_str().unwrap().to_string(),
                e["amount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sweeps, vec![("ws-a".into(), 260), ("ws-b".into(), 200)]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_7_conservation_holds_after_every_operation_a_clean_stop_and_a_crash() {
    let node = TestNode::start().await;
    let c = node.client.clone();
    let check = |c: Client| async move {
        let view = c.org("acme").await;
        assert_conserved(&view);
        view
    };
    budget_org(&c, "acme", 5_000, &[("ws-a", 1_000), ("ws-b", 500)]).await;
    check(c.clone()).await;
    c.debit("acme", "ws-a", 123).await;
    check(c.clone()).await;
    let r1 = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-b", "amount": 200}),
        )
        .await;
    let r2 = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-a", "amount": 300, "ttl_ms": 3_600_000}),
        )
        .await;
    let view = check(c.clone()).await;
    assert_eq!(view["held"], 500);
    c.post(
        &format!(
            "/v1/reservations/{}/commit",
            r1.body["reservation"].as_str().unwrap()
        ),
        json!({"amount": 120}),
    )
    .await;
    check(c.clone()).await;
    c.transfer("acme", "ws-b", "ws-a", 100).await;
    check(c.clone()).await;
    c.debit("acme", "ws-b", 1_000).await; // refused
    check(c.clone()).await;
    c.purchase("acme", 777).await;
    check(c.clone()).await;
    set_mode(&c, "acme", "shared").await;
    let view = check(c.clone()).await;
    assert_eq!(view["held"], 300, "the open reservation survives the sweep");
    c.debit("acme", "ws-b", 10).await;
    c.delete("/v1/orgs/acme/workspaces/ws-b").await;
    let before_stop = check(c.clone()).await;
    assert_eq!(
        before_stop["purchased"],
        before_stop["total_credits"].as_u64().unwrap() + before_stop["used"].as_u64().unwrap()
    );
    let _ = r2;
    node.stop().await;

    // The same across a clean stop (SIGTERM) and a hard crash (SIGKILL) of the real binary.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = common::Process::spawn(dir.path(), &[]).await;
    budget_org(&p.client, "acme", 1_000, &[("ws-a", 400)]).await;
    p.client.debit("acme", "ws-a", 30).await;
    let r = p
        .client
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-a", "amount": 70}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let before_stop = p.client.org("acme").await;
    assert_conserved(&before_stop);
    assert_eq!(before_stop["held"], 70);
    assert!(p.terminate().success(), "clean exit on SIGTERM");

    let p = common::Process::spawn(dir.path(), &[]).await;
    let view = p.client.org("acme").await;
    assert_conserved(&view);
    assert_eq!(view["purchased"], 1_000);
    assert_eq!(view["used"], 30);
    assert_eq!(view["held"], 0, "a stop releases open reservations");
    assert_eq!(balance(&view, "ws-a"), 370);
    p.client.debit("acme", "ws-a", 5).await;
    let r = p
        .client
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-a", "amount": 15}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_conserved(&p.client.org("acme").await);
    p.kill();

    // After a crash, unsettled usage may be lost (under-charged) but nothing is created or
    // destroyed: what was added is still all accounted for.
    let p = common::Process::spawn(dir.path(), &[]).await;
    let view = p.client.org("acme").await;
    assert_conserved(&view);
    assert_eq!(view["purchased"], 1_000);
    assert_eq!(view["held"], 0);
    let used_now = view["used"].as_u64().unwrap();
    assert!((30..=35).contains(&used_now), "used {used_now}: {view}");
    assert!(p.terminate().success());
}

/// Fires `n` concurrent 1-credit calls at `org`/`ws` (debits, authorizes and reservations
/// committed in full) and returns how many were allowed.
async fn spend_concurrently(c: &Client, org: &str, workspaces: &[&str], n: usize) -> u64 {
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let c = c.clone();
        let org = org.to_string();
        let ws = workspaces[i % workspaces.len()].to_string();
        tasks.spawn(async move {
            match i % 3 {
                0 => {
                    let a = c.debit(&org, &ws, 1).await;
                    assert!(matches!(a.status.as_u16(), 200 | 402), "{}", a.text);
                    a.status == StatusCode::OK
                }
                1 => {
                    let a = c
                        .send(
                            Method::POST,
                            "/v1/authorize",
                            None,
                            &[("x-credits-org", &org), ("x-credits-workspace", &ws)],
                        )
                        .await;
                    assert!(matches!(a.status.as_u16(), 200 | 403), "{}", a.text);
                    a.status == StatusCode::OK
                }
                _ => {
                    let a = c
                        .post(
                            "/v1/reservations",
                            json!({"org": org, "workspace": ws, "amount": 1}),
                        )
                        .await;
                    assert!(matches!(a.status.as_u16(), 201 | 402), "{}", a.text);
                    if a.status != StatusCode::CREATED {
                        return false;
                    }
                    let id = a.body["reservation"].as_str().unwrap();
                    let done = c
                        .post(
                            &format!("/v1/reservations/{id}/commit"),
                            json!({"amount": 1}),
                        )
                        .await;
                    assert_eq!(done.status, StatusCode::OK, "{}", done.text);
                    true
                }
            }
        });
    }
    let mut allowed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .expect("concurrent calls finish within 60s")
    {
        allowed += joined.expect("task") as u64;
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_8_no_overspend_a_spender_never_consumes_more_than_it_was_given() {
    let node = TestNode::start().await;
    let c = &node.client;

    // Budget: each workspace is its own limit, however much the others or the Primary hold.
    budget_org(c, "acme", 10_000, &[("ws-a", 25), ("ws-b", 7)]).await;
    let allowed_a = spend_concurrently(c, "acme", &["ws-a"], 60).await;
    let allowed_b = spend_concurrently(c, "acme", &["ws-b"], 30).await;
    assert_eq!(allowed_a, 25, "one node decides exactly");
    assert_eq!(allowed_b, 7);
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), 25);
    assert_eq!(used(&view, "ws-b"), 7);
    assert_eq!(balance(&view, "primary"), 10_000 - 32);
    assert_conserved(&view);

    // Shared: the org as a whole is the limit.
    c.create_org("pool", "shared").await;
    c.purchase("pool", 40).await;
    for ws in ["w1", "w2", "w3"] {
        c.create_workspace("pool", ws).await;
    }
    let allowed = spend_concurrently(c, "pool", &["primary", "w1", "w2", "w3"], 90).await;
    assert_eq!(allowed, 40);
    let view = c.org("pool").await;
    assert_eq!(view["used"], 40);
    assert_eq!(balance(&view, "primary"), 0);
    assert_conserved(&view);

    // While credits are being taken away: what was spent plus what left never exceeds what
    // was given.
    budget_org(c, "moving", 1_000, &[("ws-a", 50)]).await;
    let spender = {
        let c = c.clone();
        tokio::spawn(async move { spend_concurrently(&c, "moving", &["ws-a"], 90).await })
    };
    let mut moved_out = 0u64;
    for _ in 0..4 {
        let a = c.transfer("moving", "ws-a", "primary", 10).await;
        match a.status.as_u16() {
            200 => moved_out += 10,
            409 => assert_eq!(a.error_code(), "insufficient_credits", "{}", a.text),
            _ => panic!("transfer: {}", a.text),
        }
    }
    let allowed = tokio::time::timeout(Duration::from_secs(60), spender)
        .await
        .expect("spender finishes")
        .expect("spender task");
    let view = c.org("moving").await;
    assert_eq!(used(&view, "ws-a"), allowed);
    assert!(
        allowed + moved_out <= 50,
        "ws-a was given 50 but spent {allowed} and gave away {moved_out}"
    );
    assert_eq!(balance(&view, "ws-a"), 50 - allowed - moved_out);
    assert_conserved(&view);
    node.stop().await;
}
