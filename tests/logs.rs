//! Proves the log contract: JSON lines when `log_format = "json"`, one audit line per
//! control-plane change, and no line per allowed debit at the default level.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, wait_exit, Client, TOKEN};

/// Polls /readyz (the shared `Process` harness does not capture stderr, so this test spawns
/// the binary itself).
async fn wait_ready(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(c.addr).await.is_ok()
            && c.get("/readyz").await.status == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "creditd not ready within 30s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_audit_line_per_change_and_none_per_debit() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(common::binary())
        .arg("serve")
        .env_clear()
        .env("CREDITD_LISTEN", &addr)
        .env("CREDITD_DATA_DIR", dir.path())
        .env("CREDITD_ADMIN_TOKEN", TOKEN)
        .env("CREDITD_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn creditd");
    let c = Client::new(addr.parse().unwrap());
    wait_ready(&c).await;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1_000).await;
    c.create_workspace("acme", "ws-a").await;
    assert_eq!(c.transfer("acme", "primary", "ws-a", 500).await.status, 200);
    for _ in 0..50 {
        assert_eq!(c.debit("acme", "ws-a", 1).await.status, 200);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();

    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let audit: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "audit").collect();
    // org created, purchase, workspace created, transfer.
    assert_eq!(audit.len(), 4, "one audit line per change: {audit:#?}");
    assert!(
        audit.iter().all(|l| l["fields"]["org"] == "acme"),
        "{audit:#?}"
    );
    // 50 debits, and fewer lines than that in all: none per debit.
    assert!(
        lines.len() < 20,
        "a line per debit? {} lines:\n{stderr}",
        lines.len()
    );
}
