//! Proves that creditd nodes sharing one real Redis never let a workspace spend more than it was
//! given and can always spend it to the last credit: races, exhaustion, changes seen across
//! nodes under load, a killed node, a lost settle reply, and a restarted Redis.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{clients, metric_of, nodes};
use common::redis::RedisServer;
use common::{assert_conserved, balance, eventually, Client};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Creates a budget-mode org with workspace `ws` holding `budget` credits.
async fn seed_budget(c: &Client, org: &str, ws: &str, budget: u64) {
    c.create_org(org, "budget").await;
    c.purchase(org, budget).await;
    c.create_workspace(org, ws).await;
    let t = c.transfer(org, "primary", ws, budget).await;
    assert_eq!(t.status, 200, "{}", t.text);
}

/// Debits 1 credit from `org/ws` through every client, `tasks` tasks per client, each at most
/// `per_task` times or until refused; returns the number of 200 answers.
async fn hammer(clients: &[Client], org: &str, ws: &str, tasks: usize, per_task: usize) -> u64 {
    let allowed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for c in clients {
        for _ in 0..tasks {
            let (c, org, ws, allowed) = (
                c.clone(),
                org.to_string(),
                ws.to_string(),
                Arc::clone(&allowed),
            );
            handles.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    let a = c.debit(&org, &ws, 1).await;
                    match a.status.as_u16() {
                        200 => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        402 => break,
                        s => panic!("unexpected answer {s}: {}", a.text),
                    }
                }
            }));
        }
    }
    for h in handles {
        tokio::time::timeout(Duration::from_secs(120), h)
            .await
            .expect("load finished in time")
            .unwrap();
    }
    allowed.load(Ordering::Relaxed)
}

/// Polls the org view on `c` until `used` reaches `want` (other nodes' usage lags by about a
/// settle interval), asserting it never exceeds it.
async fn view_with_used(c: &Client, org: &str, want: u64, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let view = c.org(org).await;
        let used = view["used"].as_u64().unwrap();
        assert!(used <= want, "used {used} beyond {want}: {view}");
        if used == want {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "used stuck at {used}, want {want}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_credit_is_allowed_exactly_once_across_three_nodes() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 3, &[]).await;
    let cs = clients(&procs);
    seed_budget(&cs[0], "acme", "ws", 1).await;
    assert_eq!(hammer(&cs, "acme", "ws", 4, 3).await, 1);
    let view = view_with_used(&cs[2], "acme", 1, Duration::from_secs(10)).await;
    assert_conserved(&view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_runs_to_exhaustion_exactly_across_three_nodes() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 3, &[]).await;
    let cs = clients(&procs);
    seed_budget(&cs[0], "acme", "ws", 1_000).await;
    let started = Instant::now();
    let allowed = hammer(&cs, "acme", "ws", 6, 400).await;
    assert_eq!(allowed, 1_000, "every credit spent, none twice");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "exhaustion took {:?}",
        started.elapsed()
    );
    for c in &cs {
        let view = view_with_used(c, "acme", 1_000, Duration::from_secs(10)).await;
        assert_eq!(balance(&view, "ws"), 0, "nothing stranded: {view}");
        assert_conserved(&view);
    }
}

/// Debits of 1 credit on `org/ws` through every client, in the background, until finished.
struct Load {
    stop: Arc<AtomicBool>,
    allowed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(clients: Vec<Client>, org: &str, ws: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let allowed = Arc::new(AtomicU64::new(0));
        let tasks = clients
            .into_iter()
            .map(|c| {
                let (org, ws) = (org.to_string(), ws.to_string());
                let (stop, allowed) = (Arc::clone(&stop), Arc::clone(&allowed));
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match c.try_debit(&org, &ws, 1).await {
                            Some(a) if a.status == 200 => {
                                allowed.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(_) => {}
                            // A killed node: stop sending to it.
                            None => return,
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            allowed,
            tasks,
        }
    }

    /// Stops the load; returns the number of 200 answers.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.allowed.load(Ordering::Relaxed)
    }
}

/// Waits until the org view on `c` shows more than `n` credits used: load is flowing.
async fn used_above(c: &Client, org: &str, n: u64) {
    let c = c.clone();
    eventually(Duration::from_secs(20), "load running", || {
        let c = c.clone();
        async move { c.org(org).await["used"].as_u64().unwrap() > n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_node_reach_the_others_under_load() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(&redis.url(), 3, &[]).await;
    let cs = clients(&procs);
    seed_budget(&cs[0], "acme", "busy", 1_000_000).await;
    cs[0].create_workspace("acme", "ws-x").await;
    // Load on B and C while A changes the org.
    let load = Load::start(vec![cs[1].clone(), cs[2].clone()], "acme", "busy");
    // A deadline well above one settle interval: a 2-core shared machine is slow and noisy.
    let limit = Duration::from_secs(5);

    // Transfer on A: B and C can spend ws-x.
    let t = cs[0].transfer("acme", "busy", "ws-x", 10).await;
    assert_eq!(t.status, 200, "{}", t.text);
    for c in &cs[1..] {
        let c = c.clone();
        eventually(limit, "transfer seen", || {
            let c = c.clone();
            async move {
                c.get("/v1/balance?org=acme&workspace=ws-x").await.body["remaining"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
            }
        })
        .await;
    }
    // Deletion on A: ws-x is unknown on B and C.
    let d = cs[0].delete("/v1/orgs/acme/workspaces/ws-x").await;
    assert_eq!(d.status, 200, "{}", d.text);
    for c in &cs[1..] {
        let c = c.clone();
        eventually(limit, "deletion seen", || {
            let c = c.clone();
            async move { c.debit("acme", "ws-x", 1).await.status == 404 }
        })
        .await;
    }
    // Mode switch on A: B and C report shared mode and spend from the Primary's lease.
    let m = cs[0]
        .put("/v1/orgs/acme/mode", json!({"mode": "shared"}))
        .await;
    assert_eq!(m.status, 200, "{}", m.text);
    for c in &cs[1..] {
        let c = c.clone();
        eventually(limit, "mode switch seen", || {
            let c = c.clone();
            async move { c.get("/v1/balance?org=acme&workspace=busy").await.body["mode"] == "shared" }
        })
        .await;
    }
    let total = load.finish().await;
    let view = view_with_used(&cs[0], "acme", total, Duration::from_secs(10)).await;
    assert_conserved(&view);
    assert_eq!(view["mode"], "shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_never_causes_overspend_and_its_leases_expire() {
    let redis = RedisServer::start();
    let (mut procs, _dirs) = nodes(&redis.url(), 3, &[("CREDITD_LEASE_TTL", "1s")]).await;
    let cs = clients(&procs);
    let budget = 2_000;
    seed_budget(&cs[0], "acme", "ws", budget).await;
    let load = Load::start(cs.clone(), "acme", "ws");
    // Let every node take leases, then kill one mid-load.
    used_above(&cs[0], "acme", 100).await;
    let c0 = cs[0].clone();
    procs.remove(2).kill();
    // The survivors spend what is left, the dead node's leases included once they expire.
    eventually(
        Duration::from_secs(60),
        "budget exhausted by the survivors",
        || {
            let c0 = c0.clone();
            async move { c0.get("/v1/balance?org=acme&workspace=ws").await.body["remaining"] == 0 }
        },
    )
    .await;
    let allowed = load.finish().await;
    assert!(
        allowed <= budget,
        "overspend: {allowed} allowed of {budget}"
    );
    // The survivors can see nothing left before the dead node's lease expires: they do not
    // count a dead node's lease as recallable. It then expires, as consumed.
    let c0 = cs[0].clone();
    eventually(
        Duration::from_secs(30),
        "the dead node's lease counts as consumed",
        || {
            let c0 = c0.clone();
            async move { c0.org("acme").await["used"] == budget }
        },
    )
    .await;
    let view = cs[0].org("acme").await;
    assert_conserved(&view);
    assert_eq!(view["used"], budget, "{view}");
    let ledger = cs[0].get("/v1/orgs/acme/ledger?limit=1000").await.body;
    let expired = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "lease_expired");
    assert!(expired, "a lease_expired entry in the ledger: {ledger}");
}

/// A TCP proxy to Redis that, once armed, forwards the next request containing `marker` and
/// then cuts both connections without relaying the answer: a reply lost after the command ran.
struct CuttingProxy {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
}

impl CuttingProxy {
    async fn start(upstream: SocketAddr, marker: Vec<u8>) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (a, k) = (Arc::clone(&armed), Arc::clone(&cuts));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (armed, cuts, marker) = (Arc::clone(&a), Arc::clone(&k), marker.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let cut = Arc::new(AtomicBool::new(false));
                    let cut2 = Arc::clone(&cut);
                    let down = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if cut2.load(Ordering::Acquire)
                                || cw.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let hit = buf[..n]
                            .windows(marker.len())
                            .any(|w| w == marker.as_slice());
                        if hit && armed.swap(false, Ordering::AcqRel) {
                            // The command reaches Redis; its answer never comes back.
                            cut.store(true, Ordering::Release);
                            let _ = sw.write_all(&buf[..n]).await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            cuts.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        CuttingProxy { addr, armed, cuts }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_whose_reply_is_lost_is_applied_once() {
    let redis = RedisServer::start();
    let upstream: SocketAddr = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    let settle_sha = creditd::store::redis::script_sha("redis_settle").expect("the settle script");
    let proxy = CuttingProxy::start(upstream, settle_sha.into_bytes()).await;
    let url = format!("redis://{}", proxy.addr);
    let (procs, _dirs) = nodes(&url, 1, &[]).await;
    let c = procs[0].client.clone();
    seed_budget(&c, "acme", "ws", 100).await;
    for round in 0..3u64 {
        for _ in 0..5 {
            assert_eq!(c.debit("acme", "ws", 1).await.status, 200);
        }
        proxy.armed.store(true, Ordering::Release);
        let p = Arc::clone(&proxy.cuts);
        eventually(Duration::from_secs(20), "a settle reply was cut", || {
            let p = Arc::clone(&p);
            async move { p.load(Ordering::Relaxed) > round }
        })
        .await;
    }
    // Every usage settled once: 15 used, not 20 or 30, whatever was retried.
    let view = view_with_used(&c, "acme", 15, Duration::from_secs(20)).await;
    assert_eq!(balance(&view, "ws"), 85);
    assert_conserved(&view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_load_fails_no_settlement_after_one_retry() {
    let mut redis = RedisServer::start_persistent();
    let (procs, _dirs) = nodes(&redis.url(), 2, &[]).await;
    let cs = clients(&procs);
    seed_budget(&cs[0], "acme", "ws", 1_000_000).await;
    let load = Load::start(cs.clone(), "acme", "ws");
    used_above(&cs[0], "acme", 50).await;
    let c0 = cs[0].clone();
    // Restart on the same port, data kept (AOF), script cache empty.
    let batches_before = metric_of(&cs[0], "creditd_settle_batches_total").await;
    redis.restart();
    eventually(
        Duration::from_secs(30),
        "a settle succeeds after the restart",
        || {
            let c0 = c0.clone();
            async move { metric_of(&c0, "creditd_settle_batches_total").await > batches_before }
        },
    )
    .await;
    // From then on every settle succeeds (a NOSCRIPT is answered by loading the script and
    // running it again within the same call): the error counter may move during the outage,
    // never after. A call sent during the outage (queued on the reconnecting connection) may
    // still time out up to redis_call_timeout after that first success: the count starts once
    // every such call has ended.
    let outage_calls_end = Instant::now() + creditd::config::DEFAULT_REDIS_CALL_TIMEOUT;
    eventually(
        Duration::from_secs(30),
        "the calls sent during the outage have ended",
        move || async move { Instant::now() >= outage_calls_end },
    )
    .await;
    let metrics = cs[0].get("/metrics").await.text;
    let errors = common::metric(&metrics, "creditd_settle_errors_total");
    let batches = common::metric(&metrics, "creditd_settle_batches_total");
    let c0 = cs[0].clone();
    eventually(
        Duration::from_secs(30),
        "ten more settle batches under load",
        || {
            let c0 = c0.clone();
            async move { metric_of(&c0, "creditd_settle_batches_total").await >= batches + 10.0 }
        },
    )
    .await;
    let after = metric_of(&cs[0], "creditd_settle_errors_total").await;
    assert_eq!(after, errors, "settles failed after Redis came back");
    let total = load.finish().await;
    let view = view_with_used(&cs[0], "acme", total, Duration::from_secs(20)).await;
    assert_conserved(&view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_three_master_redis_cluster_spend_exactly_the_budgets() {
    let cluster = common::redis::RedisCluster::start();
    let (procs, _dirs) = nodes(&cluster.url(), 3, &[]).await;
    let cs = clients(&procs);
    // Several orgs, so that their hash tags land on different masters.
    let orgs = ["acme", "globex", "initech", "umbrella"];
    for org in orgs {
        seed_budget(&cs[0], org, "ws", 200).await;
    }
    let mut runs = Vec::new();
    for org in orgs {
        let cs = cs.clone();
        runs.push(tokio::spawn(
            async move { hammer(&cs, org, "ws", 2, 150).await },
        ));
    }
    for run in runs {
        assert_eq!(run.await.unwrap(), 200, "every credit spent once");
    }
    for org in orgs {
        let view = view_with_used(&cs[1], org, 200, Duration::from_secs(20)).await;
        assert_conserved(&view);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_store_outage_the_reserve_answers_boundedly_then_503() {
    let redis = RedisServer::start();
    let (procs, _dirs) = nodes(
        &redis.url(),
        1,
        &[
            ("CREDITD_OUTAGE_RESERVE_CREDITS", "50"),
            ("CREDITD_LEASE_WAIT_MAX", "300ms"),
            ("CREDITD_REDIS_CALL_TIMEOUT", "200ms"),
        ],
    )
    .await;
    let c = procs[0].client.clone();
    seed_budget(&c, "acme", "ws", 10_000).await;
    assert_eq!(c.debit("acme", "ws", 10).await.status, 200);
    let c1 = c.clone();
    eventually(
        Duration::from_secs(20),
        "the outage reserve is leased",
        || {
            let c1 = c1.clone();
            async move { metric_of(&c1, "creditd_leased_credits").await >= 50.0 }
        },
    )
    .await;

    redis.pause();
    // The lease answers first, then the reserve, 10 credits at a time, then 503.
    let mut allowed = 1u64;
    let mut refused = None;
    for _ in 0..2_000 {
        let a = c.debit("acme", "ws", 10).await;
        match a.status.as_u16() {
            200 => allowed += 1,
            _ => {
                refused = Some(a);
                break;
            }
        }
    }
    let refused = refused.expect("the node stops answering once lease and reserve are spent");
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.error_code(), "store_unavailable");
    assert_eq!(
        metric_of(&c, "creditd_outage_debits_total").await,
        5.0,
        "exactly the reserve"
    );

    redis.resume();
    // Everything allowed during the outage is settled once Redis is back: no overspend.
    let view = view_with_used(&c, "acme", allowed * 10, Duration::from_secs(30)).await;
    assert_conserved(&view);
}
