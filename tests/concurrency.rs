//! Proves that concurrent debits never overspend and never lose a credit: exactly the budget or
//! pool is allowed when many tasks race for the last credits, also while operators transfer,
//! purchase, delete workspaces and switch modes, over HTTP and on the node directly.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{assert_conserved, balance, eventually, used, Client, TestNode};
use creditd::config::Config;
use creditd::model::{Amount, Mode, NodeId, OrgId, WorkspaceId};
use creditd::node::{Decision, Node, NodeOptions};
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore};
use creditd::store::ControlOp;
use tokio::task::JoinSet;

const TASKS: usize = 64;

/// A debit that finds its lease recalled by a control-plane change waits for that change for
/// at most `lease_wait_max`, then answers 503. On a loaded 2-core machine an fsync can take
/// longer than the default 500ms; the tests that race operators give it room, so that a 503
/// means a real failure to decide rather than a slow disk.
const LEASE_WAIT_MAX_UNDER_LOAD: Duration = Duration::from_secs(10);

/// Status counts of many answers.
#[derive(Debug, Default)]
struct Tally {
    by_status: HashMap<u16, u64>,
    /// Credits allowed (sum of amounts answered 200), per workspace.
    allowed: HashMap<String, u64>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        for (s, n) in other.by_status {
            *self.by_status.entry(s).or_default() += n;
        }
        for (ws, n) in other.allowed {
            *self.allowed.entry(ws).or_default() += n;
        }
    }

    fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.by_status.values().sum()
    }

    fn allowed_on(&self, ws: &str) -> u64 {
        self.allowed.get(ws).copied().unwrap_or(0)
    }

    fn allowed_total(&self) -> u64 {
        self.allowed.values().sum()
    }

    fn only(&self, statuses: &[u16]) {
        for s in self.by_status.keys() {
            assert!(statuses.contains(s), "unexpected status {s}: {self:?}");
        }
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `TASKS` tasks, each sending `per_task` debits of `amount` on the workspace `pick`
/// chooses for (task, attempt), or fewer if `stop` is set first; `answered` counts every
/// answer as it arrives.
async fn debit_storm(
    client: &Client,
    org: &'static str,
    per_task: usize,
    amount: u64,
    pick: fn(usize, usize) -> &'static str,
    answered: Arc<AtomicU64>,
    stop: Option<Arc<AtomicBool>>,
) -> Tally {
    let mut set = JoinSet::new();
    for task in 0..TASKS {
        let client = client.clone();
        let answered = Arc::clone(&answered);
        let stop = stop.clone();
        set.spawn(async move {
            let mut tally = Tally::default();
            for attempt in 0..per_task {
                if stop.as_ref().is_some_and(|s| s.load(Ordering::Acquire)) {
                    break;
                }
                let ws = pick(task, attempt);
                let a = client.debit(org, ws, amount).await;
                let status = a.status.as_u16();
                match status {
                    200 => {
                        assert_eq!(a.body["allowed"], true, "{}", a.text);
                        *tally.allowed.entry(ws.to_string()).or_default() += amount;
                    }
                    402 => {
                        assert_eq!(a.body["allowed"], false, "{}", a.text);
                        assert_eq!(a.error_code(), "insufficient_credits");
                    }
                    404 => assert_eq!(a.error_code(), "unknown_workspace", "{}", a.text),
                    _ => {}
                }
                *tally.by_status.entry(status).or_default() += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            tally
        });
    }
    let mut total = Tally::default();
    while let Some(done) = set.join_next().await {
        total.add(done.expect("debit task panicked"));
    }
    if stop.is_none() {
        assert_eq!(total.total(), (TASKS * per_task) as u64);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_debits_allow_exactly_the_budget() {
    const BUDGET: u64 = 300;
    let node = TestNode::start().await;
    let c = &node.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1_000).await;
    c.create_workspace("acme", "ws-a").await;
    assert_eq!(
        c.transfer("acme", "primary", "ws-a", BUDGET).await.status,
        200
    );

    let tally = debit_storm(c, "acme", 8, 1, |_, _| "ws-a", Arc::default(), None).await;
    tally.only(&[200, 402]);
    assert_eq!(tally.count(200), BUDGET, "{tally:?}");
    assert_eq!(tally.count(402), (TASKS * 8) as u64 - BUDGET);

    let view = c.org("acme").await;
    assert_eq!(used(&view, "ws-a"), BUDGET);
    assert_eq!(balance(&view, "ws-a"), 0);
    assert_eq!(
        balance(&view, "primary"),
        700,
        "the budget never reaches into the Primary"
    );
    assert_eq!(view["used"], BUDGET);
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_debits_in_shared_mode_allow_exactly_the_pool() {
    const POOL: u64 = 400;
    const SPENDERS: [&str; 5] = ["primary", "ws-1", "ws-2", "ws-3", "ws-4"];
    let node = TestNode::start().await;
    let c = &node.client;
    c.create_org("acme", "shared").await;
    for ws in &SPENDERS[1..] {
        c.create_workspace("acme", ws).await;
    }
    c.purchase("acme", POOL).await;

    let tally = debit_storm(
        c,
        "acme",
        10,
        1,
        |task, attempt| SPENDERS[(task + attempt) % SPENDERS.len()],
        Arc::default(),
        None,
    )
    .await;
    tally.only(&[200, 402]);
    assert_eq!(tally.count(200), POOL, "{tally:?}");

    let view = c.org("acme").await;
    assert_eq!(view["used"], POOL);
    for ws in SPENDERS {
        assert_eq!(used(&view, ws), tally.allowed_on(ws), "used of {ws}");
        assert_eq!(balance(&view, ws), 0);
    }
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_racing_transfers_and_purchases_never_overspend() {
    const START: u64 = 100;
    const AMOUNT: u64 = 3;
    const ROUNDS: u64 = 20;
    /// Bounds each debit task; the operator finishes long before.
    const STORM_ATTEMPTS_MAX: usize = 500;
    let node = TestNode::start_with(|c| c.lease_wait_max = LEASE_WAIT_MAX_UNDER_LOAD).await;
    let c = node.client.clone();
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1_000).await;
    c.create_workspace("acme", "ws-a").await;
    assert_eq!(
        c.transfer("acme", "primary", "ws-a", START).await.status,
        200
    );

    // The operator: credits in, one credit out (refused when ws-a has none left: the debits
    // leave 0, 1 or 2 of it), purchases.
    // The debits go on until it is done, so that every one of its operations races them.
    let operator_done = Arc::new(AtomicBool::new(false));
    let operator = {
        let c = c.clone();
        let done = SetOnDrop(Arc::clone(&operator_done));
        tokio::spawn(async move {
            // Set however the task ends, so that a failing operator also ends the debits.
            let _done = done;
            let (mut moved_in, mut moved_out, mut refused) = (0u64, 0u64, 0u64);
            for round in 0..ROUNDS {
                let a = c.transfer("acme", "primary", "ws-a", 20).await;
                assert_eq!(a.status, 200, "transfer in: {}", a.text);
                moved_in += 20;
                if round % 2 == 1 {
                    let a = c.transfer("acme", "ws-a", "primary", 1).await;
                    match a.status.as_u16() {
                        200 => moved_out += 1,
                        409 => {
                            assert_eq!(a.error_code(), "insufficient_credits", "{}", a.text);
                            refused += 1;
                        }
                        s => panic!("transfer out answered {s}: {}", a.text),
                    }
                }
                c.purchase("acme", 50).await;
            }
            (moved_in, moved_out, refused)
        })
    };
    let tally = debit_storm(
        &c,
        "acme",
        STORM_ATTEMPTS_MAX,
        AMOUNT,
        |_, _| "ws-a",
        Arc::default(),
        Some(Arc::clone(&operator_done)),
    )
    .await;
    let (moved_in, moved_out, _refused) = operator.await.expect("operator task");
    assert!(
        tally.total() < (TASKS * STORM_ATTEMPTS_MAX) as u64,
        "the debits ran out ({STORM_ATTEMPTS_MAX} per task) before the operator finished"
    );
    tally.only(&[200, 402]);

    let assigned = START + moved_in - moved_out;
    let allowed = tally.allowed_total();
    assert!(
        allowed <= assigned,
        "overspend: {allowed} allowed, {assigned} ever assigned to ws-a"
    );
    let view = c.org("acme").await;
    assert_eq!(
        used(&view, "ws-a"),
        allowed,
        "every allowed debit is charged, once"
    );
    assert_eq!(balance(&view, "ws-a"), assigned - allowed);
    assert_eq!(view["purchased"], 1_000 + 50 * ROUNDS);
    assert_eq!(
        balance(&view, "primary"),
        1_000 + 50 * ROUNDS - START - moved_in + moved_out
    );
    assert_conserved(&view);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_racing_a_deletion_and_a_mode_switch_lose_nothing() {
    const PURCHASED: u64 = 2_000;
    const EACH: u64 = 300;
    const AMOUNT: u64 = 2;
    const PER_TASK: usize = 20;
    const SPENDERS: [&str; 4] = ["primary", "ws-a", "ws-b", "ws-c"];
    let node = TestNode::start_with(|c| c.lease_wait_max = LEASE_WAIT_MAX_UNDER_LOAD).await;
    let c = node.client.clone();
    c.create_org("acme", "budget").await;
    c.purchase("acme", PURCHASED).await;
    for ws in &SPENDERS[1..] {
        c.create_workspace("acme", ws).await;
        assert_eq!(c.transfer("acme", "primary", ws, EACH).await.status, 200);
    }

    let answered = Arc::new(AtomicU64::new(0));
    let operator = {
        let c = c.clone();
        let answered = Arc::clone(&answered);
        tokio::spawn(async move {
            // Start while the storm is in full swing, not before or after it.
            eventually(Duration::from_secs(60), "a first wave of debits", || {
                let answered = Arc::clone(&answered);
                async move { answered.load(Ordering::Relaxed) >= 150 }
            })
            .await;
            let deleted = c.delete("/v1/orgs/acme/workspaces/ws-c").await;
            assert_eq!(deleted.status, 200, "delete: {}", deleted.text);
            let returned = deleted.body["returned_to_primary"].as_u64().unwrap();
            let shared = c.set_mode("acme", "shared").await;
            assert_eq!(shared["mode"], "shared");
            returned
        })
    };
    let tally = debit_storm(
        &c,
        "acme",
        PER_TASK,
        AMOUNT,
        |task, attempt| SPENDERS[(task + attempt) % SPENDERS.len()],
        Arc::clone(&answered),
        None,
    )
    .await;
    let returned = operator.await.expect("operator task");
    tally.only(&[200, 402, 404]);
    assert!(tally.count(404) > 0, "no debit saw the deletion: {tally:?}");

    let allowed = tally.allowed_total();
    let view = c.org("acme").await;
    assert_eq!(view["mode"], "shared");
    assert!(
        view["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["workspace"] != "ws-c"),
        "ws-c still listed: {view}"
    );
    // Nothing lost: every allowed credit is in `used` (ws-c's in the deleted part), no more.
    assert_eq!(view["used"], allowed, "{tally:?} {view}");
    for ws in ["primary", "ws-a", "ws-b"] {
        assert_eq!(used(&view, ws), tally.allowed_on(ws), "used of {ws}");
    }
    // ws-c's credits were spent or returned at deletion, nothing in between.
    assert_eq!(tally.allowed_on("ws-c") + returned, EACH);
    assert_eq!(balance(&view, "primary"), PURCHASED - allowed);
    assert_eq!(balance(&view, "ws-a"), 0);
    assert_eq!(balance(&view, "ws-b"), 0);
    assert_conserved(&view);
    node.stop().await;
}

/// The node without HTTP: the same last-credit race on `Node::debit` and on reservations
/// committed in full, from many tokio tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_itself_allows_exactly_the_budget_to_racing_tasks() {
    const BUDGET: u64 = 500;
    const PER_TASK: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::default();
    let store = EmbeddedStore::open(
        dir.path(),
        EmbeddedOptions {
            idempotency_keys_max: config.idempotency_keys_max,
            idempotency_ttl: config.idempotency_ttl,
            ledger_retain: config.ledger_retain,
            ..EmbeddedOptions::default()
        },
    )
    .expect("open the embedded store");
    let node = Node::start(
        Arc::new(store),
        NodeId::parse("node-1", "node_id").unwrap(),
        NodeOptions::from_config(&config),
    )
    .await
    .expect("start the node");
    let org = OrgId::parse("acme", "org").unwrap();
    let ws = |s: &str| WorkspaceId::parse(s, "workspace").unwrap();
    let amount = |n: u64| Amount::new(n).unwrap();
    node.create_org(&org, Mode::Budget, &ws("primary"))
        .await
        .unwrap();
    for op in [
        ControlOp::Purchase {
            amount: amount(BUDGET * 3),
        },
        ControlOp::CreateWorkspace {
            workspace: ws("ws-a"),
        },
        ControlOp::Transfer {
            from: ws("primary"),
            to: ws("ws-a"),
            amount: amount(BUDGET),
        },
    ] {
        node.change("acme", op, None).await.unwrap();
    }

    let mut set = JoinSet::new();
    for task in 0..TASKS {
        let node = Arc::clone(&node);
        set.spawn(async move {
            let (mut allowed, mut refused) = (0u64, 0u64);
            for attempt in 0..PER_TASK {
                let one = Amount::new(1).unwrap();
                // Half the attempts debit, half reserve and then commit in full.
                let decision = if (task + attempt) % 2 == 0 {
                    node.debit("acme", "ws-a", one).await.unwrap()
                } else {
                    let r = node.reserve("acme", "ws-a", one, None, None).await.unwrap();
                    if let Some(id) = &r.id {
                        assert_eq!(node.commit(id, 1).unwrap(), (1, 0));
                    }
                    r.decision
                };
                match decision {
                    Decision::Allowed { .. } => allowed += 1,
                    Decision::Insufficient { remaining } => {
                        assert_eq!(remaining, 0, "refused while credits remain");
                        refused += 1
                    }
                }
            }
            (allowed, refused)
        });
    }
    let (mut allowed, mut refused) = (0, 0);
    while let Some(done) = set.join_next().await {
        let (a, r) = done.expect("task panicked");
        allowed += a;
        refused += r;
    }
    assert_eq!(allowed, BUDGET);
    assert_eq!(refused, (TASKS * PER_TASK) as u64 - BUDGET);

    let view = node.org_view("acme").await.unwrap();
    let a = view.workspace("ws-a").unwrap();
    assert_eq!((a.used, a.balance, a.held), (BUDGET, 0, 0));
    assert_eq!(view.workspace("primary").unwrap().balance, BUDGET * 2);
    assert_eq!(view.purchased, view.total_credits + view.used);
    assert_eq!(view.used, BUDGET);
    node.stop(Duration::from_secs(5)).await.unwrap();
}
