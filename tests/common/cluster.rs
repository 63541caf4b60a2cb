//! Several creditd processes on one Redis, for the multi-node tests.

use std::path::Path;

use super::{metric, Client, Process};

/// Settle interval of every node in these tests.
pub const SETTLE: &str = "100ms";

/// Starts one creditd process with node id `id` on the Redis at `url`.
pub async fn spawn_node(url: &str, id: &str, dir: &Path, extra: &[(&str, &str)]) -> Process {
    let mut env = vec![
        ("CREDITD_STORE", "redis"),
        ("CREDITD_REDIS_URL", url),
        ("CREDITD_NODE_ID", id),
        ("CREDITD_SETTLE_INTERVAL", SETTLE),
        ("CREDITD_LEASE_WAIT_MAX", "5s"),
    ];
    env.extend_from_slice(extra);
    Process::spawn(dir, &env).await
}

/// Starts `n` nodes, `node-0` … `node-{n-1}`, on one Redis.
pub async fn nodes(
    url: &str,
    n: usize,
    extra: &[(&str, &str)],
) -> (Vec<Process>, Vec<tempfile::TempDir>) {
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().unwrap();
        procs.push(spawn_node(url, &node_id(i), dir.path(), extra).await);
        dirs.push(dir);
    }
    (procs, dirs)
}

pub fn node_id(i: usize) -> String {
    format!("node-{i}")
}

pub fn clients(procs: &[Process]) -> Vec<Client> {
    procs.iter().map(|p| p.client.clone()).collect()
}

/// Reads one metric (summed over its series) from a node.
pub async fn metric_of(c: &Client, name: &str) -> f64 {
    metric(&c.metrics_text().await, name)
}
