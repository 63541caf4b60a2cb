//! Test harness shared by the black-box tests: starts creditd on 127.0.0.1:0 (in-process or as
//! the real binary) and talks HTTP/1.1 to it with a minimal hyper client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use creditd::config::Config;
use creditd::server::Server;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub const TOKEN: &str = "test-admin-token";

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

    // Shorthands for the product's operations; each asserts success.

    pub async fn create_org(&self, org: &str, mode: &str) -> Value {
        let a = self
            .post("/v1/orgs", serde_json::json!({"org": org, "mode": mode}))
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "create org: {}", a.text);
        a.body
    }

    pub async fn purchase(&self, org: &str, amount: u64) -> Value {
        let a = self
            .post(
                &format!("/v1/orgs/{org}/credits"),
                serde_json::json!({"amount": amount}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "purchase: {}", a.text);
        a.body
    }

    pub async fn create_workspace(&self, org: &str, ws: &str) -> Value {
        let a = self
            .post(
                &format!("/v1/orgs/{org}/workspaces"),
                serde_json::json!({"workspace": ws}),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "create workspace: {}",
            a.text
        );
        a.body
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
        let a = self.get(&format!("/v1/orgs/{org}")).await;
        assert_eq!(a.status, StatusCode::OK, "org view: {}", a.text);
        a.body
    }
}

/// The balance of `ws` in an org view.
pub fn balance(view: &Value, ws: &str) -> u64 {
    workspace(view, ws)["balance"]
        .as_u64()
        .unwrap_or_else(|| panic!("no balance for {ws} in {view}"))
}

/// The `used` of `ws` in an org view.
pub fn used(view: &Value, ws: &str) -> u64 {
    workspace(view, ws)["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no used for {ws} in {view}"))
}

pub fn workspace<'a>(view: &'a Value, ws: &str) -> &'a Value {
    view["workspaces"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["workspace"] == ws))
        .unwrap_or_else(|| panic!("no workspace {ws} in {view}"))
}

/// Asserts rule 7 on an org view: purchased == total_credits + used, and the sums add up.
pub fn assert_conserved(view: &Value) {
    let n = |k: &str| {
        view[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {view}"))
    };
    assert_eq!(
        n("purchased"),
        n("total_credits") + n("used"),
        "conservation broken: {view}"
    );
    let ws = view["workspaces"].as_array().expect("workspaces");
    let balances: u64 = ws.iter().map(|w| w["balance"].as_u64().unwrap()).sum();
    assert_eq!(
        n("total_credits"),
        balances + n("held"),
        "total_credits != balances + held: {view}"
    );
}

/// A config for tests: loopback port 0, a fresh data folder, the test token, fast settling.
pub fn test_config(data_dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        admin_token: Some(TOKEN.to_string()),
        settle_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// creditd running in this process.
pub struct TestNode {
    pub server: Server,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with the test config, changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = Server::start(config.validate().expect("valid test config"), None)
            .await
            .expect("start creditd");
        let client = Client::new(server.addr());
        TestNode {
            server,
            client,
            dir,
        }
    }

    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.server.shutdown().await.expect("clean shutdown");
        self.dir
    }
}

/// The creditd binary built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_creditd"))
}

/// A free loopback port: bind :0, read the port, close. Only for processes that must be told
/// a port up front (the binary, redis-server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// creditd running as a child process (for signals, crashes and restarts).
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: Client,
}

impl Process {
    /// Starts the binary with `CREDITD_*` variables `env` (listen and token are set here) and
    /// waits until /readyz answers 200.
    pub async fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> Process {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CREDITD_LISTEN", addr.to_string())
            .env("CREDITD_DATA_DIR", data_dir)
            .env("CREDITD_ADMIN_TOKEN", TOKEN)
            .env("CREDITD_SETTLE_INTERVAL", "50ms")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn creditd");
        let process = Process {
            child,
            addr,
            client: Client::new(addr),
        };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await
            {
                drop(stream);
                if self.client.get("/readyz").await.status == StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "creditd at {} not ready within 30s",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_exit(&mut self.child, Duration::from_secs(30))
    }

    /// SIGKILL: a hard crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = wait_exit(&mut self.child, Duration::from_secs(30));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a child to exit, polling, at most `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it returns true or `limit` passes (then fails the test with `what`).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Helpers for the durability, concurrency and config tests.

/// The value of metric `name` in a Prometheus text exposition: the sum of its samples (all
/// label sets), or 0 when it is absent (a counter that was never incremented is not rendered).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // `name{labels} value` or `name value`; not `name_suffix ...`.
            let rest = match rest.chars().next()? {
                '{' => &rest[rest.find('}')? + 1..],
                ' ' => rest,
                _ => return None,
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

impl Client {
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
        let a = self
            .put(
                &format!("/v1/orgs/{org}/mode"),
                serde_json::json!({"mode": mode}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "set mode: {}", a.text);
        a.body
    }
}

/// What a finished child process printed.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end: pipes its stdout and stderr (each drained on its own thread, so a
/// large output cannot block the child), writes `stdin` if given, and waits at most `limit`;
/// past that the child is killed and the test fails. `what` names the program in failures.
pub fn run_bounded(mut cmd: Command, stdin: Option<&str>, limit: Duration, what: &str) -> Finished {
    use std::io::{Read, Write};
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("write to {what}: {e}"));
    }
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            // Never leave a stray process behind a failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs the creditd binary with exactly the variables `env` (plus PATH) in `cwd`, waits at most
/// `limit` for it to exit, and returns its status and stderr. For commands that exit by
/// themselves (a refused configuration, `healthcheck`).
pub fn run_binary(
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let done = run_bounded(cmd, None, limit, &format!("creditd {args:?}"));
    (done.status, done.stderr)
}

impl Client {
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

/// Asserts an error answer: status, stable code, a fragment of the message, JSON body.
pub fn assert_error(a: &Answer, status: u16, code: &str, fragment: &str) {
    assert_eq!(a.status.as_u16(), status, "status of {}", a.text);
    assert_eq!(a.error_code(), code, "code of {}", a.text);
    let message = a.body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {}", a.text));
    assert!(
        message.contains(fragment),
        "message {message:?} does not contain {fragment:?}"
    );
    assert_eq!(
        a.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "error bodies are JSON: {a:?}"
    );
}

/// A budget-mode org with `purchased` credits and workspaces given `allot` credits each.
pub async fn budget_org(c: &Client, org: &str, purchased: u64, allot: &[(&str, u64)]) -> Value {
    c.create_org(org, "budget").await;
    c.purchase(org, purchased).await;
    for (ws, amount) in allot {
        c.create_workspace(org, ws).await;
        if *amount > 0 {
            let a = c.transfer(org, "primary", ws, *amount).await;
            assert_eq!(a.status, StatusCode::OK, "transfer: {}", a.text);
        }
    }
    c.org(org).await
}
