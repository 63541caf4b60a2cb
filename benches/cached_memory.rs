//! Memory of cached workspaces on one node (issue #14, "many accounts"): imports ORGS orgs of
//! WORKSPACES workspaces each into an embedded store, starts a node on it, debits every
//! workspace once (which loads its org and caches its account), and prints the process's
//! resident memory at each step and the bytes per cached workspace. Not a criterion bench: it
//! measures bytes, once.
//!
//!   cargo bench --bench cached_memory                  # ORGS=100 WORKSPACES=1000
//!   ORGS=1000 WORKSPACES=1000 cargo bench --bench cached_memory
//!
//! With `EXPORT_TO=FILE` it writes the generated orgs as an export instead (the format of
//! `creditd export`), for `creditd import` into another store: `benches/load/many_accounts.sh`
//! loads a Redis with it.

use std::sync::Arc;
use std::time::Instant;

use creditd::config::Config;
use creditd::model::{Amount, Mode, NodeId, OrgId, OrgRecord, WorkspaceId};
use creditd::node::{Node, NodeOptions};
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore};
use creditd::store::export::OrgDump;
use creditd::store::Store;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of this process, in bytes (`VmRSS` of /proc/self/status).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// An org in budget mode whose Primary gave each workspace 1,000 credits.
fn record(org: &OrgId, workspaces: usize) -> OrgRecord {
    let primary = WorkspaceId::parse("primary", "primary").unwrap();
    let (mut r, _) = OrgRecord::new(org.clone(), Mode::Budget, primary.clone());
    let each = 1_000u64;
    r.purchase(Amount::new(each * workspaces as u64 + 1).unwrap())
        .unwrap();
    for i in 0..workspaces {
        let ws = WorkspaceId::parse(&format!("ws-{i:06}"), "workspace").unwrap();
        r.create_workspace(ws.clone()).unwrap();
        r.transfer(&primary, &ws, Amount::new(each).unwrap())
            .unwrap();
    }
    r
}

fn main() {
    let orgs = env("ORGS", 100);
    let workspaces = env("WORKSPACES", 1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Every org's Primary is an account too: room for all of them.
    let config = Config {
        accounts_max: (orgs * (workspaces + 1)).max(Config::default().accounts_max),
        ..Config::default()
    };
    rt.block_on(async {
        let open = || {
            let options = EmbeddedOptions {
                idempotency_keys_max: config.idempotency_keys_max,
                idempotency_ttl: config.idempotency_ttl,
                ledger_retain: config.ledger_retain,
                ..EmbeddedOptions::default()
            };
            Arc::new(EmbeddedStore::open(dir.path(), options).unwrap())
        };
        let store = open();
        let started = Instant::now();
        for o in 0..orgs {
            let org = OrgId::parse(&format!("org-{o:05}"), "org").unwrap();
            let dump = OrgDump {
                record: record(&org, workspaces),
                ledger_trimmed: 0,
                ledger: Vec::new(),
                keys: Vec::new(),
            };
            store.import_org(&dump).await.unwrap();
        }
        println!(
            "imported {orgs} orgs x {workspaces} workspaces in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if let Ok(path) = std::env::var("EXPORT_TO") {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            creditd::store::export::export(&*store, &mut out)
                .await
                .unwrap();
            std::io::Write::flush(&mut out).unwrap();
            println!("exported to {path}");
            return;
        }
        drop(store);
        // A fresh store and node, as a restarted process would have: what the import built in
        // memory is gone.
        let store: Arc<dyn Store> = open();
        let opened = rss();
        println!("rss_after_store_open_bytes {opened}");
        let node = Node::start(
            store,
            NodeId::parse("bench", "node_id").unwrap(),
            NodeOptions::from_config(&config),
        )
        .await
        .unwrap();
        let started = Instant::now();
        let one = Amount::new(1).unwrap();
        for o in 0..orgs {
            let org = format!("org-{o:05}");
            for i in 0..workspaces {
                let ws = format!("ws-{i:06}");
                node.debit(&org, &ws, one).await.unwrap();
            }
        }
        let cached = rss();
        let n = (orgs * workspaces) as u64;
        println!(
            "cached {n} workspaces (one debit each) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        println!("rss_after_caching_bytes {cached}");
        println!(
            "bytes_per_cached_workspace {}",
            cached.saturating_sub(opened) / n.max(1)
        );
        println!(
            "projected_rss_for_1m_workspaces_mb {}",
            (opened + (cached.saturating_sub(opened) / n.max(1)) * 1_000_000) >> 20
        );
        node.stop(std::time::Duration::from_secs(60)).await.unwrap();
    });
}
