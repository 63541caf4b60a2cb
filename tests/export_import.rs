//! Backups and moving between stores, through the real binary: `creditd export` of an embedded
//! store, `creditd import` into a real 3-master Redis Cluster, a standalone Redis, and back into
//! a new embedded store, each export identical to the first (byte for byte, lines sorted) and the org views
//! and idempotency keys equal; `creditd backup` of a node under load restores (`creditd
//! restore`) to a state where every org is conserved; a non-empty target and a bad file are
//! refused and change nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::{RedisCluster, RedisServer};
use common::{assert_conserved, binary, run_bounded, Finished, Process, TOKEN};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs `creditd args…` with exactly `env` (plus PATH), bounded.
fn creditd(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(cmd, None, LIMIT, &format!("creditd {args:?}"))
}

fn ok(done: &Finished, what: &str) {
    assert_eq!(
        done.status.code(),
        Some(0),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        done.status,
        done.stdout,
        done.stderr
    );
}

/// A store as the data commands name it.
enum Store<'a> {
    Embedded(&'a Path),
    Redis(&'a str),
}

/// `creditd import` (from `file`) or `creditd export` (to `file`) on `store`.
fn data_command(verb: &str, store: Store<'_>, file: &Path) -> Finished {
    let file = p(file);
    let (kind, flag, at) = match store {
        Store::Embedded(dir) => ("embedded", "--data-dir", p(dir)),
        Store::Redis(url) => ("redis", "--redis-url", url.to_string()),
    };
    let direction = if verb == "import" { "--from" } else { "--to" };
    creditd(&[verb, "--store", kind, flag, &at, direction, &file], &[])
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

async fn keyed(c: &common::Client, path: &str, body: Value) -> common::Answer {
    let a = c.post(path, body).await;
    assert_eq!(a.status, 200, "{path}: {}", a.text);
    a
}

/// Orgs in every shape: both modes, keyed purchases and transfers, a deletion, a mode
/// switch, debits and a committed reservation.
async fn populate(c: &common::Client) {
    c.create_org("acme", "budget").await;
    keyed(
        c,
        "/v1/orgs/acme/credits",
        json!({"amount": 10_000, "idempotency_key": "order-1"}),
    )
    .await;
    for ws in ["ws-a", "ws-b", "ws-c"] {
        c.create_workspace("acme", ws).await;
    }
    keyed(
        c,
        "/v1/orgs/acme/transfers",
        json!({"from": "primary", "to": "ws-a", "amount": 2_000, "idempotency_key": "t-1"}),
    )
    .await;
    let a = c.transfer("acme", "primary", "ws-b", 3_000).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = c.transfer("acme", "primary", "ws-c", 500).await;
    assert_eq!(a.status, 200, "{}", a.text);
    for _ in 0..7 {
        assert_eq!(c.debit("acme", "ws-a", 11).await.status, 200);
    }
    let r = c.reserve("acme", "ws-b", 300, 600_000).await;
    assert_eq!(c.commit(&r, 120).await.status, 200);
    let a = c.delete("/v1/orgs/acme/workspaces/ws-c").await;
    assert_eq!(a.status, 200, "{}", a.text);

    c.create_org("globex", "budget").await;
    c.purchase("globex", 777).await;
    c.create_workspace("globex", "team").await;
    let a = c.transfer("globex", "primary", "team", 700).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(c.debit("globex", "team", 5).await.status, 200);
    c.set_mode("globex", "shared").await;

    c.create_org("initech", "shared").await;
}

const ORGS: [&str; 3] = ["acme", "globex", "initech"];

async fn views(c: &common::Client) -> Vec<Value> {
    let mut out = Vec::new();
    for org in ORGS {
        out.push(c.org(org).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_a_redis_cluster_and_back_keeps_every_line() {
    let root = tempfile::tempdir().unwrap();
    let embedded = root.path().join("embedded");
    let node = Process::spawn(&embedded, &[]).await;
    populate(&node.client).await;
    let before = views(&node.client).await;
    let ledger_before = node.client.ledger_all("acme").await;
    // A running node has its file open: `export` says so and points to `backup`.
    let busy = root.path().join("busy.jsonl");
    let done = data_command("export", Store::Embedded(&embedded), &busy);
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr.contains("in use") && done.stderr.contains("creditd backup"),
        "{}",
        done.stderr
    );
    assert!(!busy.exists());
    assert_eq!(node.terminate().code(), Some(0));

    // Embedded → file.
    let first = root.path().join("first.jsonl");
    let done = data_command("export", Store::Embedded(&embedded), &first);
    ok(&done, "export of the embedded store");
    let lines = sorted_lines(&first);
    assert!(
        lines.iter().any(|l| l.contains("\"key\":\"order-1\"")),
        "live idempotency keys are exported"
    );

    // File → Redis Cluster; a second import is refused and changes nothing.
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let done = data_command("import", Store::Redis(&url), &first);
    ok(&done, "import into the cluster");
    let done = data_command("import", Store::Redis(&url), &first);
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr.contains("already holds 3 org"),
        "{}",
        done.stderr
    );

    // Redis Cluster → file: the same lines.
    let second = root.path().join("second.jsonl");
    let done = data_command("export", Store::Redis(&url), &second);
    ok(&done, "export of the cluster");
    assert_eq!(sorted_lines(&second), lines, "cluster export differs");

    // The same through a standalone Redis (one master to SCAN).
    let standalone = RedisServer::start();
    let done = data_command("import", Store::Redis(&standalone.url()), &second);
    ok(&done, "import into a standalone redis");
    let via_standalone = root.path().join("standalone.jsonl");
    let done = data_command("export", Store::Redis(&standalone.url()), &via_standalone);
    ok(&done, "export of the standalone redis");
    assert_eq!(
        sorted_lines(&via_standalone),
        lines,
        "standalone export differs"
    );

    // And back: file → a new embedded store → file: the same lines.
    let back = root.path().join("back");
    let done = data_command("import", Store::Embedded(&back), &second);
    ok(&done, "import back into an embedded store");
    let third = root.path().join("third.jsonl");
    let done = data_command("export", Store::Embedded(&back), &third);
    ok(&done, "export of the new embedded store");
    assert_eq!(sorted_lines(&third), lines, "round-tripped export differs");

    // A node on the cluster shows the same orgs and ledger, and honours the old keys.
    let redis_node = Process::spawn(
        &root.path().join("unused"),
        &[
            ("CREDITD_STORE", "redis"),
            ("CREDITD_REDIS_URL", &url),
            ("CREDITD_NODE_ID", "gw-1"),
        ],
    )
    .await;
    let c = &redis_node.client;
    assert_eq!(views(c).await, before, "org views on the cluster");
    assert_eq!(c.ledger_all("acme").await, ledger_before, "acme's ledger");
    let replay = keyed(
        c,
        "/v1/orgs/acme/credits",
        json!({"amount": 10_000, "idempotency_key": "order-1"}),
    )
    .await;
    assert_eq!(
        replay.body["purchased"], before[0]["purchased"],
        "{}",
        replay.text
    );
    let a = c
        .post(
            "/v1/orgs/acme/credits",
            json!({"amount": 5, "idempotency_key": "order-1"}),
        )
        .await;
    assert_eq!(a.status, 409, "same key, other request: {}", a.text);
    assert_eq!(c.org("acme").await["purchased"], before[0]["purchased"]);
    // Work done on Redis (ledger entries and a key written by its scripts) moves back too.
    keyed(
        c,
        "/v1/orgs/acme/credits",
        json!({"amount": 50, "idempotency_key": "order-2"}),
    )
    .await;
    let a = c.transfer("acme", "primary", "ws-a", 10).await;
    assert_eq!(a.status, 200, "{}", a.text);
    for _ in 0..3 {
        assert_eq!(c.debit("acme", "ws-a", 2).await.status, 200);
    }
    assert_eq!(redis_node.terminate().code(), Some(0));
    let redis_node = Process::spawn(
        &root.path().join("unused"),
        &[
            ("CREDITD_STORE", "redis"),
            ("CREDITD_REDIS_URL", &url),
            ("CREDITD_NODE_ID", "gw-1"),
        ],
    )
    .await;
    let on_redis = views(&redis_node.client).await;
    let ledger_on_redis = redis_node.client.ledger_all("acme").await;
    assert_eq!(redis_node.terminate().code(), Some(0));
    let fourth = root.path().join("fourth.jsonl");
    let done = data_command("export", Store::Redis(&url), &fourth);
    ok(&done, "export of the cluster after work on it");
    let again = root.path().join("again");
    let done = data_command("import", Store::Embedded(&again), &fourth);
    ok(&done, "import of the cluster's work into an embedded store");
    let node = Process::spawn(&again, &[]).await;
    let c = &node.client;
    assert_eq!(views(c).await, on_redis, "org views moved from the cluster");
    assert_eq!(c.ledger_all("acme").await, ledger_on_redis, "acme's ledger");
    let replay = keyed(
        c,
        "/v1/orgs/acme/credits",
        json!({"amount": 50, "idempotency_key": "order-2"}),
    )
    .await;
    assert_eq!(
        replay.body["purchased"], on_redis[0]["purchased"],
        "{}",
        replay.text
    );
    assert_eq!(c.org("acme").await["purchased"], on_redis[0]["purchased"]);
    assert_eq!(node.terminate().code(), Some(0));

    // The embedded store the export went back into serves the same views.
    let node = Process::spawn(&back, &[]).await;
    assert_eq!(
        views(&node.client).await,
        before,
        "org views after the way back"
    );
    assert_eq!(node.terminate().code(), Some(0));
}

/// `GET /v1/orgs/{org}/ledger` from cursor 0: the page and its `trimmed`.
async fn first_page(c: &common::Client, org: &str) -> (Vec<Value>, u64) {
    let a = c.get(&format!("/v1/orgs/{org}/ledger?limit=1000")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let trimmed = a.body["trimmed"]
        .as_u64()
        .expect("a ledger page says what was trimmed");
    (a.body["entries"].as_array().unwrap().clone(), trimmed)
}

fn seqs(entries: &[Value]) -> Vec<u64> {
    entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// A node keeping 10 ledger entries per org (`CREDITD_LEDGER_RETAIN`) trims its ledger; the
/// export carries the kept entries and the trimmed count; Redis and a new embedded store
/// import it with the same numbering and export the same lines; the next entry on Redis takes
/// the next seq; and an import into a store that keeps fewer trims as an append would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_ledger_moves_with_its_numbering() {
    let root = tempfile::tempdir().unwrap();
    let embedded = root.path().join("embedded");
    let keep10 = [("CREDITD_LEDGER_RETAIN", "10")];
    let node = Process::spawn(&embedded, &keep10).await;
    let c = &node.client;
    c.create_org("acme", "shared").await;
    for _ in 0..30 {
        c.purchase("acme", 3).await;
    }
    // 31 entries, trimmed back to 10 whenever 12 are kept (2 at a time from seq 12 on): 20
    // trimmed, 21 to 31 kept.
    let (entries, trimmed) = first_page(c, "acme").await;
    assert_eq!(trimmed, 20);
    assert_eq!(seqs(&entries), (21..=31).collect::<Vec<_>>());
    let a = c.get("/v1/orgs/acme/ledger?limit=2&after=5").await;
    assert_eq!(seqs(a.body["entries"].as_array().unwrap()), vec![21, 22]);
    assert_eq!(a.body["next"], 22);
    assert_eq!(
        c.org("acme").await["purchased"],
        90,
        "the totals still count them"
    );
    let before = c.org("acme").await;
    assert_eq!(node.terminate().code(), Some(0));

    let first = root.path().join("first.jsonl");
    ok(
        &data_command("export", Store::Embedded(&embedded), &first),
        "export of the trimmed store",
    );
    let lines = sorted_lines(&first);
    assert!(
        lines.iter().any(|l| l.contains("\"ledger_trimmed\":20")),
        "the org line carries the count: {lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"line\":\"ledger\""))
            .count(),
        11
    );

    // Into Redis and back out: the same lines; and a new embedded store the same.
    let server = RedisServer::start();
    let url = server.url();
    ok(
        &data_command("import", Store::Redis(&url), &first),
        "import into redis",
    );
    let second = root.path().join("second.jsonl");
    ok(
        &data_command("export", Store::Redis(&url), &second),
        "export of redis",
    );
    assert_eq!(sorted_lines(&second), lines, "redis export differs");
    let back = root.path().join("back");
    ok(
        &data_command("import", Store::Embedded(&back), &second),
        "import back",
    );
    let third = root.path().join("third.jsonl");
    ok(
        &data_command("export", Store::Embedded(&back), &third),
        "export back",
    );
    assert_eq!(sorted_lines(&third), lines, "round-tripped export differs");

    // A node on Redis serves the same page and numbers on from it.
    let redis_node = Process::spawn(
        &root.path().join("unused"),
        &[
            ("CREDITD_STORE", "redis"),
            ("CREDITD_REDIS_URL", &url),
            ("CREDITD_NODE_ID", "gw-1"),
            keep10[0],
        ],
    )
    .await;
    let c = &redis_node.client;
    assert_eq!(c.org("acme").await, before);
    assert_eq!(first_page(c, "acme").await, (entries.clone(), 20));
    c.purchase("acme", 1).await;
    let (after, trimmed) = first_page(c, "acme").await;
    assert_eq!(
        (trimmed, *seqs(&after).last().unwrap()),
        (22, 32),
        "trimmed at 12 kept"
    );
    assert_eq!(redis_node.terminate().code(), Some(0));

    // Into a store that keeps 3: trimmed on import as an append would trim it.
    let small = root.path().join("small");
    let done = creditd(
        &[
            "import",
            "--store",
            "embedded",
            "--data-dir",
            &p(&small),
            "--from",
            &p(&first),
        ],
        &[("CREDITD_LEDGER_RETAIN", "3")],
    );
    ok(&done, "import into a store keeping 3");
    let node = Process::spawn(&small, &[("CREDITD_LEDGER_RETAIN", "3")]).await;
    let (kept, trimmed) = first_page(&node.client, "acme").await;
    assert_eq!((trimmed, seqs(&kept)), (28, vec![29, 30, 31]));
    assert_eq!(node.client.org("acme").await, before);
    assert_eq!(node.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_to_a_conserved_state() {
    let root = tempfile::tempdir().unwrap();
    let live = root.path().join("live");
    let node = Process::spawn(&live, &[]).await;
    let c = node.client.clone();
    populate(&c).await;

    // Load: debits and transfers back and forth, until told to stop (bounded anyway).
    let stop = Arc::new(AtomicBool::new(false));
    let allowed = Arc::new(AtomicU64::new(0));
    let load = {
        let (c, stop, allowed) = (c.clone(), Arc::clone(&stop), Arc::clone(&allowed));
        tokio::spawn(async move {
            for i in 0..5_000u64 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if c.debit("acme", "ws-a", 1).await.status == 200 {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
                if c.debit("globex", "team", 1).await.status == 200 {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
                let (from, to) = if i % 2 == 0 {
                    ("primary", "ws-b")
                } else {
                    ("ws-b", "primary")
                };
                let a = c.transfer("acme", from, to, 3).await;
                assert!(a.status == 200 || a.status == 402, "{}", a.text);
            }
        })
    };
    // Some load before the backup, some during it.
    common::eventually(Duration::from_secs(20), "load under way", || async {
        allowed.load(Ordering::Relaxed) >= 50
    })
    .await;
    let backup = root.path().join("backup.jsonl");
    let url = format!("http://{}", node.addr);
    let args = ["backup", "--url", url.as_str(), "--to", &p(&backup)];
    let done = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            creditd(&args, &[("CREDITD_ADMIN_TOKEN", TOKEN)])
        }
    })
    .await
    .unwrap();
    ok(&done, "backup under load");
    stop.store(true, Ordering::Release);
    load.await.unwrap();
    let final_views = views(&c).await;
    assert_eq!(node.terminate().code(), Some(0));

    // Without the token the node refuses, and nothing is written.
    let refused = root.path().join("refused.jsonl");
    let node = Process::spawn(&live, &[]).await;
    let url = format!("http://{}", node.addr);
    let done = creditd(&["backup", "--url", &url, "--to", &p(&refused)], &[]);
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(done.stderr.contains("unauthorized"), "{}", done.stderr);
    assert!(!refused.exists());
    assert_eq!(node.terminate().code(), Some(0));

    // A damaged copy of the backup is refused before anything is written.
    let restored = root.path().join("restored");
    let bad = root.path().join("bad.jsonl");
    let text = std::fs::read_to_string(&backup).unwrap();
    let broken = text.replacen("\"purchased\":10000", "\"purchased\":10001", 1);
    assert_ne!(broken, text, "the backup has acme's purchase");
    std::fs::write(&bad, broken).unwrap();
    let done = creditd(
        &["restore", "--data-dir", &p(&restored), "--from", &p(&bad)],
        &[],
    );
    assert_eq!(done.status.code(), Some(65), "{}", done.stderr);
    assert!(
        done.stderr.contains("org acme") && done.stderr.contains("not conserved"),
        "{}",
        done.stderr
    );

    // The backup restores into an empty store, which `check` passes...
    let done = creditd(
        &[
            "restore",
            "--data-dir",
            &p(&restored),
            "--from",
            &p(&backup),
        ],
        &[],
    );
    ok(&done, "restore");
    let done = creditd(&["check", "--data-dir", &p(&restored)], &[]);
    ok(&done, "check of the restored store");
    // ...and not into a non-empty one.
    let done = creditd(
        &[
            "restore",
            "--data-dir",
            &p(&restored),
            "--from",
            &p(&backup),
        ],
        &[],
    );
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);

    // Every org is conserved, nothing was invented: what was bought is what was bought, and
    // no more was used than by the end of the load.
    let node = Process::spawn(&restored, &[]).await;
    let restored_views = views(&node.client).await;
    for (r, f) in restored_views.iter().zip(&final_views) {
        assert_conserved(r);
        assert_eq!(r["purchased"], f["purchased"], "{r}");
        assert!(r["used"].as_u64() <= f["used"].as_u64(), "{r} vs {f}");
        assert_eq!(r["held"], 0, "{r}");
    }
    // The restored node works.
    let a = node.client.debit("acme", "primary", 1).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(node.terminate().code(), Some(0));
}
