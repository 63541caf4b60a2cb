//! Proves that the Redis store (standalone and a 3-master cluster, real `redis-server`
//! processes) gives the same answers as the embedded store to the same operations, and that it
//! survives what Redis does not promise: a lost script cache, a restart, a frozen or dead
//! server, silent nodes (lease expiry) and an eviction policy.

mod common;

use std::time::{Duration, Instant};

use common::eventually_some;
use common::redis::{RedisCluster, RedisServer};
use creditd::config::{ledger_trim_at, DEFAULT_LEDGER_RETAIN};
use creditd::model::{
    Amount, LedgerEvent, Mode, NodeId, OrgId, OrgRecord, PriorLife, RuleError, SettleBatch,
    SettleReply, SettleView, UsageLine, WorkspaceId, AMOUNT_MAX, CREDITS_MAX,
};
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore};
use creditd::store::redis::{RedisOpenError, RedisOptions, RedisStore};
use creditd::store::{ControlOp, ControlOutcome, IdempotencyKey, Notice, Store, StoreError};

/// Longest any bounded poll of these tests waits.
const WAIT_MAX: Duration = Duration::from_secs(20);

// -------------------------------------------------------------------------------------------
// Helpers
// -------------------------------------------------------------------------------------------

fn org(s: &str) -> OrgId {
    OrgId::parse(s, "org").expect("test ids are valid")
}

fn ws(s: &str) -> WorkspaceId {
    WorkspaceId::parse(s, "workspace").expect("test ids are valid")
}

fn node(s: &str) -> NodeId {
    NodeId::parse(s, "node").expect("test ids are valid")
}

fn amt(n: u64) -> Amount {
    Amount::new(n).expect("test amounts are in range")
}

fn key(scope: &'static str, k: &str, fingerprint: &str) -> IdempotencyKey {
    IdempotencyKey {
        scope,
        key: k.to_string(),
        fingerprint: fingerprint.to_string(),
    }
}

fn purchase(n: u64) -> ControlOp {
    ControlOp::Purchase { amount: amt(n) }
}

fn create_ws(name: &str) -> ControlOp {
    ControlOp::CreateWorkspace {
        workspace: ws(name),
    }
}

fn delete_ws(name: &str) -> ControlOp {
    ControlOp::DeleteWorkspace {
        workspace: ws(name),
    }
}

fn transfer(from: &str, to: &str, n: u64) -> ControlOp {
    ControlOp::Transfer {
        from: ws(from),
        to: ws(to),
        amount: amt(n),
    }
}

fn set_mode(mode: Mode) -> ControlOp {
    ControlOp::SetMode { mode }
}

/// A settle batch built step by step.
#[derive(Clone)]
struct Batch(SettleBatch);

impl Batch {
    fn new(n: &str, epoch: u64, seq: u64) -> Self {
        Batch(SettleBatch {
            node: node(n),
            epoch,
            seq,
            // 0: the org's version when the batch is sent (`current`), as a node that follows
            // every change sends it.
            version: 0,
            lines: Vec::new(),
            release: Vec::new(),
            want: Vec::new(),
            first: true,
        })
    }

    /// Ties the batch to version `v` of the org (an older one is granted nothing).
    fn version(mut self, v: u64) -> Self {
        self.0.version = v;
        self
    }

    /// A usage line: [consumed, reserved, committed, released].
    fn line(mut self, workspace: &str, spender: &str, c: [u64; 4]) -> Self {
        self.0.lines.push(UsageLine {
            workspace: ws(workspace),
            spender: ws(spender),
            consumed: c[0],
            reserved: c[1],
            committed: c[2],
            released: c[3],
        });
        self
    }

    fn release(mut self, spender: &str, n: u64) -> Self {
        self.0.release.push((ws(spender), n));
        self
    }

    fn want(mut self, spender: &str, n: u64) -> Self {
        self.0.want.push((ws(spender), n));
        self
    }
}

/// The batch as sent: version 0 becomes the org's version on `store` now.
async fn current(store: &dyn Store, o: &str, b: &Batch) -> SettleBatch {
    let mut batch = b.0.clone();
    if batch.version == 0 {
        if let Ok(Some(record)) = store.load_org(&org(o)).await {
            batch.version = record.version;
        }
    }
    batch
}

fn embedded_with(keys_max: usize) -> (tempfile::TempDir, EmbeddedStore) {
    embedded_keeping(keys_max, DEFAULT_LEDGER_RETAIN)
}

/// An embedded store keeping `retain` ledger entries per org.
fn embedded_keeping(keys_max: usize, retain: u64) -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(
        dir.path(),
        EmbeddedOptions {
            idempotency_keys_max: keys_max,
            idempotency_ttl: Duration::from_secs(3600),
            ledger_retain: retain,
            ..EmbeddedOptions::default()
        },
    )
    .expect("open the embedded store");
    (dir, store)
}

fn redis_options(url: &str) -> RedisOptions {
    RedisOptions {
        url: url.to_string(),
        lease_ttl: Duration::from_secs(30),
        call_timeout: Duration::from_secs(2),
        require_noeviction: true,
        idempotency_ttl: Duration::from_secs(3600),
        idempotency_keys_max: 1000,
        settle_entries_max: 1000,
        ledger_retain: DEFAULT_LEDGER_RETAIN,
        node_forget_after: Duration::from_secs(3600),
    }
}

async fn redis_store(options: RedisOptions) -> RedisStore {
    RedisStore::open(options)
        .await
        .expect("open the redis store")
}

/// A record with its heartbeats zeroed: `seen_ms` comes from each store's own clock.
fn without_clock(mut r: OrgRecord) -> OrgRecord {
    for share in r.nodes.values_mut() {
        share.seen_ms = 0;
    }
    r
}

/// A settle view with its heartbeats zeroed.
fn view_without_clock(mut v: SettleView) -> SettleView {
    v.seen_ms = 0;
    for s in &mut v.spenders {
        for other in &mut s.others {
            other.1 = 0;
        }
    }
    v
}

/// The org as loaded after a settle answered `reply` and `view`: conserved, of the answered
/// version, and the view is the model's view of it.
async fn loaded_after(
    store: &dyn Store,
    o: &OrgId,
    reply: &SettleReply,
    view: &SettleView,
    batch: &SettleBatch,
) -> OrgRecord {
    let record = store.load_org(o).await.expect("load").expect("the org");
    assert!(record.is_conserved(), "{record:?}");
    assert_eq!(reply.version, record.version);
    assert_eq!(
        *view,
        record.settle_view(batch),
        "the settle's view is the model's"
    );
    record
}

/// A whole ledger as (seq, event), with the cursor and the trimmed count of every page read.
type LedgerRead = (Vec<(u64, LedgerEvent)>, Vec<Option<u64>>, Vec<u64>);

/// What one step of a scenario observed, comparable across stores.
#[derive(Debug, PartialEq)]
enum Seen {
    Record(Result<OrgRecord, StoreError>),
    Maybe(Result<Option<OrgRecord>, StoreError>),
    Outcome(Result<ControlOutcome, StoreError>),
    /// Each answer with the org as loaded after it.
    Settled(Vec<Result<(SettleReply, SettleView, OrgRecord), StoreError>>),
    /// Every ledger entry as (seq, event), read in pages, with the cursors and trimmed counts
    /// seen.
    Ledger(Result<LedgerRead, StoreError>),
}

/// Runs operations on one store and records what each answered.
struct Run<'a> {
    store: &'a dyn Store,
    seen: Vec<(String, Seen)>,
}

impl<'a> Run<'a> {
    fn new(store: &'a dyn Store) -> Self {
        Run {
            store,
            seen: Vec::new(),
        }
    }

    fn note(&mut self, label: impl Into<String>, seen: Seen) {
        self.seen.push((label.into(), seen));
    }

    async fn create(&mut self, o: &str, mode: Mode, primary: &str) {
        let r = self.store.create_org(&org(o), mode, &ws(primary)).await;
        self.note(format!("create {o}"), Seen::Record(r.map(without_clock)));
    }

    async fn load(&mut self, o: &str) {
        let r = self.store.load_org(&org(o)).await;
        self.note(
            format!("load {o}"),
            Seen::Maybe(r.map(|r| r.map(without_clock))),
        );
    }

    async fn apply(&mut self, o: &str, op: ControlOp, k: Option<IdempotencyKey>) -> Seen {
        let r = self.store.apply(&org(o), &op, k.as_ref()).await;
        if let Ok(outcome) = &r {
            assert!(outcome.view.purchased == outcome.view.total_credits + outcome.view.used);
        }
        self.note(format!("{o}: {op:?} {k:?}"), Seen::Outcome(r.clone()));
        Seen::Outcome(r)
    }

    async fn settle(&mut self, batches: &[(&str, &Batch)]) {
        let mut sent = Vec::new();
        for (o, b) in batches {
            sent.push((org(o), current(self.store, o, b).await));
        }
        let batches = sent;
        let answers = self.store.settle(&batches).await;
        let mut r = Vec::new();
        for ((o, batch), answer) in batches.iter().zip(answers) {
            r.push(match answer {
                Ok((reply, view)) => {
                    let record = loaded_after(self.store, o, &reply, &view, batch).await;
                    Ok((reply, view_without_clock(view), without_clock(record)))
                }
                Err(e) => Err(e),
            });
        }
        self.note(
            format!(
                "settle {:?}",
                batches
                    .iter()
                    .map(|(o, b)| format!("{o}/{}/{}/{}", b.node, b.epoch, b.seq))
                    .collect::<Vec<_>>()
            ),
            Seen::Settled(r),
        );
    }

    /// Reads the whole ledger in pages of `page` entries.
    async fn ledger(&mut self, o: &str, page: usize) {
        let mut entries = Vec::new();
        let mut cursors = Vec::new();
        let mut trimmed = Vec::new();
        let mut after = 0;
        let result = loop {
            match self.store.ledger(&org(o), after, page).await {
                Err(e) => break Err(e),
                Ok(p) => {
                    assert!(p.entries.len() <= page);
                    entries.extend(p.entries.into_iter().map(|e| (e.seq, e.event)));
                    cursors.push(p.next);
                    trimmed.push(p.trimmed);
                    match p.next {
                        Some(n) => after = n,
                        None => break Ok((entries, cursors, trimmed)),
                    }
                }
            }
        };
        self.note(format!("ledger {o} by {page}"), Seen::Ledger(result));
    }

    /// Reads one page of at most `page` entries after the cursor `after`.
    async fn page(&mut self, o: &str, after: u64, page: usize) {
        let result = self.store.ledger(&org(o), after, page).await.map(|p| {
            let entries = p.entries.into_iter().map(|e| (e.seq, e.event)).collect();
            (entries, vec![p.next], vec![p.trimmed])
        });
        self.note(
            format!("ledger {o} after {after} by {page}"),
            Seen::Ledger(result),
        );
    }
}

/// Compares two runs step by step, naming the first step that differs.
fn assert_same(embedded: &[(String, Seen)], redis: &[(String, Seen)]) {
    assert_eq!(embedded.len(), redis.len(), "runs took different steps");
    for (i, ((label, e), (_, r))) in embedded.iter().zip(redis).enumerate() {
        assert_eq!(
            e, r,
            "step {i} ({label}) differs:\n embedded: {e:#?}\n redis: {r:#?}"
        );
    }
}

/// The shared scenario: every rule, every refusal, exactly-once settles, idempotency and the
/// overflow cap, on two orgs (so that a cluster spreads them over slots). `epoch` is what
/// `start_node` gave node `n1`.
async fn scenario(run: &mut Run<'_>, epoch: u64) {
    let e = epoch;
    // Creation, and unknown orgs everywhere.
    run.create("acme", Mode::Budget, "main").await;
    run.create("acme", Mode::Shared, "other").await;
    run.create("zeta", Mode::Shared, "primary").await;
    run.load("acme").await;
    run.load("nope").await;
    run.apply("nope", purchase(1), None).await;
    run.ledger("nope", 10).await;
    run.settle(&[("nope", &Batch::new("n1", e, 1))]).await;

    // Rule 1 and idempotency: replay, mismatch, another scope.
    run.apply(
        "acme",
        purchase(10_000),
        Some(key("purchase", "k1", "10000")),
    )
    .await;
    let replay = run
        .apply(
            "acme",
            purchase(10_000),
            Some(key("purchase", "k1", "10000")),
        )
        .await;
    assert!(
        matches!(&replay, Seen::Outcome(Ok(o)) if o.replayed && o.view.purchased == 10_000),
        "{replay:?}"
    );
    run.apply("acme", purchase(5), Some(key("purchase", "k1", "5")))
        .await;
    run.apply("acme", purchase(7), Some(key("transfer", "k1", "7")))
        .await;

    // Workspaces, and rule 2's example: 10,000 total, 2,000 to A, 3,000 to B, Primary 5,000.
    run.apply("acme", create_ws("a"), None).await;
    run.apply("acme", create_ws("b"), None).await;
    run.apply("acme", create_ws("a"), None).await;
    run.apply("acme", create_ws("c"), None).await;
    run.apply(
        "acme",
        transfer("main", "a", 2_000),
        Some(key("transfer", "t1", "a")),
    )
    .await;
    run.apply("acme", transfer("main", "b", 2_993), None).await;
    run.apply("acme", transfer("a", "a", 1), None).await;
    run.apply("acme", transfer("a", "zz", 1), None).await;
    run.apply("acme", transfer("zz", "a", 1), None).await;
    run.apply("acme", transfer("a", "b", 999_999), None).await;

    // Settles: grants, exactly once, older seqs, refusals.
    let b1 = Batch::new("n1", e, 1)
        .want("a", 500)
        .want("b", 100)
        .want("main", 1_000)
        .want("zz", 5);
    run.settle(&[("acme", &b1)]).await;
    run.settle(&[("acme", &b1)]).await;
    let b2 = Batch::new("n1", e, 2)
        .line("a", "a", [100, 50, 0, 0])
        .line("b", "b", [10, 0, 0, 0])
        .release("main", 200)
        .want("a", 1_000_000);
    run.settle(&[("acme", &b2), ("zeta", &Batch::new("n1", e, 2))])
        .await;
    run.settle(&[("acme", &b1)]).await;
    run.settle(&[("acme", &b2)]).await;
    run.settle(&[(
        "acme",
        &Batch::new("n1", e, 3).line("a", "a", [1_000_000, 0, 0, 0]),
    )])
    .await;
    run.settle(&[(
        "acme",
        &Batch::new("n1", e, 3).line("a", "a", [0, 0, 51, 0]),
    )])
    .await;
    run.settle(&[("acme", &Batch::new("n1", e, 3).release("b", 1_000_000))])
        .await;
    run.settle(&[("acme", &Batch::new("n1", e.saturating_sub(1), 9))])
        .await;
    run.load("acme").await;

    // Leased credits must be recalled first (transfer, deletion, mode switch).
    run.apply("acme", transfer("a", "main", 500), None).await;
    run.apply("acme", delete_ws("a"), None).await;
    run.apply("acme", delete_ws("main"), None).await;
    run.apply("acme", delete_ws("zz"), None).await;
    run.apply("acme", set_mode(Mode::Shared), None).await;

    // Give a's lease back, settle its reservation, then delete it (rule 5).
    let b3 = Batch::new("n1", e, 4)
        .line("a", "a", [5, 0, 30, 20])
        .release("a", 1_000);
    run.settle(&[("acme", &b3)]).await;
    run.load("acme").await;
    run.settle(&[("acme", &Batch::new("n1", e, 5).release("a", 865))])
        .await;
    run.apply("acme", delete_ws("a"), None).await;
    // Usage reported late for a deleted workspace counts for the deleted.
    run.settle(&[(
        "acme",
        &Batch::new("n1", e, 6).line("a", "main", [3, 0, 0, 0]),
    )])
    .await;

    // Rule 6: budget -> shared sweeps, once b's lease is back; shared -> budget moves nothing.
    run.settle(&[("acme", &Batch::new("n1", e, 7).release("b", 90))])
        .await;
    run.apply("acme", transfer("main", "c", 40), None).await;
    run.apply("acme", set_mode(Mode::Shared), None).await;
    run.apply("acme", set_mode(Mode::Shared), None).await;
    run.apply("acme", transfer("main", "b", 1), None).await;

    // Shared mode: only the Primary is leased; several lines share its lease, and one line's
    // release pays for another's debit (every credit before any debit).
    let b4 = Batch::new("n1", e, 8).want("b", 100).want("main", 300);
    run.settle(&[("acme", &b4)]).await;
    let main_lease = |run: &Run<'_>| -> u64 {
        match &run.seen.last().expect("a step").1 {
            Seen::Settled(r) => r[0]
                .as_ref()
                .map(|(_, _, rec)| rec.nodes[&node("n1")].leases[&ws("main")])
                .unwrap_or(0),
            other => panic!("not a settle: {other:?}"),
        }
    };
    let lease = main_lease(run);
    let b5 = Batch::new("n1", e, 9)
        .line("b", "main", [0, 40, 0, 0])
        .line("c", "main", [lease - 40 + 15, 0, 0, 0])
        .line("b", "main", [0, 0, 25, 15]);
    run.settle(&[("acme", &b5)]).await;
    run.apply("acme", set_mode(Mode::Budget), None).await;
    run.apply("acme", transfer("main", "b", 10), None).await;
    run.settle(&[("acme", &Batch::new("n1", e, 10).want("b", 3).want("c", 3))])
        .await;

    // The cap: purchased may reach 2^53-1 and not one credit more.
    let mut left = CREDITS_MAX;
    while left > 0 {
        let n = left.min(AMOUNT_MAX);
        run.apply("zeta", purchase(n), None).await;
        left -= n;
    }
    run.apply("zeta", purchase(1), None).await;
    run.apply("zeta", create_ws("x"), None).await;
    run.settle(&[("zeta", &Batch::new("n1", e, 11).want("primary", u64::MAX))])
        .await;
    run.settle(&[(
        "zeta",
        &Batch::new("n1", e, 12)
            .line("x", "primary", [CREDITS_MAX - 1, 0, 0, 0])
            .release("primary", 1),
    )])
    .await;
    run.apply("zeta", purchase(1), None).await;

    // A batch of an older version of the org is granted nothing; of the current one, it is.
    run.settle(&[("acme", &Batch::new("n1", e, 13).version(1).want("b", 5))])
        .await;
    run.settle(&[("acme", &Batch::new("n1", e, 14).want("b", 5))])
        .await;
    run.load("acme").await;
    run.load("zeta").await;
    run.ledger("acme", 1).await;
    run.ledger("acme", 7).await;
    run.ledger("acme", 1000).await;
    run.ledger("zeta", 3).await;
}

/// Runs the scenario on a fresh embedded store and on `redis`, and compares.
async fn conformance(redis: &RedisStore) {
    let (_dir, embedded) = embedded_with(1000);
    let n1 = node("n1");
    let e_embedded = embedded.start_node(&n1).await.expect("start n1 (embedded)");
    let e_redis = redis.start_node(&n1).await.expect("start n1 (redis)");
    // Epochs never repeat: a fresh store's first one is at least its clock, in ms.
    let floor = 1_700_000_000_000;
    assert!(e_embedded.epoch > floor && e_redis.epoch > floor);
    // The scenario runs one life on both, under the same epoch.
    let epoch = e_embedded.epoch.max(e_redis.epoch);
    let mut a = Run::new(&embedded);
    scenario(&mut a, epoch).await;
    let mut b = Run::new(redis);
    scenario(&mut b, epoch).await;
    assert_same(&a.seen, &b.seen);
    // The scenario reaches what it means to: refusals of every kind and applied settles.
    let errors: Vec<&StoreError> = a
        .seen
        .iter()
        .filter_map(|(_, s)| match s {
            Seen::Outcome(Err(e)) | Seen::Record(Err(e)) => Some(e),
            Seen::Settled(r) => r.iter().find_map(|r| r.as_ref().err()),
            _ => None,
        })
        .collect();
    // Usage beyond what the node held was capped and recorded, not refused.
    let unbacked = a.seen.iter().any(|(_, s)| {
        matches!(s, Seen::Settled(r) if r.iter().flatten().any(|(reply, _, _)| reply.unbacked > 0))
    });
    assert!(unbacked, "the scenario never capped unbacked usage");
    for wanted in [
        "OrgExists",
        "UnknownOrg",
        "IdempotencyMismatch",
        "WorkspaceExists",
        "SameWorkspace",
        "UnknownWorkspace",
        "InsufficientCredits",
        "LeasesOutstanding",
        "PrimaryWorkspace",
        "WrongMode",
        "StaleEpoch",
        "Overflow",
    ] {
        assert!(
            errors.iter().any(|e| format!("{e:?}").contains(wanted)),
            "the scenario never saw {wanted}: {errors:?}"
        );
    }
}

/// The model's answer to one batch on a Redis store: settle with CountAsConsumed, then expire
/// other silent nodes, at the store's time (`now_ms`, the settling node's new heartbeat).
fn predict(
    before: &OrgRecord,
    batch: &SettleBatch,
    now_ms: u64,
    lease_ttl: Duration,
    forget_after: Duration,
) -> (SettleReply, OrgRecord, Vec<LedgerEvent>) {
    let mut r = before.clone();
    let mut batch = batch.clone();
    if batch.version == 0 {
        batch.version = before.version;
    }
    let batch = &batch;
    let (reply, mut events) = r
        .settle(batch, now_ms, PriorLife::CountAsConsumed)
        .expect("the model accepts the batch");
    if reply.applied {
        events.extend(
            r.expire_nodes(now_ms, lease_ttl.as_millis() as u64, &batch.node)
                .expect("the model expires"),
        );
        r.forget_nodes(now_ms, forget_after.as_millis() as u64, &batch.node);
    }
    (reply, r, events)
}

async fn ledger_events(store: &dyn Store, o: &str) -> Vec<LedgerEvent> {
    store
        .ledger(&org(o), 0, 100_000)
        .await
        .expect("ledger")
        .entries
        .into_iter()
        .map(|e| e.event)
        .collect()
}

/// One batch settled, with the org as loaded after it (see [`loaded_after`]).
async fn settle_one(
    store: &dyn Store,
    o: &str,
    b: &Batch,
) -> Result<(SettleReply, OrgRecord), StoreError> {
    let batch = current(store, o, b).await;
    let (reply, view) = store
        .settle(&[(org(o), batch.clone())])
        .await
        .pop()
        .expect("one answer per batch")?;
    let record = loaded_after(store, &org(o), &reply, &view, &batch).await;
    Ok((reply, record))
}

// -------------------------------------------------------------------------------------------
// Conformance
// -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_embedded_give_the_same_answers() {
    let server = RedisServer::start();
    let store = redis_store(redis_options(&server.url())).await;
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_gives_the_same_answers() {
    let cluster = RedisCluster::start();
    let store = redis_store(redis_options(&cluster.url())).await;
    conformance(&store).await;
    // The two orgs of the scenario live in different slots, and the store reached both.
    let slot =
        |o: &str| cluster.nodes[0].cmd(&["CLUSTER", "KEYSLOT", &format!("creditd:{{{o}}}:meta")]);
    assert_ne!(slot("acme"), slot("zeta"));
    // Notices work in a cluster too (classic pub/sub reaches the subscribers of every master).
    let mut rx = store.subscribe().expect("the redis store has notices");
    let recall = Notice::Recall {
        org: org("acme"),
        from: Some(node("n1")),
        id: 1,
        cancel: None,
    };
    let started = Instant::now();
    'heard: loop {
        store.announce(&recall).await.expect("announce");
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(n) = rx.try_recv() {
            if n == recall {
                break 'heard;
            }
        }
        assert!(started.elapsed() < WAIT_MAX, "the recall was never heard");
    }
}

// -------------------------------------------------------------------------------------------
// A bounded ledger
// -------------------------------------------------------------------------------------------

/// Ledger entries kept per org by the retention test's stores: past 34, trimmed back to 32.
const RETAIN: u64 = 32;

/// Appends about twice RETAIN entries to `keep`, one at a time (purchases) and two at once
/// (settles with two usage lines), and reads pages along the way: the whole ledger from
/// cursor 0, single pages from 0 and from cursors that fall in the trimmed part as it grows.
/// `small` stays under RETAIN.
async fn retention(run: &mut Run<'_>, epoch: u64) {
    run.create("keep", Mode::Budget, "main").await;
    run.create("small", Mode::Shared, "primary").await;
    run.apply("small", purchase(10), None).await;
    run.apply("keep", purchase(1_000), None).await;
    run.apply("keep", create_ws("a"), None).await;
    run.apply("keep", create_ws("b"), None).await;
    run.apply("keep", transfer("main", "a", 300), None).await;
    run.apply("keep", transfer("main", "b", 300), None).await;
    let leases = Batch::new("n1", epoch, 1).want("a", 100).want("b", 100);
    run.settle(&[("keep", &leases)]).await;
    let mut seq = 1;
    for i in 0..40 {
        run.apply("keep", purchase(1), None).await;
        if i % 4 == 3 {
            seq += 1;
            let usage = Batch::new("n1", epoch, seq)
                .line("a", "a", [1, 0, 0, 0])
                .line("b", "b", [2, 0, 0, 0]);
            run.settle(&[("keep", &usage)]).await;
        }
        if i % 10 == 9 {
            run.ledger("keep", 7).await;
            run.page("keep", 0, 5).await;
            run.page("keep", 3, 5).await;
            run.page("keep", 30, 5).await;
            run.load("keep").await;
        }
    }
    run.ledger("keep", 1).await;
    run.ledger("keep", 1000).await;
    run.ledger("small", 1000).await;
    run.load("keep").await;
    run.load("small").await;
}

/// Both stores keep at most about `ledger_retain` entries per org, trim the same entries at
/// the same appends, never renumber one, read on from the first kept entry after a cursor in
/// the trimmed part, and say how many were trimmed; every other answer (records, views,
/// settle replies) is what a store that trims nothing gives, since the totals are counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_beyond_its_retention_is_trimmed_alike() {
    let server = RedisServer::start();
    let redis = redis_store(RedisOptions {
        ledger_retain: RETAIN,
        ..redis_options(&server.url())
    })
    .await;
    let (_dir, embedded) = embedded_keeping(1000, RETAIN);
    let (_whole_dir, whole) = embedded_keeping(1000, DEFAULT_LEDGER_RETAIN);
    let mut epoch = 0;
    for store in [&embedded as &dyn Store, &redis, &whole] {
        epoch = epoch.max(store.start_node(&node("n1")).await.expect("start").epoch);
    }
    let mut a = Run::new(&embedded);
    retention(&mut a, epoch).await;
    let mut b = Run::new(&redis);
    retention(&mut b, epoch).await;
    let mut c = Run::new(&whole);
    retention(&mut c, epoch).await;
    assert_same(&a.seen, &b.seen);
    let not_ledger = |run: &Run<'_>| -> Vec<String> {
        run.seen
            .iter()
            .filter(|(_, s)| !matches!(s, Seen::Ledger(_)))
            .map(|(label, s)| format!("{label}: {s:?}"))
            .collect()
    };
    assert_eq!(not_ledger(&a), not_ledger(&c));

    let whole_ledger = whole.ledger(&org("keep"), 0, 1000).await.expect("ledger");
    assert_eq!((whole_ledger.trimmed, whole_ledger.next), (0, None));
    let total = whole_ledger.entries.len() as u64;
    assert_eq!(
        total, 66,
        "6 changes, 40 purchases, 10 settles of 2 usage lines"
    );
    let numbered = |entries: &[creditd::store::LedgerEntry]| -> Vec<(u64, LedgerEvent)> {
        entries.iter().map(|e| (e.seq, e.event.clone())).collect()
    };
    for store in [&embedded as &dyn Store, &redis] {
        let kind = store.kind();
        let all = store.ledger(&org("keep"), 0, 1000).await.expect("ledger");
        let t = all.trimmed;
        let kept = all.entries.len() as u64;
        assert_eq!(t + kept, total, "{kind}");
        assert!(
            (RETAIN..=ledger_trim_at(RETAIN)).contains(&kept),
            "{kind} keeps {kept}"
        );
        // The kept entries are the last ones of the whole ledger, numbered as they were.
        assert_eq!(
            numbered(&all.entries),
            numbered(&whole_ledger.entries[t as usize..]),
            "{kind}"
        );
        // A cursor in the trimmed part (0 included) reads on from the first kept entry.
        for after in [0, 1, t / 2, t] {
            let p = store.ledger(&org("keep"), after, 5).await.expect("page");
            let seqs: Vec<u64> = p.entries.iter().map(|e| e.seq).collect();
            assert_eq!(
                seqs,
                (t + 1..=t + 5).collect::<Vec<_>>(),
                "{kind} after {after}"
            );
            assert_eq!(
                (p.next, p.trimmed),
                (Some(t + 5), t),
                "{kind} after {after}"
            );
        }
        let p = store.ledger(&org("keep"), t + 3, 5).await.expect("page");
        assert_eq!(p.entries[0].seq, t + 4, "{kind}");
        let end = store.ledger(&org("keep"), total, 5).await.expect("page");
        assert!(end.entries.is_empty() && end.next.is_none(), "{kind}");
        // The totals are counters: they still count what the trimmed entries recorded.
        let record = store
            .load_org(&org("keep"))
            .await
            .expect("load")
            .expect("org");
        assert!(record.is_conserved(), "{kind}");
        let view = record.view();
        assert_eq!((view.purchased, view.used), (1_040, 30), "{kind}");
        assert_eq!(view.purchased, view.total_credits + view.used, "{kind}");
        // Retention is per org: a short ledger is whole.
        let small = store.ledger(&org("small"), 0, 1000).await.expect("ledger");
        assert_eq!((small.trimmed, small.entries.len()), (0, 2), "{kind}");
    }
    // Redis keeps the count in the org's meta and only the kept entries in its list.
    let t = redis
        .ledger(&org("keep"), 0, 1)
        .await
        .expect("ledger")
        .trimmed;
    let read = |args: &[&str]| -> u64 {
        redis::from_redis_value(&server.cmd(args)).expect("a number from redis")
    };
    assert_eq!(read(&["HGET", "creditd:{keep}:meta", "ledger_trimmed"]), t);
    assert_eq!(read(&["LLEN", "creditd:{keep}:ledger"]), total - t);
    assert_eq!(
        read(&["HEXISTS", "creditd:{small}:meta", "ledger_trimmed"]),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_beyond_the_limit_are_refused_alike() {
    let server = RedisServer::start();
    let redis = redis_store(RedisOptions {
        idempotency_keys_max: 2,
        ..redis_options(&server.url())
    })
    .await;
    let (_dir, embedded) = embedded_with(2);
    let mut answers = Vec::new();
    for store in [&embedded as &dyn Store, &redis] {
        store
            .create_org(&org("acme"), Mode::Shared, &ws("primary"))
            .await
            .expect("create");
        let mut seen = Vec::new();
        for k in ["k1", "k2", "k3", "k1"] {
            let r = store
                .apply(&org("acme"), &purchase(1), Some(&key("purchase", k, "1")))
                .await;
            seen.push(r);
        }
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1]);
    assert!(
        matches!(&answers[1][2], Err(StoreError::LimitExceeded(m)) if m.contains("limit of 2")),
        "{:?}",
        answers[1][2]
    );
    assert!(matches!(&answers[1][3], Ok(o) if o.replayed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_twice_applies_once() {
    // The cluster client re-sends a command after a lost connection or a timeout: the same
    // call must not apply twice, with or without an idempotency key.
    let server = RedisServer::start();
    let store = redis_store(RedisOptions {
        idempotency_keys_max: 1,
        ..redis_options(&server.url())
    })
    .await;
    let first = store
        .create_org_as_call(
            &org("acme"),
            Mode::Budget,
            &ws("main"),
            "call-0000000000000001",
        )
        .await
        .expect("create");
    let again = store
        .create_org_as_call(
            &org("acme"),
            Mode::Budget,
            &ws("main"),
            "call-0000000000000001",
        )
        .await
        .expect("the same call again");
    assert_eq!(first, again);
    assert!(matches!(
        store
            .create_org_as_call(
                &org("acme"),
                Mode::Budget,
                &ws("main"),
                "call-0000000000000002"
            )
            .await,
        Err(StoreError::OrgExists(_))
    ));
    let bought = store
        .apply_as_call(&org("acme"), &purchase(100), "call-0000000000000003")
        .await
        .expect("buy");
    let resent = store
        .apply_as_call(&org("acme"), &purchase(100), "call-0000000000000003")
        .await
        .expect("the same purchase again");
    assert_eq!(
        bought, resent,
        "a re-sent call is the same call, not a replay"
    );
    assert_eq!(resent.view.purchased, 100);
    // A call id is remembered without the org (a copy per call would grow Redis by the org's
    // size on every call): re-sent after another change, it applies nothing and answers the
    // org as it is now.
    let record = format!(
        "{:?}",
        server.cmd(&["HKEYS", "creditd:{acme}:idem:call:call-0000000000000003"])
    );
    assert!(
        record.contains("fp") && !record.contains("state"),
        "{record}"
    );
    store
        .apply_as_call(&org("acme"), &purchase(5), "call-0000000000000004")
        .await
        .expect("another call");
    let late = store
        .apply_as_call(&org("acme"), &purchase(100), "call-0000000000000003")
        .await
        .expect("the first purchase re-sent late");
    assert_eq!(late.view.purchased, 105, "applied once");
    assert!(!late.replayed);
    // Calls without a key are not counted against the callers' keys.
    for _ in 0..3 {
        store
            .apply(&org("acme"), &purchase(1), None)
            .await
            .expect("buy");
    }
    let keyed = store
        .apply(&org("acme"), &purchase(1), Some(&key("purchase", "k", "1")))
        .await
        .expect("one key fits");
    assert_eq!(keyed.view.purchased, 109);
    let ledger = ledger_events(&store, "acme").await;
    assert_eq!(ledger.len(), 1 + 2 + 3 + 1, "{ledger:?}");
}

// -------------------------------------------------------------------------------------------
// A node's new life, per store (the stores differ here on purpose)
// -------------------------------------------------------------------------------------------

/// An org with 1,000 credits, workspace `a` holding 400, and node `n1` (at `epoch`) holding a
/// lease of 300 on `a` and a reservation of 50 taken from it.
async fn org_with_a_lease(store: &dyn Store, epoch: u64) -> OrgRecord {
    store
        .create_org(&org("acme"), Mode::Budget, &ws("main"))
        .await
        .expect("create");
    for op in [purchase(1_000), create_ws("a"), transfer("main", "a", 400)] {
        store.apply(&org("acme"), &op, None).await.expect("apply");
    }
    settle_one(store, "acme", &Batch::new("n1", epoch, 1).want("a", 300))
        .await
        .expect("lease");
    let (_, record) = settle_one(
        store,
        "acme",
        &Batch::new("n1", epoch, 2).line("a", "a", [10, 50, 0, 0]),
    )
    .await
    .expect("reserve");
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_gives_a_prior_life_back_to_the_balances() {
    let (_dir, store) = embedded_with(100);
    let first = store.start_node(&node("n1")).await.expect("start").epoch;
    let before = org_with_a_lease(&store, first).await;
    let second = store.start_node(&node("n1")).await.expect("restart");
    assert!(second.epoch > first);
    assert!(second.unclean, "no clean stop was recorded");
    // The embedded store closes the prior life at start: lease and reservation back to `a`.
    let after = store
        .load_org(&org("acme"))
        .await
        .expect("load")
        .expect("org");
    let mut expected = before.clone();
    expected
        .close_node(&node("n1"), PriorLife::ReturnToBalance)
        .expect("model");
    assert_eq!(after, expected);
    assert_eq!(after.workspaces[&ws("a")].balance, 390);
    assert!(ledger_events(&store, "acme")
        .await
        .iter()
        .any(|e| matches!(e, LedgerEvent::LeaseReturned { amount: 290, .. })));
    let (reply, record) = settle_one(
        &store,
        "acme",
        // Not empty: the embedded store does not write an empty batch that closes nothing
        // (the prior life was closed at start), so only a written one moves the epoch on.
        &Batch::new("n1", second.epoch, 1).want("a", 1),
    )
    .await
    .expect("the new life settles");
    assert!(reply.applied);
    assert!(record.is_conserved());
    let stale = settle_one(&store, "acme", &Batch::new("n1", first, 9)).await;
    assert_eq!(
        stale,
        Err(StoreError::Rule(RuleError::StaleEpoch {
            batch: first,
            current: second.epoch
        }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counts_a_prior_life_as_consumed() {
    let server = RedisServer::start();
    let store = redis_store(redis_options(&server.url())).await;
    let first = store.start_node(&node("n1")).await.expect("start");
    assert!(first.epoch > 1_700_000_000_000 && !first.unclean);
    let before = org_with_a_lease(&store, first.epoch).await;
    let second = store.start_node(&node("n1")).await.expect("restart");
    assert!(second.epoch > first.epoch && !second.unclean);
    // Nothing closes at start: the new life's first settle in the org does it.
    assert_eq!(
        store.load_org(&org("acme")).await.expect("load"),
        Some(before.clone())
    );
    let batch = Batch::new("n1", second.epoch, 1).want("a", 20);
    let (reply, after) = settle_one(&store, "acme", &batch).await.expect("settle");
    let now_ms = after.nodes[&node("n1")].seen_ms;
    let (expected_reply, expected, events) = predict(
        &before,
        &batch.0,
        now_ms,
        Duration::from_secs(30),
        Duration::from_secs(3600),
    );
    assert_eq!((reply, after.clone()), (expected_reply, expected));
    // 240 leased and 50 held count as used by `a`; 20 new lease from a's 100 left.
    assert_eq!(after.workspaces[&ws("a")].used, 10 + 240 + 50);
    assert_eq!(after.workspaces[&ws("a")].balance, 80);
    assert!(after.is_conserved());
    let ledger = ledger_events(&store, "acme").await;
    assert!(ledger.ends_with(&events), "{ledger:?} vs {events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, LedgerEvent::LeaseExpired { .. }))
            .count(),
        2
    );
    let stale = settle_one(&store, "acme", &Batch::new("n1", first.epoch, 3)).await;
    assert_eq!(
        stale,
        Err(StoreError::Rule(RuleError::StaleEpoch {
            batch: first.epoch,
            current: second.epoch
        }))
    );
}

// -------------------------------------------------------------------------------------------
// What Redis does not promise
// -------------------------------------------------------------------------------------------

fn settle_sha() -> String {
    creditd::store::redis::script_sha("redis_settle").expect("the settle script")
}

fn script_cached(server: &RedisServer, sha: &str) -> bool {
    matches!(
        server.cmd(&["SCRIPT", "EXISTS", sha]),
        redis::Value::Array(ref v) if v == &[redis::Value::Int(1)]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_sent_again_after_script_flush() {
    let server = RedisServer::start();
    let store = redis_store(redis_options(&server.url())).await;
    let epoch = store.start_node(&node("n1")).await.expect("start").epoch;
    store
        .create_org(&org("acme"), Mode::Shared, &ws("primary"))
        .await
        .expect("create");
    store
        .apply(&org("acme"), &purchase(100), None)
        .await
        .expect("buy");
    settle_one(
        &store,
        "acme",
        &Batch::new("n1", epoch, 1).want("primary", 10),
    )
    .await
    .expect("settle");
    let sha = settle_sha();
    assert!(script_cached(&server, &sha));
    server.cmd(&["SCRIPT", "FLUSH"]);
    assert!(!script_cached(&server, &sha));
    // Every kind of script recovers, a retry included.
    let b2 = Batch::new("n1", epoch, 2).line("primary", "primary", [4, 0, 0, 0]);
    let (reply, record) = settle_one(&store, "acme", &b2).await.expect("after flush");
    assert!(reply.applied);
    assert_eq!(record.workspaces[&ws("primary")].used, 4);
    assert!(script_cached(&server, &sha));
    server.cmd(&["SCRIPT", "FLUSH"]);
    let (reply, _) = settle_one(&store, "acme", &b2)
        .await
        .expect("retry after flush");
    assert!(!reply.applied);
    store
        .apply(&org("acme"), &purchase(1), None)
        .await
        .expect("apply after flush");
    server.cmd(&["SCRIPT", "FLUSH"]);
    assert!(store.load_org(&org("acme")).await.expect("load").is_some());
    server.cmd(&["SCRIPT", "FLUSH"]);
    assert_eq!(
        store
            .ledger(&org("acme"), 0, 10)
            .await
            .expect("ledger")
            .entries
            .len(),
        4
    );
    server.cmd(&["SCRIPT", "FLUSH"]);
    assert!(matches!(
        store
            .create_org(&org("acme"), Mode::Shared, &ws("primary"))
            .await,
        Err(StoreError::OrgExists(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_carries_on_after_a_redis_restart() {
    let mut server = RedisServer::start();
    let store = redis_store(redis_options(&server.url())).await;
    let epoch = store.start_node(&node("n1")).await.expect("start").epoch;
    store
        .create_org(&org("acme"), Mode::Shared, &ws("primary"))
        .await
        .expect("create");
    server.restart();
    // The old connection is gone: calls fail as Unavailable until the store has reconnected.
    let loaded = eventually_some(WAIT_MAX, "load after restart", || async {
        match store.load_org(&org("acme")).await {
            Ok(r) => Some(r),
            Err(StoreError::Unavailable(_)) => None,
            Err(e) => panic!("unexpected error after restart: {e}"),
        }
    })
    .await;
    assert_eq!(loaded, None, "no persistence: the org is gone");
    let sha = settle_sha();
    assert!(!script_cached(&server, &sha));
    store
        .create_org(&org("acme"), Mode::Shared, &ws("primary"))
        .await
        .expect("recreate");
    store
        .apply(&org("acme"), &purchase(100), None)
        .await
        .expect("buy");
    let (reply, record) = settle_one(
        &store,
        "acme",
        &Batch::new("n1", epoch, 1).want("primary", 60),
    )
    .await
    .expect("settle on the new server");
    assert!(reply.applied);
    assert_eq!(reply.grants, vec![(ws("primary"), 60)]);
    assert!(record.is_conserved());
    assert!(script_cached(&server, &sha));
}

/// Nodes n1 and n2 started (their epochs), and org `acme` in budget mode: 1,000 purchased,
/// 500 of them in workspace `a`.
async fn two_nodes_and_acme(store: &RedisStore) -> (u64, u64) {
    let e1 = store.start_node(&node("n1")).await.expect("start n1").epoch;
    let e2 = store.start_node(&node("n2")).await.expect("start n2").epoch;
    store
        .create_org(&org("acme"), Mode::Budget, &ws("main"))
        .await
        .expect("create");
    for op in [purchase(1_000), create_ws("a"), transfer("main", "a", 500)] {
        store.apply(&org("acme"), &op, None).await.expect("apply");
    }
    (e1, e2)
}

/// Node records go once they hold nothing and their node has been silent for
/// `node_forget_after` (pods come and go under new names); a tombstone answers a re-sent
/// batch of the forgotten life without applying it again, and a later batch of it is applied
/// without its wants (its usage unbacked), answered `expired` with `prev_seq` 0, as the model
/// says (`OrgRecord::forget_nodes`, `replay_forgotten`, `SettleBatch::first`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_node_is_answered_from_its_tombstone_and_granted_nothing() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(200);
    let forget = Duration::from_millis(600);
    let store = redis_store(RedisOptions {
        lease_ttl: ttl,
        node_forget_after: forget,
        ..redis_options(&server.url())
    })
    .await;
    let (e1, e2) = two_nodes_and_acme(&store).await;
    let last = Batch::new("n1", e1, 1).want("a", 200);
    settle_one(&store, "acme", &last).await.expect("n1 leases");
    // n1 falls silent; n2 keeps settling until n1's lease expired and its record is gone
    // (bounded wait on Redis's own clock).
    let mut seq = 0;
    let started = Instant::now();
    let after = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seq += 1;
        let (_, r) = settle_one(&store, "acme", &Batch::new("n2", e2, seq))
            .await
            .expect("n2 settles");
        if !r.nodes.contains_key(&node("n1")) {
            break r;
        }
        assert!(started.elapsed() < WAIT_MAX, "n1 was never forgotten");
    };
    assert_eq!(
        after.workspaces[&ws("a")].used,
        200,
        "the lease expired as consumed"
    );
    let members = server.cmd(&["SMEMBERS", "creditd:{acme}:nodes"]);
    assert_eq!(
        members,
        redis::Value::Array(vec![redis::Value::BulkString(b"n2".to_vec())])
    );
    assert_eq!(
        server.cmd(&["EXISTS", "creditd:{acme}:node:n1"]),
        redis::Value::Int(0)
    );
    let ledger_len = ledger_events(&store, "acme").await.len();

    // The last batch n1 sent, re-sent: answered from the tombstone, nothing applied.
    let (reply, record) = settle_one(&store, "acme", &last).await.expect("re-sent");
    assert!(!reply.applied && reply.expired && reply.grants.is_empty());
    assert_eq!(reply.prev_seq, 0);
    assert_eq!(record, after);
    assert_eq!(ledger_events(&store, "acme").await.len(), ledger_len);
    // An older epoch of n1 is refused.
    let stale = settle_one(&store, "acme", &Batch::new("n1", e1 - 1, 9)).await;
    assert!(
        matches!(stale, Err(StoreError::Rule(RuleError::StaleEpoch { .. }))),
        "{stale:?}"
    );

    // n1's next batch (not its first in the org): its usage is recorded, unbacked; its wants
    // are not granted; it is told, as an expiry, that the store holds nothing of it.
    let mut next = Batch::new("n1", e1, 2)
        .line("a", "a", [7, 0, 0, 0])
        .want("a", 50);
    next.0.first = false;
    let before = store
        .load_org(&org("acme"))
        .await
        .expect("load")
        .expect("org");
    let (reply, record) = settle_one(&store, "acme", &next).await.expect("applied");
    assert!(reply.applied && reply.expired && reply.grants.is_empty());
    assert_eq!((reply.prev_seq, reply.unbacked), (0, 7));
    let now_ms = record.nodes[&node("n1")].seen_ms;
    let (expected_reply, expected, events) = predict(&before, &next.0, now_ms, ttl, forget);
    assert_eq!(
        (reply, without_clock(record)),
        (expected_reply, without_clock(expected))
    );
    assert!(ledger_events(&store, "acme").await.ends_with(&events));
    assert_eq!(
        events,
        vec![LedgerEvent::UsageUnbacked {
            node: node("n1"),
            workspace: ws("a"),
            amount: 7
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nodes_leases_expire_as_consumed() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(300);
    let store = redis_store(RedisOptions {
        lease_ttl: ttl,
        ..redis_options(&server.url())
    })
    .await;
    let (e1, e2) = two_nodes_and_acme(&store).await;
    settle_one(
        &store,
        "acme",
        &Batch::new("n1", e1, 1).want("a", 200).want("main", 100),
    )
    .await
    .expect("n1 leases");
    let (_, before) = settle_one(
        &store,
        "acme",
        &Batch::new("n1", e1, 2).line("a", "a", [20, 30, 0, 0]),
    )
    .await
    .expect("n1 reserves");
    // n2 settles while n1 is fresh: nothing expires.
    let (_, fresh) = settle_one(&store, "acme", &Batch::new("n2", e2, 1).want("a", 10))
        .await
        .expect("n2 settles");
    assert_eq!(
        fresh.nodes[&node("n1")].leases,
        before.nodes[&node("n1")].leases
    );
    let seen_n1 = before.nodes[&node("n1")].seen_ms;
    // Then n1 falls silent for longer than lease_ttl while n2 keeps settling (bounded wait on
    // Redis's own clock).
    let mut seq = fresh.nodes[&node("n2")].seq;
    let started = Instant::now();
    let (reply, after) = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seq += 1;
        let r = settle_one(&store, "acme", &Batch::new("n2", e2, seq))
            .await
            .expect("n2 settles");
        let n1 = &r.1.nodes[&node("n1")];
        if n1.leases.is_empty() && n1.held.is_empty() {
            break r;
        }
        assert!(started.elapsed() < WAIT_MAX, "n1's leases never expired");
    };
    let now_ms = after.nodes[&node("n2")].seen_ms;
    assert!(now_ms - seen_n1 > ttl.as_millis() as u64);
    // What was answered is what is stored.
    let stored = store
        .load_org(&org("acme"))
        .await
        .expect("load")
        .expect("org");
    assert_eq!(stored, after);
    let n1_held_and_leased: u64 = before.nodes[&node("n1")]
        .leases
        .values()
        .chain(before.nodes[&node("n1")].held.values())
        .sum();
    assert_eq!(n1_held_and_leased, 150 + 100 + 30);
    let used: u64 = after.workspaces.values().map(|w| w.used).sum();
    assert_eq!(used, 20 + 150 + 30 + 100);
    assert!(after.is_conserved());
    let view = after.view();
    assert_eq!(view.purchased, view.total_credits + view.used);
    assert!(reply.applied);
    let expired: Vec<LedgerEvent> = ledger_events(&store, "acme")
        .await
        .into_iter()
        .filter(|e| matches!(e, LedgerEvent::LeaseExpired { .. }))
        .collect();
    assert_eq!(
        expired,
        vec![
            LedgerEvent::LeaseExpired {
                node: node("n1"),
                workspace: ws("a"),
                amount: 30
            },
            LedgerEvent::LeaseExpired {
                node: node("n1"),
                workspace: ws("a"),
                amount: 150
            },
            LedgerEvent::LeaseExpired {
                node: node("n1"),
                workspace: ws("main"),
                amount: 100
            },
        ]
    );
    // n1 comes back in the same life: the reply says its leases expired, what it spent from
    // them is recorded as unbacked and not charged again (nobody pays a credit twice), and it
    // can lease again.
    let used_before = store
        .load_org(&org("acme"))
        .await
        .unwrap()
        .unwrap()
        .view()
        .used;
    let (reply, record) = settle_one(
        &store,
        "acme",
        &Batch::new("n1", e1, 3).line("a", "a", [5, 0, 0, 0]),
    )
    .await
    .expect("a late batch is applied");
    assert!(reply.applied && reply.expired);
    assert_eq!(reply.unbacked, 5);
    assert_eq!(record.view().used, used_before);
    assert!(ledger_events(&store, "acme")
        .await
        .contains(&LedgerEvent::UsageUnbacked {
            node: node("n1"),
            workspace: ws("a"),
            amount: 5
        }));
    let (reply, _) = settle_one(&store, "acme", &Batch::new("n1", e1, 4).want("a", 5))
        .await
        .expect("n1 leases again");
    assert_eq!(reply.grants, vec![(ws("a"), 5)]);
    assert!(!reply.expired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_matches_the_model() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(200);
    let store = redis_store(RedisOptions {
        lease_ttl: ttl,
        ..redis_options(&server.url())
    })
    .await;
    store
        .create_org(&org("acme"), Mode::Shared, &ws("p"))
        .await
        .expect("create");
    store
        .apply(&org("acme"), &purchase(500), None)
        .await
        .expect("buy");
    store
        .apply(&org("acme"), &create_ws("w"), None)
        .await
        .expect("ws");
    for (n, want) in [("n1", 100), ("n2", 50), ("n3", 70)] {
        settle_one(
            &store,
            "acme",
            &Batch::new(n, 1, 1)
                .want("p", want)
                .line("w", "p", [0, 0, 0, 0]),
        )
        .await
        .expect("lease");
    }
    settle_one(
        &store,
        "acme",
        &Batch::new("n2", 1, 2).line("w", "p", [1, 9, 0, 0]),
    )
    .await
    .expect("reserve");
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let before = store
        .load_org(&org("acme"))
        .await
        .expect("load")
        .expect("org");
    let batch = Batch::new("n3", 1, 2).line("w", "p", [3, 0, 0, 0]);
    let (reply, after) = settle_one(&store, "acme", &batch).await.expect("settle");
    let now_ms = after.nodes[&node("n3")].seen_ms;
    let (expected_reply, expected, events) =
        predict(&before, &batch.0, now_ms, ttl, Duration::from_secs(3600));
    assert_eq!((reply, after), (expected_reply, expected));
    assert!(ledger_events(&store, "acme").await.ends_with(&events));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, LedgerEvent::LeaseExpired { .. }))
            .count(),
        3,
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_unavailable_within_the_timeout() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(300);
    let store = redis_store(RedisOptions {
        call_timeout: timeout,
        ..redis_options(&server.url())
    })
    .await;
    let epoch = store.start_node(&node("n1")).await.expect("start").epoch;
    store
        .create_org(&org("acme"), Mode::Shared, &ws("primary"))
        .await
        .expect("create");
    store
        .apply(&org("acme"), &purchase(100), None)
        .await
        .expect("buy");
    let batch =
        Batch::new("n1", epoch, 1)
            .want("primary", 30)
            .line("primary", "primary", [0, 0, 0, 0]);

    // A frozen server: the call times out, its outcome unknown.
    server.pause();
    let started = Instant::now();
    let r = settle_one(&store, "acme", &batch).await;
    let waited = started.elapsed();
    server.resume();
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(
        waited < timeout + Duration::from_millis(700),
        "waited {waited:?}"
    );
    // The same batch, re-sent, applies once: the grant is the first one, never doubled.
    let (reply, record) = eventually_some(WAIT_MAX, "the re-sent batch", || async {
        settle_one(&store, "acme", &batch).await.ok()
    })
    .await;
    assert_eq!(reply.grants, vec![(ws("primary"), 30)]);
    assert_eq!(record.nodes[&node("n1")].leases[&ws("primary")], 30);
    assert_eq!(record.workspaces[&ws("primary")].balance, 70);

    // A dead server: every call fails fast as Unavailable.
    server.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let r = settle_one(&store, "acme", &batch).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(700));
        let started = Instant::now();
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.apply(&org("acme"), &purchase(1), None).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(started.elapsed() < 2 * (timeout + Duration::from_millis(700)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_is_refused_or_warned_about() {
    let server = RedisServer::start();
    server.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let refused = RedisStore::open(redis_options(&server.url())).await;
    assert!(
        matches!(&refused, Err(RedisOpenError::Eviction { policy, .. }) if policy == "allkeys-lru"),
        "{:?}",
        refused.as_ref().err()
    );
    let warned = RedisStore::open(RedisOptions {
        require_noeviction: false,
        ..redis_options(&server.url())
    })
    .await;
    assert!(warned.is_ok());
    server.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    assert!(RedisStore::open(redis_options(&server.url())).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_may_evict_is_refused() {
    let cluster = RedisCluster::start();
    cluster.nodes[2].cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]);
    let refused = RedisStore::open(redis_options(&cluster.url())).await;
    assert!(
        matches!(&refused, Err(RedisOpenError::Eviction { policy, .. }) if policy == "volatile-lru"),
        "{:?}",
        refused.as_ref().err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_subscribers_and_survive_a_restart() {
    let mut server = RedisServer::start();
    let store = redis_store(redis_options(&server.url())).await;
    let mut rx = store.subscribe().expect("the redis store has notices");
    let recall = Notice::Recall {
        org: org("acme"),
        from: Some(node("n1")),
        id: 1,
        cancel: None,
    };
    // The subscription starts in the background: announce until it is heard.
    let heard = |rx: &mut tokio::sync::broadcast::Receiver<Notice>, wanted: &Notice| {
        let mut hit = false;
        while let Ok(n) = rx.try_recv() {
            hit |= n == *wanted;
        }
        hit
    };
    let started = Instant::now();
    loop {
        store.announce(&recall).await.expect("announce");
        tokio::time::sleep(Duration::from_millis(50)).await;
        if heard(&mut rx, &recall) {
            break;
        }
        assert!(started.elapsed() < WAIT_MAX, "the recall was never heard");
    }
    // A control-plane change announces itself.
    let record = store
        .create_org(&org("acme"), Mode::Shared, &ws("primary"))
        .await
        .expect("create");
    let outcome = store
        .apply(&org("acme"), &purchase(5), None)
        .await
        .expect("buy");
    assert_eq!(outcome.view.purchased, 5);
    let changed = Notice::Changed {
        org: org("acme"),
        version: record.version + 1,
    };
    let started = Instant::now();
    while !heard(&mut rx, &changed) {
        assert!(started.elapsed() < WAIT_MAX, "the change was never heard");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // After a restart the subscription comes back by itself.
    server.restart();
    let started = Instant::now();
    loop {
        let _ = store.announce(&recall).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if heard(&mut rx, &recall) {
            break;
        }
        assert!(
            started.elapsed() < WAIT_MAX,
            "the recall was never heard after the restart"
        );
    }
}
