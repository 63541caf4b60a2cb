//! Proves each product rule of docs/api.md (1-7) and each settle/close rule of docs/design.md on the pure
//! model, one test per rule, including that every refused operation leaves the record unchanged.

use super::*;
use crate::store::ControlOp;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const PRIMARY: &str = "primary";

fn ws(s: &str) -> WorkspaceId {
    WorkspaceId::parse(s, "workspace").expect("test ids are valid")
}

fn node(s: &str) -> NodeId {
    NodeId::parse(s, "node").expect("test ids are valid")
}

fn amt(n: u64) -> Amount {
    Amount::new(n).expect("test amounts are in range")
}

/// An org with no credits and no workspace but its Primary.
fn org(mode: Mode) -> OrgRecord {
    let org = OrgId::parse("acme", "org").expect("test ids are valid");
    OrgRecord::new(org, mode, ws(PRIMARY)).0
}

/// A budget-mode org with `credits` purchased and each `(workspace, credits)` transferred to it.
fn budget_org(credits: u64, workspaces: &[(&str, u64)]) -> OrgRecord {
    let mut r = org(Mode::Budget);
    r.purchase(amt(credits)).unwrap();
    for &(name, n) in workspaces {
        r.create_workspace(ws(name)).unwrap();
        if n > 0 {
            r.transfer(&ws(PRIMARY), &ws(name), amt(n)).unwrap();
        }
    }
    assert!(r.is_conserved());
    r
}

fn balance(r: &OrgRecord, name: &str) -> u64 {
    r.workspaces[&ws(name)].balance
}

fn used(r: &OrgRecord, name: &str) -> u64 {
    r.workspaces[&ws(name)].used
}

fn lease(r: &OrgRecord, n: &str, spender: &str) -> u64 {
    r.nodes
        .get(&node(n))
        .and_then(|s| s.leases.get(&ws(spender)).copied())
        .unwrap_or(0)
}

fn held(r: &OrgRecord, n: &str, workspace: &str) -> u64 {
    r.nodes
        .get(&node(n))
        .and_then(|s| s.held.get(&ws(workspace)).copied())
        .unwrap_or(0)
}

fn holds_nothing(r: &OrgRecord, n: &str) -> bool {
    let share = &r.nodes[&node(n)];
    share.leases.is_empty() && share.held.is_empty() && share.held_from.is_empty()
}

fn batch(n: &str, epoch: u64, seq: u64) -> SettleBatch {
    SettleBatch {
        node: node(n),
        epoch,
        seq,
        // 0: filled in by `settle` with the record's version when the batch is applied.
        version: 0,
        lines: Vec::new(),
        release: Vec::new(),
        want: Vec::new(),
        first: true,
    }
}

/// The batch as a node whose view is the record's current version sends it.
fn current(r: &OrgRecord, b: &SettleBatch) -> SettleBatch {
    let mut b = b.clone();
    if b.version == 0 {
        b.version = r.version;
    }
    b
}

fn want(mut b: SettleBatch, spender: &str, n: u64) -> SettleBatch {
    b.want.push((ws(spender), n));
    b
}

fn release(mut b: SettleBatch, spender: &str, n: u64) -> SettleBatch {
    b.release.push((ws(spender), n));
    b
}

/// A usage line of increments: `(consumed, reserved, committed, released)`.
fn line(mut b: SettleBatch, workspace: &str, spender: &str, c: [u64; 4]) -> SettleBatch {
    b.lines.push(UsageLine {
        workspace: ws(workspace),
        spender: ws(spender),
        consumed: c[0],
        reserved: c[1],
        committed: c[2],
        released: c[3],
    });
    b
}

/// Applies a batch that must succeed, and checks conservation and the API's view identity.
fn settle(r: &mut OrgRecord, b: &SettleBatch) -> (SettleReply, Vec<LedgerEvent>) {
    let out = r
        .settle(&current(r, b), 1_000, PriorLife::CountAsConsumed)
        .expect("batch applies");
    assert_conserved(r);
    out
}

/// Rule 7 on the record, and `purchased == total_credits + used` on its view.
fn assert_conserved(r: &OrgRecord) {
    assert!(r.is_conserved(), "not conserved: {r:?}");
    let v = r.view();
    assert_eq!(v.purchased, v.total_credits + v.used, "view: {v:?}");
    let balances: u64 = v.workspaces.iter().map(|w| w.balance).sum();
    let held: u64 = v.workspaces.iter().map(|w| w.held).sum();
    assert_eq!(v.total_credits, balances + v.held, "view: {v:?}");
    // A deleted workspace's open reservations are in the org's `held` but in no workspace's.
    assert!(v.held >= held, "view: {v:?}");
}

/// Runs `op`, which must be refused, and checks that the record did not change at all: equal to
/// a clone taken before, field for field and byte for byte as serialized.
fn refused<T: std::fmt::Debug>(
    r: &mut OrgRecord,
    op: impl FnOnce(&mut OrgRecord) -> Result<T, RuleError>,
) -> RuleError {
    let before = r.clone();
    let bytes_before = serde_json::to_vec(&before).unwrap();
    let err = op(r).expect_err("operation must be refused");
    assert_eq!(*r, before, "a refused operation changed the record ({err})");
    assert_eq!(serde_json::to_vec(r).unwrap(), bytes_before);
    err
}

// ---------------------------------------------------------------------------------------------
// Rules 1-7 (docs/api.md, "Product rules")
// ---------------------------------------------------------------------------------------------

#[test]
fn rule1_purchases_land_in_the_primary() {
    for mode in [Mode::Budget, Mode::Shared] {
        let mut r = org(mode);
        r.create_workspace(ws("ws-a")).unwrap();
        let version = r.version;
        let event = r.purchase(amt(700)).unwrap();
        assert_eq!(
            event,
            LedgerEvent::Purchase {
                workspace: ws(PRIMARY),
                amount: 700
            }
        );
        r.purchase(amt(300)).unwrap();
        assert_eq!(balance(&r, PRIMARY), 1_000);
        assert_eq!(balance(&r, "ws-a"), 0);
        assert_eq!(r.purchased, 1_000);
        assert_eq!(r.version, version + 2, "each purchase is a change");
        assert_conserved(&r);
    }
}

#[test]
fn rule2_primary_shows_the_credits_not_allocated_to_other_workspaces() {
    let r = budget_org(10_000, &[("ws-a", 2_000), ("ws-b", 3_000)]);
    let v = r.view();
    assert_eq!(v.workspace(PRIMARY).unwrap().balance, 5_000);
    assert!(v.workspace(PRIMARY).unwrap().primary);
    assert_eq!(v.workspace("ws-a").unwrap().balance, 2_000);
    assert_eq!(v.workspace("ws-b").unwrap().balance, 3_000);
    assert!(!v.workspace("ws-a").unwrap().primary);
    assert_eq!(v.purchased, 10_000);
    assert_eq!(v.total_credits, 10_000);
    assert_eq!((v.used, v.held), (0, 0));
    assert_conserved(&r);
}

#[test]
fn rule3_transfers_move_credits_at_once_in_budget_mode() {
    let mut r = budget_org(1_000, &[("ws-a", 0), ("ws-b", 0)]);
    r.check_transfer(&ws(PRIMARY), &ws("ws-a"), amt(400))
        .unwrap();
    let event = r.transfer(&ws(PRIMARY), &ws("ws-a"), amt(400)).unwrap();
    assert_eq!(
        event,
        LedgerEvent::Transfer {
            from: ws(PRIMARY),
            to: ws("ws-a"),
            amount: 400
        }
    );
    // Between two non-primary workspaces, and the source's whole balance.
    r.transfer(&ws("ws-a"), &ws("ws-b"), amt(400)).unwrap();
    assert_eq!(
        (
            balance(&r, PRIMARY),
            balance(&r, "ws-a"),
            balance(&r, "ws-b")
        ),
        (600, 0, 400)
    );
    assert_conserved(&r);
}

#[test]
fn rule3_transfers_are_refused_in_shared_mode() {
    let mut r = org(Mode::Shared);
    r.purchase(amt(1_000)).unwrap();
    r.create_workspace(ws("ws-a")).unwrap();
    let err = refused(&mut r, |r| r.transfer(&ws(PRIMARY), &ws("ws-a"), amt(1)));
    assert_eq!(err, RuleError::WrongMode(Mode::Shared));
    assert_eq!(
        r.check_transfer(&ws(PRIMARY), &ws("ws-a"), amt(1)),
        Err(RuleError::WrongMode(Mode::Shared))
    );
}

#[test]
fn rule3_a_transfer_never_exceeds_what_the_source_can_give() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    let err = refused(&mut r, |r| r.transfer(&ws("ws-a"), &ws(PRIMARY), amt(301)));
    assert_eq!(
        err,
        RuleError::InsufficientCredits {
            workspace: ws("ws-a"),
            available: 300,
            wanted: 301
        }
    );
    let err = refused(&mut r, |r| r.transfer(&ws(PRIMARY), &ws("ws-a"), amt(701)));
    assert!(matches!(
        err,
        RuleError::InsufficientCredits { available: 700, .. }
    ));
}

#[test]
fn rule3_a_transfer_to_the_same_workspace_is_refused() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    let err = refused(&mut r, |r| r.transfer(&ws("ws-a"), &ws("ws-a"), amt(1)));
    assert_eq!(err, RuleError::SameWorkspace);
}

#[test]
fn rule3_a_transfer_with_an_unknown_workspace_is_refused() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    let err = refused(&mut r, |r| r.transfer(&ws("nope"), &ws("ws-a"), amt(1)));
    assert_eq!(err, RuleError::UnknownWorkspace(ws("nope")));
    let err = refused(&mut r, |r| r.transfer(&ws("ws-a"), &ws("nope"), amt(1)));
    assert_eq!(err, RuleError::UnknownWorkspace(ws("nope")));
}

#[test]
fn rule3_leased_credits_must_be_recalled_before_a_transfer() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 400));
    assert_eq!((balance(&r, "ws-a"), lease(&r, "n1", "ws-a")), (100, 400));
    // What no node holds can still move.
    r.transfer(&ws("ws-a"), &ws(PRIMARY), amt(100)).unwrap();
    let err = refused(&mut r, |r| r.transfer(&ws("ws-a"), &ws(PRIMARY), amt(50)));
    assert_eq!(
        err,
        RuleError::LeasesOutstanding {
            workspace: ws("ws-a"),
            leased: 400
        }
    );
    // More than balance and leases together is plainly insufficient.
    let err = refused(&mut r, |r| r.transfer(&ws("ws-a"), &ws(PRIMARY), amt(401)));
    assert_eq!(
        err,
        RuleError::InsufficientCredits {
            workspace: ws("ws-a"),
            available: 400,
            wanted: 401
        }
    );
    // After the recall, the transfer applies.
    settle(&mut r, &release(batch("n1", 1, 2), "ws-a", 400));
    r.transfer(&ws("ws-a"), &ws(PRIMARY), amt(400)).unwrap();
    assert_eq!(balance(&r, PRIMARY), 1_000);
    assert_conserved(&r);
}

#[test]
fn rule4_an_exhausted_spender_gets_nothing_until_credits_are_assigned() {
    let mut r = budget_org(1_000, &[("ws-a", 10)]);
    let (reply, _) = settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    assert_eq!(reply.grants, vec![(ws("ws-a"), 10)]);
    // The node spends the whole lease and asks for more: blocked, nothing granted.
    let b = line(batch("n1", 1, 2), "ws-a", "ws-a", [10, 0, 0, 0]);
    let (reply, _) = settle(&mut r, &want(b, "ws-a", 100));
    assert!(reply.applied);
    assert!(reply.grants.is_empty(), "{:?}", reply.grants);
    assert_eq!((balance(&r, "ws-a"), lease(&r, "n1", "ws-a")), (0, 0));
    // The Primary's credits are not the workspace's: still nothing.
    let (reply, _) = settle(&mut r, &want(batch("n1", 1, 3), "ws-a", 100));
    assert!(reply.grants.is_empty());
    // A transfer in refills it at once.
    let version = reply.version;
    r.transfer(&ws(PRIMARY), &ws("ws-a"), amt(25)).unwrap();
    let (reply, _) = settle(&mut r, &want(batch("n1", 1, 4), "ws-a", 100));
    assert!(reply.version > version, "the node learns of the change");
    assert_eq!(reply.grants, vec![(ws("ws-a"), 25)]);
    assert_eq!(used(&r, "ws-a"), 10);
}

#[test]
fn rule5_deleting_a_workspace_returns_its_credits_to_the_primary() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    // ws-a consumes 40 through a node, which then gives the rest back.
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 300));
    let b = line(batch("n1", 1, 2), "ws-a", "ws-a", [40, 0, 0, 0]);
    settle(&mut r, &release(b, "ws-a", 260));
    let (returned, event) = r.delete_workspace(&ws("ws-a")).unwrap();
    assert_eq!(returned, 260);
    assert_eq!(
        event,
        LedgerEvent::WorkspaceDeleted {
            workspace: ws("ws-a"),
            returned_to_primary: 260
        }
    );
    assert!(!r.workspaces.contains_key(&ws("ws-a")));
    assert_eq!(balance(&r, PRIMARY), 960);
    let v = r.view();
    assert_eq!(
        v.used, 40,
        "usage of a deleted workspace stays in the org's used"
    );
    assert!(v.workspace("ws-a").is_none());
    assert_conserved(&r);
}

#[test]
fn rule5_deleting_the_primary_is_refused() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    let err = refused(&mut r, |r| r.delete_workspace(&ws(PRIMARY)));
    assert_eq!(err, RuleError::PrimaryWorkspace(ws(PRIMARY)));
    let err = refused(&mut r, |r| r.delete_workspace(&ws("nope")));
    assert_eq!(err, RuleError::UnknownWorkspace(ws("nope")));
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 1));
    let err = refused(&mut r, |r| r.delete_workspace(&ws("ws-a")));
    assert_eq!(
        err,
        RuleError::LeasesOutstanding {
            workspace: ws("ws-a"),
            leased: 1
        }
    );
}

#[test]
fn rule6_budget_to_shared_sweeps_every_balance_into_the_primary() {
    let mut r = budget_org(1_000, &[("ws-a", 300), ("ws-b", 0), ("ws-c", 200)]);
    let events = r.set_mode(Mode::Shared).unwrap();
    assert_eq!(
        events,
        vec![
            LedgerEvent::ModeChanged {
                from: Mode::Budget,
                to: Mode::Shared
            },
            LedgerEvent::Sweep {
                workspace: ws("ws-a"),
                to: ws(PRIMARY),
                amount: 300
            },
            LedgerEvent::Sweep {
                workspace: ws("ws-c"),
                to: ws(PRIMARY),
                amount: 200
            },
        ]
    );
    assert_eq!(r.mode, Mode::Shared);
    assert_eq!(balance(&r, PRIMARY), 1_000);
    for name in ["ws-a", "ws-b", "ws-c"] {
        assert_eq!(balance(&r, name), 0);
    }
    assert_conserved(&r);
}

#[test]
fn rule6_budget_to_shared_waits_for_non_primary_leases() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 5));
    let err = refused(&mut r, |r| r.set_mode(Mode::Shared));
    assert_eq!(
        err,
        RuleError::LeasesOutstanding {
            workspace: ws("ws-a"),
            leased: 5
        }
    );
    // A lease on the Primary stays valid in shared mode and does not block the switch.
    let b = release(batch("n1", 1, 2), "ws-a", 5);
    settle(&mut r, &want(b, PRIMARY, 50));
    r.set_mode(Mode::Shared).unwrap();
    assert_eq!(lease(&r, "n1", PRIMARY), 50);
    assert_eq!(balance(&r, PRIMARY), 950);
    assert_conserved(&r);
}

#[test]
fn rule6_shared_to_budget_moves_nothing() {
    let mut r = org(Mode::Shared);
    r.purchase(amt(1_000)).unwrap();
    r.create_workspace(ws("ws-a")).unwrap();
    let events = r.set_mode(Mode::Budget).unwrap();
    assert_eq!(
        events,
        vec![LedgerEvent::ModeChanged {
            from: Mode::Shared,
            to: Mode::Budget
        }]
    );
    assert_eq!((balance(&r, PRIMARY), balance(&r, "ws-a")), (1_000, 0));
    let v = r.view();
    assert_eq!(v.workspace("ws-a").unwrap().balance, 0);
    assert_conserved(&r);
}

#[test]
fn rule6_shared_to_budget_waits_for_the_pool_leases() {
    let mut r = org(Mode::Shared);
    r.purchase(amt(1_000)).unwrap();
    r.create_workspace(ws("ws-a")).unwrap();
    // In shared mode a node leases the Primary's balance and spends it for every workspace.
    settle(&mut r, &want(batch("n1", 1, 1), PRIMARY, 40));
    let err = refused(&mut r, |r| r.set_mode(Mode::Budget));
    assert_eq!(
        err,
        RuleError::LeasesOutstanding {
            workspace: ws(PRIMARY),
            leased: 40
        }
    );
    settle(&mut r, &release(batch("n1", 1, 2), PRIMARY, 40));
    r.set_mode(Mode::Budget).unwrap();
    assert_eq!((balance(&r, PRIMARY), balance(&r, "ws-a")), (1_000, 0));
    assert_conserved(&r);
}

#[test]
fn a_reservation_open_across_a_mode_switch_returns_to_the_lease_it_came_from() {
    // Shared mode: ws-a reserves 30 from the Primary's lease; the org switches to budget; the
    // node's life then ends without a clean stop.
    let mut r = org(Mode::Shared);
    r.purchase(amt(100)).unwrap();
    r.create_workspace(ws("ws-a")).unwrap();
    settle(&mut r, &want(batch("n1", 1, 1), PRIMARY, 30));
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", PRIMARY, [0, 30, 0, 0]),
    );
    r.set_mode(Mode::Budget).unwrap();
    assert_eq!(held(&r, "n1", "ws-a"), 30);
    r.close_node(&node("n1"), PriorLife::ReturnToBalance)
        .unwrap();
    // The 30 go back to the Primary, whose lease they came from: ws-a was never given any.
    assert_eq!((balance(&r, PRIMARY), balance(&r, "ws-a")), (100, 0));
    assert!(holds_nothing(&r, "n1"));
    assert_conserved(&r);
}

#[test]
fn rule6_setting_the_current_mode_again_changes_nothing() {
    for mode in [Mode::Budget, Mode::Shared] {
        let mut r = org(mode);
        r.purchase(amt(10)).unwrap();
        let before = r.clone();
        assert_eq!(r.set_mode(mode), Ok(Vec::new()));
        assert_eq!(r, before, "no version bump, no change");
    }
}

#[test]
fn rule7_every_operation_conserves_credits() {
    let mut r = org(Mode::Budget);
    assert_conserved(&r);
    r.purchase(amt(5_000)).unwrap();
    assert_conserved(&r);
    r.create_workspace(ws("ws-a")).unwrap();
    r.create_workspace(ws("ws-b")).unwrap();
    assert_conserved(&r);
    r.transfer(&ws(PRIMARY), &ws("ws-a"), amt(2_000)).unwrap();
    r.transfer(&ws(PRIMARY), &ws("ws-b"), amt(1_000)).unwrap();
    assert_conserved(&r);
    let b = want(want(batch("n1", 1, 1), "ws-a", 700), "ws-b", 300);
    settle(&mut r, &b);
    settle(&mut r, &want(batch("n2", 1, 1), "ws-a", 500));
    // n1 spends, reserves and commits part; n2 spends.
    let b = line(batch("n1", 1, 2), "ws-a", "ws-a", [100, 200, 150, 0]);
    settle(&mut r, &line(b, "ws-b", "ws-b", [0, 100, 0, 0]));
    settle(
        &mut r,
        &line(batch("n2", 1, 2), "ws-a", "ws-a", [499, 0, 0, 0]),
    );
    // n1 restarts and returns what it held; n2 dies and what it held counts as consumed.
    r.settle(
        &current(&r, &batch("n1", 2, 1)),
        2_000,
        PriorLife::ReturnToBalance,
    )
    .unwrap();
    assert_conserved(&r);
    r.close_node(&node("n2"), PriorLife::CountAsConsumed)
        .unwrap();
    assert_conserved(&r);
    assert_conserved(&r.with_leases_returned().unwrap());
    r.set_mode(Mode::Shared).unwrap();
    assert_conserved(&r);
    r.delete_workspace(&ws("ws-b")).unwrap();
    assert_conserved(&r);
    r.set_mode(Mode::Budget).unwrap();
    assert_conserved(&r);
    let v = r.view();
    assert_eq!(v.purchased, 5_000);
    assert_eq!(
        v.used,
        100 + 150 + 499 + 1,
        "n2's unspent credit counted as consumed"
    );
}

// ---------------------------------------------------------------------------------------------
// Settle (docs/design.md: leases, exactly-once, node lives)
// ---------------------------------------------------------------------------------------------

#[test]
fn settle_applies_each_batch_exactly_once() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    let b = line(batch("n1", 1, 2), "ws-a", "ws-a", [30, 0, 0, 0]);
    let b = want(b, "ws-a", 50);
    let (first, events) = settle(&mut r, &b);
    assert!(first.applied);
    assert_eq!(first.grants, vec![(ws("ws-a"), 50)]);
    assert_eq!(
        events,
        vec![LedgerEvent::Usage {
            node: node("n1"),
            workspace: ws("ws-a"),
            amount: 30
        }]
    );
    let after_first = r.clone();
    // The same batch again (a retry after a timeout): same grants, nothing applied twice.
    let (again, events) = r
        .settle(&current(&r, &b), 9_999, PriorLife::CountAsConsumed)
        .unwrap();
    assert!(!again.applied);
    assert_eq!(again.grants, first.grants);
    assert!(events.is_empty());
    assert_eq!(r, after_first);
    assert_eq!(used(&r, "ws-a"), 30);
    assert_eq!(lease(&r, "n1", "ws-a"), 120);
}

#[test]
fn settle_ignores_a_batch_older_than_the_last_applied() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    settle(&mut r, &want(batch("n1", 1, 2), "ws-a", 100));
    let before = r.clone();
    let old = line(batch("n1", 1, 1), "ws-a", "ws-a", [10, 0, 0, 0]);
    let (reply, events) = r
        .settle(&current(&r, &old), 5_000, PriorLife::CountAsConsumed)
        .unwrap();
    assert!(!reply.applied);
    assert!(
        reply.grants.is_empty(),
        "an older batch's grants are not known"
    );
    assert!(events.is_empty());
    assert_eq!(r, before);
}

#[test]
fn settle_refuses_a_batch_from_a_stale_epoch() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 2, 1), "ws-a", 100));
    let stale = line(batch("n1", 1, 7), "ws-a", "ws-a", [10, 0, 0, 0]);
    let err = refused(&mut r, |r| {
        r.settle(&current(r, &stale), 1, PriorLife::CountAsConsumed)
    });
    assert_eq!(
        err,
        RuleError::StaleEpoch {
            batch: 1,
            current: 2
        }
    );
}

#[test]
fn settle_from_a_new_epoch_returns_the_prior_life_to_balance() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", "ws-a", [10, 40, 0, 0]),
    );
    assert_eq!((lease(&r, "n1", "ws-a"), held(&r, "n1", "ws-a")), (50, 40));
    // The restarted node's first batch: seq starts over, leases and reservations come back.
    let (reply, events) = r
        .settle(
            &current(&r, &want(batch("n1", 2, 1), "ws-a", 20)),
            2,
            PriorLife::ReturnToBalance,
        )
        .unwrap();
    assert_conserved(&r);
    assert!(reply.applied);
    assert_eq!(reply.grants, vec![(ws("ws-a"), 20)]);
    assert_eq!(
        events,
        vec![LedgerEvent::LeaseReturned {
            node: node("n1"),
            workspace: ws("ws-a"),
            amount: 90
        }]
    );
    assert_eq!(balance(&r, "ws-a"), 500 - 10 - 20);
    assert_eq!((lease(&r, "n1", "ws-a"), held(&r, "n1", "ws-a")), (20, 0));
    assert_eq!(used(&r, "ws-a"), 10);
    let share = &r.nodes[&node("n1")];
    assert_eq!((share.epoch, share.seq), (2, 1));
}

#[test]
fn settle_from_a_new_epoch_counts_the_prior_life_as_consumed() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", "ws-a", [10, 40, 0, 0]),
    );
    let (_, events) = r
        .settle(&batch("n1", 2, 1), 2, PriorLife::CountAsConsumed)
        .unwrap();
    assert_conserved(&r);
    assert_eq!(
        events,
        vec![
            LedgerEvent::LeaseExpired {
                node: node("n1"),
                workspace: ws("ws-a"),
                amount: 40
            },
            LedgerEvent::LeaseExpired {
                node: node("n1"),
                workspace: ws("ws-a"),
                amount: 50
            },
        ]
    );
    assert_eq!(balance(&r, "ws-a"), 400);
    assert_eq!(used(&r, "ws-a"), 100);
    assert_eq!((lease(&r, "n1", "ws-a"), held(&r, "n1", "ws-a")), (0, 0));
}

#[test]
fn settle_caps_usage_beyond_what_the_node_holds_and_records_the_rest() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    // Each batch spends one credit more than n1 holds (a lease of 100 of ws-a): it is applied
    // up to what n1 holds, the last credit is recorded as unbacked, and nothing is created.
    for bad in [
        line(batch("n1", 1, 2), "ws-a", "ws-a", [101, 0, 0, 0]),
        line(batch("n1", 1, 2), "ws-a", "ws-a", [60, 41, 0, 0]),
        line(batch("n1", 1, 2), "ws-a", "ws-a", [0, 10, 11, 0]),
        line(batch("n1", 1, 2), "ws-a", "ws-a", [0, 10, 5, 6]),
        line(batch("n1", 1, 2), "ws-a", PRIMARY, [1, 0, 0, 0]),
        line(batch("n2", 1, 1), "ws-a", "ws-a", [1, 0, 0, 0]),
    ] {
        let mut copy = r.clone();
        let (reply, events) = settle(&mut copy, &bad);
        assert!(reply.applied);
        assert_eq!(reply.unbacked, 1, "{bad:?}");
        assert!(events.contains(&LedgerEvent::UsageUnbacked {
            node: bad.node.clone(),
            workspace: ws("ws-a"),
            amount: 1
        }));
        assert_eq!(copy.purchased, r.purchased);
        assert_eq!(
            copy.view().used + 1,
            r.view().used + bad.lines[0].consumed + bad.lines[0].committed
        );
    }
    // A release beyond the lease gives back only what the store leased.
    let mut copy = r.clone();
    settle(&mut copy, &release(batch("n1", 1, 2), "ws-a", 101));
    assert_eq!(balance(&copy, "ws-a"), 500);
    assert_eq!(lease(&copy, "n1", "ws-a"), 0);
    // Within the lease, the batch is exact.
    let ok = line(batch("n1", 1, 2), "ws-a", "ws-a", [100, 0, 0, 0]);
    let (reply, _) = settle(&mut r, &ok);
    assert!(reply.applied && reply.unbacked == 0);
    assert_eq!(used(&r, "ws-a"), 100);
}

#[test]
fn a_batch_of_an_older_version_is_granted_nothing() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    let stale = r.version;
    r.purchase(amt(1)).unwrap();
    let mut b = want(batch("n1", 1, 1), "ws-a", 100);
    b.version = stale;
    let (reply, _) = settle(&mut r, &b);
    assert!(reply.applied && reply.grants.is_empty());
    assert_eq!(reply.version, stale + 1);
    b.seq = 2;
    b.version = r.version;
    assert_eq!(settle(&mut r, &b).0.grants, vec![(ws("ws-a"), 100)]);
}

#[test]
fn an_expired_node_learns_it_once_and_its_late_usage_is_not_charged_twice() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    r.expire_nodes(1_000 + 5_000, 3_000, &node("n2")).unwrap();
    assert_eq!(
        used(&r, "ws-a"),
        100,
        "the expired lease counts as consumed"
    );
    assert!(r.nodes[&node("n1")].expired);
    // n1 spent 30 before it went silent: reported late, recorded, not charged again.
    let late = line(batch("n1", 1, 2), "ws-a", "ws-a", [30, 0, 0, 0]);
    let (reply, _) = settle(&mut r, &late);
    assert!(reply.expired);
    assert_eq!(reply.unbacked, 30);
    assert_eq!(used(&r, "ws-a"), 100);
    // The reply is lost and the batch re-sent: it says so again. The next one does not.
    assert!(settle(&mut r, &late).0.expired);
    assert!(!settle(&mut r, &batch("n1", 1, 3)).0.expired);
    // A store that forgot writes answers a lower previous seq than was acknowledged.
    assert_eq!(settle(&mut r, &batch("n1", 1, 9)).0.prev_seq, 3);
}

#[test]
fn a_workspace_with_open_reservations_is_deleted_only_once_they_end() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    // An open reservation of 30 survives the recall; the deletion waits for it.
    let b = line(batch("n1", 1, 2), "ws-a", "ws-a", [0, 30, 0, 0]);
    settle(&mut r, &release(b, "ws-a", 70));
    let err = refused(&mut r, |r| r.delete_workspace(&ws("ws-a")));
    assert_eq!(
        err,
        RuleError::LeasesOutstanding {
            workspace: ws("ws-a"),
            leased: 30
        }
    );
    // The reservation ends: 10 charged, 20 released and given back; then the deletion.
    let b = line(batch("n1", 1, 3), "ws-a", "ws-a", [0, 0, 10, 20]);
    settle(&mut r, &release(b, "ws-a", 20));
    let (returned, _) = r.delete_workspace(&ws("ws-a")).unwrap();
    assert_eq!(returned, 490);
    assert_eq!(balance(&r, PRIMARY), 1_000 - 500 + 490);
    assert_eq!(r.used_deleted, 10);
    assert!(holds_nothing(&r, "n1"));
    assert_conserved(&r);
    // Created again under the same name, it starts from nothing.
    r.create_workspace(ws("ws-a")).unwrap();
    assert_eq!((balance(&r, "ws-a"), used(&r, "ws-a")), (0, 0));
}

#[test]
fn settle_grants_only_to_spenders_of_the_current_mode() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    let b = want(
        want(want(batch("n1", 1, 1), "ws-a", 10), PRIMARY, 10),
        "nope",
        10,
    );
    let (reply, _) = settle(&mut r, &b);
    assert_eq!(reply.grants, vec![(ws("ws-a"), 10), (ws(PRIMARY), 10)]);
    let b = release(batch("n1", 1, 2), "ws-a", 10);
    settle(&mut r, &b);
    r.set_mode(Mode::Shared).unwrap();
    // In shared mode only the Primary spends: a want for ws-a grants nothing.
    let b = want(want(batch("n1", 1, 3), "ws-a", 10), PRIMARY, 10);
    let (reply, _) = settle(&mut r, &b);
    assert_eq!(reply.grants, vec![(ws(PRIMARY), 10)]);
    assert_eq!(lease(&r, "n1", "ws-a"), 0);
    assert_eq!(lease(&r, "n1", PRIMARY), 20);
}

#[test]
fn settle_reservation_lines_keep_held_and_lease_right() {
    let mut r = org(Mode::Shared);
    r.purchase(amt(1_000)).unwrap();
    r.create_workspace(ws("ws-a")).unwrap();
    settle(&mut r, &want(batch("n1", 1, 1), PRIMARY, 300));
    // ws-a reserves 100 from the Primary's lease: held by ws-a, out of the lease.
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", PRIMARY, [0, 100, 0, 0]),
    );
    assert_eq!(
        (lease(&r, "n1", PRIMARY), held(&r, "n1", "ws-a")),
        (200, 100)
    );
    let v = r.view();
    assert_eq!(v.held, 100);
    assert_eq!(v.workspace("ws-a").unwrap().held, 100);
    assert_eq!(v.workspace(PRIMARY).unwrap().balance, 900);
    assert_eq!(v.total_credits, 1_000);
    // It commits 60 and releases 40 back into the lease.
    settle(
        &mut r,
        &line(batch("n1", 1, 3), "ws-a", PRIMARY, [0, 0, 60, 40]),
    );
    assert_eq!((lease(&r, "n1", PRIMARY), held(&r, "n1", "ws-a")), (240, 0));
    assert_eq!(used(&r, "ws-a"), 60);
    assert_eq!(
        used(&r, PRIMARY),
        0,
        "usage is counted per workspace in shared mode"
    );
    // Reserve and finish within one batch.
    settle(
        &mut r,
        &line(batch("n1", 1, 4), "ws-a", PRIMARY, [5, 50, 50, 0]),
    );
    assert_eq!((lease(&r, "n1", PRIMARY), held(&r, "n1", "ws-a")), (185, 0));
    assert_eq!(r.view().used, 115);
}

/// In shared mode every workspace spends from the Primary's one lease, so one workspace may spend
/// what another's finished reservation gave back to it within the same interval. The batch's
/// lines are increments over that interval, so their order must not matter; it once did (the
/// first line's spend was checked before the second line's release, and a faithful node's batch
/// was refused for ever). `tests/model_props.rs` finds the same bug; its seed is persisted.
#[test]
fn settle_lines_of_one_batch_apply_in_any_order() {
    let mut r = org(Mode::Shared);
    r.purchase(amt(100)).unwrap();
    r.create_workspace(ws("ws-a")).unwrap();
    r.create_workspace(ws("ws-b")).unwrap();
    settle(&mut r, &want(batch("n1", 1, 1), PRIMARY, 10));
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-b", PRIMARY, [0, 10, 0, 0]),
    );
    assert_eq!(lease(&r, "n1", PRIMARY), 0);
    // ws-b's reservation is released (lease back to 10), then ws-a spends the 10.
    let b = line(batch("n1", 1, 3), "ws-a", PRIMARY, [10, 0, 0, 0]);
    let b = line(b, "ws-b", PRIMARY, [0, 0, 0, 10]);
    settle(&mut r, &b);
    assert_eq!((lease(&r, "n1", PRIMARY), held(&r, "n1", "ws-b")), (0, 0));
    assert_eq!(used(&r, "ws-a"), 10);
    // Net spend beyond lease plus releases is capped, whatever the order: the released 5 and
    // the lease's 5 are charged, the one credit more is recorded as unbacked.
    settle(&mut r, &want(batch("n1", 1, 4), PRIMARY, 10));
    settle(
        &mut r,
        &line(batch("n1", 1, 5), "ws-b", PRIMARY, [0, 5, 0, 0]),
    );
    let b = line(batch("n1", 1, 6), "ws-a", PRIMARY, [11, 0, 0, 0]);
    let b = line(b, "ws-b", PRIMARY, [0, 0, 0, 5]);
    let (reply, _) = settle(&mut r, &b);
    assert_eq!(reply.unbacked, 1);
    assert_eq!((lease(&r, "n1", PRIMARY), held(&r, "n1", "ws-b")), (0, 0));
    assert_eq!(used(&r, "ws-a"), 20);
}

// ---------------------------------------------------------------------------------------------
// Node lives: close_node, expired_nodes, recall preview
// ---------------------------------------------------------------------------------------------

#[test]
fn close_node_count_as_consumed_records_lease_expired() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    let b = want(want(batch("n1", 1, 1), "ws-a", 100), PRIMARY, 50);
    settle(&mut r, &b);
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", "ws-a", [0, 30, 0, 0]),
    );
    let events = r
        .close_node(&node("n1"), PriorLife::CountAsConsumed)
        .unwrap();
    assert_conserved(&r);
    let expired: Vec<(WorkspaceId, u64)> = events
        .iter()
        .map(|e| match e {
            LedgerEvent::LeaseExpired {
                node: n,
                workspace,
                amount,
            } => {
                assert_eq!(*n, node("n1"));
                (workspace.clone(), *amount)
            }
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(
        expired,
        vec![(ws("ws-a"), 30), (ws(PRIMARY), 50), (ws("ws-a"), 70)]
    );
    assert_eq!((used(&r, "ws-a"), used(&r, PRIMARY)), (100, 50));
    assert_eq!((balance(&r, "ws-a"), balance(&r, PRIMARY)), (400, 450));
    assert!(holds_nothing(&r, "n1"));
    // Closing again, or closing a node never seen, changes nothing.
    let before = r.clone();
    assert_eq!(
        r.close_node(&node("n1"), PriorLife::CountAsConsumed),
        Ok(Vec::new())
    );
    assert_eq!(
        r.close_node(&node("ghost"), PriorLife::ReturnToBalance),
        Ok(Vec::new())
    );
    assert_eq!(r, before);
}

#[test]
fn close_node_return_to_balance_gives_everything_back() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", "ws-a", [5, 30, 0, 0]),
    );
    let events = r
        .close_node(&node("n1"), PriorLife::ReturnToBalance)
        .unwrap();
    assert_conserved(&r);
    assert_eq!(
        events,
        vec![LedgerEvent::LeaseReturned {
            node: node("n1"),
            workspace: ws("ws-a"),
            amount: 95
        }]
    );
    assert_eq!((balance(&r, "ws-a"), used(&r, "ws-a")), (495, 5));
}

#[test]
fn expired_nodes_are_silent_nodes_that_still_hold_credits() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    r.settle(
        &current(&r, &want(batch("n1", 1, 1), "ws-a", 10)),
        1_000,
        PriorLife::CountAsConsumed,
    )
    .unwrap();
    r.settle(
        &current(&r, &batch("n2", 1, 1)),
        1_000,
        PriorLife::CountAsConsumed,
    )
    .unwrap();
    r.settle(
        &current(&r, &want(batch("n3", 1, 1), "ws-a", 10)),
        5_000,
        PriorLife::CountAsConsumed,
    )
    .unwrap();
    assert!(
        r.expired_nodes(4_000, 3_000).is_empty(),
        "exactly ttl is alive"
    );
    // n2 holds nothing and n3 settled recently: only n1 is expired.
    assert_eq!(r.expired_nodes(4_001, 3_000), vec![node("n1")]);
    assert_eq!(r.expired_nodes(9_000, 3_000), vec![node("n1"), node("n3")]);
    // A clock behind the heartbeat never expires anything.
    assert!(r.expired_nodes(0, 3_000).is_empty());
}

#[test]
fn with_leases_returned_previews_a_recall() {
    let mut r = budget_org(1_000, &[("ws-a", 500)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    settle(
        &mut r,
        &line(batch("n1", 1, 2), "ws-a", "ws-a", [0, 30, 0, 0]),
    );
    let before = r.clone();
    let preview = r.with_leases_returned().unwrap();
    assert_eq!(r, before, "a preview changes nothing");
    assert_eq!(balance(&preview, "ws-a"), 470);
    assert_eq!(held(&preview, "n1", "ws-a"), 30, "reservations stay held");
    assert_eq!(preview.leased(&ws("ws-a")), 0);
    assert_eq!(
        preview.view(),
        r.view(),
        "the view already counts leases as balance"
    );
    assert_conserved(&preview);
}

// ---------------------------------------------------------------------------------------------
// Refusals and arithmetic
// ---------------------------------------------------------------------------------------------

#[test]
fn refused_control_operations_leave_the_record_unchanged() {
    let mut r = budget_org(1_000, &[("ws-a", 300)]);
    settle(&mut r, &want(batch("n1", 1, 1), "ws-a", 100));
    let cases = [
        (
            ControlOp::CreateWorkspace {
                workspace: ws("ws-a"),
            },
            RuleError::WorkspaceExists(ws("ws-a")),
        ),
        (
            ControlOp::DeleteWorkspace {
                workspace: ws(PRIMARY),
            },
            RuleError::PrimaryWorkspace(ws(PRIMARY)),
        ),
        (
            ControlOp::DeleteWorkspace {
                workspace: ws("ws-a"),
            },
            RuleError::LeasesOutstanding {
                workspace: ws("ws-a"),
                leased: 100,
            },
        ),
        (
            ControlOp::Transfer {
                from: ws(PRIMARY),
                to: ws(PRIMARY),
                amount: amt(1),
            },
            RuleError::SameWorkspace,
        ),
        (
            ControlOp::Transfer {
                from: ws(PRIMARY),
                to: ws("ws-a"),
                amount: amt(701),
            },
            RuleError::InsufficientCredits {
                workspace: ws(PRIMARY),
                available: 700,
                wanted: 701,
            },
        ),
        (
            ControlOp::SetMode { mode: Mode::Shared },
            RuleError::LeasesOutstanding {
                workspace: ws("ws-a"),
                leased: 100,
            },
        ),
    ];
    for (op, expected) in cases {
        let err = refused(&mut r, |r| op.apply(r));
        assert_eq!(err, expected, "{}", op.name());
    }
}

#[test]
fn purchase_overflow_is_refused_and_changes_nothing() {
    let mut r = org(Mode::Budget);
    // A record at the top of u64 (unreachable through the API in practice, but the rules must
    // not wrap if it ever is).
    r.purchased = u64::MAX;
    r.workspaces.get_mut(&ws(PRIMARY)).unwrap().balance = u64::MAX;
    assert!(r.is_conserved());
    let err = refused(&mut r, |r| r.purchase(amt(1)));
    assert_eq!(err, RuleError::Overflow);
    let err = refused(&mut r, |r| {
        ControlOp::Purchase {
            amount: amt(AMOUNT_MAX),
        }
        .apply(r)
    });
    assert_eq!(err, RuleError::Overflow);
    assert_eq!(r.purchased, u64::MAX);
}

#[test]
fn settle_overflow_is_refused_and_changes_nothing() {
    let mut r = org(Mode::Budget);
    r.purchased = u64::MAX;
    r.workspaces.get_mut(&ws(PRIMARY)).unwrap().balance = u64::MAX;
    settle(&mut r, &want(batch("n1", 1, 1), PRIMARY, u64::MAX));
    let b = line(batch("n1", 1, 2), PRIMARY, PRIMARY, [u64::MAX, 1, 0, 0]);
    let err = refused(&mut r, |r| {
        r.settle(&current(r, &b), 0, PriorLife::CountAsConsumed)
    });
    assert_eq!(err, RuleError::Overflow);
}
