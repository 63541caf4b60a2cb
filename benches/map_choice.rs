//! Which concurrent map holds the accounts: the lookup + debit of the hot path with the
//! candidates side by side, one thread and two threads on the same account (the contended
//! case). `Account::debit` is the same in every variant; only the map, the hasher and whether
//! the account's `Arc` is cloned per lookup change.
//!
//! Run: `cargo bench --bench map_choice`. The decision and figures are in BENCHMARKS.md.

use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use creditd::cache::{Account, AskStore, Decision, Lease, Spend};
use creditd::model::{OrgId, WorkspaceId};
use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;

const KEY: &str = "acme/ws-a";

fn account() -> Arc<Account> {
    let ws = WorkspaceId::parse("ws-a", "workspace").unwrap();
    let lease = Arc::new(Lease::new(ws.clone()));
    lease.give(1 << 62);
    lease.set_store_left(0);
    Arc::new(Account::new(
        OrgId::parse("acme", "org").unwrap(),
        ws,
        lease,
    ))
}

fn allowed(d: Result<Decision, AskStore>) -> u64 {
    match d {
        Ok(Decision::Allowed { remaining }) => remaining,
        other => panic!("refused: {other:?}"),
    }
}

/// The candidates: each looks `KEY` up and debits 1.
trait Candidate: Sync {
    fn debit(&self, key: &str) -> u64;
}

/// DashMap, SipHash, an `Arc` clone per lookup (creditd before this bench).
struct DashArc(DashMap<Box<str>, Arc<Account>>);
impl Candidate for DashArc {
    fn debit(&self, key: &str) -> u64 {
        let a = self.0.get(key).map(|a| Arc::clone(a.value())).unwrap();
        allowed(a.debit(1, Spend::Consume))
    }
}

/// DashMap, SipHash, debit under the shard's read guard (no `Arc` traffic).
struct DashGuard(DashMap<Box<str>, Arc<Account>>);
impl Candidate for DashGuard {
    fn debit(&self, key: &str) -> u64 {
        allowed(self.0.get(key).unwrap().debit(1, Spend::Consume))
    }
}

/// DashMap, foldhash, under the guard.
struct DashFold(DashMap<Box<str>, Arc<Account>, foldhash::fast::RandomState>);
impl Candidate for DashFold {
    fn debit(&self, key: &str) -> u64 {
        allowed(self.0.get(key).unwrap().debit(1, Spend::Consume))
    }
}

/// papaya (lock-free reads), foldhash, under an epoch guard.
struct Papaya(papaya::HashMap<Box<str>, Arc<Account>, foldhash::fast::RandomState>);
impl Candidate for Papaya {
    fn debit(&self, key: &str) -> u64 {
        let map = self.0.pin();
        allowed(map.get(key).unwrap().debit(1, Spend::Consume))
    }
}

fn candidates() -> Vec<(&'static str, Box<dyn Candidate>)> {
    let a = account();
    let dash = || {
        let m = DashMap::new();
        m.insert(KEY.into(), Arc::clone(&a));
        m
    };
    let fold = DashMap::with_hasher(foldhash::fast::RandomState::default());
    fold.insert(KEY.into(), Arc::clone(&a));
    let papaya = papaya::HashMap::with_hasher(foldhash::fast::RandomState::default());
    papaya.pin().insert(KEY.into(), Arc::clone(&a));
    let _ = foldhash::fast::RandomState::default().hash_one(KEY);
    vec![
        ("dashmap-sip-arc", Box::new(DashArc(dash()))),
        ("dashmap-sip-guard", Box::new(DashGuard(dash()))),
        ("dashmap-fold-guard", Box::new(DashFold(fold))),
        ("papaya-fold", Box::new(Papaya(papaya))),
    ]
}

/// Two threads each do half of `iters`; wall time for the pair.
fn two_threads(iters: u64, c: &dyn Candidate) -> Duration {
    let barrier = Barrier::new(2);
    let half = iters / 2;
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..half {
                        black_box(c.debit(black_box(KEY)));
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
        spans.iter().map(|s| s.1).max().unwrap() - spans.iter().map(|s| s.0).min().unwrap()
    })
}

fn map_choice(c: &mut Criterion) {
    let all = candidates();
    let mut g = c.benchmark_group("map/1-thread");
    for (name, cand) in &all {
        g.bench_function(*name, |b| b.iter(|| cand.debit(black_box(KEY))));
    }
    g.finish();
    let mut g = c.benchmark_group("map/2-threads-same-account");
    for (name, cand) in &all {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| two_threads(iters, cand.as_ref()))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = map_choice
}
criterion_main!(benches);
