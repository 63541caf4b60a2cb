//! Proves the README's walk-through: the product definition's example (10,000 purchased;
//! 2,000 to A and 3,000 to B; the Primary shows 5,000) through the real HTTP API.

mod common;

use common::{assert_conserved, balance, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_leaves_five_thousand_in_the_primary() {
    let node = TestNode::start().await;
    let c = &node.client;
    c.create_org("acme", "budget").await;
    c.purchase("acme", 10_000).await;
    c.create_workspace("acme", "ws-a").await;
    c.create_workspace("acme", "ws-b").await;
    assert_eq!(
        c.transfer("acme", "primary", "ws-a", 2_000).await.status,
        200
    );
    assert_eq!(
        c.transfer("acme", "primary", "ws-b", 3_000).await.status,
        200
    );
    let view = c.org("acme").await;
    assert_eq!(balance(&view, "primary"), 5_000);
    assert_eq!(balance(&view, "ws-a"), 2_000);
    assert_eq!(balance(&view, "ws-b"), 3_000);
    assert_eq!(view["purchased"], 10_000);
    assert_conserved(&view);
    node.stop().await;
}

/// A stopped server releases its store: the same data folder opens again in this process
/// (the notice listener must not keep the node, and with it the database lock, alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_can_be_started_again_on_its_data() {
    let node = TestNode::start().await;
    node.client.create_org("acme", "shared").await;
    node.client.purchase("acme", 10).await;
    assert_eq!(node.client.debit("acme", "primary", 3).await.status, 200);
    let dir = node.stop().await;
    let again = TestNode::start_with(|c| c.data_dir = dir.path().to_path_buf()).await;
    let view = again.client.org("acme").await;
    assert_eq!(balance(&view, "primary"), 7);
    assert_conserved(&view);
    again.stop().await;
}
