//! The in-process debit: `Cache::get` + `Account::debit`, beside a naive baseline
//! (`parking_lot::Mutex<HashMap<String, u64>>` doing the same lookup, check and subtract), on
//! one thread, two threads on distinct workspaces, and two threads on the same workspace (the
//! contended CAS). Then the whole node path, `Node::debit`, on a current-thread tokio runtime.
//!
//! Two-thread cases are timed with `iter_custom`: two threads each do half of the iterations,
//! and the time reported is wall-clock time per debit for the pair (so the inverse is the
//! aggregate throughput of both threads).
//!
//! Run: `cargo bench --bench debit`. See BENCHMARKS.md for the machine and the figures.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use parking_lot::Mutex;

use creditd::cache::{Account, Cache, Decision, Lease, Spend};
use creditd::config::Config;
use creditd::model::{Amount, Mode, NodeId, OrgId, WorkspaceId};
use creditd::node::{Node, NodeOptions};
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore};
use creditd::store::ControlOp;

const ORG: &str = "acme";
const WS_A: &str = "ws-a";
const WS_B: &str = "ws-b";
/// A lease no benchmark can run dry: 2^62 credits, debited one at a time.
const HUGE_LEASE: u64 = 1 << 62;

/// The real thing: a cache with two warm accounts of one org, each on its own huge lease, and
/// the store known to have nothing more (a short lease is then refused from memory, never asks).
fn creditd_cache() -> Cache {
    let cache = Cache::new();
    let org = OrgId::parse(ORG, "org").unwrap();
    for ws in [WS_A, WS_B] {
        let ws = WorkspaceId::parse(ws, "workspace").unwrap();
        let lease = Arc::new(Lease::new(ws.clone()));
        lease.give(HUGE_LEASE);
        lease.set_store_left(0);
        cache.insert(Arc::new(Account::new(org.clone(), ws, lease)));
    }
    cache
}

#[inline]
fn creditd_debit(cache: &Cache, org: &str, ws: &str, amount: u64) -> u64 {
    // The node's hot path: the debit in place in the map (`Node::debit` calls exactly this).
    match cache.debit(org, ws, amount, Spend::Consume) {
        Some(Ok(Decision::Allowed { remaining })) => remaining,
        other => panic!("debit refused: {other:?}"),
    }
}

/// The naive baseline: one mutex around one map of balances.
type Naive = Mutex<HashMap<String, u64>>;

fn naive_map() -> Naive {
    let mut map = HashMap::new();
    map.insert(format!("{ORG}/{WS_A}"), HUGE_LEASE);
    map.insert(format!("{ORG}/{WS_B}"), HUGE_LEASE);
    Mutex::new(map)
}

/// Same lookup as the cache: the `org/ws` key built on the stack, no allocation; then the
/// check and the subtraction under the lock.
#[inline]
fn naive_debit(map: &Naive, org: &str, ws: &str, amount: u64) -> u64 {
    let mut buf = [0u8; 129];
    let len = org.len() + 1 + ws.len();
    buf[..org.len()].copy_from_slice(org.as_bytes());
    buf[org.len()] = b'/';
    buf[org.len() + 1..len].copy_from_slice(ws.as_bytes());
    let key = std::str::from_utf8(&buf[..len]).unwrap();
    let mut map = map.lock();
    let balance = map.get_mut(key).expect("warm account");
    if *balance < amount {
        panic!("debit refused: {balance} left");
    }
    *balance -= amount;
    *balance
}

/// Runs `iters` operations split over two threads; `op(thread)` does one. Returns the wall
/// time from the moment both threads are ready to the moment the last one finished.
fn two_threads<F>(iters: u64, op: F) -> Duration
where
    F: Fn(usize) + Sync,
{
    let barrier = Barrier::new(2);
    let halves = [iters / 2, iters - iters / 2];
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let (barrier, op, n) = (&barrier, &op, halves[t]);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..n {
                        op(t);
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = spans.iter().map(|s| s.0).min().unwrap();
    let end = spans.iter().map(|s| s.1).max().unwrap();
    end - start
}

fn single_thread(c: &mut Criterion) {
    let cache = creditd_cache();
    let naive = naive_map();
    let mut g = c.benchmark_group("debit/1-thread");
    g.bench_function("creditd", |b| {
        b.iter(|| creditd_debit(&cache, black_box(ORG), black_box(WS_A), black_box(1)))
    });
    g.bench_function("mutex-hashmap", |b| {
        b.iter(|| naive_debit(&naive, black_box(ORG), black_box(WS_A), black_box(1)))
    });
    g.finish();
}

fn two_threads_distinct(c: &mut Criterion) {
    let cache = creditd_cache();
    let naive = naive_map();
    let ws = [WS_A, WS_B];
    let mut g = c.benchmark_group("debit/2-threads-distinct-ws");
    g.bench_function("creditd", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t| {
                black_box(creditd_debit(
                    &cache,
                    black_box(ORG),
                    black_box(ws[t]),
                    black_box(1),
                ));
            })
        })
    });
    g.bench_function("mutex-hashmap", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t| {
                black_box(naive_debit(
                    &naive,
                    black_box(ORG),
                    black_box(ws[t]),
                    black_box(1),
                ));
            })
        })
    });
    g.finish();
}

fn two_threads_same(c: &mut Criterion) {
    let cache = creditd_cache();
    let naive = naive_map();
    let mut g = c.benchmark_group("debit/2-threads-same-ws");
    g.bench_function("creditd", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_| {
                black_box(creditd_debit(
                    &cache,
                    black_box(ORG),
                    black_box(WS_A),
                    black_box(1),
                ));
            })
        })
    });
    g.bench_function("mutex-hashmap", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_| {
                black_box(naive_debit(
                    &naive,
                    black_box(ORG),
                    black_box(WS_A),
                    black_box(1),
                ));
            })
        })
    });
    g.finish();
}

/// Where the one-thread time goes: building the `org/ws` key on the stack and hashing it with
/// the std `RandomState` (SipHash-1-3, what both maps use), and `Account::debit` alone (the CAS
/// and the usage counter, no lookup).
fn parts(c: &mut Criterion) {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    let cache = creditd_cache();
    let account = cache.get(ORG, WS_A).unwrap();
    let mut g = c.benchmark_group("parts/1-thread");
    g.bench_function("key+siphash", |b| {
        b.iter(|| {
            let (org, ws) = (black_box(ORG), black_box(WS_A));
            let mut buf = [0u8; 129];
            let len = org.len() + 1 + ws.len();
            buf[..org.len()].copy_from_slice(org.as_bytes());
            buf[org.len()] = b'/';
            buf[org.len() + 1..len].copy_from_slice(ws.as_bytes());
            state.hash_one(std::str::from_utf8(&buf[..len]).unwrap())
        })
    });
    g.bench_function("Account::debit", |b| {
        b.iter(|| match account.debit(black_box(1), Spend::Consume) {
            Ok(Decision::Allowed { remaining }) => remaining,
            other => panic!("debit refused: {other:?}"),
        })
    });
    g.finish();
}

/// A control: work that shares nothing (hashing the key on the stack), on one thread and split
/// over two. On an idle 2-core machine the two-thread time per operation is about half the
/// one-thread time; when it is not, the two-thread figures above measure time-slicing by the
/// scheduler more than contention between cores.
fn parallelism(c: &mut Criterion) {
    let hash = |ws: &str| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (ORG, ws).hash(&mut h);
        h.finish()
    };
    let mut g = c.benchmark_group("control/share-nothing");
    g.bench_function("1-thread", |b| b.iter(|| hash(black_box(WS_A))));
    g.bench_function("2-threads", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_| {
                black_box(hash(black_box(WS_A)));
            })
        })
    });
    g.finish();
}

/// The compare-and-swap alone, without the lookup: `Lease::take` beside a `Mutex<u64>`, on one
/// thread and on two threads hitting the same balance. Separates the cost of the CAS from the
/// cost of finding the account.
fn take_only(c: &mut Criterion) {
    let lease = Lease::new(WorkspaceId::parse(WS_A, "workspace").unwrap());
    lease.give(HUGE_LEASE);
    lease.set_store_left(0);
    let naive = Mutex::new(HUGE_LEASE);
    let take = |amount: u64| match lease.take(amount) {
        Ok(Decision::Allowed { remaining }) => remaining,
        other => panic!("take refused: {other:?}"),
    };
    let subtract = |amount: u64| {
        let mut balance = naive.lock();
        if *balance < amount {
            panic!("subtract refused: {balance} left");
        }
        *balance -= amount;
        *balance
    };
    // A lease of a cluster node: its lease term is finite, so every take reads the clock.
    let termed = Lease::new(WorkspaceId::parse(WS_A, "workspace").unwrap());
    termed.give(HUGE_LEASE);
    termed.set_store_left(0);
    termed.set_valid_until(u64::MAX - 1);
    let mut g = c.benchmark_group("take-only/1-thread");
    g.bench_function("Lease::take", |b| b.iter(|| take(black_box(1))));
    g.bench_function("Lease::take-with-term", |b| {
        b.iter(|| match termed.take(black_box(1)) {
            Ok(Decision::Allowed { remaining }) => remaining,
            other => panic!("take refused: {other:?}"),
        })
    });
    g.bench_function("mutex-u64", |b| b.iter(|| subtract(black_box(1))));
    g.finish();
    let mut g = c.benchmark_group("take-only/2-threads-same");
    g.bench_function("Lease::take", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_| {
                black_box(take(black_box(1)));
            })
        })
    });
    g.bench_function("mutex-u64", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_| {
                black_box(subtract(black_box(1)));
            })
        })
    });
    g.finish();
}

/// The node path: `Node::debit` (cache lookup, debit, the credits-debited metric with no
/// recorder installed) on an embedded store in a temporary folder. The org is in budget mode
/// with 10^15 purchased and 10^15 - 1 moved to ws-a; the node leases ws-a's whole balance on
/// first use, so every measured debit is decided from memory. No settler runs.
fn node_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config::default();
    let node = rt.block_on(async {
        let store = EmbeddedStore::open(
            dir.path(),
            EmbeddedOptions {
                idempotency_keys_max: config.idempotency_keys_max,
                idempotency_ttl: config.idempotency_ttl,
                ledger_retain: config.ledger_retain,
                ..EmbeddedOptions::default()
            },
        )
        .unwrap();
        let node = Node::start(
            Arc::new(store),
            NodeId::parse("bench", "node_id").unwrap(),
            NodeOptions::from_config(&config),
        )
        .await
        .unwrap();
        let org = OrgId::parse(ORG, "org").unwrap();
        let primary = WorkspaceId::parse("primary", "primary").unwrap();
        let ws = WorkspaceId::parse(WS_A, "workspace").unwrap();
        let most = Amount::new(creditd::model::AMOUNT_MAX).unwrap();
        node.create_org(&org, Mode::Budget, &primary).await.unwrap();
        node.change(ORG, ControlOp::Purchase { amount: most }, None)
            .await
            .unwrap();
        node.change(
            ORG,
            ControlOp::CreateWorkspace {
                workspace: ws.clone(),
            },
            None,
        )
        .await
        .unwrap();
        node.change(
            ORG,
            ControlOp::Transfer {
                from: primary,
                to: ws,
                amount: Amount::new(creditd::model::AMOUNT_MAX - 1).unwrap(),
            },
            None,
        )
        .await
        .unwrap();
        // Warm: load the org and take the lease.
        let first = node.debit(ORG, WS_A, Amount::new(1).unwrap()).await;
        assert!(matches!(first, Ok(Decision::Allowed { .. })), "{first:?}");
        node
    });
    let one = Amount::new(1).unwrap();
    let mut g = c.benchmark_group("debit/node-path");
    g.bench_function("Node::debit (current-thread runtime)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let d = node
                        .debit(black_box(ORG), black_box(WS_A), black_box(one))
                        .await;
                    assert!(matches!(d, Ok(Decision::Allowed { .. })));
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    rt.block_on(node.stop(Duration::from_secs(5))).unwrap();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = single_thread, two_threads_distinct, two_threads_same, take_only, parts, parallelism, node_path
}
criterion_main!(benches);
