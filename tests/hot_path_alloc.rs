//! Proves that the hot path allocates nothing: looking an account up and debiting it (allowed
//! or refused) makes no heap allocation, counted by a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use creditd::cache::{Account, AskStore, Cache, Decision, Lease, Spend};
use creditd::model::{OrgId, WorkspaceId};

/// Counts allocations made while `COUNTING` is on (by any thread, so the test runs alone).
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_debit_allocates_nothing() {
    let cache = Cache::new();
    let org = OrgId::parse("acme", "org").unwrap();
    for i in 0..100 {
        let ws = WorkspaceId::parse(&format!("ws-{i}"), "workspace").unwrap();
        let lease = Arc::new(Lease::new(ws.clone()));
        lease.give(1_000);
        lease.set_store_left(0);
        cache.insert(Arc::new(Account::new(org.clone(), ws, lease)));
    }
    let names: Vec<String> = (0..100).map(|i| format!("ws-{i}")).collect();

    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let mut allowed = 0u32;
    let mut refused = 0u32;
    for round in 0..20 {
        for name in &names {
            // `Node::debit`'s hot path: the debit in place in the map.
            match cache
                .debit("acme", name, 60, Spend::Consume)
                .expect("account")
            {
                Ok(Decision::Allowed { .. }) => allowed += 1,
                Ok(Decision::Insufficient { .. }) => refused += 1,
                Err(AskStore) => {
                    panic!("an exhausted lease must refuse from memory (round {round})")
                }
            }
            // The slow path's lookup keeps the account: a reference count, no allocation.
            drop(cache.get("acme", name).expect("account"));
        }
    }
    COUNTING.store(false, Ordering::Relaxed);

    assert_eq!(allowed, 100 * 16, "1,000 credits cover 16 debits of 60");
    assert_eq!(refused, 100 * 4);
    assert_eq!(
        ALLOCATIONS.load(Ordering::Relaxed),
        0,
        "the hot path allocated"
    );
}
