//! The tests' HTTP/1.1 client for one creditd address: raw requests, and one method per API
//! call the tests make.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::TOKEN;

/// Longest any single test request may take before the test fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// An answer: status, headers and the body parsed as JSON (`Value::Null` when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    pub fn error_code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

/// A client for one creditd address.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Client {
            addr,
            token: Some(TOKEN.to_string()),
        }
    }

    /// Sends one request on a new connection. `headers` are extra headers.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.send_inner(method, path, body, headers),
        )
        .await
        .unwrap_or_else(|_| panic!("request {path} took longer than {REQUEST_TIMEOUT:?}"))
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to creditd");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .expect("request");
        let response = sender.send_request(req).await.expect("send request");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(&body.to_string()), &[])
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Answer {
        self.send(Method::PUT, path, Some(&body.to_string()), &[])
            .await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None, &[]).await
    }

    /// Sends `body` (JSON) and asserts the answer's status; returns its body. `what` names the
    /// call in a failure.
    pub async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        status: StatusCode,
        what: &str,
    ) -> Value {
        let text = body.map(|b| b.to_string());
        let a = self.send(method, path, text.as_deref(), &[]).await;
        assert_eq!(a.status, status, "{what}: {}", a.text);
        a.body
    }

    // Shorthands for the product's operations; each asserts success.

    pub async fn create_org(&self, org: &str, mode: &str) -> Value {
        let body = serde_json::json!({"org": org, "mode": mode});
        self.expect(
            Method::POST,
            "/v1/orgs",
            Some(body),
            StatusCode::CREATED,
            "create org",
        )
        .await
    }

    pub async fn purchase(&self, org: &str, amount: u64) -> Value {
        let path = format!("/v1/orgs/{org}/credits");
        let body = serde_json::json!({"amount": amount});
        self.expect(Method::POST, &path, Some(body), StatusCode::OK, "purchase")
            .await
    }

    pub async fn create_workspace(&self, org: &str, ws: &str) -> Value {
        let path = format!("/v1/orgs/{org}/workspaces");
        let body = serde_json::json!({"workspace": ws});
        let created = StatusCode::CREATED;
        self.expect(Method::POST, &path, Some(body), created, "create workspace")
            .await
    }

    pub async fn transfer(&self, org: &str, from: &str, to: &str, amount: u64) -> Answer {
        self.post(
            &format!("/v1/orgs/{org}/transfers"),
            serde_json::json!({"from": from, "to": to, "amount": amount}),
        )
        .await
    }

    pub async fn debit(&self, org: &str, ws: &str, amount: u64) -> Answer {
        self.post(
            "/v1/debit",
            serde_json::json!({"org": org, "workspace": ws, "amount": amount}),
        )
        .await
    }

    pub async fn org(&self, org: &str) -> Value {
        let path = format!("/v1/orgs/{org}");
        self.expect(Method::GET, &path, None, StatusCode::OK, "org view")
            .await
    }

    /// `GET /metrics` as text; fails the test on any other status.
    pub async fn metrics_text(&self) -> String {
        let a = self.get("/metrics").await;
        assert_eq!(a.status, StatusCode::OK, "metrics: {}", a.text);
        a.text
    }

    /// Every ledger entry of `org`, oldest first, following `next` cursors (at most 1,000 pages).
    pub async fn ledger_all(&self, org: &str) -> Vec<Value> {
        let mut entries = Vec::new();
        let mut after: Option<u64> = None;
        for _ in 0..1000 {
            let path = match after {
                Some(cursor) => format!("/v1/orgs/{org}/ledger?limit=100&after={cursor}"),
                None => format!("/v1/orgs/{org}/ledger?limit=100"),
            };
            let a = self.get(&path).await;
            assert_eq!(a.status, StatusCode::OK, "ledger: {}", a.text);
            entries.extend(
                a.body["entries"]
                    .as_array()
                    .expect("entries")
                    .iter()
                    .cloned(),
            );
            match a.body["next"].as_u64() {
                Some(cursor) => after = Some(cursor),
                None => return entries,
            }
        }
        panic!("ledger of {org} has more than 1000 pages");
    }

    /// `POST /v1/reservations`; returns the reservation id, asserting `201`.
    pub async fn reserve(&self, org: &str, ws: &str, amount: u64, ttl_ms: u64) -> String {
        let a = self
            .post(
                "/v1/reservations",
                serde_json::json!({"org": org, "workspace": ws, "amount": amount, "ttl_ms": ttl_ms}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "reserve: {}", a.text);
        a.body["reservation"]
            .as_str()
            .unwrap_or_else(|| panic!("no reservation id in {}", a.text))
            .to_string()
    }

    /// `POST /v1/reservations/{id}/commit`.
    pub async fn commit(&self, id: &str, amount: u64) -> Answer {
        self.post(
            &format!("/v1/reservations/{id}/commit"),
            serde_json::json!({"amount": amount}),
        )
        .await
    }

    /// `PUT /v1/orgs/{org}/mode`, asserting `200`; returns the org view.
    pub async fn set_mode(&self, org: &str, mode: &str) -> Value {
        let path = format!("/v1/orgs/{org}/mode");
        let body = serde_json::json!({"mode": mode});
        self.expect(Method::PUT, &path, Some(body), StatusCode::OK, "set mode")
            .await
    }

    /// A debit that reports a failed connection as `None` instead of failing the test: for
    /// load aimed at a node that is killed on purpose.
    pub async fn try_debit(&self, org: &str, ws: &str, amount: u64) -> Option<Answer> {
        let body = serde_json::json!({"org": org, "workspace": ws, "amount": amount}).to_string();
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(self.addr).await.ok()?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(Method::POST)
                .uri("/v1/debit")
                .header("host", self.addr.to_string())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .ok()?;
            let response = sender.send_request(req).await.ok()?;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response.into_body().collect().await.ok()?.to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Some(Answer {
                status,
                headers,
                body,
                text,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .ok()
            .flatten()
    }
}
