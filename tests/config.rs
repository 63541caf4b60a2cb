//! Proves the binary's configuration handling: a bad file or `CREDITD_*` variable exits 64 and
//! names every bad key, no configuration at all runs the embedded loopback default, and
//! `creditd healthcheck` tells a running node from a missing one.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{eventually, free_port, metric, run_binary, Client, Process};
use creditd::config::{Config, EXIT_CONFIG};

/// A refused configuration exits at once; this only bounds a broken binary.
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// Runs `creditd <args>` with only `env` in a temporary working folder (so that nothing is
/// written next to the tests) and returns the exit code and stderr.
async fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let cwd = tempfile::tempdir().unwrap();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_binary(&args, &env, cwd.path(), EXIT_WAIT)
    })
    .await
    .expect("run creditd");
    (status.code(), stderr)
}

/// Asserts a refusal: exit code 64 and every `names` on stderr.
fn assert_refused((code, stderr): &(Option<i32>, String), names: &[&str]) {
    assert_eq!(
        *code,
        Some(EXIT_CONFIG),
        "expected exit 64; stderr: {stderr}"
    );
    for name in names {
        assert!(
            stderr.contains(name),
            "stderr does not name `{name}`: {stderr}"
        );
    }
}

fn write_file(dir: &Path, text: &str) -> String {
    let path = dir.join("creditd.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_in_the_config_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nsettle_intervall = \"1s\"\n",
    );
    let out = run(&["serve", "--config", &file], &[]).await;
    assert_refused(&out, &["settle_intervall"]);
    assert!(out.1.contains("unknown"), "{}", out.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_creditd_variable_is_refused() {
    let out = run(&["serve"], &[("CREDITD_SETTLE_INTERVALL", "1s")]).await;
    assert_refused(&out, &["CREDITD_SETTLE_INTERVALL"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_settle_interval_is_refused() {
    let out = run(&["serve"], &[("CREDITD_SETTLE_INTERVAL", "fast")]).await;
    assert_refused(&out, &["settle_interval", "fast"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_authorize_deny_status_is_refused() {
    let out = run(&["serve"], &[("CREDITD_AUTHORIZE_DENY_STATUS", "500")]).await;
    assert_refused(&out, &["authorize_deny_status", "500"]);
}

/// Every bound is checked before anything starts: a connection limit the accept loop cannot
/// count once panicked in a spawned task after "listening" was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_beyond_its_bound_is_refused_before_start() {
    let out = run(
        &["serve"],
        &[
            ("CREDITD_LISTEN", "127.0.0.1:0"),
            ("CREDITD_CONNECTIONS_MAX", "4611686018427387904"),
            ("CREDITD_ACCOUNTS_MAX", "9223372036854775807"),
            ("CREDITD_IDEMPOTENCY_TTL", "100000000h"),
            ("CREDITD_RESERVATION_TTL_MAX", "1000000h"),
            ("CREDITD_REDIS_CALL_TIMEOUT", "0ms"),
            ("CREDITD_EMBEDDED_CACHE_BYTES", "1024"),
        ],
    )
    .await;
    assert_refused(
        &out,
        &[
            "connections_max: must be from 1 to 1048576",
            "accounts_max: must be from 1 to 100000000",
            "idempotency_ttl: must be from 1s to 30d",
            "reservation_ttl_max: must be from 1ms to 7d",
            "redis_call_timeout: must be from 1ms to 1m",
            "embedded_cache_bytes: must be from 1048576 to 68719476736",
        ],
    );
    assert!(!out.1.contains("listening"), "{}", out.1);
    assert!(!out.1.contains("panicked"), "{}", out.1);
}

/// Node records are forgotten only well after their leases could expire: in a cluster,
/// node_forget_after must exceed twice lease_ttl (one embedded node never forgets: its
/// lease_ttl may be anything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_forget_after_within_twice_lease_ttl_is_refused() {
    let out = run(
        &["serve"],
        &[
            ("CREDITD_LISTEN", "127.0.0.1:0"),
            ("CREDITD_STORE", "redis"),
            ("CREDITD_LEASE_TTL", "30s"),
            ("CREDITD_NODE_FORGET_AFTER", "60s"),
        ],
    )
    .await;
    assert_refused(
        &out,
        &["node_forget_after: must be more than twice lease_ttl"],
    );
}

/// The ledger is bounded: a retention of 0 (nothing kept, not even the last change) or beyond
/// the bound is refused by its variable, naming the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_retain_out_of_its_bounds_is_refused() {
    for value in ["0", "100000001"] {
        let out = run(
            &["serve"],
            &[
                ("CREDITD_LISTEN", "127.0.0.1:0"),
                ("CREDITD_LEDGER_RETAIN", value),
            ],
        )
        .await;
        assert_refused(&out, &["ledger_retain: must be from 1 to 100000000"]);
        assert!(!out.1.contains("listening"), "{}", out.1);
    }
    let out = run(&["serve"], &[("CREDITD_LEDGER_RETAIN", "many")]).await;
    assert_refused(&out, &["CREDITD_LEDGER_RETAIN", "many"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_key_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "no_such_limit = 5\nbody_bytes_max = \"big\"\n");
    let out = run(
        &["serve", "--config", &file],
        &[
            ("CREDITD_SETTLE_INTERVAL", "fast"),
            ("CREDITD_NOT_A_SETTING", "1"),
            ("CREDITD_AUTHORIZE_DENY_STATUS", "500"),
        ],
    )
    .await;
    assert_refused(
        &out,
        &[
            "no_such_limit",
            "body_bytes_max",
            "settle_interval",
            "CREDITD_NOT_A_SETTING",
            "authorize_deny_status",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_refuses_a_bad_configuration_too() {
    let out = run(&["healthcheck"], &[("CREDITD_LISTEN", "not-an-address")]).await;
    assert_refused(&out, &["listen"]);
}

#[test]
fn the_default_listen_address_is_loopback() {
    let config = Config::default();
    assert!(config.listen.ip().is_loopback(), "{}", config.listen);
    assert_eq!(
        config.listen,
        "127.0.0.1:8787".parse::<SocketAddr>().unwrap()
    );
    let loaded = Config::load(None, Vec::new()).expect("no file and no variables is valid");
    assert!(loaded.listen.ip().is_loopback());
}

/// `creditd serve` with no file and no variables but where to listen and keep its data runs
/// the embedded single-node default; `creditd healthcheck` sees it, and sees when it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_configuration_runs_the_embedded_default_and_healthcheck_sees_it() {
    let cwd = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: SocketAddr = listen.parse().unwrap();
    let child = std::process::Command::new(common::binary())
        .arg("serve")
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CREDITD_LISTEN", &listen)
        .env("CREDITD_DATA_DIR", data.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn creditd");
    // Owned by the harness type so that a failing assertion still kills the child.
    let node = Process {
        child,
        addr,
        client: Client { addr, token: None },
    };
    eventually(Duration::from_secs(30), "creditd serve ready", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && node.client.get("/readyz").await.status == 200
    })
    .await;
    assert!(
        data.path().join(creditd::store::embedded::DB_FILE).exists(),
        "the embedded store lives in CREDITD_DATA_DIR"
    );
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "nothing is written to the working folder"
    );
    // No admin token configured: the control plane is closed, never open.
    let a = node
        .client
        .post("/v1/orgs", serde_json::json!({"org": "acme"}))
        .await;
    assert_eq!(a.status, 401, "{}", a.text);
    let metrics = node.client.metrics_text().await;
    assert_eq!(metric(&metrics, "creditd_ready"), 1.0, "{metrics}");

    let (code, stderr) = run(&["healthcheck"], &[("CREDITD_LISTEN", &listen)]).await;
    assert_eq!(
        code,
        Some(0),
        "healthcheck against a running node: {stderr}"
    );

    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0");
    let (code, stderr) = run(&["healthcheck"], &[("CREDITD_LISTEN", &listen)]).await;
    assert!(
        code.is_some_and(|c| c != 0),
        "healthcheck with nothing listening must fail, got {code:?}"
    );
    assert!(stderr.contains("creditd healthcheck"), "{stderr}");
}
