//! The embedded store on a real, small filesystem filled up under load: while the disk is full
//! the node says so (`/readyz` 503 with the reason, control-plane calls 503 with the cause,
//! `creditd_store_errors_total{kind="full"}`), keeps deciding the debits its memory can
//! decide, and once space is freed it writes again without a restart, having lost nothing
//! acknowledged and applied nothing twice.
//!
//! The test mounts a 4 MiB tmpfs (it runs as root in CI); if it cannot, it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_conserved, eventually, metric, used, Process};
use serde_json::json;

/// A tmpfs mounted on a fresh folder, unmounted (lazily, in case a process still holds a
/// file) when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs to mount a {size} tmpfs (run it as root): mount said {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { _dir: dir, mount }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Writes `path` until the filesystem is full (bounded: the filesystem is small).
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 16 * 1024];
    for _ in 0..10_000 {
        match file.write_all(&chunk).and_then(|()| file.sync_all()) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(28) => return,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    panic!("the filesystem did not fill up");
}

async fn ready_status(p: &Process) -> (u16, serde_json::Value) {
    let a = p.client.get("/readyz").await;
    (a.status.as_u16(), a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_the_node_recovers_once_space_is_freed() {
    let fs = Tmpfs::mount("4m");
    let data = fs.mount.join("data");
    let p = Process::spawn(&data, &[]).await;
    let c = &p.client;
    // `steady` is only debited: its lease stays in memory through the outage. `acme` takes
    // the control-plane load that fills the disk.
    c.create_org("steady", "shared").await;
    c.purchase("steady", 1_000_000).await;
    c.create_org("acme", "budget").await;
    let mut allowed = 0u64;
    for _ in 0..5 {
        assert_eq!(c.debit("steady", "primary", 1).await.status, 200);
        allowed += 1;
    }

    fill(&fs.mount.join("filler"));

    // Keyed purchases and workspace creations until the store refuses one for lack of space.
    let mut acked_keys: Vec<String> = Vec::new();
    let mut unknown_keys: Vec<String> = Vec::new();
    let mut acked_workspaces: Vec<String> = Vec::new();
    let mut refusal = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..2_000 {
        assert!(Instant::now() < deadline, "the disk never filled up");
        let key = format!("buy-{i}");
        let a = c
            .post(
                "/v1/orgs/acme/credits",
                json!({"amount": 10, "idempotency_key": key}),
            )
            .await;
        match a.status.as_u16() {
            200 => acked_keys.push(key),
            503 => {
                unknown_keys.push(key);
                refusal = Some(a);
                break;
            }
            other => panic!("purchase answered {other}: {}", a.text),
        }
        let ws = format!("ws-{i}");
        let a = c
            .post("/v1/orgs/acme/workspaces", json!({"workspace": ws}))
            .await;
        match a.status.as_u16() {
            201 => acked_workspaces.push(ws),
            503 => {
                refusal = Some(a);
                break;
            }
            other => panic!("workspace creation answered {other}: {}", a.text),
        }
    }
    let refusal = refusal.expect("the store never ran out of space");
    assert_eq!(
        refusal.error_code(),
        "store_unavailable",
        "{}",
        refusal.text
    );
    assert!(
        refusal.text.contains("No space left"),
        "the refusal names the cause: {}",
        refusal.text
    );

    // While the disk is full: not ready, with the reason; the error counted by kind.
    let (status, body) = ready_status(&p).await;
    assert_eq!(status, 503, "/readyz while the disk is full: {body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("No space left")
            || body["reason"].as_str().unwrap_or("").contains("free"),
        "{body}"
    );
    let text = c.metrics_text().await;
    assert!(
        metric(&text, "creditd_store_errors_total{kind=\"full\"}") >= 1.0,
        "{}",
        text.lines()
            .filter(|l| l.contains("store_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Debits the node's memory can decide are still decided.
    for _ in 0..20 {
        let a = c.debit("steady", "primary", 1).await;
        assert_eq!(a.status, 200, "debit from memory while full: {}", a.text);
        allowed += 1;
    }
    // A control-plane change is refused with the cause, and stays refused while full (the
    // store retries in the background, with backoff).
    let a = c
        .post(
            "/v1/orgs/acme/workspaces",
            json!({"workspace": "while-full"}),
        )
        .await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(a.error_code(), "store_unavailable");
    let (status, body) = ready_status(&p).await;
    assert_eq!(status, 503, "/readyz still full: {body}");

    // Space is freed: the node writes again without a restart.
    std::fs::remove_file(fs.mount.join("filler")).unwrap();
    eventually(
        Duration::from_secs(30),
        "/readyz 200 after space was freed",
        || async { ready_status(&p).await.0 == 200 },
    )
    .await;
    // Every purchase whose outcome was unknown is retried with its key: applied once.
    for key in &unknown_keys {
        let a = c
            .post(
                "/v1/orgs/acme/credits",
                json!({"amount": 10, "idempotency_key": key}),
            )
            .await;
        assert_eq!(a.status, 200, "retry of {key}: {}", a.text);
    }
    // The same keys again: replays, nothing added.
    for key in acked_keys.iter().chain(&unknown_keys) {
        let a = c
            .post(
                "/v1/orgs/acme/credits",
                json!({"amount": 10, "idempotency_key": key}),
            )
            .await;
        assert_eq!(a.status, 200, "replay of {key}: {}", a.text);
    }
    c.create_workspace("acme", "after").await;
    let view = c.org("acme").await;
    let keys = (acked_keys.len() + unknown_keys.len()) as u64;
    assert_eq!(
        view["purchased"].as_u64(),
        Some(10 * keys),
        "every keyed purchase exactly once: {view}"
    );
    let names: Vec<&str> = view["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["workspace"].as_str().unwrap())
        .collect();
    for ws in &acked_workspaces {
        assert!(
            names.contains(&ws.as_str()),
            "acknowledged {ws} lost: {view}"
        );
    }
    assert_conserved(&view);
    // Every allowed debit is charged exactly once once the settler catches up.
    eventually(
        Duration::from_secs(20),
        "steady's usage settled",
        || async { used(&c.org("steady").await, "primary") == allowed },
    )
    .await;
    let steady = c.org("steady").await;
    assert_conserved(&steady);
    assert_eq!(steady["used"].as_u64(), Some(allowed), "{steady}");

    // A clean stop, and the restart finds exactly what was acknowledged.
    let before = (c.org("acme").await, c.org("steady").await);
    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM after recovery: {status:?}");
    let p = Process::spawn(&data, &[]).await;
    let after = (p.client.org("acme").await, p.client.org("steady").await);
    assert_eq!(after, before, "state changed across the restart");
    assert_eq!(p.terminate().code(), Some(0));
}
