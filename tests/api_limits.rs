//! Proves every limit of docs/api.md over real HTTP: body size, ids, amounts, accounts, workspaces,
//! reservations, idempotency keys, stalled connections and ledger pages, each refused with its
//! documented status and code, changing nothing, and counted in `/metrics`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    assert_conserved, assert_error, balance, budget_org, Answer, Client, Process, TestNode,
};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// 10^15: the largest amount of one call.
const AMOUNT_MAX: u64 = 1_000_000_000_000_000;

/// Writes `request` on a new connection and reads until the server closes it (at most 10 s).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server did not close the connection within 10s"
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_default_64_kib_is_413_payload_too_large() {
    let node = TestNode::start().await;
    let c = &node.client;
    let before = budget_org(c, "acme", 100, &[]).await;
    let body = |size: usize| {
        let json = r#"{"org":"acme","workspace":"primary","amount":1}"#;
        format!("{json}{}", " ".repeat(size - json.len()))
    };
    let a = c
        .send(Method::POST, "/v1/debit", Some(&body(65_537)), &[])
        .await;
    assert_error(&a, 413, "payload_too_large", "body larger than 65536 bytes");
    assert_eq!(c.org("acme").await, before);
    // Exactly at the limit is accepted.
    let a = c
        .send(Method::POST, "/v1/debit", Some(&body(65_536)), &[])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_body_bytes_max_is_413_on_every_plane_and_changes_nothing() {
    let node = TestNode::start_with(|c| c.body_bytes_max = 1024).await;
    let c = &node.client;
    let before = budget_org(c, "acme", 100, &[("ws-a", 10)]).await;
    let pad = " ".repeat(1100);
    let calls = [
        (
            Method::POST,
            "/v1/debit".to_string(),
            format!(r#"{{"org":"acme","workspace":"primary","amount":1}}{pad}"#),
        ),
        (
            Method::POST,
            "/v1/reservations".to_string(),
            format!(r#"{{"org":"acme","workspace":"primary","amount":1}}{pad}"#),
        ),
        (
            Method::POST,
            "/v1/orgs".to_string(),
            format!(r#"{{"org":"big"}}{pad}"#),
        ),
        (
            Method::POST,
            "/v1/orgs/acme/credits".to_string(),
            format!(r#"{{"amount":5}}{pad}"#),
        ),
        (
            Method::PUT,
            "/v1/orgs/acme/mode".to_string(),
            format!(r#"{{"mode":"shared"}}{pad}"#),
        ),
        (
            Method::POST,
            "/v1/orgs/acme/workspaces".to_string(),
            format!(r#"{{"workspace":"w"}}{pad}"#),
        ),
        (
            Method::POST,
            "/v1/orgs/acme/transfers".to_string(),
            format!(r#"{{"from":"primary","to":"ws-a","amount":1}}{pad}"#),
        ),
    ];
    for (method, path, body) in calls {
        let a = c.send(method, &path, Some(&body), &[]).await;
        assert_error(&a, 413, "payload_too_large", "body larger than 1024 bytes");
    }
    assert_eq!(c.org("acme").await, before);
    assert_error(&c.get("/v1/orgs/big").await, 404, "unknown_org", "big");

    // A chunked body (no Content-Length) is cut at the limit too.
    let chunk = format!(
        r#"{{"org":"acme","workspace":"primary","amount":1}}{}"#,
        " ".repeat(600)
    );
    let request = format!(
        "POST /v1/debit HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let response = raw_exchange(node.client.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains(r#""error":"payload_too_large""#),
        "{response}"
    );
    assert!(
        response.contains("body larger than 1024 bytes"),
        "{response}"
    );
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_over_64_characters_or_outside_the_charset_are_400() {
    let node = TestNode::start().await;
    let c = &node.client;
    let longest = "a".repeat(64);
    let too_long = "a".repeat(65);
    // The whole charset, at the longest length, is accepted everywhere.
    let charset_id = format!("{}AZaz09._:-", "x".repeat(54));
    assert_eq!(charset_id.len(), 64);
    let a = c
        .post(
            "/v1/orgs",
            json!({"org": longest, "mode": "budget", "primary": charset_id}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    c.purchase(&longest, 100).await;
    c.create_workspace(&longest, &too_long[..64]).await;
    assert_eq!(
        c.post(
            "/v1/debit",
            json!({"org": longest, "workspace": charset_id, "amount": 1, "idempotency_key": charset_id}),
        )
        .await
        .status,
        StatusCode::OK
    );
    let before = c.org(&longest).await;

    let bad_ids = [
        too_long.as_str(),
        "",
        "a b",
        "a/b",
        "a@b",
        "a#b",
        "é",
        "a\u{1f}b",
        "a,b",
        "a+b",
    ];
    for bad in bad_ids {
        let debits = [
            (
                json!({"org": bad, "workspace": "primary", "amount": 1}),
                "org must be 1 to 64",
            ),
            (
                json!({"org": longest, "workspace": bad, "amount": 1}),
                "workspace must be 1 to 64",
            ),
            (
                json!({"org": longest, "workspace": charset_id, "amount": 1, "idempotency_key": bad}),
                "idempotency_key must be 1 to 64",
            ),
        ];
        for (body, fragment) in debits {
            assert_error(
                &c.post("/v1/debit", body.clone()).await,
                400,
                "invalid_request",
                fragment,
            );
            assert_error(
                &c.post("/v1/reservations", body).await,
                400,
                "invalid_request",
                fragment,
            );
        }
        let control = [
            (
                "/v1/orgs".to_string(),
                json!({"org": bad}),
                "org must be 1 to 64",
            ),
            (
                "/v1/orgs".to_string(),
                json!({"org": "fresh", "primary": bad}),
                "primary must be 1 to 64",
            ),
            (
                format!("/v1/orgs/{longest}/workspaces"),
                json!({"workspace": bad}),
                "workspace must be 1 to 64",
            ),
            (
                format!("/v1/orgs/{longest}/transfers"),
                json!({"from": bad, "to": charset_id, "amount": 1}),
                "from must be 1 to 64",
            ),
            (
                format!("/v1/orgs/{longest}/transfers"),
                json!({"from": charset_id, "to": bad, "amount": 1}),
                "to must be 1 to 64",
            ),
            (
                format!("/v1/orgs/{longest}/credits"),
                json!({"amount": 1, "idempotency_key": bad}),
                "idempotency_key must be 1 to 64",
            ),
        ];
        for (path, body, fragment) in control {
            assert_error(&c.post(&path, body).await, 400, "invalid_request", fragment);
        }
    }
    // Ids in the path, the query and headers.
    let path_bad = [too_long.as_str(), "a%20b", "a%40b", "%C3%A9"];
    for bad in path_bad {
        assert_error(
            &c.get(&format!("/v1/orgs/{bad}")).await,
            400,
            "invalid_request",
            "org must be 1 to 64",
        );
        assert_error(
            &c.delete(&format!("/v1/orgs/{longest}/workspaces/{bad}"))
                .await,
            400,
            "invalid_request",
            "workspace must be 1 to 64",
        );
        assert_error(
            &c.get(&format!("/v1/balance?org={bad}&workspace=primary"))
                .await,
            400,
            "invalid_request",
            "org must be 1 to 64",
        );
        assert_error(
            &c.get(&format!("/v1/balance?org={longest}&workspace={bad}"))
                .await,
            400,
            "invalid_request",
            "workspace must be 1 to 64",
        );
    }
    for (org, ws, key, fragment) in [
        (
            too_long.as_str(),
            "primary",
            None,
            "X-Credits-Org must be 1 to 64",
        ),
        (
            longest.as_str(),
            too_long.as_str(),
            None,
            "X-Credits-Workspace must be 1 to 64",
        ),
        (
            longest.as_str(),
            "a b",
            None,
            "X-Credits-Workspace must be 1 to 64",
        ),
        (
            longest.as_str(),
            charset_id.as_str(),
            Some(too_long.as_str()),
            "X-Credits-Idempotency-Key must be 1 to 64",
        ),
        (
            longest.as_str(),
            charset_id.as_str(),
            Some("k@y"),
            "X-Credits-Idempotency-Key must be 1 to 64",
        ),
    ] {
        let mut headers = vec![("x-credits-org", org), ("x-credits-workspace", ws)];
        if let Some(key) = key {
            headers.push(("x-credits-idempotency-key", key));
        }
        let a = c.send(Method::GET, "/v1/authorize", None, &headers).await;
        assert_error(&a, 400, "invalid_request", fragment);
    }
    assert_eq!(c.org(&longest).await, before);
    assert_error(&c.get("/v1/orgs/fresh").await, 404, "unknown_org", "fresh");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_must_be_json_integers_from_1_to_10_pow_15() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let before = c.org("acme").await;
    let bad: &[(&str, &str)] = &[
        ("0", "amount must be an integer from 1 to 1000000000000000"),
        (
            "1000000000000001",
            "amount must be an integer from 1 to 1000000000000000",
        ),
        (
            "18446744073709551615",
            "amount must be an integer from 1 to 1000000000000000",
        ),
        ("18446744073709551616", "invalid JSON body"),
        ("1.5", "invalid JSON body"),
        ("1.0", "invalid JSON body"),
        ("1e3", "invalid JSON body"),
        ("\"5\"", "invalid JSON body"),
        ("-1", "invalid JSON body"),
        ("null", "invalid JSON body"),
        ("true", "invalid JSON body"),
    ];
    for (amount, fragment) in bad {
        let calls = [
            (
                "/v1/debit",
                format!(r#"{{"org":"acme","workspace":"ws-a","amount":{amount}}}"#),
            ),
            (
                "/v1/reservations",
                format!(r#"{{"org":"acme","workspace":"ws-a","amount":{amount}}}"#),
            ),
            ("/v1/orgs/acme/credits", format!(r#"{{"amount":{amount}}}"#)),
            (
                "/v1/orgs/acme/transfers",
                format!(r#"{{"from":"primary","to":"ws-a","amount":{amount}}}"#),
            ),
            (
                "/v1/orgs/acme/transfers",
                format!(r#"{{"from":"primary","to":"ws-a","amount":{amount},"dry_run":true}}"#),
            ),
        ];
        for (path, body) in calls {
            let a = c.send(Method::POST, path, Some(&body), &[]).await;
            assert_error(&a, 400, "invalid_request", fragment);
        }
    }
    assert_eq!(
        c.org("acme").await,
        before,
        "refused amounts change nothing"
    );

    // 1 and 10^15 themselves are accepted.
    c.create_org("whale", "shared").await;
    let view = c.purchase("whale", AMOUNT_MAX).await;
    assert_eq!(view["purchased"], AMOUNT_MAX);
    let a = c.debit("whale", "primary", AMOUNT_MAX).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["remaining"], 0);
    assert_eq!(c.debit("acme", "ws-a", 1).await.status, StatusCode::OK);
    assert_conserved(&c.org("whale").await);
    node.stop().await;
}

/// A field the endpoint does not know is refused, never ignored: a purchase sent twice with a
/// misspelt `idempotency_kye` would otherwise be applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused_with_400_naming_the_field_and_change_nothing() {
    let node = TestNode::start().await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let before = c.org("acme").await;
    let calls: &[(Method, &str, &str, &str)] = &[
        (
            Method::POST,
            "/v1/orgs/acme/credits",
            r#"{"amount":100,"idempotency_kye":"k-1"}"#,
            "idempotency_kye",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/credits",
            r#"{"amount":100,"expires_at":"2027-01-01"}"#,
            "expires_at",
        ),
        (
            Method::POST,
            "/v1/orgs",
            r#"{"org":"beta","mode":"shared","owner":"x"}"#,
            "owner",
        ),
        (
            Method::PUT,
            "/v1/orgs/acme/mode",
            r#"{"mode":"shared","force":true}"#,
            "force",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/workspaces",
            r#"{"workspace":"ws-b","budget":5}"#,
            "budget",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/transfers",
            r#"{"from":"primary","to":"ws-a","amount":1,"dryrun":true}"#,
            "dryrun",
        ),
        (
            Method::POST,
            "/v1/debit",
            r#"{"org":"acme","workspace":"ws-a","amount":1,"cost":1}"#,
            "cost",
        ),
        (
            Method::POST,
            "/v1/reservations",
            r#"{"org":"acme","workspace":"ws-a","amount":1,"ttl":5}"#,
            "ttl",
        ),
    ];
    for (method, path, body, field) in calls {
        for _ in 0..2 {
            let a = c.send(method.clone(), path, Some(body), &[]).await;
            assert_error(
                &a,
                400,
                "invalid_request",
                &format!("unknown field `{field}`"),
            );
        }
    }
    let r = c.reserve("acme", "ws-a", 10, 60_000).await;
    let a = c
        .send(
            Method::POST,
            &format!("/v1/reservations/{r}/commit"),
            Some(r#"{"amount":5,"amout":5}"#),
            &[],
        )
        .await;
    assert_error(&a, 400, "invalid_request", "unknown field `amout`");
    assert_eq!(c.commit(&r, 10).await.status, StatusCode::OK);
    let after = c.org("acme").await;
    assert_eq!(
        after["purchased"], before["purchased"],
        "no purchase applied"
    );
    assert_eq!(after["used"], 10, "only the valid commit charged");
    assert_eq!(balance(&after, "ws-a"), 90);
    assert!(
        after["workspaces"].as_array().unwrap().len() == 2,
        "no workspace created"
    );
    assert_eq!(after["mode"], "budget");
    assert_eq!(c.get("/v1/orgs/beta").await.status, StatusCode::NOT_FOUND);
    assert_conserved(&after);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_max_refuses_more_cached_accounts_with_429() {
    let node = TestNode::start_with(|c| c.accounts_max = 3).await;
    let c = &node.client;
    for org in ["a", "b", "c"] {
        c.create_org(org, "budget").await;
    }
    c.purchase("a", 100).await; // loads a: 1 account
    c.create_workspace("a", "ws-a").await; // 2
    c.purchase("b", 100).await; // loads b: 3, the limit
    let a_before = c.org("a").await;
    let c_before = c.org("c").await;

    let message = "accounts cached reached the limit of 3";
    assert_error(
        &c.post("/v1/orgs/c/credits", json!({"amount": 5})).await,
        429,
        "limit_exceeded",
        message,
    );
    assert_error(
        &c.debit("c", "primary", 1).await,
        429,
        "limit_exceeded",
        message,
    );
    assert_error(
        &c.get("/v1/balance?org=c&workspace=primary").await,
        429,
        "limit_exceeded",
        message,
    );
    let a = c
        .send(
            Method::GET,
            "/v1/authorize",
            None,
            &[("x-credits-org", "c"), ("x-credits-workspace", "primary")],
        )
        .await;
    assert_error(&a, 429, "limit_exceeded", message);
    assert_eq!(
        a.headers
            .get("x-credits-error")
            .and_then(|v| v.to_str().ok()),
        Some("limit_exceeded")
    );
    // A new workspace of a cached org is one more account, too.
    assert_error(
        &c.post("/v1/orgs/a/workspaces", json!({"workspace": "ws-b"}))
            .await,
        429,
        "limit_exceeded",
        message,
    );
    assert_eq!(c.org("c").await, c_before);
    assert_eq!(c.org("a").await, a_before);

    // Cached orgs keep working.
    assert_eq!(c.debit("a", "primary", 1).await.status, StatusCode::OK);
    assert_eq!(c.debit("b", "primary", 1).await.status, StatusCode::OK);
    // Deleting a workspace frees its account.
    let d = c.delete("/v1/orgs/a/workspaces/ws-a").await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    assert_eq!(c.purchase("c", 5).await["purchased"], 5);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_max_refuses_more_workspaces_with_429() {
    let node = TestNode::start_with(|c| c.workspaces_max = 3).await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[("ws-1", 10), ("ws-2", 0)]).await;
    let before = c.org("acme").await;
    assert_error(
        &c.post("/v1/orgs/acme/workspaces", json!({"workspace": "ws-3"}))
            .await,
        429,
        "limit_exceeded",
        "org acme reached the limit of 3 workspaces",
    );
    assert_eq!(c.org("acme").await, before);
    // Deleting one makes room again.
    c.delete("/v1/orgs/acme/workspaces/ws-2").await;
    c.create_workspace("acme", "ws-3").await;

    // Concurrent creations never go past the limit either.
    c.create_org("race", "budget").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let c = c.clone();
        tasks.spawn(async move {
            c.post(
                "/v1/orgs/race/workspaces",
                json!({"workspace": format!("w{i}")}),
            )
            .await
            .status
            .as_u16()
        });
    }
    let mut created = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(status) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .expect("creations finish within 60s")
    {
        match status.expect("task") {
            201 => created += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    let view = c.org("race").await;
    assert_eq!(created, 2, "{view}");
    assert_eq!(view["workspaces"].as_array().unwrap().len(), 3, "{view}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_max_refuses_more_open_reservations_with_429() {
    let node = TestNode::start_with(|c| c.reservations_max = 2).await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;
    let reserve = |amount: u64| {
        let c = c.clone();
        async move {
            c.post(
                "/v1/reservations",
                json!({"org": "acme", "workspace": "primary", "amount": amount}),
            )
            .await
        }
    };
    let r1 = reserve(10).await;
    let r2 = reserve(20).await;
    assert_eq!(
        (r1.status, r2.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    let before = c.org("acme").await;
    assert_eq!(before["held"], 30);
    assert_error(
        &reserve(1).await,
        429,
        "limit_exceeded",
        "open reservations reached the limit of 2",
    );
    assert_eq!(c.org("acme").await, before);
    // Debits are not reservations: they still work.
    assert_eq!(c.debit("acme", "primary", 1).await.status, StatusCode::OK);

    // Finishing one makes room again.
    let id = r1.body["reservation"].as_str().unwrap();
    assert_eq!(
        c.delete(&format!("/v1/reservations/{id}")).await.status,
        StatusCode::OK
    );
    assert_eq!(reserve(1).await.status, StatusCode::CREATED);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_max_refuses_new_keys_with_429_but_replays_known_ones() {
    let node = TestNode::start_with(|c| c.idempotency_keys_max = 2).await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[("ws-a", 100)]).await;
    let message = "idempotency keys remembered reached the limit of 2";

    // Data plane: debits, reservations and authorize share the node's keys.
    let debit = |key: &str| {
        let c = c.clone();
        let body = json!({"org": "acme", "workspace": "ws-a", "amount": 1, "idempotency_key": key});
        async move { c.post("/v1/debit", body).await }
    };
    assert_eq!(debit("k1").await.status, StatusCode::OK);
    let r = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-a", "amount": 1, "idempotency_key": "k2"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let before = c.org("acme").await;
    assert_error(&debit("k3").await, 429, "limit_exceeded", message);
    assert_error(
        &c.post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "ws-a", "amount": 1, "idempotency_key": "k4"}),
        )
        .await,
        429,
        "limit_exceeded",
        message,
    );
    let a = c
        .send(
            Method::GET,
            "/v1/authorize",
            None,
            &[
                ("x-credits-org", "acme"),
                ("x-credits-workspace", "ws-a"),
                ("x-credits-idempotency-key", "k5"),
            ],
        )
        .await;
    assert_error(&a, 429, "limit_exceeded", message);
    assert_eq!(c.org("acme").await, before);
    // A known key still replays, and calls without a key still work.
    assert_eq!(debit("k1").await.status, StatusCode::OK);
    assert_eq!(c.org("acme").await, before);
    assert_eq!(c.debit("acme", "ws-a", 1).await.status, StatusCode::OK);

    // Control plane: purchases and transfers share the store's keys.
    let purchase = |key: &str| {
        let c = c.clone();
        let body = json!({"amount": 10, "idempotency_key": key});
        async move { c.post("/v1/orgs/acme/credits", body).await }
    };
    assert_eq!(purchase("p1").await.status, StatusCode::OK);
    let t = c
        .post(
            "/v1/orgs/acme/transfers",
            json!({"from": "primary", "to": "ws-a", "amount": 1, "idempotency_key": "p2"}),
        )
        .await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.text);
    let before = c.org("acme").await;
    assert_error(&purchase("p3").await, 429, "limit_exceeded", message);
    assert_error(
        &c.post(
            "/v1/orgs/acme/transfers",
            json!({"from": "primary", "to": "ws-a", "amount": 1, "idempotency_key": "p4"}),
        )
        .await,
        429,
        "limit_exceeded",
        message,
    );
    assert_eq!(c.org("acme").await, before);
    assert_eq!(purchase("p1").await.status, StatusCode::OK);
    assert_eq!(c.org("acme").await, before, "a replay adds nothing");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_is_closed_after_header_read_timeout_without_delaying_others() {
    let timeout = Duration::from_millis(300);
    let node = TestNode::start_with(|c| c.header_read_timeout = timeout).await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[]).await;

    let mut stalled = TcpStream::connect(c.addr).await.expect("connect");
    stalled
        .write_all(b"POST /v1/debit HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-ty")
        .await
        .expect("write half a head");
    let stalled_at = Instant::now();
    let closed = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stalled.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        (result.is_ok(), Instant::now(), out)
    });

    // Meanwhile, other callers are served.
    let served = c.debit("acme", "primary", 1).await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.text);
    assert_eq!(c.get("/healthz").await.status, StatusCode::OK);
    let served_at = Instant::now();

    let (in_time, closed_at, out) = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("reader finishes")
        .expect("reader task");
    assert!(in_time, "the stalled connection was not closed within 10s");
    let waited = closed_at - stalled_at;
    assert!(
        waited >= timeout - Duration::from_millis(50),
        "closed after {waited:?}, before the {timeout:?} timeout"
    );
    assert!(
        served_at < closed_at,
        "other callers were served while it stalled"
    );
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
    // Nothing was charged by the half request.
    assert_eq!(c.org("acme").await["used"], 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_answered_408_and_charges_nothing() {
    let timeout = Duration::from_millis(300);
    let node = TestNode::start_with(|c| c.header_read_timeout = timeout).await;
    let c = &node.client;
    let before = budget_org(c, "acme", 100, &[]).await;

    let mut stalled = TcpStream::connect(c.addr).await.expect("connect");
    stalled
        .write_all(
            b"POST /v1/debit HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
              content-length: 60\r\n\r\n{\"org\":\"acme\",",
        )
        .await
        .expect("write head and part of the body");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the stalled connection was not closed within 10s"
    );
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains(r#""error":"invalid_request""#), "{out}");
    assert!(out.contains("body not received within 300ms"), "{out}");
    assert_eq!(c.org("acme").await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_limit_out_of_range_is_400() {
    let node = TestNode::start_with(|c| c.ledger_page_max = 5).await;
    let c = &node.client;
    budget_org(c, "acme", 100, &[("ws-a", 1), ("ws-b", 1), ("ws-c", 1)]).await;
    for limit in ["0", "6", "-1", "abc", "1.5", "", "99999999999999999999999"] {
        assert_error(
            &c.get(&format!("/v1/orgs/acme/ledger?limit={limit}")).await,
            400,
            "invalid_request",
            "limit must be an integer from 1 to 5",
        );
    }
    for (limit, expected) in [("1", 1), ("5", 5)] {
        let a = c.get(&format!("/v1/orgs/acme/ledger?limit={limit}")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(a.body["entries"].as_array().unwrap().len(), expected);
        assert!(a.body["next"].is_u64(), "more pages follow: {}", a.text);
    }
    // Without a limit the page is the smaller of 100 and ledger_page_max.
    let a = c.get("/v1/orgs/acme/ledger").await;
    assert_eq!(a.body["entries"].as_array().unwrap().len(), 5);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_hit_is_counted_in_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Process::spawn(
        dir.path(),
        &[
            ("CREDITD_BODY_BYTES_MAX", "1024"),
            ("CREDITD_ACCOUNTS_MAX", "2"),
            ("CREDITD_WORKSPACES_MAX", "2"),
            ("CREDITD_RESERVATIONS_MAX", "1"),
            ("CREDITD_IDEMPOTENCY_KEYS_MAX", "1"),
            ("CREDITD_HEADER_READ_TIMEOUT", "300ms"),
        ],
    )
    .await;
    let c = &p.client;
    c.create_org("acme", "budget").await;
    c.create_org("full", "budget").await;
    c.purchase("acme", 100).await;
    c.create_workspace("acme", "ws-a").await;

    let big = format!(
        r#"{{"org":"acme","workspace":"primary","amount":1}}{}"#,
        " ".repeat(2000)
    );
    assert_eq!(
        c.send(Method::POST, "/v1/debit", Some(&big), &[])
            .await
            .status
            .as_u16(),
        413
    );
    assert_eq!(c.debit("full", "primary", 1).await.status.as_u16(), 429);
    assert_eq!(
        c.post("/v1/orgs/acme/workspaces", json!({"workspace": "ws-b"}))
            .await
            .status
            .as_u16(),
        429
    );
    let r = json!({"org": "acme", "workspace": "primary", "amount": 1});
    assert_eq!(
        c.post("/v1/reservations", r.clone()).await.status.as_u16(),
        201
    );
    assert_eq!(c.post("/v1/reservations", r).await.status.as_u16(), 429);
    let keyed =
        |k: &str| json!({"org": "acme", "workspace": "primary", "amount": 1, "idempotency_key": k});
    assert_eq!(c.post("/v1/debit", keyed("k1")).await.status.as_u16(), 200);
    assert_eq!(c.post("/v1/debit", keyed("k2")).await.status.as_u16(), 429);
    let response = raw_exchange(p.addr, b"GET /healthz HTTP/1.1\r\nhost: x").await;
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 408"),
        "{response}"
    );

    let labels = [
        "body_bytes",
        "accounts",
        "workspaces",
        "reservations",
        "idempotency_keys",
        "header_timeout",
    ];
    let anonymous = Client {
        token: None,
        ..c.clone()
    };
    common::eventually(
        Duration::from_secs(10),
        "every limit hit in /metrics",
        || {
            let anonymous = anonymous.clone();
            async move {
                let text = anonymous.get("/metrics").await.text;
                // Every series exists at 0 from the start: each must have counted a hit.
                labels.iter().all(|l| {
                    common::metric(&text, &format!("creditd_limit_hits_total{{limit=\"{l}\"}}"))
                        >= 1.0
                })
            }
        },
    )
    .await;
    assert!(p.terminate().success());
}

/// Runs `n` concurrent `POST path` calls with bodies from `body(i)`; returns the answers.
async fn concurrent_posts(
    c: &Client,
    path: &str,
    n: usize,
    body: impl Fn(usize) -> Value,
) -> Vec<Answer> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let c = c.clone();
        let path = path.to_string();
        let body = body(i);
        tasks.spawn(async move { c.post(&path, body).await });
    }
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(answer) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .expect("calls finish within 60s")
    {
        answers.push(answer.expect("task"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_never_pass_reservations_max() {
    let node = TestNode::start_with(|c| c.reservations_max = 3).await;
    let c = &node.client;
    let start = budget_org(c, "acme", 1_000, &[]).await;
    for round in 0..5 {
        let answers = concurrent_posts(
            c,
            "/v1/reservations",
            40,
            |_| json!({"org": "acme", "workspace": "primary", "amount": 1}),
        )
        .await;
        let created: Vec<&str> = answers
            .iter()
            .filter(|a| a.status == StatusCode::CREATED)
            .map(|a| a.body["reservation"].as_str().unwrap())
            .collect();
        for a in answers.iter().filter(|a| a.status != StatusCode::CREATED) {
            assert_error(
                a,
                429,
                "limit_exceeded",
                "open reservations reached the limit of 3",
            );
        }
        assert_eq!(created.len(), 3, "round {round}");
        assert_eq!(c.org("acme").await["held"], 3, "round {round}");
        for id in created {
            let a = c.delete(&format!("/v1/reservations/{id}")).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        }
        assert_eq!(c.org("acme").await, start);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_new_keys_never_pass_idempotency_keys_max() {
    let node = TestNode::start_with(|c| c.idempotency_keys_max = 3).await;
    let c = &node.client;
    budget_org(c, "acme", 1_000, &[]).await;
    let answers = concurrent_posts(c, "/v1/debit", 60, |i| {
        json!({"org": "acme", "workspace": "primary", "amount": 1, "idempotency_key": format!("k{i}")})
    })
    .await;
    let allowed = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    for a in answers.iter().filter(|a| a.status != StatusCode::OK) {
        assert_error(
            a,
            429,
            "limit_exceeded",
            "idempotency keys remembered reached the limit of 3",
        );
    }
    assert_eq!(allowed, 3);
    assert_eq!(c.org("acme").await["used"], 3);
    node.stop().await;
}

/// `connections_max`: with every connection slot taken, a new connection is not served (it
/// waits in the kernel's backlog, costing nothing here) until a slot frees; then it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let node = TestNode::start_with(|c| {
        c.connections_max = 2;
        c.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let addr = node.server.addr();
    // Two idle connections hold both slots.
    let first = TcpStream::connect(addr).await.unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    // Both are accepted (and so hold their slots) once a request on a third one is not served.
    let third = tokio::spawn({
        let c = node.client.clone();
        async move { c.get("/healthz").await.status }
    });
    let waited = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if third.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "a third connection was served while two held every slot"
    );
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    drop(second);
    node.stop().await;
}
