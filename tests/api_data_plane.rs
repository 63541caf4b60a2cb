//! Proves the data plane of docs/api.md over real HTTP: debit, authorize (forward auth), two-phase
//! reservations and balance, with every answer, every error code and idempotency.

mod common;

use std::time::Duration;

use common::{
    assert_conserved, assert_error, balance, budget_org, used, workspace, Answer, Client, TestNode,
};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

async fn raw_debit(c: &Client, body: &str) -> Answer {
    c.send(Method::POST, "/v1/debit", Some(body), &[]).await
}

async fn authorize(c: &Client, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
    c.send(method, path, None, headers).await
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_allowed_answers_200_with_remaining_and_charges_the_workspace() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 5_000, &[("ws-a", 100)]).await;

    let a = c.debit("acme", "ws-a", 25).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.body,
        json!({"allowed": true, "org": "acme", "workspace": "ws-a", "amount": 25, "remaining": 75})
    );
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), 25);
    assert_eq!(balance(&view, "ws-a"), 75);
    assert_eq!(view["used"], 25);
    assert_conserved(&view);

    // Spending the last credit exactly is allowed and leaves 0.
    let a = c.debit("acme", "ws-a", 75).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["remaining"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_that_cannot_be_covered_is_402_and_changes_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 5_000, &[("ws-a", 10)]).await;
    let before = c.org("acme").await;

    let a = c.debit("acme", "ws-a", 11).await;
    assert_error(&a, 402, "insufficient_credits", "not enough credits");
    assert_eq!(a.body["allowed"], false);
    assert_eq!(a.body["remaining"], 10);
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_of_unknown_org_or_workspace_is_404_and_changes_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;
    let before = c.org("acme").await;

    assert_error(
        &c.debit("nope", "primary", 1).await,
        404,
        "unknown_org",
        "unknown org nope",
    );
    assert_error(
        &c.debit("acme", "ghost", 1).await,
        404,
        "unknown_workspace",
        "unknown workspace ghost",
    );
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_with_a_malformed_body_is_400_and_changes_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;
    let before = c.org("acme").await;

    let cases: &[(&str, &str)] = &[
        ("", "invalid JSON body"),
        ("{", "invalid JSON body"),
        ("[1,2]", "invalid JSON body"),
        (
            r#"{"workspace":"primary","amount":1}"#,
            "missing field `org`",
        ),
        (r#"{"org":"acme","amount":1}"#, "missing field `workspace`"),
        (
            r#"{"org":"acme","workspace":"primary"}"#,
            "missing field `amount`",
        ),
        (
            r#"{"org":7,"workspace":"primary","amount":1}"#,
            "invalid type",
        ),
        (
            r#"{"org":"acme","workspace":null,"amount":1}"#,
            "invalid type",
        ),
        (
            r#"{"org":"a b","workspace":"primary","amount":1}"#,
            "org must be 1 to 64 characters",
        ),
        (
            r#"{"org":"acme","workspace":"primary","amount":1,"idempotency_key":""}"#,
            "idempotency_key must be 1 to 64 characters",
        ),
    ];
    for (body, fragment) in cases {
        let a = raw_debit(c, body).await;
        assert_error(&a, 400, "invalid_request", fragment);
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_refuses_unknown_fields_and_charges_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;
    let a = raw_debit(
        c,
        r#"{"org":"acme","workspace":"primary","amount":3,"model":"gpt","tokens":[1,2]}"#,
    )
    .await;
    assert_error(&a, 400, "invalid_request", "unknown field `model`");
    assert_eq!(c.org("acme").await["used"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_idempotency_key_charges_once_and_refuses_a_different_body() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100), ("ws-b", 100)]).await;
    let body =
        json!({"org": "acme", "workspace": "ws-a", "amount": 25, "idempotency_key": "req-8f1c"});

    let first = c.post("/v1/debit", body.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    for _ in 0..3 {
        let again = c.post("/v1/debit", body.clone()).await;
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body, "a retry returns the first answer");
    }
    let view = c.org("acme").await;
    assert_eq!(view["used"], 25, "charged once: {view}");
    assert_eq!(used(&view, "ws-a"), 25);

    // Same key, different amount, or different workspace: 409, nothing charged.
    for other in [
        json!({"org": "acme", "workspace": "ws-a", "amount": 26, "idempotency_key": "req-8f1c"}),
        json!({"org": "acme", "workspace": "ws-b", "amount": 25, "idempotency_key": "req-8f1c"}),
    ] {
        let a = c.post("/v1/debit", other).await;
        assert_error(&a, 409, "idempotency_mismatch", "req-8f1c");
    }
    assert_eq!(c.org("acme").await, view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_scoped_to_the_org_and_the_kind_of_call() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[]).await;
    budget_org(c, "globex", 1_000, &[]).await;

    // The same key in two orgs: two charges, one per org.
    for org in ["acme", "globex"] {
        let a = c
            .post(
                "/v1/debit",
                json!({"org": org, "workspace": "primary", "amount": 5, "idempotency_key": "k-1"}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    // The same key for a reservation (another kind of call) and with a different body: a new
    // reservation, not a mismatch.
    let r = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "primary", "amount": 7, "idempotency_key": "k-1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // And for a purchase (control plane).
    let p = c
        .post(
            "/v1/orgs/acme/credits",
            json!({"amount": 1, "idempotency_key": "k-1"}),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);

    let acme = c.org("acme").await;
    assert_eq!(acme["used"], 5);
    assert_eq!(acme["held"], 7);
    assert_eq!(acme["purchased"], 1_001);
    assert_eq!(c.org("globex").await["used"], 5);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_accepts_any_method_and_any_path_below_it() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let headers = [("x-credits-org", "acme"), ("x-credits-workspace", "ws-a")];
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::from_bytes(b"PURGE").unwrap(),
    ];
    let paths = [
        "/v1/authorize",
        "/v1/authorize/",
        "/v1/authorize/some/original/path",
        "/v1/authorize/some/original/path?q=1&r=two",
    ];
    let mut charged = 0u64;
    for method in &methods {
        for path in paths {
            let a = authorize(c, method.clone(), path, &headers).await;
            charged += 1;
            assert_eq!(a.status, StatusCode::OK, "{method} {path}: {}", a.text);
            let remaining = 100 - charged;
            assert_eq!(
                header(&a, "x-credits-remaining"),
                Some(remaining.to_string().as_str()),
                "{method} {path}"
            );
            assert_eq!(header(&a, "x-credits-error"), None);
        }
    }
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), charged);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_charges_one_by_default_and_the_amount_header_otherwise() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let base = [("x-credits-org", "acme"), ("x-credits-workspace", "ws-a")];

    let a = authorize(c, Method::GET, "/v1/authorize", &base).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(header(&a, "x-credits-remaining"), Some("99"));

    let a = authorize(
        c,
        Method::GET,
        "/v1/authorize",
        &[base[0], base[1], ("x-credits-amount", "40")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(header(&a, "x-credits-remaining"), Some("59"));
    assert_eq!(used(&c.org("acme").await, "ws-a"), 41);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_without_org_or_workspace_header_is_400_never_200_nor_the_deny_code() {
    let node = TestNode::start().await;
    let c = &node.client;
    // One workspace with credits (a 200 would be possible) and one without (a deny would be).
    budget_org(c, "acme", 1_000, &[("rich", 100), ("poor", 0)]).await;
    let before = c.org("acme").await;

    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "X-Credits-Org is required"),
        (
            &[("x-credits-workspace", "rich")],
            "X-Credits-Org is required",
        ),
        (
            &[("x-credits-workspace", "poor")],
            "X-Credits-Org is required",
        ),
        (
            &[("x-credits-org", "acme")],
            "X-Credits-Workspace is required",
        ),
        (
            &[("x-credits-org", "acme"), ("x-credits-amount", "1")],
            "X-Credits-Workspace is required",
        ),
        (
            &[("x-credits-org", ""), ("x-credits-workspace", "rich")],
            "X-Credits-Org must be 1 to 64 characters",
        ),
        (
            &[("x-credits-org", "acme"), ("x-credits-workspace", "po or")],
            "X-Credits-Workspace must be 1 to 64 characters",
        ),
    ];
    for method in [Method::GET, Method::POST] {
        for (headers, fragment) in cases {
            let a = authorize(c, method.clone(), "/v1/authorize/x", headers).await;
            assert_error(&a, 400, "invalid_request", fragment);
            assert_eq!(header(&a, "x-credits-error"), Some("invalid_request"));
        }
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_with_a_bad_amount_header_is_400_never_200_nor_the_deny_code() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("rich", 100), ("poor", 0)]).await;
    let before = c.org("acme").await;
    let too_big = (1_000_000_000_000_000u64 + 1).to_string();
    let bad = [
        "0",
        "-1",
        "1.5",
        "abc",
        "1e3",
        "+5",
        "0x10",
        "",
        too_big.as_str(),
        "99999999999999999999999",
    ];
    for ws in ["rich", "poor"] {
        for amount in bad {
            let a = authorize(
                c,
                Method::GET,
                "/v1/authorize",
                &[
                    ("x-credits-org", "acme"),
                    ("x-credits-workspace", ws),
                    ("x-credits-amount", amount),
                ],
            )
            .await;
            assert_error(
                &a,
                400,
                "invalid_request",
                "X-Credits-Amount must be an integer from 1 to 1000000000000000",
            );
        }
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_deny_is_403_with_error_and_remaining_headers() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 3)]).await;
    let before = c.org("acme").await;
    for method in [Method::GET, Method::POST, Method::HEAD] {
        let a = authorize(
            c,
            method.clone(),
            "/v1/authorize/v1/chat",
            &[
                ("x-credits-org", "acme"),
                ("x-credits-workspace", "ws-a"),
                ("x-credits-amount", "4"),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method}: {}", a.text);
        assert_eq!(header(&a, "x-credits-error"), Some("insufficient_credits"));
        assert_eq!(header(&a, "x-credits-remaining"), Some("3"));
        if method != Method::HEAD {
            assert_error(&a, 403, "insufficient_credits", "not enough credits");
        }
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_deny_status_is_configurable_to_402_and_429() {
    for status in [402u16, 429] {
        let node = TestNode::start_with(|c| c.authorize_deny_status = status).await;
        let c = &node.client;
        budget_org(c, "acme", 10, &[("ws-a", 0)]).await;
        let a = authorize(
            c,
            Method::GET,
            "/v1/authorize",
            &[("x-credits-org", "acme"), ("x-credits-workspace", "ws-a")],
        )
        .await;
        assert_error(&a, status, "insufficient_credits", "not enough credits");
        assert_eq!(header(&a, "x-credits-error"), Some("insufficient_credits"));
        assert_eq!(header(&a, "x-credits-remaining"), Some("0"));
        // Invalid requests stay 400 whatever the deny status.
        let a = authorize(
            c,
            Method::GET,
            "/v1/authorize",
            &[("x-credits-org", "acme")],
        )
        .await;
        assert_error(&a, 400, "invalid_request", "X-Credits-Workspace");
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_of_unknown_org_or_workspace_is_404_with_the_error_header() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 10, &[]).await;
    let a = authorize(
        c,
        Method::GET,
        "/v1/authorize",
        &[
            ("x-credits-org", "nope"),
            ("x-credits-workspace", "primary"),
        ],
    )
    .await;
    assert_error(&a, 404, "unknown_org", "unknown org nope");
    assert_eq!(header(&a, "x-credits-error"), Some("unknown_org"));
    let a = authorize(
        c,
        Method::GET,
        "/v1/authorize",
        &[("x-credits-org", "acme"), ("x-credits-workspace", "ghost")],
    )
    .await;
    assert_error(&a, 404, "unknown_workspace", "unknown workspace ghost");
    assert_eq!(header(&a, "x-credits-error"), Some("unknown_workspace"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_idempotency_key_charges_once_and_refuses_a_different_amount() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let headers = [
        ("x-credits-org", "acme"),
        ("x-credits-workspace", "ws-a"),
        ("x-credits-amount", "10"),
        ("x-credits-idempotency-key", "envoy-req-1"),
    ];
    for _ in 0..3 {
        let a = authorize(c, Method::GET, "/v1/authorize", &headers).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(header(&a, "x-credits-remaining"), Some("90"));
    }
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), 10, "charged once: {view}");
    let a = authorize(
        c,
        Method::GET,
        "/v1/authorize",
        &[
            headers[0],
            headers[1],
            ("x-credits-amount", "11"),
            headers[3],
        ],
    )
    .await;
    assert_error(&a, 409, "idempotency_mismatch", "envoy-req-1");
    assert_eq!(header(&a, "x-credits-error"), Some("idempotency_mismatch"));
    assert_eq!(c.org("acme").await, view);
    node.stop().await;
}

async fn reserve(c: &Client, body: Value) -> Answer {
    c.post("/v1/reservations", body).await
}

async fn commit(c: &Client, id: &str, amount: Value) -> Answer {
    c.post(
        &format!("/v1/reservations/{id}/commit"),
        json!({ "amount": amount }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_is_201_and_commit_charges_n_and_releases_the_rest() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;

    let r = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 30})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["remaining"], 70);
    let id = r.body["reservation"]
        .as_str()
        .expect("reservation id")
        .to_string();
    let view = c.org("acme").await;
    assert_eq!(view["held"], 30);
    assert_eq!(workspace(&view, "ws-a")["held"], 30);
    assert_eq!(balance(&view, "ws-a"), 70);
    assert_conserved(&view);

    let a = commit(c, &id, json!(12)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["charged"], 12);
    assert_eq!(a.body["released"], 18);
    let view = c.org("acme").await;
    assert_eq!(view["held"], 0);
    assert_eq!(used(&view, "ws-a"), 12);
    assert_eq!(balance(&view, "ws-a"), 88);
    assert_conserved(&view);

    // Committing the whole reservation, and committing nothing, are both allowed.
    for (n, charged, released) in [(5u64, 5u64, 0u64), (0, 0, 5)] {
        let r = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 5})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let a = commit(c, r.body["reservation"].as_str().unwrap(), json!(n)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(
            (a.body["charged"].as_u64(), a.body["released"].as_u64()),
            (Some(charged), Some(released))
        );
    }
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), 17);
    assert_eq!(view["held"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_over_the_reservation_is_409_and_the_reservation_stays_usable() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let r = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 30})).await;
    let id = r.body["reservation"].as_str().unwrap().to_string();
    let before = c.org("acme").await;

    let a = commit(c, &id, json!(31)).await;
    assert_error(&a, 409, "exceeds_reservation", "exceeds the 30 reserved");
    assert_eq!(c.org("acme").await, before);

    let a = commit(c, &id, json!(30)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["charged"], 30);
    assert_eq!(a.body["released"], 0);
    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), 30);
    assert_eq!(view["held"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_gives_the_whole_reservation_back() {
    let node = TestNode::start().await;
    let c = &node.client;
    let start = budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let r = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 40})).await;
    let id = r.body["reservation"].as_str().unwrap().to_string();
    assert_eq!(c.org("acme").await["held"], 40);

    let a = c.delete(&format!("/v1/reservations/{id}")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["released"], 40);
    assert_eq!(
        c.org("acme").await,
        start,
        "a release leaves the org as it was"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_finished_reservation_is_404() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;

    let committed = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 5})).await;
    let committed = committed.body["reservation"].as_str().unwrap().to_string();
    assert_eq!(commit(c, &committed, json!(5)).await.status, StatusCode::OK);
    let released = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 5})).await;
    let released = released.body["reservation"].as_str().unwrap().to_string();
    assert_eq!(
        c.delete(&format!("/v1/reservations/{released}"))
            .await
            .status,
        StatusCode::OK
    );
    let before = c.org("acme").await;

    for id in [
        committed.as_str(),
        released.as_str(),
        "r-nope",
        "never-issued",
    ] {
        assert_error(
            &commit(c, id, json!(1)).await,
            404,
            "unknown_reservation",
            id,
        );
        assert_error(
            &c.delete(&format!("/v1/reservations/{id}")).await,
            404,
            "unknown_reservation",
            "unknown or finished reservation",
        );
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_that_cannot_be_covered_is_402_and_changes_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 20)]).await;
    let before = c.org("acme").await;
    let a = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 21})).await;
    assert_error(
        &a,
        402,
        "insufficient_credits",
        "not enough credits for this reservation",
    );
    assert_eq!(a.body["remaining"], 20);
    assert_eq!(c.org("acme").await, before);

    assert_error(
        &reserve(c, json!({"org": "nope", "workspace": "ws-a", "amount": 1})).await,
        404,
        "unknown_org",
        "nope",
    );
    assert_error(
        &reserve(c, json!({"org": "acme", "workspace": "ghost", "amount": 1})).await,
        404,
        "unknown_workspace",
        "ghost",
    );
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_not_committed_within_its_ttl_is_released_by_itself() {
    let node = TestNode::start().await;
    let c = &node.client;
    let start = budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let r = reserve(
        c,
        json!({"org": "acme", "workspace": "ws-a", "amount": 60, "ttl_ms": 200}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["expires_in_ms"], 200);
    let id = r.body["reservation"].as_str().unwrap().to_string();
    assert_eq!(c.org("acme").await["held"], 60);

    common::eventually(Duration::from_secs(10), "reservation expired", || async {
        c.org("acme").await == start
    })
    .await;
    assert_error(
        &commit(c, &id, json!(1)).await,
        404,
        "unknown_reservation",
        &id,
    );
    // The credits are spendable again.
    assert_eq!(c.debit("acme", "ws-a", 100).await.status, StatusCode::OK);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_with_a_bad_request_is_400_and_changes_nothing() {
    let node = TestNode::start_with(|c| c.reservation_ttl_max = Duration::from_secs(60)).await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let r = reserve(c, json!({"org": "acme", "workspace": "ws-a", "amount": 10})).await;
    let id = r.body["reservation"].as_str().unwrap().to_string();
    let before = c.org("acme").await;

    let bad_reservations = [
        (
            json!({"org": "acme", "workspace": "ws-a", "amount": 1, "ttl_ms": 0}),
            "ttl_ms must be from 1 to 60000",
        ),
        (
            json!({"org": "acme", "workspace": "ws-a", "amount": 1, "ttl_ms": 60_001}),
            "ttl_ms must be from 1 to 60000",
        ),
        (
            json!({"org": "acme", "workspace": "ws-a", "amount": 1, "ttl_ms": -5}),
            "invalid JSON body",
        ),
        (
            json!({"org": "acme", "workspace": "ws-a", "amount": 0}),
            "amount must be an integer from 1",
        ),
        (
            json!({"org": "acme", "workspace": "ws-a"}),
            "missing field `amount`",
        ),
        (
            json!({"org": "acme", "amount": 1}),
            "missing field `workspace`",
        ),
    ];
    for (body, fragment) in bad_reservations {
        assert_error(&reserve(c, body).await, 400, "invalid_request", fragment);
    }
    let bad_commits = [
        (json!(1.5), "invalid JSON body"),
        (json!(-1), "invalid JSON body"),
        (json!("5"), "invalid JSON body"),
        (
            json!(1_000_000_000_000_001u64),
            "amount must be an integer from 0 to 1000000000000000",
        ),
    ];
    for (amount, fragment) in bad_commits {
        assert_error(
            &commit(c, &id, amount).await,
            400,
            "invalid_request",
            fragment,
        );
    }
    let a = c
        .send(
            Method::POST,
            &format!("/v1/reservations/{id}/commit"),
            Some("{}"),
            &[],
        )
        .await;
    assert_error(&a, 400, "invalid_request", "missing field `amount`");
    assert_eq!(c.org("acme").await, before, "the reservation is untouched");
    assert_eq!(commit(c, &id, json!(10)).await.status, StatusCode::OK);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_idempotency_key_returns_the_same_reservation_and_refuses_a_different_body() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let body =
        json!({"org": "acme", "workspace": "ws-a", "amount": 20, "idempotency_key": "llm-1"});
    let first = reserve(c, body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    for _ in 0..3 {
        let again = reserve(c, body.clone()).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.body["reservation"], first.body["reservation"]);
        assert_eq!(again.body["remaining"], first.body["remaining"]);
    }
    let view = c.org("acme").await;
    assert_eq!(view["held"], 20, "held once: {view}");

    for other in [
        json!({"org": "acme", "workspace": "ws-a", "amount": 21, "idempotency_key": "llm-1"}),
        json!({"org": "acme", "workspace": "ws-a", "amount": 20, "ttl_ms": 5000, "idempotency_key": "llm-1"}),
    ] {
        assert_error(
            &reserve(c, other).await,
            409,
            "idempotency_mismatch",
            "llm-1",
        );
    }
    assert_eq!(c.org("acme").await, view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_answers_remaining_and_mode() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    c.debit("acme", "ws-a", 30).await;

    let a = c.get("/v1/balance?org=acme&workspace=ws-a").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.body,
        json!({"org": "acme", "workspace": "ws-a", "mode": "budget", "remaining": 70})
    );
    let a = c.get("/v1/balance?workspace=primary&org=acme").await;
    assert_eq!(a.body["remaining"], 900);

    // In shared mode every workspace spends from the Primary's balance.
    c.create_org("pool", "shared").await;
    c.purchase("pool", 500).await;
    c.create_workspace("pool", "ws-x").await;
    c.debit("pool", "ws-x", 50).await;
    for ws in ["primary", "ws-x"] {
        let a = c.get(&format!("/v1/balance?org=pool&workspace={ws}")).await;
        assert_eq!(
            a.body,
            json!({"org": "pool", "workspace": ws, "mode": "shared", "remaining": 450})
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_with_a_bad_query_is_400_and_of_the_unknown_is_404() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 10, &[]).await;
    let cases = [
        (
            "/v1/balance",
            400,
            "invalid_request",
            "query parameter org is required",
        ),
        (
            "/v1/balance?org=acme",
            400,
            "invalid_request",
            "query parameter workspace is required",
        ),
        (
            "/v1/balance?workspace=primary",
            400,
            "invalid_request",
            "query parameter org is required",
        ),
        (
            "/v1/balance?org=a%20b&workspace=primary",
            400,
            "invalid_request",
            "org must be 1 to 64",
        ),
        (
            "/v1/balance?org=acme&workspace=",
            400,
            "invalid_request",
            "workspace must be 1 to 64",
        ),
        (
            "/v1/balance?org=nope&workspace=primary",
            404,
            "unknown_org",
            "nope",
        ),
        (
            "/v1/balance?org=acme&workspace=ghost",
            404,
            "unknown_workspace",
            "ghost",
        ),
    ];
    for (path, status, code, fragment) in cases {
        assert_error(&c.get(path).await, status, code, fragment);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_routes_refuse_a_wrong_method_with_405_and_unknown_routes_with_404() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;
    let before = c.org("acme").await;
    let wrong = [
        (Method::GET, "/v1/debit"),
        (Method::PUT, "/v1/debit"),
        (Method::GET, "/v1/reservations"),
        (Method::DELETE, "/v1/reservations"),
        (Method::GET, "/v1/reservations/r-1/commit"),
        (Method::GET, "/v1/reservations/r-1"),
        (Method::POST, "/v1/reservations/r-1"),
        (Method::POST, "/v1/balance?org=acme&workspace=primary"),
    ];
    for (method, path) in wrong {
        let a = c
            .send(
                method.clone(),
                path,
                Some(r#"{"org":"acme","workspace":"primary","amount":1}"#),
                &[],
            )
            .await;
        assert_error(&a, 405, "method_not_allowed", "method not allowed");
    }
    for path in [
        "/v1/debits",
        "/v1/debit/extra",
        "/v1/reservations/r-1/commit/x",
        "/v1",
        "/v2/debit",
        "/",
    ] {
        let a = c.send(Method::POST, path, Some("{}"), &[]).await;
        assert_error(&a, 404, "not_found", "no such route");
    }
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}
