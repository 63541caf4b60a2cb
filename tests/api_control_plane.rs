//! Proves the control plane and operations endpoints of docs/api.md over real HTTP: orgs, mode,
//! credits, workspaces, transfers (with dry_run), ledger, the bearer token, health and metrics.

mod common;

use std::time::Duration;

use common::{
    assert_conserved, assert_error, balance, budget_org, used, workspace, Answer, Client, Process,
    TestNode,
};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

async fn raw(c: &Client, method: Method, path: &str, body: &str) -> Answer {
    c.send(method, path, Some(body), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_org_answers_201_with_the_org_view_and_defaults() {
    let node = TestNode::start().await;
    let c = &node.client;
    let a = c.post("/v1/orgs", json!({"org": "acme"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(
        a.body,
        json!({
            "org": "acme", "mode": "shared", "primary": "primary",
            "purchased": 0, "total_credits": 0, "held": 0, "used": 0,
            "workspaces": [{"workspace": "primary", "primary": true, "balance": 0, "held": 0, "used": 0}],
        })
    );
    assert_eq!(c.org("acme").await, a.body);

    let a = c
        .post(
            "/v1/orgs",
            json!({"org": "globex", "mode": "budget", "primary": "main"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.body["mode"], "budget");
    assert_eq!(a.body["primary"], "main");
    assert_eq!(workspace(&a.body, "main")["primary"], true);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_org_refuses_a_taken_id_with_409_and_bad_input_with_400() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;
    let before = c.org("acme").await;

    let a = c
        .post("/v1/orgs", json!({"org": "acme", "mode": "shared"}))
        .await;
    assert_error(&a, 409, "org_exists", "org acme already exists");
    assert_eq!(c.org("acme").await, before, "the existing org is untouched");

    let cases: &[(&str, &str)] = &[
        ("{", "invalid JSON body"),
        ("{}", "missing field `org`"),
        (r#"{"org":5}"#, "invalid type"),
        (r#"{"org":"a/b"}"#, "org must be 1 to 64 characters"),
        (
            r#"{"org":"new","mode":"pooled"}"#,
            "mode must be \"shared\" or \"budget\"",
        ),
        (
            r#"{"org":"new","mode":"Budget"}"#,
            "mode must be \"shared\" or \"budget\"",
        ),
        (
            r#"{"org":"new","primary":"has space"}"#,
            "primary must be 1 to 64 characters",
        ),
        (
            r#"{"org":"new","primary":""}"#,
            "primary must be 1 to 64 characters",
        ),
    ];
    for (body, fragment) in cases {
        assert_error(
            &raw(c, Method::POST, "/v1/orgs", body).await,
            400,
            "invalid_request",
            fragment,
        );
    }
    assert_error(
        &c.get("/v1/orgs/new").await,
        404,
        "unknown_org",
        "unknown org new",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_org_of_an_unknown_or_malformed_id_is_404_or_400() {
    let node = TestNode::start().await;
    let c = &node.client;
    assert_error(
        &c.get("/v1/orgs/nope").await,
        404,
        "unknown_org",
        "unknown org nope",
    );
    assert_error(
        &c.get("/v1/orgs/a%20b").await,
        400,
        "invalid_request",
        "org must be 1 to 64",
    );
    let long = "o".repeat(65);
    assert_error(
        &c.get(&format!("/v1/orgs/{long}")).await,
        400,
        "invalid_request",
        "org must be 1 to 64",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_mode_answers_the_org_view_and_refuses_bad_input() {
    let node = TestNode::start().await;
    let c = &node.client;
    c.create_org("acme", "shared").await;
    let a = c.put("/v1/orgs/acme/mode", json!({"mode": "budget"})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["mode"], "budget");
    assert_eq!(c.org("acme").await, a.body);

    // Setting the current mode again changes nothing.
    let again = c.put("/v1/orgs/acme/mode", json!({"mode": "budget"})).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, a.body);

    let before = c.org("acme").await;
    for (body, fragment) in [
        (
            r#"{"mode":"both"}"#,
            "mode must be \"shared\" or \"budget\"",
        ),
        (r#"{}"#, "missing field `mode`"),
        (r#"{"mode":1}"#, "invalid type"),
        ("nope", "invalid JSON body"),
    ] {
        assert_error(
            &raw(c, Method::PUT, "/v1/orgs/acme/mode", body).await,
            400,
            "invalid_request",
            fragment,
        );
    }
    assert_eq!(c.org("acme").await, before);
    assert_error(
        &c.put("/v1/orgs/nope/mode", json!({"mode": "shared"})).await,
        404,
        "unknown_org",
        "nope",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_land_in_the_primary_and_refuse_bad_input() {
    let node = TestNode::start().await;
    let c = &node.client;
    c.create_org("acme", "budget").await;
    c.create_workspace("acme", "ws-a").await;
    let a = c
        .post("/v1/orgs/acme/credits", json!({"amount": 10_000}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["purchased"], 10_000);
    assert_eq!(a.body["total_credits"], 10_000);
    assert_eq!(balance(&a.body, "primary"), 10_000);
    assert_eq!(balance(&a.body, "ws-a"), 0);
    assert_eq!(c.org("acme").await, a.body);

    let before = a.body;
    for (body, fragment) in [
        (
            r#"{"amount":0}"#,
            "amount must be an integer from 1 to 1000000000000000",
        ),
        (
            r#"{"amount":1000000000000001}"#,
            "amount must be an integer from 1",
        ),
        (r#"{"amount":1.5}"#, "invalid JSON body"),
        (r#"{"amount":"5"}"#, "invalid JSON body"),
        (r#"{}"#, "missing field `amount`"),
        (
            r#"{"amount":5,"idempotency_key":"no spaces"}"#,
            "idempotency_key must be 1 to 64",
        ),
    ] {
        assert_error(
            &raw(c, Method::POST, "/v1/orgs/acme/credits", body).await,
            400,
            "invalid_request",
            fragment,
        );
    }
    assert_eq!(c.org("acme").await, before);
    assert_error(
        &c.post("/v1/orgs/nope/credits", json!({"amount": 5})).await,
        404,
        "unknown_org",
        "nope",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_idempotency_key_adds_once_and_refuses_a_different_amount() {
    let node = TestNode::start().await;
    let c = &node.client;
    c.create_org("acme", "budget").await;
    let body = json!({"amount": 500, "idempotency_key": "invoice-17"});
    let first = c.post("/v1/orgs/acme/credits", body.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    for _ in 0..3 {
        let again = c.post("/v1/orgs/acme/credits", body.clone()).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.body, first.body, "a retry returns the first answer");
    }
    let view = c.org("acme").await;
    assert_eq!(view["purchased"], 500, "added once: {view}");

    let a = c
        .post(
            "/v1/orgs/acme/credits",
            json!({"amount": 501, "idempotency_key": "invoice-17"}),
        )
        .await;
    assert_error(&a, 409, "idempotency_mismatch", "invoice-17");
    assert_eq!(c.org("acme").await, view);

    let ledger = c.get("/v1/orgs/acme/ledger").await;
    let purchases = ledger.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "purchase")
        .count();
    assert_eq!(purchases, 1, "{}", ledger.text);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_are_created_with_201_and_deleted_with_their_credits_returned() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[]).await;
    let a = c
        .post("/v1/orgs/acme/workspaces", json!({"workspace": "ws-a"}))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(
        workspace(&a.body, "ws-a"),
        &json!({"workspace": "ws-a", "primary": false, "balance": 0, "held": 0, "used": 0})
    );
    c.transfer("acme", "primary", "ws-a", 300).await;
    c.debit("acme", "ws-a", 100).await;

    let a = c.delete("/v1/orgs/acme/workspaces/ws-a").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["returned_to_primary"], 200);
    assert_eq!(balance(&a.body, "primary"), 900);
    assert_eq!(
        a.body["used"], 100,
        "usage of deleted workspaces stays counted"
    );
    assert_eq!(a.body["workspaces"].as_array().unwrap().len(), 1);
    assert_conserved(&a.body);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_conflicts_are_409_and_bad_input_400_and_change_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 10)]).await;
    let before = c.org("acme").await;

    for ws in ["ws-a", "primary"] {
        assert_error(
            &c.post("/v1/orgs/acme/workspaces", json!({"workspace": ws}))
                .await,
            409,
            "workspace_exists",
            &format!("workspace {ws} already exists"),
        );
    }
    assert_error(
        &c.delete("/v1/orgs/acme/workspaces/primary").await,
        409,
        "primary_workspace",
        "cannot be deleted",
    );
    assert_error(
        &c.delete("/v1/orgs/acme/workspaces/ghost").await,
        404,
        "unknown_workspace",
        "ghost",
    );
    assert_error(
        &c.delete("/v1/orgs/acme/workspaces/a%20b").await,
        400,
        "invalid_request",
        "workspace must be 1 to 64",
    );
    for (body, fragment) in [
        (r#"{"workspace":"a b"}"#, "workspace must be 1 to 64"),
        (r#"{}"#, "missing field `workspace`"),
        (r#"{"workspace":["x"]}"#, "invalid type"),
    ] {
        assert_error(
            &raw(c, Method::POST, "/v1/orgs/acme/workspaces", body).await,
            400,
            "invalid_request",
            fragment,
        );
    }
    assert_eq!(c.org("acme").await, before);
    assert_error(
        &c.post("/v1/orgs/nope/workspaces", json!({"workspace": "w"}))
            .await,
        404,
        "unknown_org",
        "nope",
    );
    assert_error(
        &c.delete("/v1/orgs/nope/workspaces/w").await,
        404,
        "unknown_org",
        "nope",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_answers_both_balances_after_the_move() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 0), ("ws-b", 0)]).await;
    let a = c
        .post(
            "/v1/orgs/acme/transfers",
            json!({"from": "primary", "to": "ws-a", "amount": 400, "dry_run": false}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.body["from"],
        json!({"workspace": "primary", "balance": 600})
    );
    assert_eq!(a.body["to"], json!({"workspace": "ws-a", "balance": 400}));
    let a = c.transfer("acme", "ws-a", "ws-b", 150).await;
    assert_eq!(a.body["from"], json!({"workspace": "ws-a", "balance": 250}));
    assert_eq!(a.body["to"], json!({"workspace": "ws-b", "balance": 150}));
    let view = c.org("acme").await;
    assert_eq!(
        (
            balance(&view, "primary"),
            balance(&view, "ws-a"),
            balance(&view, "ws-b")
        ),
        (600, 250, 150)
    );
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_dry_run_shows_the_outcome_and_changes_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    let before = budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    // Leases must not matter: spend a little so that the node holds leases of both.
    c.debit("acme", "ws-a", 10).await;
    c.debit("acme", "primary", 10).await;
    let before_dry = c.org("acme").await;
    assert_ne!(before_dry, before);

    let a = c
        .post(
            "/v1/orgs/acme/transfers",
            json!({"from": "primary", "to": "ws-a", "amount": 890, "dry_run": true}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["dry_run"], true);
    assert_eq!(
        a.body["from"],
        json!({"workspace": "primary", "balance": 0})
    );
    assert_eq!(a.body["to"], json!({"workspace": "ws-a", "balance": 980}));
    assert_eq!(c.org("acme").await, before_dry, "a dry run changes nothing");

    // A dry run is refused exactly like the real transfer would be.
    let a = c
        .post(
            "/v1/orgs/acme/transfers",
            json!({"from": "primary", "to": "ws-a", "amount": 891, "dry_run": true}),
        )
        .await;
    assert_error(&a, 409, "insufficient_credits", "fewer than 891");
    assert_eq!(c.org("acme").await, before_dry);

    // And the real one does what the dry run said.
    let real = c.transfer("acme", "primary", "ws-a", 890).await;
    assert_eq!(
        real.body["from"],
        json!({"workspace": "primary", "balance": 0})
    );
    assert_eq!(
        real.body["to"],
        json!({"workspace": "ws-a", "balance": 980})
    );
    assert_eq!(real.body["dry_run"], false);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_refusals_are_409_or_400_or_404_and_change_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    c.create_org("pool", "shared").await;
    c.purchase("pool", 100).await;
    c.create_workspace("pool", "ws-x").await;
    let before = c.org("acme").await;
    let pool_before = c.org("pool").await;

    let t = |org: &'static str, body: Value| {
        let c = c.clone();
        async move { c.post(&format!("/v1/orgs/{org}/transfers"), body).await }
    };
    assert_error(
        &t(
            "acme",
            json!({"from": "ws-a", "to": "primary", "amount": 101}),
        )
        .await,
        409,
        "insufficient_credits",
        "workspace ws-a has 100 credits, fewer than 101",
    );
    for dry_run in [false, true] {
        assert_error(
            &t(
                "pool",
                json!({"from": "primary", "to": "ws-x", "amount": 1, "dry_run": dry_run}),
            )
            .await,
            409,
            "wrong_mode",
            "budget mode only",
        );
    }
    let bad = [
        (
            json!({"from": "ws-a", "to": "ws-a", "amount": 1}),
            "from and to must be different",
        ),
        (
            json!({"from": "ws-a", "to": "primary", "amount": 0}),
            "amount must be an integer from 1",
        ),
        (
            json!({"from": "ws-a", "to": "primary"}),
            "missing field `amount`",
        ),
        (
            json!({"to": "primary", "amount": 1}),
            "missing field `from`",
        ),
        (
            json!({"from": "ws-a", "to": "pri mary", "amount": 1}),
            "to must be 1 to 64",
        ),
        (
            json!({"from": "ws-a", "to": "primary", "amount": 1, "dry_run": "yes"}),
            "invalid type",
        ),
    ];
    for (body, fragment) in bad {
        assert_error(&t("acme", body).await, 400, "invalid_request", fragment);
    }
    assert_error(
        &t(
            "acme",
            json!({"from": "ghost", "to": "primary", "amount": 1}),
        )
        .await,
        404,
        "unknown_workspace",
        "ghost",
    );
    assert_error(
        &t(
            "acme",
            json!({"from": "primary", "to": "ghost", "amount": 1, "dry_run": true}),
        )
        .await,
        404,
        "unknown_workspace",
        "ghost",
    );
    assert_error(
        &t(
            "nope",
            json!({"from": "primary", "to": "ws-a", "amount": 1}),
        )
        .await,
        404,
        "unknown_org",
        "nope",
    );
    assert_eq!(c.org("acme").await, before);
    assert_eq!(c.org("pool").await, pool_before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_idempotency_key_moves_once_and_refuses_a_different_body() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 0), ("ws-b", 0)]).await;
    let body = json!({"from": "primary", "to": "ws-a", "amount": 200, "idempotency_key": "move-1"});
    let first = c.post("/v1/orgs/acme/transfers", body.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    for _ in 0..3 {
        let again = c.post("/v1/orgs/acme/transfers", body.clone()).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.body, first.body);
    }
    let view = c.org("acme").await;
    assert_eq!(balance(&view, "ws-a"), 200, "moved once: {view}");
    assert_eq!(balance(&view, "primary"), 800);

    for other in [
        json!({"from": "primary", "to": "ws-a", "amount": 201, "idempotency_key": "move-1"}),
        json!({"from": "primary", "to": "ws-b", "amount": 200, "idempotency_key": "move-1"}),
        json!({"from": "ws-a", "to": "primary", "amount": 200, "idempotency_key": "move-1"}),
    ] {
        assert_error(
            &c.post("/v1/orgs/acme/transfers", other).await,
            409,
            "idempotency_mismatch",
            "move-1",
        );
    }
    assert_eq!(c.org("acme").await, view);
    // The same key on a purchase is another kind of call.
    let p = c
        .post(
            "/v1/orgs/acme/credits",
            json!({"amount": 5, "idempotency_key": "move-1"}),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_lists_every_kind_of_change_in_order_and_pages() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await; // created, purchase, ws, transfer
    c.debit("acme", "ws-a", 7).await;
    c.create_workspace("acme", "ws-b").await;
    c.transfer("acme", "primary", "ws-b", 50).await;
    c.delete("/v1/orgs/acme/workspaces/ws-b").await;
    c.put("/v1/orgs/acme/mode", json!({"mode": "shared"})).await;

    let a = c.get("/v1/orgs/acme/ledger").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let entries = a.body["entries"].as_array().unwrap().clone();
    assert_eq!(a.body["next"], Value::Null, "one page holds it all");
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "org_created",
        "purchase",
        "workspace_created",
        "transfer",
        "usage",
        "workspace_deleted",
        "mode_changed",
        "sweep",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    assert_eq!(kinds[0], "org_created");
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
    assert!(entries.iter().all(|e| e["at_ms"].as_u64().is_some()));
    let usage = entries.iter().find(|e| e["kind"] == "usage").unwrap();
    assert_eq!(
        (usage["workspace"].as_str(), usage["amount"].as_u64()),
        (Some("ws-a"), Some(7))
    );
    let deleted = entries
        .iter()
        .find(|e| e["kind"] == "workspace_deleted")
        .unwrap();
    assert_eq!(deleted["returned_to_primary"], 50);
    let sweep = entries.iter().find(|e| e["kind"] == "sweep").unwrap();
    assert_eq!(
        (sweep["workspace"].as_str(), sweep["amount"].as_u64()),
        (Some("ws-a"), Some(93))
    );

    // Pages of 3 give back the same entries, in the same order.
    let mut paged = Vec::new();
    let mut path = "/v1/orgs/acme/ledger?limit=3".to_string();
    for _ in 0..entries.len() + 1 {
        let page = c.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        let got = page.body["entries"].as_array().unwrap();
        assert!(got.len() <= 3);
        paged.extend(got.iter().cloned());
        match page.body["next"].as_u64() {
            Some(next) => path = format!("/v1/orgs/acme/ledger?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged, entries);

    assert_error(
        &c.get("/v1/orgs/acme/ledger?after=soon").await,
        400,
        "invalid_request",
        "after must be a cursor",
    );
    assert_error(
        &c.get("/v1/orgs/nope/ledger").await,
        404,
        "unknown_org",
        "nope",
    );
    node.stop().await;
}

/// Every control-plane route, with a body it would accept.
fn control_calls() -> Vec<(Method, &'static str, Option<&'static str>)> {
    vec![
        (Method::POST, "/v1/orgs", Some(r#"{"org":"intruder"}"#)),
        (Method::GET, "/v1/orgs/acme", None),
        (
            Method::PUT,
            "/v1/orgs/acme/mode",
            Some(r#"{"mode":"shared"}"#),
        ),
        (
            Method::POST,
            "/v1/orgs/acme/credits",
            Some(r#"{"amount":1000}"#),
        ),
        (
            Method::POST,
            "/v1/orgs/acme/workspaces",
            Some(r#"{"workspace":"w"}"#),
        ),
        (Method::DELETE, "/v1/orgs/acme/workspaces/ws-a", None),
        (
            Method::POST,
            "/v1/orgs/acme/transfers",
            Some(r#"{"from":"primary","to":"ws-a","amount":1}"#),
        ),
        (Method::GET, "/v1/orgs/acme/ledger", None),
        (Method::GET, "/v1/orgs/acme/nope", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_without_the_right_token_is_401_and_changes_nothing() {
    let node = TestNode::start().await;
    let admin = &node.client;
    let before = budget_org(admin, "acme", 100, &[("ws-a", 10)]).await;
    let anonymous = Client {
        token: None,
        ..admin.clone()
    };
    let wrong = Client {
        token: Some("not-the-token".into()),
        ..admin.clone()
    };
    for (method, path, body) in control_calls() {
        let a = anonymous.send(method.clone(), path, body, &[]).await;
        assert_error(&a, 401, "unauthorized", "missing Authorization: Bearer");
        let a = wrong.send(method.clone(), path, body, &[]).await;
        assert_error(&a, 401, "unauthorized", "wrong admin token");
        for auth in [
            "test-admin-token",
            "Basic test-admin-token",
            "bearer test-admin-token",
            "Bearer  test-admin-token",
        ] {
            let a = anonymous
                .send(method.clone(), path, body, &[("authorization", auth)])
                .await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{auth}: {}", a.text);
            assert_eq!(a.error_code(), "unauthorized");
        }
    }
    assert_eq!(admin.org("acme").await, before);
    assert_error(
        &admin.get("/v1/orgs/intruder").await,
        404,
        "unknown_org",
        "intruder",
    );
    // The data plane needs no token.
    assert_eq!(
        anonymous.debit("acme", "ws-a", 1).await.status,
        StatusCode::OK
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_without_a_configured_token_is_off() {
    let node = TestNode::start_with(|c| c.admin_token = None).await;
    let c = &node.client;
    for (method, path, body) in control_calls() {
        let a = c.send(method, path, body, &[]).await;
        assert_error(&a, 401, "unauthorized", "the control plane is off");
    }
    let anonymous = Client {
        token: None,
        ..c.clone()
    };
    assert_error(
        &anonymous.get("/v1/orgs/acme").await,
        401,
        "unauthorized",
        "control plane is off",
    );
    // The data plane still answers.
    assert_error(
        &c.debit("acme", "primary", 1).await,
        404,
        "unknown_org",
        "acme",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_routes_refuse_a_wrong_method_with_405_and_unknown_routes_with_404() {
    let node = TestNode::start().await;
    let c = &node.client;
    let before = budget_org(c, "acme", 100, &[("ws-a", 10)]).await;
    let wrong = [
        (Method::GET, "/v1/orgs"),
        (Method::DELETE, "/v1/orgs"),
        (Method::POST, "/v1/orgs/acme"),
        (Method::DELETE, "/v1/orgs/acme"),
        (Method::GET, "/v1/orgs/acme/mode"),
        (Method::POST, "/v1/orgs/acme/mode"),
        (Method::GET, "/v1/orgs/acme/credits"),
        (Method::GET, "/v1/orgs/acme/workspaces"),
        (Method::GET, "/v1/orgs/acme/workspaces/ws-a"),
        (Method::POST, "/v1/orgs/acme/workspaces/ws-a"),
        (Method::GET, "/v1/orgs/acme/transfers"),
        (Method::POST, "/v1/orgs/acme/ledger"),
        (Method::POST, "/metrics"),
        (Method::POST, "/healthz"),
        (Method::DELETE, "/livez"),
        (Method::PUT, "/readyz"),
    ];
    for (method, path) in wrong {
        let a = c.send(method.clone(), path, Some("{}"), &[]).await;
        assert_error(&a, 405, "method_not_allowed", "method not allowed");
    }
    for path in [
        "/v1/orgs/acme/nope",
        "/v1/orgs/acme/workspaces/ws-a/extra",
        "/v1/organizations",
        "/health",
        "/metrics/x",
    ] {
        assert_error(&c.get(path).await, 404, "not_found", "no such route");
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_200_json() {
    let node = TestNode::start().await;
    let anonymous = Client {
        token: None,
        ..node.client.clone()
    };
    for path in ["/healthz", "/livez", "/readyz"] {
        let a = anonymous.get(path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text);
        assert_eq!(a.body, json!({"status": "ok"}), "{path}");
        assert_eq!(
            a.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_the_real_binary_count_debits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = Process::spawn(dir.path(), &[]).await;
    let c = &process.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 10).await;
    assert_eq!(c.debit("acme", "primary", 4).await.status, StatusCode::OK);
    assert_eq!(
        c.debit("acme", "primary", 7).await.status,
        StatusCode::PAYMENT_REQUIRED
    );

    let anonymous = Client {
        token: None,
        ..c.clone()
    };
    common::eventually(
        Duration::from_secs(10),
        "debit counters in /metrics",
        || {
            let anonymous = anonymous.clone();
            async move {
                let text = anonymous.get("/metrics").await.text;
                text.contains("creditd_debit_requests_total{outcome=\"allowed\"} 1")
                    && text.contains("creditd_debit_requests_total{outcome=\"insufficient\"} 1")
            }
        },
    )
    .await;
    let a = anonymous.get("/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    let content_type = a.headers.get("content-type").and_then(|v| v.to_str().ok());
    assert!(
        content_type.is_some_and(|t| t.starts_with("text/plain")),
        "{content_type:?}"
    );
    let last = a.text;
    assert!(
        last.contains("# TYPE creditd_debit_requests_total counter"),
        "{last}"
    );
    assert!(last.contains("creditd_credits_debited_total 4"), "{last}");
    assert!(last.contains("creditd_http_requests_total"), "{last}");
    let status = process.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_view_adds_up_after_every_kind_of_change() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 300), ("ws-b", 200)]).await;
    c.debit("acme", "ws-a", 50).await;
    let r = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-b", "amount": 30}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let view = c.org("acme").await;
    assert_eq!(view["purchased"], 1_000);
    assert_eq!(view["used"], 50);
    assert_eq!(view["held"], 30);
    assert_eq!(view["total_credits"], 950);
    assert_eq!(workspace(&view, "ws-b")["held"], 30);
    assert_eq!(balance(&view, "ws-b"), 170);
    assert_eq!(used(&view, "ws-a"), 50);
    assert_conserved(&view);
    node.stop().await;
}
