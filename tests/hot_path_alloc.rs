//! Proves that the hot path allocates nothing: looking an account up and debiting it (allowed
//! or refused) makes no heap allocation, and neither do parsing a debit body and writing its
//! answer into a buffer; counted by a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use creditd::cache::{Account, AskStore, Cache, Decision, Lease, Spend};
use creditd::model::{OrgId, WorkspaceId};

/// Counts the allocations (and reallocations) a thread makes while its `COUNTING` is on. Per
/// thread, so that the tests of this file can run in parallel; what is measured runs on the
/// test's own thread.
struct Counting;

thread_local! {
    static COUNTING_HERE: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED_HERE: Cell<usize> = const { Cell::new(0) };
}

/// Starts counting this thread's allocations from 0.
fn start_counting() {
    ALLOCATED_HERE.with(|n| n.set(0));
    COUNTING_HERE.with(|on| on.set(true));
}

/// Stops counting; the allocations this thread made since `start_counting`.
fn stop_counting() -> usize {
    COUNTING_HERE.with(|on| on.set(false));
    ALLOCATED_HERE.with(Cell::get)
}

fn count() {
    // `try_with`: a thread being torn down has no counter left, and counts nothing.
    let _ = COUNTING_HERE.try_with(|on| {
        if on.get() {
            let _ = ALLOCATED_HERE.try_with(|n| n.set(n.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
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

    start_counting();
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
    let allocations = stop_counting();

    assert_eq!(allowed, 100 * 16, "1,000 credits cover 16 debits of 60");
    assert_eq!(refused, 100 * 4);
    assert_eq!(allocations, 0, "the hot path allocated");
}

/// The request parse and the answer write of `POST /v1/debit` and `/v1/authorize`, measured
/// alone. What this does not cover, and does allocate per request: hyper's own work (the
/// request's `HeaderMap`, the response's `HeaderMap` and its header-read timer, boxed by
/// hyper-util's `TokioTimer`), the body-read timeout's timer entry, and the histogram sample's
/// storage in the Prometheus recorder (a block every few dozen samples until a scrape drains
/// it). See BENCHMARKS.md, session 4.
#[test]
fn parsing_a_debit_and_writing_its_answer_allocate_nothing_but_the_body() {
    let body = br#"{"org":"acme","workspace":"ws-a","amount":25,"idempotency_key":"k-1"}"#;
    let mut out: Vec<u8> = Vec::with_capacity(256);
    // Warm up once: lazy statics, if any, are not the hot path.
    let _ = creditd::api::parse_debit(body).unwrap();
    creditd::api::write_debit_allowed(&mut out, "acme", "ws-a", 25, 1975);

    start_counting();
    let mut total = 0u64;
    for i in 0..1_000u64 {
        let req = creditd::api::parse_debit(body).expect("a valid body");
        assert!(matches!(req.org, std::borrow::Cow::Borrowed("acme")));
        assert!(matches!(req.workspace, std::borrow::Cow::Borrowed("ws-a")));
        assert!(matches!(
            req.idempotency_key,
            Some(std::borrow::Cow::Borrowed("k-1"))
        ));
        total += req.amount;
        out.clear();
        creditd::api::write_debit_allowed(&mut out, &req.org, &req.workspace, req.amount, i);
        out.clear();
        creditd::api::write_insufficient(&mut out, creditd::api::Refused::Debit, i);
    }
    let allocations = stop_counting();
    assert_eq!(total, 25_000);
    assert_eq!(
        allocations, 0,
        "parsing a debit body or writing its answer into a buffer with room allocated"
    );

    // The bytes are what the serde_json::Value answers were: keys in alphabetical order.
    out.clear();
    creditd::api::write_debit_allowed(&mut out, "acme", "ws-a", 25, 1975);
    assert_eq!(
        out,
        br#"{"allowed":true,"amount":25,"org":"acme","remaining":1975,"workspace":"ws-a"}"#
    );
    let value = serde_json::json!({"allowed": true, "org": "acme", "workspace": "ws-a", "amount": 25, "remaining": 1975u64});
    assert_eq!(out, serde_json::to_vec(&value).unwrap());
    out.clear();
    creditd::api::write_insufficient(&mut out, creditd::api::Refused::Debit, 7);
    let value = serde_json::json!({
        "allowed": false,
        "error": "insufficient_credits",
        "message": "not enough credits for this debit",
        "remaining": 7,
    });
    assert_eq!(out, serde_json::to_vec(&value).unwrap());
}

/// The answer as a response body: one allocation, the body's own bytes.
#[test]
fn an_answer_body_is_one_allocation() {
    let write = |out: &mut Vec<u8>| creditd::api::write_debit_allowed(out, "acme", "ws-a", 1, 2);
    drop(creditd::api::answer_body(write)); // this thread's scratch buffer, once
    for _ in 0..100 {
        start_counting();
        let body = creditd::api::answer_body(write);
        let allocations = stop_counting();
        assert_eq!(
            &body[..],
            br#"{"allowed":true,"amount":1,"org":"acme","remaining":2,"workspace":"ws-a"}"#
        );
        assert_eq!(allocations, 1);
    }
}

/// A JSON escape in a string is the one case where parsing owns a copy (`Cow::Owned`).
#[test]
fn an_escaped_string_is_the_only_parse_that_allocates() {
    let body = br#"{"org":"ac\u006de","workspace":"ws-a","amount":1}"#;
    start_counting();
    let req = creditd::api::parse_debit(body).expect("a valid body");
    let allocations = stop_counting();
    assert_eq!(req.org, "acme");
    assert!(matches!(req.org, std::borrow::Cow::Owned(_)));
    assert!(allocations >= 1);
}

/// The `x-credits-remaining` header value of `/v1/authorize`: one allocation, its own bytes.
#[test]
fn the_remaining_header_is_one_allocation() {
    for n in [0u64, 7, 10, 1975, u64::MAX] {
        start_counting();
        let value = creditd::api::remaining_value(n);
        let allocations = stop_counting();
        assert_eq!(value.to_str().unwrap(), n.to_string());
        assert_eq!(allocations, 1, "for {n}");
    }
}
