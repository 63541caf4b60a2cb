//! Proves docs/gateways/nginx.conf works as documented with a real nginx: a workspace with 5
//! credits gets exactly 5 requests through to the API (each told what is left), then 402s,
//! and callers without a mapping or a credit account never reach the API.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;

use common::{free_port, Answer, Client, TestNode};

/// The Debian package's binary; .ci/run installs it. Never skipped: a missing nginx fails.
const NGINX: &str = "/usr/sbin/nginx";

/// The documented configuration, the source of truth; the test changes only ports and paths.
const DOC_CONFIG: &str = include_str!("../docs/gateways/nginx.conf");

/// Longest nginx may take to start or stop.
const NGINX_WAIT: Duration = Duration::from_secs(15);

/// The API behind the gateway: answers every request `200 hello`, counting them and keeping
/// the `X-Credits-Remaining` nginx passed on.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    remaining_seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let remaining_seen = Arc::new(Mutex::new(Vec::new()));
        let (h, r) = (Arc::clone(&hits), Arc::clone(&remaining_seen));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, r) = (Arc::clone(&h), Arc::clone(&r));
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let seen = req
                        .headers()
                        .get("x-credits-remaining")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("<none>")
                        .to_string();
                    r.lock().unwrap().push(seen);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"hello"),
                        )))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            remaining_seen,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replaces `from`, which must occur exactly once in the documented config, by `to`. A doc
/// change that removes an anchor fails here, naming it, instead of testing something else.
fn substitute(config: &mut String, from: &str, to: &str) {
    let n = config.matches(from).count();
    assert_eq!(
        n, 1,
        "docs/gateways/nginx.conf has {n} copies of {from:?} (expected 1): update the \
         substitutions in tests/gateway_nginx.rs along with the doc"
    );
    *config = config.replacen(from, to, 1);
}

/// The documented config with its ports and file paths moved into `dir`: nginx on
/// `listen`, creditd at `creditd`, the API at `api`; the doc's demo backend on `demo`.
fn render_config(
    dir: &Path,
    listen: u16,
    creditd: SocketAddr,
    api: SocketAddr,
    demo: u16,
) -> String {
    let d = dir.display();
    let mut c = DOC_CONFIG.to_string();
    // One worker is plenty for a test on a shared two-core machine.
    substitute(&mut c, "worker_processes auto;", "worker_processes 1;");
    substitute(
        &mut c,
        "pid /tmp/nginx-creditd.pid;",
        &format!("pid {d}/nginx.pid;"),
    );
    substitute(
        &mut c,
        "access_log /dev/stdout;",
        &format!("access_log {d}/access.log;"),
    );
    substitute(
        &mut c,
        "error_log  /dev/stderr warn;",
        &format!("error_log {d}/error.log warn;"),
    );
    // The package's temp paths are under /var/lib/nginx: keep everything in the tempdir.
    substitute(
        &mut c,
        "http {\n",
        &format!(
            "http {{\n    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n    \
             fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
             scgi_temp_path {d}/scgi;\n"
        ),
    );
    substitute(
        &mut c,
        "server 127.0.0.1:8787;",
        &format!("server {creditd};"),
    );
    substitute(&mut c, "server 127.0.0.1:9000;", &format!("server {api};"));
    substitute(
        &mut c,
        "listen 8080;",
        &format!("listen 127.0.0.1:{listen};"),
    );
    substitute(
        &mut c,
        "listen 127.0.0.1:9000;",
        &format!("listen 127.0.0.1:{demo};"),
    );
    c
}

/// nginx in the foreground with the rendered config; stopped (TERM, then KILL) on drop.
struct Nginx {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(creditd: SocketAddr, api: SocketAddr) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} not found: install the Debian package nginx (.ci/run does); this test \
             is never skipped"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // nginx workers drop root privileges; they must still reach the temp folders.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod tempdir");
        }
        let port = free_port();
        let config = render_config(dir.path(), port, creditd, api, free_port());
        let conf: PathBuf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).expect("write nginx.conf");
        let base = |cmd: &mut Command| {
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null());
        };

        // Check the config first, for a clear message if the doc's config is broken.
        let mut check = Command::new(NGINX);
        base(&mut check);
        let out = check.arg("-t").output().expect("run nginx -t");
        assert!(
            out.status.success(),
            "nginx -t refused the rendered docs/gateways/nginx.conf:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let mut cmd = Command::new(NGINX);
        base(&mut cmd);
        let child = cmd
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child: Some(child),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
        };
        nginx.wait_listening().await;
        nginx
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + NGINX_WAIT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nginx exited at start ({status}):\n{}", self.logs());
            }
            if tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await
            .is_ok_and(|r| r.is_ok())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening on {} within {NGINX_WAIT:?}:\n{}",
                self.addr,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The error log and the access log, for failure messages.
    fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- error.log\n{}--- access.log\n{}",
            read("error.log"),
            read("access.log")
        )
    }

    fn client(&self) -> Client {
        Client {
            addr: self.addr,
            token: None,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // TERM: the master stops its workers and exits (fast shutdown).
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + NGINX_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A request through the gateway with the given API key (none when `None`).
async fn call(c: &Client, path: &str, key: Option<&str>, extra: &[(&str, &str)]) -> Answer {
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(key) = key {
        headers.push(("x-api-key", key));
    }
    c.send(Method::GET, path, None, &headers).await
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Asserts a JSON answer written by nginx or creditd: status, `error` code, content type.
fn assert_refused(a: &Answer, status: u16, code: &str, logs: &str) {
    assert_eq!(a.status.as_u16(), status, "{a:?}\n{logs}");
    assert_eq!(a.error_code(), code, "{a:?}");
    assert_eq!(header(a, "content-type"), Some("application/json"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_charges_each_request_and_refuses_when_out_of_credits() {
    let node = TestNode::start().await;
    let c = &node.client;
    // The doc's key map: key-acme-a -> acme/ws-a, key-acme-b -> acme/ws-b,
    // key-globex-1 -> globex/primary (globex is never created here).
    c.create_org("acme", "budget").await;
    c.purchase("acme", 100).await;
    for (ws, credits) in [("ws-a", 5), ("ws-b", 12)] {
        c.create_workspace("acme", ws).await;
        let t = c.transfer("acme", "primary", ws, credits).await;
        assert_eq!(t.status, StatusCode::OK, "{}", t.text);
    }
    let api = Upstream::start().await;
    let nginx = Nginx::start(node.server.addr(), api.addr).await;
    let g = nginx.client();

    // Exactly 5 requests through, each told what is left.
    for left in [4, 3, 2, 1, 0] {
        let a = call(&g, "/v1/items", Some("key-acme-a"), &[]).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}\n{}", nginx.logs());
        assert_eq!(a.text, "hello", "the API's answer reaches the client");
        assert_eq!(
            header(&a, "x-credits-remaining"),
            Some(left.to_string().as_str()),
            "{a:?}"
        );
    }
    assert_eq!(api.hits(), 5);
    assert_eq!(
        *api.remaining_seen.lock().unwrap(),
        ["4", "3", "2", "1", "0"],
        "the API is told what is left too"
    );

    // Then refused with 402, the error recipe's JSON and headers; the API sees nothing.
    for _ in 0..2 {
        let a = call(&g, "/v1/items", Some("key-acme-a"), &[]).await;
        assert_refused(&a, 402, "insufficient_credits", &nginx.logs());
        assert_eq!(header(&a, "x-credits-error"), Some("insufficient_credits"));
        assert_eq!(header(&a, "x-credits-remaining"), Some("0"));
    }
    // Headers a client sends to pick another payer are overwritten by the gateway.
    let a = call(
        &g,
        "/v1/items",
        Some("key-acme-a"),
        &[
            ("x-credits-org", "acme"),
            ("x-credits-workspace", "primary"),
            ("x-credits-amount", "1"),
        ],
    )
    .await;
    assert_refused(&a, 402, "insufficient_credits", &nginx.logs());
    assert_eq!(api.hits(), 5);

    // No mapping: no key, or a key nginx does not know, never reaches creditd or the API.
    for key in [None, Some("key-unknown")] {
        let a = call(&g, "/v1/items", key, &[]).await;
        assert_refused(&a, 401, "unauthorized", &nginx.logs());
    }
    // A mapping to an org creditd does not know: 404 with creditd's code, no request through.
    let a = call(&g, "/v1/items", Some("key-globex-1"), &[]).await;
    assert_refused(&a, 404, "unknown_org", &nginx.logs());
    assert_eq!(header(&a, "x-credits-error"), Some("unknown_org"));
    assert_eq!(api.hits(), 5);

    // The per-route price map: /v1/chat/ costs 10, /v1/embeddings 2 (ws-b holds 12).
    let a = call(&g, "/v1/chat/completions", Some("key-acme-b"), &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(header(&a, "x-credits-remaining"), Some("2"));
    let a = call(&g, "/v1/embeddings", Some("key-acme-b"), &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(header(&a, "x-credits-remaining"), Some("0"));
    let a = call(&g, "/v1/chat/completions", Some("key-acme-b"), &[]).await;
    assert_refused(&a, 402, "insufficient_credits", &nginx.logs());
    assert_eq!(api.hits(), 7);

    // creditd agrees: exactly what was let through was charged, nothing for the refusals.
    let view = c.org("acme").await;
    assert_eq!(common::balance(&view, "ws-a"), 0);
    assert_eq!(common::used(&view, "ws-a"), 5);
    assert_eq!(common::balance(&view, "ws-b"), 0);
    assert_eq!(common::used(&view, "ws-b"), 12);
    assert_eq!(common::balance(&view, "primary"), 83);
    common::assert_conserved(&view);

    // Stop nginx first: its keep-alive connections to creditd would hold the node's drain.
    drop(nginx);
    drop(api);
    node.stop().await;
}
