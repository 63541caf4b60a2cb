//! Proves the lease/recall protocol between nodes, with three nodes in one process sharing one
//! store: no overspend, the last credit can always be spent, and changes reach every node.

use std::sync::Arc;
use std::time::Duration;

use creditd::config::Config;
use creditd::model::{Amount, Mode, NodeId, OrgId, WorkspaceId};
use creditd::node::{Decision, LeasePolicy, Node, NodeOptions};
use creditd::store::embedded::{EmbeddedOptions, EmbeddedStore};
use creditd::store::{ControlOp, Store};
use tokio::sync::watch;

struct Cluster {
    nodes: Vec<Arc<Node>>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn id<T>(f: fn(&str, &'static str) -> Result<T, creditd::model::InvalidInput>, s: &str) -> T {
    f(s, "id").expect("valid id")
}

async fn cluster(n: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        idempotency_keys_max: 1000,
        idempotency_ttl: Duration::from_secs(60),
        ledger_retain: creditd::config::DEFAULT_LEDGER_RETAIN,
        ..EmbeddedOptions::default()
    };
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path(), options).unwrap());
    let config = Config {
        settle_interval: Duration::from_millis(20),
        ..Config::default()
    };
    let mut node_options = NodeOptions::from_config(&config);
    node_options.lease_policy = LeasePolicy::Adaptive {
        horizon: Duration::from_millis(200),
        share_max_percent: 25,
    };
    node_options.lease_wait_max = Duration::from_secs(5);
    let (stop, stop_rx) = watch::channel(false);
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = Node::start(
            Arc::clone(&store),
            id(NodeId::parse, &format!("n{i}")),
            node_options.clone(),
        )
        .await
        .unwrap();
        let mut rx = stop_rx.clone();
        tokio::spawn(
            Arc::clone(&node).run_settler(config.settle_interval, async move {
                let _ = rx.wait_for(|s| *s).await;
            }),
        );
        nodes.push(node);
    }
    Cluster {
        nodes,
        stop,
        _dir: dir,
    }
}

async fn seed(node: &Node, org: &str, mode: Mode, budget: u64) {
    let org_id = id(OrgId::parse, org);
    node.create_org(&org_id, mode, &id(WorkspaceId::parse, "primary"))
        .await
        .unwrap();
    node.change(
        org,
        ControlOp::Purchase {
            amount: Amount::new(budget).unwrap(),
        },
        None,
    )
    .await
    .unwrap();
    if mode == Mode::Budget {
        node.change(
            org,
            ControlOp::CreateWorkspace {
                workspace: id(WorkspaceId::parse, "ws"),
            },
            None,
        )
        .await
        .unwrap();
        let op = ControlOp::Transfer {
            from: id(WorkspaceId::parse, "primary"),
            to: id(WorkspaceId::parse, "ws"),
            amount: Amount::new(budget).unwrap(),
        };
        node.change(org, op, None).await.unwrap();
    }
}

/// The org view once it shows `used` credits consumed: a node's view of other nodes' usage
/// lags by about one settle interval (docs/api.md).
async fn view_with_used(node: &Node, org: &str, used: u64) -> creditd::model::OrgView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = node.org_view(org).await.unwrap();
        assert!(view.used <= used, "more used than allowed: {view:?}");
        if view.used == used {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage of all nodes not settled: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Debits `amount` from `org/ws` on every node from `tasks` tasks per node, each at most
/// `per_task` times; returns the credits allowed.
async fn hammer(nodes: &[Arc<Node>], org: &str, ws: &str, tasks: usize, per_task: usize) -> u64 {
    let mut handles = Vec::new();
    for node in nodes {
        for _ in 0..tasks {
            let (node, org, ws) = (Arc::clone(node), org.to_string(), ws.to_string());
            handles.push(tokio::spawn(async move {
                let mut allowed = 0u64;
                for _ in 0..per_task {
                    match node.debit(&org, &ws, Amount::new(1).unwrap()).await {
                        Ok(Decision::Allowed { .. }) => allowed += 1,
                        Ok(Decision::Insufficient { .. }) => break,
                        Err(e) => panic!("debit failed: {e}"),
                    }
                }
                allowed
            }));
        }
    }
    let mut total = 0;
    for h in handles {
        total += tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("bounded")
            .unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_credit_is_spent_exactly_once_across_three_nodes() {
    let c = cluster(3).await;
    seed(&c.nodes[0], "acme", Mode::Budget, 1).await;
    let allowed = hammer(&c.nodes, "acme", "ws", 8, 5).await;
    assert_eq!(allowed, 1);
    let view = view_with_used(&c.nodes[1], "acme", 1).await;
    assert_eq!(view.purchased, view.total_credits + view.used);
    c.stop.send(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_runs_to_exhaustion_with_nothing_stranded() {
    let c = cluster(3).await;
    seed(&c.nodes[0], "acme", Mode::Budget, 1_000).await;
    let allowed = hammer(&c.nodes, "acme", "ws", 4, 400).await;
    assert_eq!(allowed, 1_000, "every credit spendable, none twice");
    view_with_used(&c.nodes[0], "acme", 1_000).await;
    for node in &c.nodes {
        let view = node.org_view("acme").await.unwrap();
        assert_eq!(view.purchased, view.total_credits + view.used);
    }
    c.stop.send(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pool_is_shared_across_nodes_and_workspaces() {
    let c = cluster(3).await;
    seed(&c.nodes[0], "acme", Mode::Shared, 300).await;
    c.nodes[0]
        .change(
            "acme",
            ControlOp::CreateWorkspace {
                workspace: id(WorkspaceId::parse, "ws"),
            },
            None,
        )
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        hammer(&c.nodes, "acme", "ws", 2, 200),
        hammer(&c.nodes, "acme", "primary", 2, 200)
    );
    assert_eq!(a + b, 300);
    let view = view_with_used(&c.nodes[2], "acme", 300).await;
    assert_eq!(view.purchased, view.total_credits + view.used);
    c.stop.send(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_on_one_node_is_seen_and_spendable_on_the_others() {
    let c = cluster(3).await;
    seed(&c.nodes[0], "acme", Mode::Budget, 100).await;
    // Every node has the org loaded and some lease out.
    for node in &c.nodes {
        assert!(matches!(
            node.debit("acme", "ws", Amount::new(1).unwrap()).await,
            Ok(Decision::Allowed { .. })
        ));
    }
    c.nodes[0]
        .change(
            "acme",
            ControlOp::Purchase {
                amount: Amount::new(50).unwrap(),
            },
            None,
        )
        .await
        .unwrap();
    let view = view_with_used(&c.nodes[0], "acme", 3).await;
    // Moves the rest of ws back to the Primary: needs leases other nodes hold.
    let left = view.workspace("ws").unwrap().balance;
    let op = ControlOp::Transfer {
        from: id(WorkspaceId::parse, "ws"),
        to: id(WorkspaceId::parse, "primary"),
        amount: Amount::new(left).unwrap(),
    };
    c.nodes[1].change("acme", op, None).await.unwrap();
    // ws is empty everywhere now.
    for node in &c.nodes {
        assert!(matches!(
            node.debit("acme", "ws", Amount::new(1).unwrap()).await,
            Ok(Decision::Insufficient { .. })
        ));
    }
    let op = ControlOp::Transfer {
        from: id(WorkspaceId::parse, "primary"),
        to: id(WorkspaceId::parse, "ws"),
        amount: Amount::new(10).unwrap(),
    };
    c.nodes[2].change("acme", op, None).await.unwrap();
    assert_eq!(hammer(&c.nodes, "acme", "ws", 2, 20).await, 10);
    let view = view_with_used(&c.nodes[0], "acme", 13).await;
    assert_eq!(view.purchased, view.total_credits + view.used);
    c.stop.send(true).unwrap();
}
