//! Issue #11 [exact], each numbered case as a test against real creditd processes sharing one
//! real `redis-server`: the interleavings the rest of the suite does not walk, where the
//! promises "never more than given" and "spendable to the last credit" must still hold.
//!
//! 1. Mode flapping under load: no usage while a workspace has no budget.
//! 2. A node frozen (SIGSTOP) past `lease_ttl`: nothing stranded, nothing lost.
//! 3. Redis restarted from older data (lost acknowledged writes, a node epoch reused): no
//!    overspend beyond the credits the lost writes handed out, and the nodes keep working.
//! 4. A workspace deleted while another node holds a reservation of it, then recreated under
//!    the same name: the old reservation never reaches the new workspace.
//! 5. Two nodes recalling the same org at once: both changes succeed.
//!
//! Every wait polls a condition with a deadline; every loop is bounded in count and time.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{clients, metric_of, node_id, nodes, spawn_node};
use common::redis::RedisServer;
use common::signal;
use common::{assert_conserved, balance, eventually, workspace, Client, Process};
use serde_json::{json, Value};

/// Longest any test's background load runs, whatever happens.
const LOAD_MAX: Duration = Duration::from_secs(240);
/// The org of every test.
const ORG: &str = "acme";

// ---------------------------------------------------------------------------------------------
// Harness

/// A creditd process frozen with SIGSTOP (a long GC pause, a VM stall); thawed with SIGCONT
/// when dropped, so a failing test never leaves a stopped process behind.
struct Frozen {
    pid: u32,
    thawed: bool,
}

impl Frozen {
    fn freeze(p: &Process) -> Frozen {
        let pid = p.child.id();
        signal(pid, "-STOP");
        Frozen { pid, thawed: false }
    }

    fn thaw(mut self) {
        signal(self.pid, "-CONT");
        self.thawed = true;
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = std::process::Command::new("kill")
                .arg("-CONT")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

/// What one node answered to the load's debits.
#[derive(Default)]
struct Counts {
    allowed: AtomicU64,
    refused: AtomicU64,
    unavailable: AtomicU64,
}

impl Counts {
    fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }
    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Background debits of 1 credit: each target is (node index, client, workspace), one task
/// per target, counted per node index. `200`, `402` and `503` are counted; any other answer
/// fails the test. A connection refused (a node killed on purpose) ends that task.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        counts: &Arc<Vec<Counts>>,
        targets: Vec<(usize, Client, &str)>,
        pace: Option<Duration>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = targets
            .into_iter()
            .map(|(n, c, ws)| {
                let ws = ws.to_string();
                let (stop, counts) = (Arc::clone(&stop), Arc::clone(counts));
                tokio::spawn(async move {
                    let deadline = Instant::now() + LOAD_MAX;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let Some(a) = c.try_debit(ORG, &ws, 1).await else {
                            return;
                        };
                        let counter = match a.status.as_u16() {
                            200 => &counts[n].allowed,
                            402 => &counts[n].refused,
                            503 => &counts[n].unavailable,
                            s => panic!("debit of {ws} on node {n}: unexpected {s}: {}", a.text),
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        if let Some(p) = pace {
                            tokio::time::sleep(p).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("load task ended in time")
                .expect("load task");
        }
    }
}

fn new_counts(n: usize) -> Arc<Vec<Counts>> {
    Arc::new((0..n).map(|_| Counts::default()).collect())
}

fn total_allowed(counts: &[Counts]) -> u64 {
    counts.iter().map(Counts::allowed).sum()
}

/// Polls the org view on `c` until `used` equals `want`; returns the last view and whether it
/// got there within `limit` (other nodes' usage reaches the store within a settle interval).
async fn settled_view(c: &Client, want: u64, limit: Duration) -> (Value, bool) {
    let deadline = Instant::now() + limit;
    loop {
        let view = c.org(ORG).await;
        if view["used"].as_u64() == Some(want) {
            return (view, true);
        }
        if Instant::now() >= deadline {
            return (view, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The org view on `c`; a `503` (the node's store connection broken by a Redis restart, the
/// first call after it fails) is retried, for at most 10 s.
async fn org_view(c: &Client) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = c.get(&format!("/v1/orgs/{ORG}")).await;
        if a.status == 200 {
            return a.body;
        }
        assert!(
            a.status == 503 && Instant::now() < deadline,
            "org view: {} {}",
            a.status,
            a.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Sum of ledger `amount`s of entries of `kind` matching `pred`.
fn ledger_sum(ledger: &[Value], kind: &str, pred: impl Fn(&Value) -> bool) -> u64 {
    ledger
        .iter()
        .filter(|e| e["kind"] == kind && pred(e))
        .map(|e| n(&e["amount"]))
        .sum()
}

/// Debits 1 on every client once per round until every node refuses `ws` (`402`) and the
/// org view shows `ws` empty (balance 0, held 0): the budget was spent to its last credit.
/// Fails, naming what is stranded, when every node keeps refusing while the view still shows
/// credits (`stranded_rounds` rounds in a row, a round every 100 ms), or after `limit`.
/// Returns the debits allowed meanwhile, per client.
async fn drain_to_zero(cs: &[Client], ws: &str, stranded_rounds: u32, limit: Duration) -> Vec<u64> {
    let deadline = Instant::now() + limit;
    let mut allowed = vec![0u64; cs.len()];
    let mut refusing = 0u32;
    let mut last_answers = vec![String::new(); cs.len()];
    for _round in 0..100_000 {
        let mut all_refuse = true;
        for (i, c) in cs.iter().enumerate() {
            let a = c.debit(ORG, ws, 1).await;
            last_answers[i] = format!("node-{i}: {} {}", a.status.as_u16(), a.text);
            match a.status.as_u16() {
                200 => {
                    allowed[i] += 1;
                    all_refuse = false;
                }
                402 => {}
                // A node waiting on a recall: not a refusal yet.
                503 => all_refuse = false,
                s => panic!("debit on node {i}: unexpected {s}: {}", a.text),
            }
        }
        if all_refuse {
            let view = org_view(&cs[0]).await;
            let w = workspace(&view, ws);
            if n(&w["balance"]) == 0 && n(&w["held"]) == 0 {
                return allowed;
            }
            refusing += 1;
            assert!(
                refusing < stranded_rounds,
                "stranded: every node refused {ws} for {refusing} rounds in a row (over \
                 {}ms), but the org view still shows {ws} with balance {} and held {}: \
                 credits no node will ever spend: {view}",
                refusing * 100,
                n(&w["balance"]),
                n(&w["held"]),
            );
        } else {
            refusing = 0;
        }
        if Instant::now() >= deadline {
            panic!(
                "{ws} not drained within {limit:?}: the nodes neither spend it nor refuse it; \
                 last answers: {}; org view: {}",
                last_answers.join(" | "),
                org_view(&cs[0]).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{ws} not drained in 100,000 rounds");
}

/// Runs `targets` (one task each, unpaced) until the org view on `view_on` shows at most 20
/// credits left in `ws`, every node has refused `ws` at least 5 times since the start, or no
/// node has allowed a debit for 3 s: what is then left, if anything, is for
/// [`drain_to_zero`] to judge.
async fn spend_down(
    counts: &Arc<Vec<Counts>>,
    targets: Vec<(usize, Client, &str)>,
    view_on: &Client,
    ws: &str,
    limit: Duration,
) {
    let nodes: Vec<usize> = targets.iter().map(|t| t.0).collect();
    let since: Vec<u64> = counts.iter().map(Counts::refused).collect();
    let load = Load::start(counts, targets, None);
    let deadline = Instant::now() + limit;
    let mut progress = (total_allowed(counts), Instant::now());
    loop {
        let all_refused = nodes.iter().all(|&i| counts[i].refused() >= since[i] + 5);
        let allowed = total_allowed(counts);
        if allowed != progress.0 {
            progress = (allowed, Instant::now());
        }
        let stalled = progress.1.elapsed() > Duration::from_secs(3);
        if all_refused || stalled || balance(&org_view(view_on).await, ws) <= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ws} not spent down within {limit:?}: {}",
            org_view(view_on).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 1. Mode flapping

/// Per workspace in `wss`: the usage the ledger records while the org was in budget mode,
/// beyond what the workspace was given in that same period (transfers to it). The mode is
/// followed entry by entry from `org_created` through every `mode_changed`. Returns the
/// overspent credits and a description of each offending period.
///
/// Why any such usage is an overspend, even usage debited just before the switch: the store
/// applies shared → budget only when no node holds a lease of the Primary (`apply.lua`,
/// `leases_outstanding`), and a settle line can only consume from a lease the store records.
/// So usage settled after the switch was paid from a lease granted after it: for ws-a and
/// ws-b, whose budgets are 0, a Primary lease spent by a node that had not applied the switch.
/// (The load uses /v1/debit only: no reservation can be committed across a switch.)
fn budget_period_overspend(ledger: &[Value], wss: &[&str]) -> (u64, Vec<String>) {
    let mut mode = String::new();
    let mut period = 0usize;
    // Per (period, workspace): (given, used, first offending entry).
    let mut tally: BTreeMap<(usize, String), (u64, u64, Option<String>)> = BTreeMap::new();
    for e in ledger {
        match e["kind"].as_str().unwrap_or("") {
            "org_created" => mode = e["mode"].as_str().unwrap_or("").to_string(),
            "mode_changed" => {
                mode = e["to"].as_str().unwrap_or("").to_string();
                period += 1;
            }
            "transfer" if mode == "budget" => {
                let to = e["to"].as_str().unwrap_or("");
                if wss.contains(&to) {
                    tally.entry((period, to.to_string())).or_default().0 += n(&e["amount"]);
                }
            }
            "usage" if mode == "budget" => {
                let ws = e["workspace"].as_str().unwrap_or("");
                if wss.contains(&ws) {
                    let t = tally.entry((period, ws.to_string())).or_default();
                    t.1 += n(&e["amount"]);
                    if t.1 > t.0 && t.2.is_none() {
                        t.2 = Some(e.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let mut over = 0;
    let mut periods = Vec::new();
    for ((period, ws), (given, used, first)) in tally {
        if used > given {
            over += used - given;
            periods.push(format!(
                "budget period #{period}: {ws} used {used} with {given} given; first: {}",
                first.unwrap_or_default()
            ));
        }
    }
    (over, periods)
}

/// `PUT /v1/orgs/acme/mode`; a `503` (a recall that did not converge in time on a slow
/// machine) is retried, at most 3 times, and reported.
async fn switch_mode(c: &Client, mode: &str) {
    for attempt in 1..=3 {
        let a = c
            .put(&format!("/v1/orgs/{ORG}/mode"), json!({"mode": mode}))
            .await;
        match a.status.as_u16() {
            200 => return,
            503 if attempt < 3 => {
                eprintln!(
                    "switch to {mode}: 503 on attempt {attempt}, retrying: {}",
                    a.text
                )
            }
            s => panic!("switch to {mode}: {s}: {}", a.text),
        }
    }
}

/// Switches to budget and back in the mode-flapping test.
const FLIPS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_flapping_under_load_never_lets_a_workspace_spend_without_a_budget() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 3, &[("CREDITD_RECALL_WAIT_MAX", "5s")]).await;
    let cs = clients(&procs);
    let (a, b, c) = (&cs[0], &cs[1], &cs[2]);
    // Shared mode, every credit in the Primary; ws-a and ws-b have no budget of their own.
    a.create_org(ORG, "shared").await;
    a.purchase(ORG, 1_000_000).await;
    a.create_workspace(ORG, "ws-a").await;
    a.create_workspace(ORG, "ws-b").await;

    // B and C debit ws-a and ws-b continuously (only /v1/debit: no reservation can be open
    // across a switch, so every `usage` entry is a debit's).
    let counts = new_counts(3);
    let load = Load::start(
        &counts,
        vec![
            (1, b.clone(), "ws-a"),
            (1, b.clone(), "ws-b"),
            (2, c.clone(), "ws-a"),
            (2, c.clone(), "ws-b"),
        ],
        None,
    );
    let flowing = |since: [u64; 2], more: u64| {
        let counts = Arc::clone(&counts);
        move || {
            let ok =
                counts[1].allowed() >= since[0] + more && counts[2].allowed() >= since[1] + more;
            async move { ok }
        }
    };
    eventually(
        Duration::from_secs(30),
        "B and C spend in shared mode",
        flowing([0, 0], 20),
    )
    .await;

    // A flips the org to budget and back, FLIPS times (the ten flips catch the bug
    // in about one run in two; each flip is a fresh chance). Each budget period lasts until B
    // and C have both refused a debit (they apply the switch); each shared period until both
    // spend again.
    for _ in 0..FLIPS {
        switch_mode(a, "budget").await;
        let since = [counts[1].refused(), counts[2].refused()];
        let counts2 = Arc::clone(&counts);
        eventually(
            Duration::from_secs(30),
            "B and C refuse in budget mode",
            move || {
                let ok = counts2[1].refused() > since[0] && counts2[2].refused() > since[1];
                async move { ok }
            },
        )
        .await;
        switch_mode(a, "shared").await;
        let since = [counts[1].allowed(), counts[2].allowed()];
        eventually(
            Duration::from_secs(30),
            "B and C spend again in shared mode",
            flowing(since, 20),
        )
        .await;
    }
    load.finish().await;
    let allowed = total_allowed(&counts);

    let (view, settled) = settled_view(a, allowed, Duration::from_secs(20)).await;
    let ledger = a.ledger_all(ORG).await;
    let switches = ledger
        .iter()
        .filter(|e| e["kind"] == "mode_changed")
        .count();
    assert_eq!(switches, 2 * FLIPS, "every switch each way in the ledger");
    let (over, periods) = budget_period_overspend(&ledger, &["ws-a", "ws-b"]);
    assert_eq!(
        over,
        0,
        "overspend: ws-a/ws-b used {over} credits in budget mode with a budget of 0:\n{}",
        periods.join("\n")
    );
    assert_conserved(&view);
    assert!(
        settled,
        "every allowed debit recorded exactly once: clients saw {allowed} allowed, the org \
         view shows {} used: {view}",
        view["used"]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A node frozen past lease_ttl

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_lease_ttl_strands_nothing_and_loses_no_usage() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 3, &[("CREDITD_LEASE_TTL", "1s")]).await;
    let cs = clients(&procs);
    let (a, b, c) = (&cs[0], &cs[1], &cs[2]);
    // Two workspaces, each its own spender: two chances per run for the same interleaving.
    let wss = ["ws-a", "ws-b"];
    let budget = 2_000;
    common::budget_org(a, ORG, 2 * budget, &[("ws-a", budget), ("ws-b", budget)]).await;

    // B spends a little of each and holds leases of both.
    let counts = new_counts(3);
    for ws in wss {
        for _ in 0..5 {
            let d = b.debit(ORG, ws, 1).await;
            assert_eq!(d.status, 200, "{}", d.text);
            counts[1].allowed.fetch_add(1, Ordering::Relaxed);
        }
    }
    eventually(
        Duration::from_secs(10),
        "B holds a lease",
        move || async move { metric_of(b, "creditd_leased_credits").await > 0.0 },
    )
    .await;

    // B freezes; A and C keep spending until B's leases have expired in the store.
    let frozen = Frozen::freeze(&procs[1]);
    let load = Load::start(
        &counts,
        wss.iter()
            .flat_map(|ws| [(0, a.clone(), *ws), (2, c.clone(), *ws)])
            .collect(),
        None,
    );
    eventually(
        Duration::from_secs(30),
        "B's leases expired (lease_expired in the ledger)",
        move || async move {
            let ledger = a.ledger_all(ORG).await;
            wss.iter().all(|ws| {
                ledger.iter().any(|e| {
                    e["kind"] == "lease_expired" && e["node"] == "node-1" && e["workspace"] == *ws
                })
            })
        },
    )
    .await;
    // B wakes up, spends some of what it still believes it holds, and settles again (it
    // takes a new lease on top of the one it believes it still has), spends again in a burst;
    // then every node spends, until each workspace is nearly empty or all of them refuse.
    frozen.thaw();
    load.finish().await;
    let b_counts = &counts[1];
    let b_burst = |count: usize| async move {
        for _ in 0..count {
            for ws in wss {
                let d = b.debit(ORG, ws, 1).await;
                match d.status.as_u16() {
                    200 => {
                        b_counts.allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    402 | 503 => {}
                    s => panic!("debit of {ws} on B after its pause: {s}: {}", d.text),
                }
            }
        }
    };
    b_burst(60).await;
    let batches = metric_of(b, "creditd_settle_batches_total").await;
    eventually(
        Duration::from_secs(10),
        "B settles after its pause",
        move || async move { metric_of(b, "creditd_settle_batches_total").await >= batches + 2.0 },
    )
    .await;
    b_burst(100).await;
    for ws in wss {
        spend_down(
            &counts,
            vec![(0, a.clone(), ws), (1, b.clone(), ws), (2, c.clone(), ws)],
            a,
            ws,
            Duration::from_secs(60),
        )
        .await;
    }
    for ws in wss {
        let more = drain_to_zero(&cs, ws, 30, Duration::from_secs(30)).await;
        for (i, m) in more.iter().enumerate() {
            counts[i].allowed.fetch_add(*m, Ordering::Relaxed);
        }
    }
    let allowed = total_allowed(&counts);

    let view = a.org(ORG).await;
    assert_conserved(&view);
    for ws in wss {
        assert_eq!(balance(&view, ws), 0, "nothing stranded in {ws}: {view}");
    }
    assert!(
        allowed <= 2 * budget,
        "overspend: {allowed} allowed of {}",
        2 * budget
    );
    assert_eq!(
        view["used"],
        2 * budget,
        "the whole budget is consumed: {view}"
    );
    // Nothing silently lost: every debit a node allowed is in the ledger, as that node's usage
    // or inside a lease of it that expired (counted as consumed).
    let ledger = a.ledger_all(ORG).await;
    for i in 0..3 {
        let id = node_id(i);
        let usage = ledger_sum(&ledger, "usage", |e| e["node"] == id.as_str());
        let expired = ledger_sum(&ledger, "lease_expired", |e| e["node"] == id.as_str());
        assert!(
            counts[i].allowed() <= usage + expired,
            "{id} allowed {} debits but the ledger records only {usage} usage + {expired} \
             expired for it: its usage was dropped",
            counts[i].allowed()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Redis restarted from older data

/// `HGETALL key` on the Redis at `port`, as strings.
fn hgetall(port: u16, key: &str) -> BTreeMap<String, String> {
    fn text(v: &redis::Value) -> String {
        match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            redis::Value::Int(i) => i.to_string(),
            other => format!("{other:?}"),
        }
    }
    let value = common::redis::command(port, &["HGETALL", key])
        .unwrap_or_else(|e| panic!("HGETALL {key}: {e}"));
    match value {
        redis::Value::Array(items) => items
            .chunks(2)
            .map(|kv| (text(&kv[0]), text(&kv[1])))
            .collect(),
        redis::Value::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), text(v))).collect(),
        other => panic!("HGETALL {key}: unexpected {other:?}"),
    }
}

/// What the store holds for the org, read straight from Redis: the unleased balances, and
/// each node's leases.
#[derive(Debug)]
struct Raw {
    bal: u64,
    leases: BTreeMap<String, u64>,
}

fn read_raw(port: u16, node_ids: &[String]) -> Raw {
    let num = |s: &String| {
        s.parse::<u64>()
            .unwrap_or_else(|_| panic!("not a number: {s}"))
    };
    let bal = hgetall(port, &format!("creditd:{{{ORG}}}:bal"))
        .values()
        .map(num)
        .sum();
    let leases = node_ids
        .iter()
        .map(|id| {
            let h = hgetall(port, &format!("creditd:{{{ORG}}}:node:{id}"));
            let l: u64 = h
                .iter()
                .filter(|(k, _)| k.starts_with("l:"))
                .map(|(_, v)| num(v))
                .sum();
            (id.clone(), l)
        })
        .collect();
    Raw { bal, leases }
}

/// Copies the files of directory `from` into `to` (one level of subdirectories: Redis 7 keeps
/// its AOF as `appendonlydir/` with a manifest).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Blocks every write to the Redis at `port` (scripts included; reads still answer) for at
/// most 10 s, so that what is read and copied meanwhile is one consistent state.
fn pause_writes(port: u16) {
    common::redis::command(port, &["CLIENT", "PAUSE", "10000", "WRITE"]).expect("CLIENT PAUSE");
}

fn unpause(port: u16) {
    common::redis::command(port, &["CLIENT", "UNPAUSE"]).expect("CLIENT UNPAUSE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_older_data_overspends_at_most_what_the_lost_writes_granted() {
    let mut redis = RedisServer::start_persistent();
    let url = redis.url();
    let port = redis.port();
    let ids: Vec<String> = (0..2).map(node_id).collect();
    // lease_ttl 3s: heartbeats every second, so what a node believes the store has left is
    // never older than that.
    let extra = [("CREDITD_LEASE_TTL", "3s")];
    let (mut procs, dirs) = nodes(&url, 2, &extra).await;
    let purchased = 10_000;
    common::budget_org(&procs[0].client, ORG, purchased, &[("ws", purchased)]).await;
    let counts = new_counts(2);
    let targets = |procs: &[Process]| -> Vec<(usize, Client, &'static str)> {
        vec![
            (0, procs[0].client.clone(), "ws"),
            (1, procs[1].client.clone(), "ws"),
        ]
    };
    let pace = Some(Duration::from_millis(10));

    // Spend a little, then snapshot the store: S.
    let load = Load::start(&counts, targets(&procs), pace);
    eventually(
        Duration::from_secs(30),
        "some spending before the snapshot",
        || {
            let counts = Arc::clone(&counts);
            async move { total_allowed(&counts) >= 300 }
        },
    )
    .await;
    let snapshot = tempfile::tempdir().unwrap();
    pause_writes(port);
    let s = read_raw(port, &ids);
    copy_dir(redis.dir(), snapshot.path());
    unpause(port);

    // Keep spending and settling past S; node-1 restarts meanwhile (a new life: its epoch
    // counter moves on in writes that will be lost). Its new life settles many batches, so
    // that a new life after the restore that reused its epoch would be taken for it.
    procs.remove(1).kill();
    procs.push(spawn_node(&url, &ids[1], dirs[1].path(), &extra).await);
    load.finish().await;
    let load = Load::start(&counts, targets(&procs), pace);
    let b = procs[1].client.clone();
    eventually(
        Duration::from_secs(90),
        "node-1's new life settles 150 batches",
        || {
            let b = b.clone();
            async move { metric_of(&b, "creditd_settle_batches_total").await >= 150.0 }
        },
    )
    .await;
    load.finish().await;
    // Quiesce, so that the state read at T holds every allowed debit: no live node has
    // unsettled usage.
    for p in &procs {
        let c = p.client.clone();
        eventually(
            Duration::from_secs(20),
            "usage settled before T",
            move || {
                let c = c.clone();
                async move { metric_of(&c, "creditd_unsettled_credits").await == 0.0 }
            },
        )
        .await;
    }
    let allowed_before_t = total_allowed(&counts);
    let view = procs[0].client.org(ORG).await;
    // node-1's first life was killed: its unsettled debits are inside its closed lease, so the
    // store may show more used than the clients saw allowed, never less.
    assert!(
        n(&view["used"]) >= allowed_before_t,
        "before the restore: {allowed_before_t} allowed, view {view}"
    );
    // T: the state the restore will lose, read while writes are paused; Redis dies paused.
    pause_writes(port);
    let t = read_raw(port, &ids);
    redis.stop();
    let aof = redis.dir().join("appendonlydir");
    if aof.exists() {
        std::fs::remove_dir_all(&aof).unwrap();
    }
    copy_dir(snapshot.path(), redis.dir());
    redis.restart();

    // The honest window. The restored store has forgotten what the lost writes recorded:
    // the usage settled after S (it is unspent again), and the leases granted after S (the
    // store can lease those credits again while the nodes still hold them in memory). With
    // every debit settled at T, what the clients saw allowed up to T is at most
    // `purchased - bal_T - Σ lease_T`; afterwards a node can spend at most what it holds in
    // memory (its lease at T) or what the store records for it (its lease at S, if it
    // adopts the store's record), plus what the store has unleased (bal_S). Hence:
    //   allowed ≤ purchased + (bal_S − bal_T) + Σ_node max(0, lease_S − lease_T)
    // (= the usage settled in the lost writes + the leases they granted beyond those at S).
    // Anything beyond is a grant answered twice: a new life taking an old life's grants,
    // a lease spent across the restore and granted again.
    let window = (s.bal as i64 - t.bal as i64)
        + ids
            .iter()
            .map(|id| (s.leases[id] as i64 - t.leases[id] as i64).max(0))
            .sum::<i64>();
    eprintln!("restore: S {s:?}, T {t:?}, window {window}");

    // Both nodes settle again on the restored store (a node whose every batch is refused
    // after a restore has stopped working, and its usage is dropped).
    for (i, p) in procs.iter().enumerate() {
        let c = p.client.clone();
        let before = metric_of(&c, "creditd_settle_batches_total").await;
        eventually(
            Duration::from_secs(10),
            &format!("node-{i} settles again after the restore"),
            move || {
                let c = c.clone();
                async move { metric_of(&c, "creditd_settle_batches_total").await >= before + 2.0 }
            },
        )
        .await;
    }
    // node-1 spends below half its lease, so that it asks for more: the store records a
    // grant for this life (whose epoch, lost with the writes after S, the store has just
    // learned from its batches).
    let b = procs[1].client.clone();
    for _ in 0..60 {
        let d = b.debit(ORG, "ws", 1).await;
        match d.status.as_u16() {
            200 => {
                counts[1].allowed.fetch_add(1, Ordering::Relaxed);
            }
            402 | 503 => {}
            s => panic!("debit on node-1 after the restore: {s}: {}", d.text),
        }
    }
    let before = metric_of(&b, "creditd_settle_batches_total").await;
    eventually(
        Duration::from_secs(10),
        "node-1 settles after spending",
        move || {
            let b = b.clone();
            async move { metric_of(&b, "creditd_settle_batches_total").await >= before + 2.0 }
        },
    )
    .await;
    // node-1 restarts on the restored store: `INCR` of its epoch counter (restored too) gives
    // again the epoch of its life after S, whose batches the store has just seen.
    let epoch_key = format!("creditd:node:{}:epoch", ids[1]);
    let epoch_before = redis.cmd(&["GET", &epoch_key]);
    procs.remove(1).kill();
    procs.push(spawn_node(&url, &ids[1], dirs[1].path(), &extra).await);
    eprintln!(
        "node-1 epoch counter: {epoch_before:?} before its restart on the restored store, {:?} \
         after",
        redis.cmd(&["GET", &epoch_key])
    );
    for (i, p) in procs.iter().enumerate() {
        let c = p.client.clone();
        let counts = Arc::clone(&counts);
        eventually(
            Duration::from_secs(10),
            &format!("node-{i} allows a debit after the restore"),
            move || {
                let (c, counts) = (c.clone(), Arc::clone(&counts));
                async move {
                    let ok = c.debit(ORG, "ws", 1).await.status == 200;
                    if ok {
                        counts[i].allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                }
            },
        )
        .await;
    }
    // Spend everything that is left, on both nodes.
    spend_down(
        &counts,
        targets(&procs),
        &procs[0].client,
        "ws",
        Duration::from_secs(120),
    )
    .await;
    // What the store records for each node, for the failure's reader (a lease no live node
    // knows of is stranded).
    for id in &ids {
        eprintln!(
            "store record of {id}: {:?}",
            hgetall(port, &format!("creditd:{{{ORG}}}:node:{id}"))
        );
    }
    let cs = clients(&procs);
    let more = drain_to_zero(&cs, "ws", 40, Duration::from_secs(30)).await;
    for (i, m) in more.iter().enumerate() {
        counts[i].allowed.fetch_add(*m, Ordering::Relaxed);
    }
    let allowed = total_allowed(&counts);
    let view = org_view(&cs[0]).await;
    eprintln!("allowed {allowed} of {purchased} purchased, window {window}");
    assert_conserved(&view);
    assert!(
        allowed as i64 <= purchased as i64 + window,
        "overspend beyond the lost writes: {allowed} allowed of {purchased} purchased, \
         window {window} (S {s:?}, T {t:?}): {view}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A workspace deleted and recreated under a reservation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_workspace_receives_nothing_of_its_namesakes_reservations() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 2, &[]).await;
    let cs = clients(&procs);
    let (a, b) = (&cs[0], &cs[1]);
    let purchased = 10_000;
    common::budget_org(a, ORG, purchased, &[("ws-x", 1_000)]).await;

    // B reserves twice from ws-x; the store records what B holds.
    let r1 = b.reserve(ORG, "ws-x", 100, 600_000).await;
    let r2 = b.reserve(ORG, "ws-x", 50, 600_000).await;
    eventually(
        Duration::from_secs(10),
        "B's reservations settled",
        move || async move { n(&workspace(&b.org(ORG).await, "ws-x")["held"]) == 150 },
    )
    .await;

    // A deletes ws-x (its credits go to the Primary), then creates ws-x again and gives it 500.
    let d = a.delete(&format!("/v1/orgs/{ORG}/workspaces/ws-x")).await;
    assert_eq!(d.status, 200, "delete: {}", d.text);
    a.create_workspace(ORG, "ws-x").await;
    let t = a.transfer(ORG, "primary", "ws-x", 500).await;
    assert_eq!(t.status, 200, "transfer: {}", t.text);
    // B knows the new ws-x (its org was rebuilt).
    eventually(
        Duration::from_secs(10),
        "B sees the new ws-x",
        move || async move {
            n(&b.get(&format!("/v1/balance?org={ORG}&workspace=ws-x"))
                .await
                .body["remaining"])
                > 0
        },
    )
    .await;

    // B finishes its old reservations: commits 30 of r1, releases r2. Either the node still
    // knows them (200) or it voided them with the deletion (404): both are fine, as long as
    // nothing of them reaches the new ws-x.
    let commit = b.commit(&r1, 30).await;
    assert!(
        commit.status == 200 || commit.status == 404,
        "commit: {}",
        commit.text
    );
    let charged = if commit.status == 200 {
        n(&commit.body["charged"])
    } else {
        0
    };
    let release = b.delete(&format!("/v1/reservations/{r2}")).await;
    assert!(
        release.status == 200 || release.status == 404,
        "release: {}",
        release.text
    );

    // Wait until B has settled it all: nothing held any more.
    let deadline = Instant::now() + Duration::from_secs(15);
    let view = loop {
        let view = b.org(ORG).await;
        if n(&view["held"]) == 0 && n(&view["used"]) >= charged {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "B's reservations never settled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let new_ws = workspace(&view, "ws-x");
    assert_eq!(
        (
            n(&new_ws["balance"]),
            n(&new_ws["used"]),
            n(&new_ws["held"])
        ),
        (500, 0, 0),
        "the new ws-x got the old reservations' credits or usage (balance, used, held): {view}"
    );
    assert_conserved(&view);
    assert_eq!(view["used"], charged, "the commit is counted once: {view}");
    // Everything of the old ws-x that was not charged is back in the Primary.
    assert_eq!(
        balance(&view, "primary"),
        purchased - 500 - charged,
        "the old ws-x's credits return to the Primary: {view}"
    );
    // The same view from A.
    let from_a = a.org(ORG).await;
    assert_eq!(workspace(&from_a, "ws-x")["used"], 0, "{from_a}");
    assert_conserved(&from_a);
}

// ---------------------------------------------------------------------------------------------
// 5. Two nodes recalling at once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_recalling_the_same_org_at_once_both_succeed() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 3, &[]).await;
    let cs = clients(&procs);
    let (a, b, c) = (&cs[0], &cs[1], &cs[2]);
    common::budget_org(
        a,
        ORG,
        100_000,
        &[("ws-a", 0), ("ws-b", 0), ("ws-c", 50_000), ("ws-d", 0)],
    )
    .await;
    // C spends ws-c all along.
    let counts = new_counts(3);
    let load = Load::start(&counts, vec![(2, c.clone(), "ws-c")], None);
    let rounds = 20u64;
    let mut slowest = Duration::ZERO;
    for round in 1..=rounds {
        // ws-a and ws-b get 1,000 each; every node spends 1 of each, so that every node
        // holds a lease of both.
        for ws in ["ws-a", "ws-b"] {
            let t = a.transfer(ORG, "primary", ws, 1_000).await;
            assert_eq!(t.status, 200, "round {round}: refill {ws}: {}", t.text);
        }
        for (i, node) in cs.iter().enumerate() {
            for ws in ["ws-a", "ws-b"] {
                let mut ok = false;
                for _ in 0..100 {
                    let d = node.debit(ORG, ws, 1).await;
                    match d.status.as_u16() {
                        200 => {
                            ok = true;
                            break;
                        }
                        // The refill not seen yet on this node.
                        402 | 503 => tokio::time::sleep(Duration::from_millis(50)).await,
                        s => panic!("round {round}: debit {ws} on node {i}: {s}: {}", d.text),
                    }
                }
                assert!(ok, "round {round}: node {i} never allowed a debit of {ws}");
            }
        }
        // Settled everywhere: the view's balances are then exact.
        let want_used = 3 * round;
        eventually(
            Duration::from_secs(10),
            "the debits of ws-a and ws-b settled",
            move || async move {
                let v = a.org(ORG).await;
                n(&workspace(&v, "ws-a")["used"]) == want_used
                    && n(&workspace(&v, "ws-b")["used"]) == want_used
            },
        )
        .await;
        let view = a.org(ORG).await;
        let (bal_a, bal_b) = (balance(&view, "ws-a"), balance(&view, "ws-b"));
        assert_eq!((bal_a, bal_b), (997, 997), "round {round}: {view}");
        // A empties ws-a while B empties ws-b, at the same time. The other nodes hold leases
        // of both: each change needs a recall, and each node recalls while the other does.
        let started = Instant::now();
        let (ta, tb) = tokio::join!(
            async {
                let r = a.transfer(ORG, "ws-a", "ws-d", bal_a).await;
                (r, started.elapsed())
            },
            async {
                let r = b.transfer(ORG, "ws-b", "ws-d", bal_b).await;
                (r, started.elapsed())
            },
        );
        assert!(
            ta.0.status == 200 && tb.0.status == 200,
            "round {round}: concurrent recalls: A answered {} after {:?} ({}), B answered {} \
             after {:?} ({})",
            ta.0.status,
            ta.1,
            ta.0.text,
            tb.0.status,
            tb.1,
            tb.0.text
        );
        slowest = slowest.max(ta.1).max(tb.1);
    }
    eprintln!("slowest concurrent transfer: {slowest:?}");
    load.finish().await;
    let allowed = total_allowed(&counts);
    let want = allowed + 6 * rounds;
    let (view, settled) = settled_view(a, want, Duration::from_secs(20)).await;
    assert!(settled, "used {} != {want} allowed: {view}", view["used"]);
    assert_conserved(&view);
    assert_eq!(balance(&view, "ws-d"), 997 * 2 * rounds, "{view}");
}
