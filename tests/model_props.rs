//! Proves that over random sequences of control-plane operations and faithfully simulated nodes
//! (leases, debits, reservations, lost replies, retried batches, crashes) the model conserves
//! every credit, applies each settle batch exactly once, and never lets the nodes spend more
//! than was purchased or more than the store leased to them.

use std::collections::{BTreeMap, BTreeSet};

use creditd::model::{
    Amount, LedgerEvent, Mode, NodeId, OrgId, OrgRecord, PriorLife, RuleError, SettleBatch,
    UsageLine, WorkspaceId,
};
use creditd::store::ControlOp;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// The workspace names a sequence draws from; the first is the Primary.
const WORKSPACES: [&str; 4] = ["primary", "ws-a", "ws-b", "ws-c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const LEASE_TTL_MS: u64 = 3_000;

fn ws(i: usize) -> WorkspaceId {
    WorkspaceId::parse(WORKSPACES[i % WORKSPACES.len()], "workspace").unwrap()
}

fn amount(n: u64) -> Amount {
    Amount::new(n).unwrap()
}

/// One step of a sequence. Node indices are taken modulo the number of nodes; workspace indices
/// pick among the org's workspaces (so that most steps name one that exists), except for
/// `CreateWorkspace`, which names one of [`WORKSPACES`].
#[derive(Debug, Clone)]
enum Step {
    Purchase {
        amount: u64,
    },
    CreateWorkspace {
        ws: usize,
    },
    /// `recall`: the nodes give their leases back first, as the node's admin path does.
    DeleteWorkspace {
        ws: usize,
        recall: bool,
    },
    Transfer {
        from: usize,
        to: usize,
        amount: u64,
        recall: bool,
    },
    SetMode {
        budget: bool,
        recall: bool,
    },
    Debit {
        node: usize,
        ws: usize,
        amount: u64,
    },
    Reserve {
        node: usize,
        ws: usize,
        amount: u64,
    },
    /// Ends an open reservation: charges `percent` of it, releases the rest.
    Finish {
        node: usize,
        pick: usize,
        percent: u64,
    },
    /// Reports usage and asks for `want` of every spender (and, with `stale_want`, of
    /// workspaces that are not spenders now); with `lose_reply` the store applies the batch
    /// but the node never hears back, so it re-sends the very same batch next time.
    Settle {
        node: usize,
        want: Option<u64>,
        stale_want: bool,
        lose_reply: bool,
    },
    /// The network delivers the node's last acknowledged batch again.
    Retry {
        node: usize,
    },
    /// The node dies and restarts with a new epoch. With `eager`, its previous life is closed
    /// at once (lease expiry); otherwise the store closes it on the new life's first batch.
    Crash {
        node: usize,
        count_as_consumed: bool,
        eager: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    // Mostly small wants, so that leases run dry and spenders get blocked and refilled.
    let want = prop_oneof![
        2 => Just(None),
        3 => (1u64..60).prop_map(Some),
        1 => Just(Some(u64::MAX)),
    ];
    prop_oneof![
        2 => (1u64..=300).prop_map(|amount| Step::Purchase { amount }),
        1 => (1usize..4).prop_map(|ws| Step::CreateWorkspace { ws }),
        1 => (any::<usize>(), prop::bool::weighted(0.8))
            .prop_map(|(ws, recall)| Step::DeleteWorkspace { ws, recall }),
        3 => (any::<usize>(), any::<usize>(), 1u64..=150, prop::bool::weighted(0.8))
            .prop_map(|(from, to, amount, recall)| Step::Transfer { from, to, amount, recall }),
        1 => (any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(budget, recall)| Step::SetMode { budget, recall }),
        8 => (0usize..3, any::<usize>(), 1u64..=40)
            .prop_map(|(node, ws, amount)| Step::Debit { node, ws, amount }),
        4 => (0usize..3, any::<usize>(), 1u64..=40)
            .prop_map(|(node, ws, amount)| Step::Reserve { node, ws, amount }),
        4 => (0usize..3, any::<usize>(), prop_oneof![Just(0u64), Just(100u64), 0u64..=100])
            .prop_map(|(node, pick, percent)| Step::Finish { node, pick, percent }),
        5 => (0usize..3, want, prop::bool::weighted(0.1), prop::bool::weighted(0.2))
            .prop_map(|(node, want, stale_want, lose_reply)| Step::Settle {
                node,
                want,
                stale_want,
                lose_reply,
            }),
        1 => (0usize..3).prop_map(|node| Step::Retry { node }),
        1 => (0usize..3, any::<bool>(), any::<bool>())
            .prop_map(|(node, count_as_consumed, eager)| Step::Crash {
                node,
                count_as_consumed,
                eager,
            }),
    ]
}

/// The org as a sequence starts: mode, extra workspaces, first purchase, node count.
#[derive(Debug, Clone)]
struct Start {
    budget: bool,
    extra_workspaces: usize,
    purchase: u64,
    nodes: usize,
}

fn start() -> impl Strategy<Value = Start> {
    (any::<bool>(), 0usize..=3, 0u64..=500, 1usize..=3).prop_map(
        |(budget, extra_workspaces, purchase, nodes)| Start {
            budget,
            extra_workspaces,
            purchase,
            nodes,
        },
    )
}

/// An open reservation on a node.
#[derive(Debug, Clone)]
struct Reservation {
    workspace: WorkspaceId,
    /// Whose lease paid for it (fixed when it was made).
    spender: WorkspaceId,
    amount: u64,
    /// Made under an earlier org state: what it gives back goes to a retired lease.
    retired: bool,
}

/// A batch the store applied but whose reply the node has not seen.
#[derive(Debug, Clone)]
struct Unanswered {
    batch: SettleBatch,
    grants: Vec<(WorkspaceId, u64)>,
    /// The org state (see [`Sim::generation`]) the batch was built under.
    generation: u64,
}

/// What a node does, modelled on `src/node`: leases per spender, debits by
/// compare-and-swap on them, usage counted per (workspace, spender) until the next batch.
#[derive(Debug, Clone)]
struct SimNode {
    id: NodeId,
    epoch: u64,
    seq: u64,
    /// Spendable local leases, by spender; keys are spenders of the current org state.
    lease: BTreeMap<WorkspaceId, u64>,
    /// Leases of an earlier org state (a deletion or mode change): never spent, given back on
    /// the next batch.
    retired: BTreeMap<WorkspaceId, u64>,
    reservations: Vec<Reservation>,
    /// Not yet reported, by (workspace, spender): consumed, reserved, committed, released.
    unsettled: BTreeMap<(WorkspaceId, WorkspaceId), [u64; 4]>,
    unanswered: Option<Unanswered>,
    /// The last batch answered, and its grants.
    acked: Option<(SettleBatch, Vec<(WorkspaceId, u64)>)>,
    /// The last batch of an earlier life, which the network may still deliver.
    old_life: Option<SettleBatch>,
    /// Crashed, and the store has not closed the previous life yet: how to close it, and the
    /// usage that life allowed but never reported.
    unclosed: Option<(PriorLife, u64)>,
}

impl SimNode {
    fn new(name: &str) -> Self {
        SimNode {
            id: NodeId::parse(name, "node").unwrap(),
            epoch: 1,
            seq: 0,
            lease: BTreeMap::new(),
            retired: BTreeMap::new(),
            reservations: Vec::new(),
            unsettled: BTreeMap::new(),
            unanswered: None,
            acked: None,
            old_life: None,
            unclosed: None,
        }
    }

    fn unsettled_usage(&self) -> u64 {
        self.unsettled.values().map(|c| c[0] + c[2]).sum()
    }

    fn count(&mut self, workspace: &WorkspaceId, spender: &WorkspaceId, i: usize, n: u64) {
        self.unsettled
            .entry((workspace.clone(), spender.clone()))
            .or_default()[i] += n;
    }
}

/// The store's record, the nodes, and the running totals the invariants are checked against.
struct Sim {
    rec: OrgRecord,
    nodes: Vec<SimNode>,
    now_ms: u64,
    /// Bumped by every deletion and mode change: the nodes rebuild their leases.
    generation: u64,
    /// Every credit a node let a caller consume (debits and commits).
    allowed: u64,
    /// Usage lost with a life closed as `ReturnToBalance` (a documented under-charge).
    forgiven: u64,
    /// Usage lost with a life closed as `CountAsConsumed` (covered by `expired`).
    lost_counted: u64,
    /// Σ `Usage` events.
    settled: u64,
    /// Σ `LeaseExpired` events.
    expired: u64,
}

impl Sim {
    fn new(s: &Start) -> Self {
        let mode = if s.budget { Mode::Budget } else { Mode::Shared };
        let (mut rec, _) = OrgRecord::new(OrgId::parse("acme", "org").unwrap(), mode, ws(0));
        for i in 1..=s.extra_workspaces {
            rec.create_workspace(ws(i)).unwrap();
        }
        if s.purchase > 0 {
            rec.purchase(amount(s.purchase)).unwrap();
        }
        // In budget mode, hand each workspace a share of the purchase to spend.
        if mode == Mode::Budget {
            let share = s.purchase / (s.extra_workspaces as u64 + 1);
            for i in (1..=s.extra_workspaces).filter(|_| share > 0) {
                rec.transfer(&ws(0), &ws(i), amount(share)).unwrap();
            }
        }
        Sim {
            rec,
            nodes: NODES[..s.nodes].iter().map(|n| SimNode::new(n)).collect(),
            now_ms: 0,
            generation: 0,
            allowed: 0,
            forgiven: 0,
            lost_counted: 0,
            settled: 0,
            expired: 0,
        }
    }

    fn account(&mut self, events: &[LedgerEvent]) {
        for e in events {
            match e {
                LedgerEvent::Usage { amount, .. } => self.settled += amount,
                LedgerEvent::LeaseExpired { amount, .. } => self.expired += amount,
                _ => {}
            }
        }
    }

    fn run(&mut self, step: &Step) {
        self.now_ms += 100;
        let n = self.nodes.len();
        match *step {
            Step::Purchase { amount: a } => {
                self.change(ControlOp::Purchase { amount: amount(a) }, false)
            }
            Step::CreateWorkspace { ws: i } => {
                self.change(ControlOp::CreateWorkspace { workspace: ws(i) }, false)
            }
            Step::DeleteWorkspace { ws: i, recall } => {
                let workspace = self.existing(i);
                self.change(ControlOp::DeleteWorkspace { workspace }, recall)
            }
            Step::Transfer {
                from,
                to,
                amount: a,
                recall,
            } => self.change(
                ControlOp::Transfer {
                    from: self.existing(from),
                    to: self.existing(to),
                    amount: amount(a),
                },
                recall,
            ),
            Step::SetMode { budget, recall } => {
                let mode = if budget { Mode::Budget } else { Mode::Shared };
                self.change(ControlOp::SetMode { mode }, recall)
            }
            Step::Debit {
                node,
                ws: w,
                amount,
            } => self.spend(node % n, &self.existing(w), amount, false),
            Step::Reserve {
                node,
                ws: w,
                amount,
            } => self.spend(node % n, &self.existing(w), amount, true),
            Step::Finish {
                node,
                pick,
                percent,
            } => self.finish(node % n, pick, percent),
            Step::Settle {
                node,
                want,
                stale_want,
                lose_reply,
            } => self.settle(node % n, want, stale_want, lose_reply, false),
            Step::Retry { node } => self.retry(node % n),
            Step::Crash {
                node,
                count_as_consumed,
                eager,
            } => self.crash(node % n, count_as_consumed, eager),
        }
    }

    /// The `i`-th workspace of the org (modulo their number).
    fn existing(&self, i: usize) -> WorkspaceId {
        let all = &self.rec.workspaces;
        all.keys().nth(i % all.len()).cloned().unwrap()
    }

    /// A debit (or a reservation) on `workspace`, decided from the node's lease alone.
    fn spend(&mut self, i: usize, workspace: &WorkspaceId, amount: u64, reserve: bool) {
        let Some(spender) = self.rec.spender_of(workspace).cloned() else {
            return; // unknown_workspace
        };
        let node = &mut self.nodes[i];
        let Some(lease) = node.lease.get_mut(&spender).filter(|l| **l >= amount) else {
            return; // insufficient: the node would ask for a lease (a Settle step)
        };
        *lease -= amount;
        if reserve {
            node.count(workspace, &spender, 1, amount);
            node.reservations.push(Reservation {
                workspace: workspace.clone(),
                spender,
                amount,
                retired: false,
            });
        } else {
            node.count(workspace, &spender, 0, amount);
            self.allowed += amount;
        }
    }

    /// Commits `percent` of an open reservation and releases the rest into its lease.
    fn finish(&mut self, i: usize, pick: usize, percent: u64) {
        let node = &mut self.nodes[i];
        if node.reservations.is_empty() {
            return;
        }
        let r = node.reservations.remove(pick % node.reservations.len());
        let charged = r.amount * percent / 100;
        let back = r.amount - charged;
        node.count(&r.workspace, &r.spender, 2, charged);
        node.count(&r.workspace, &r.spender, 3, back);
        let leases = if r.retired {
            &mut node.retired
        } else {
            &mut node.lease
        };
        *leases.entry(r.spender.clone()).or_default() += back;
        self.allowed += charged;
    }

    /// Puts granted credits into the leases they were asked for (a retired lease if the org
    /// changed while the reply was on its way, as `Node::take_grants` does).
    fn take_grants(&mut self, i: usize, grants: &[(WorkspaceId, u64)], generation: u64) {
        let current = generation == self.generation;
        let node = &mut self.nodes[i];
        for (spender, granted) in grants {
            let leases = if current {
                &mut node.lease
            } else {
                &mut node.retired
            };
            *leases.entry(spender.clone()).or_default() += granted;
        }
    }

    /// One settle of node `i`: re-send the unanswered batch if any, then report everything.
    fn settle(
        &mut self,
        i: usize,
        want: Option<u64>,
        stale_want: bool,
        lose_reply: bool,
        recall: bool,
    ) {
        if let Some(u) = self.nodes[i].unanswered.take() {
            let before = self.rec.clone();
            let (reply, events) = self
                .rec
                .settle(&u.batch, self.now_ms, PriorLife::CountAsConsumed)
                .unwrap_or_else(|e| panic!("re-sent batch refused: {e}: {:?}", u.batch));
            assert!(!reply.applied, "a re-sent batch was applied twice");
            assert_eq!(
                reply.grants, u.grants,
                "a re-sent batch answers its first grants"
            );
            assert!(events.is_empty());
            assert_eq!(self.rec, before, "a re-sent batch changed the record");
            self.take_grants(i, &u.grants, u.generation);
            self.nodes[i].acked = Some((u.batch, u.grants));
        }

        let spenders: BTreeSet<WorkspaceId> = self
            .rec
            .workspaces
            .keys()
            .filter_map(|w| self.rec.spender_of(w).cloned())
            .collect();
        let node = &mut self.nodes[i];
        let lines: Vec<UsageLine> = std::mem::take(&mut node.unsettled)
            .into_iter()
            .filter(|(_, c)| c.iter().any(|&v| v > 0))
            .map(|((workspace, spender), c)| UsageLine {
                workspace,
                spender,
                consumed: c[0],
                reserved: c[1],
                committed: c[2],
                released: c[3],
            })
            .collect();
        let mut release: Vec<(WorkspaceId, u64)> = std::mem::take(&mut node.retired)
            .into_iter()
            .filter(|(_, a)| *a > 0)
            .collect();
        if recall {
            release.extend(
                std::mem::take(&mut node.lease)
                    .into_iter()
                    .filter(|(_, a)| *a > 0),
            );
        }
        let mut wants = Vec::new();
        if let (Some(w), false) = (want, recall) {
            wants.extend(spenders.iter().map(|s| (s.clone(), w)));
            if stale_want {
                wants.extend(
                    (0..WORKSPACES.len())
                        .map(ws)
                        .filter(|s| !spenders.contains(s))
                        .map(|s| (s, w)),
                );
            }
        }
        node.seq += 1;
        let batch = SettleBatch {
            node: node.id.clone(),
            epoch: node.epoch,
            seq: node.seq,
            // The simulated node follows every change at once.
            version: self.rec.version,
            lines,
            release,
            want: wants,
            first: true,
        };
        let unclosed = node.unclosed.take();
        let prior = unclosed.map_or(PriorLife::CountAsConsumed, |(p, _)| p);
        let (reply, events) = self
            .rec
            .settle(&batch, self.now_ms, prior)
            .unwrap_or_else(|e| panic!("a faithful node's batch was refused: {e}: {batch:?}"));
        assert!(reply.applied);
        assert_eq!(
            reply.unbacked, 0,
            "a faithful node's usage is backed: {batch:?}"
        );
        assert_eq!(reply.version, self.rec.version);
        self.account(&events);
        if let Some((p, lost)) = unclosed {
            self.close_accounting(p, lost);
        }
        // Grants: only to spenders of the current mode, never more than wanted.
        let mut seen = BTreeSet::new();
        for (spender, granted) in &reply.grants {
            assert!(*granted > 0);
            assert!(seen.insert(spender.clone()), "one grant per spender");
            assert!(
                spenders.contains(spender),
                "grant to {spender}, not a spender now"
            );
            let wanted = batch.want.iter().find(|(s, _)| s == spender).map(|w| w.1);
            assert!(Some(*granted) <= wanted, "granted {granted} of {wanted:?}");
        }
        if lose_reply {
            self.nodes[i].unanswered = Some(Unanswered {
                batch,
                grants: reply.grants,
                generation: self.generation,
            });
        } else {
            self.take_grants(i, &reply.grants, self.generation);
            self.nodes[i].acked = Some((batch, reply.grants));
        }
    }

    fn close_accounting(&mut self, prior: PriorLife, lost: u64) {
        match prior {
            PriorLife::ReturnToBalance => self.forgiven += lost,
            PriorLife::CountAsConsumed => self.lost_counted += lost,
        }
    }

    /// The network delivers an old batch again: it must change nothing.
    fn retry(&mut self, i: usize) {
        let node = &self.nodes[i];
        let before = self.rec.clone();
        if let Some((batch, grants)) = node.acked.clone() {
            let (reply, events) = self
                .rec
                .settle(&batch, self.now_ms + 1, PriorLife::CountAsConsumed)
                .unwrap_or_else(|e| panic!("duplicate refused: {e}"));
            assert!(!reply.applied);
            assert!(events.is_empty());
            let share = &self.rec.nodes[&node.id];
            if (share.epoch, share.seq) == (batch.epoch, batch.seq) {
                assert_eq!(reply.grants, grants);
            }
        } else if let Some(batch) = node.old_life.clone() {
            match self
                .rec
                .settle(&batch, self.now_ms + 1, PriorLife::CountAsConsumed)
            {
                Err(RuleError::StaleEpoch { .. }) => {}
                Ok((reply, events)) => {
                    // The store has not heard of the new life yet.
                    assert!(!reply.applied);
                    assert!(events.is_empty());
                }
                Err(e) => panic!("a batch of an earlier life: {e}"),
            }
        }
        assert_eq!(self.rec, before, "a duplicate batch changed the record");
    }

    fn crash(&mut self, i: usize, count_as_consumed: bool, eager: bool) {
        let prior = if count_as_consumed {
            PriorLife::CountAsConsumed
        } else {
            PriorLife::ReturnToBalance
        };
        let node = &mut self.nodes[i];
        let mut lost = node.unsettled_usage();
        if let Some((_, earlier)) = node.unclosed.take() {
            lost += earlier;
        }
        let last = node
            .unanswered
            .take()
            .map(|u| u.batch)
            .or_else(|| node.acked.take().map(|a| a.0));
        let mut fresh = SimNode::new(NODES[i]);
        fresh.epoch = node.epoch + 1;
        fresh.old_life = last.or(node.old_life.take());
        *node = fresh;
        let id = node.id.clone();
        if eager {
            if let Some(share) = self.rec.nodes.get(&id) {
                let holds = share
                    .leases
                    .values()
                    .chain(share.held.values())
                    .any(|&v| v > 0);
                let expired = self
                    .rec
                    .expired_nodes(self.now_ms + LEASE_TTL_MS + 1, LEASE_TTL_MS)
                    .contains(&id);
                assert_eq!(holds, expired, "a silent node holding credits is expired");
            }
            let events = self.rec.close_node(&id, prior).unwrap();
            self.account(&events);
            self.close_accounting(prior, lost);
            if let Some(share) = self.rec.nodes.get(&id) {
                assert!(share.leases.is_empty() && share.held.is_empty());
            }
        } else {
            self.nodes[i].unclosed = Some((prior, lost));
        }
    }

    /// A control-plane operation, checked against its rule. With `recall`, an operation that
    /// finds credits leased to nodes has the nodes give every lease back and is applied again,
    /// as the node's admin path does.
    fn change(&mut self, op: ControlOp, recall: bool) {
        let needs_recall = matches!(
            op.apply(&mut self.rec.clone()),
            Err(RuleError::LeasesOutstanding { .. })
        );
        if recall && needs_recall {
            // A deletion's recall also asks the nodes to release their reservations of the
            // workspace (`Notice::Recall::cancel`).
            if let ControlOp::DeleteWorkspace { workspace } = &op {
                for i in 0..self.nodes.len() {
                    while let Some(k) = self.nodes[i]
                        .reservations
                        .iter()
                        .position(|r| r.workspace == *workspace)
                    {
                        self.finish(i, k, 0);
                    }
                }
            }
            for i in 0..self.nodes.len() {
                self.settle(i, None, false, false, true);
            }
            assert!(self.rec.nodes.values().all(|s| s.leases.is_empty()));
        }
        let before = self.rec.clone();
        match op.apply(&mut self.rec) {
            Ok((returned, events)) => {
                self.check_applied(&before, &op, returned, &events);
                let rebuild = match op {
                    ControlOp::DeleteWorkspace { .. } => true,
                    ControlOp::SetMode { mode } => mode != before.mode,
                    _ => false,
                };
                if rebuild {
                    self.generation += 1;
                    for node in &mut self.nodes {
                        for (s, a) in std::mem::take(&mut node.lease) {
                            *node.retired.entry(s).or_default() += a;
                        }
                        for r in &mut node.reservations {
                            r.retired = true;
                        }
                    }
                }
            }
            Err(e) => {
                assert_eq!(
                    self.rec,
                    before,
                    "refused {} ({e}) changed the record",
                    op.name()
                );
                assert!(
                    !(recall && matches!(e, RuleError::LeasesOutstanding { .. })),
                    "leases outstanding after a recall: {e}"
                );
            }
        }
    }

    fn check_applied(
        &self,
        before: &OrgRecord,
        op: &ControlOp,
        returned: u64,
        events: &[LedgerEvent],
    ) {
        let primary = &before.primary;
        let bal = |r: &OrgRecord, w: &WorkspaceId| r.workspaces.get(w).map_or(0, |x| x.balance);
        match op {
            ControlOp::Purchase { amount } => {
                assert_eq!(bal(&self.rec, primary), bal(before, primary) + amount.get());
                assert_eq!(self.rec.purchased, before.purchased + amount.get());
            }
            ControlOp::CreateWorkspace { workspace } => {
                assert_eq!(self.rec.workspaces[workspace], Default::default());
            }
            ControlOp::DeleteWorkspace { workspace } => {
                assert_ne!(workspace, primary);
                assert!(!self.rec.workspaces.contains_key(workspace));
                assert_eq!(returned, bal(before, workspace));
                assert_eq!(bal(&self.rec, primary), bal(before, primary) + returned);
                assert_eq!(
                    self.rec.used_deleted,
                    before.used_deleted + before.workspaces[workspace].used
                );
            }
            ControlOp::Transfer { from, to, amount } => {
                assert_eq!(before.mode, Mode::Budget);
                assert_eq!(bal(&self.rec, from), bal(before, from) - amount.get());
                assert_eq!(bal(&self.rec, to), bal(before, to) + amount.get());
            }
            ControlOp::SetMode { mode } => {
                if *mode == before.mode {
                    assert!(events.is_empty());
                    assert_eq!(self.rec, *before);
                } else if *mode == Mode::Shared {
                    let all: u64 = before.workspaces.values().map(|w| w.balance).sum();
                    assert_eq!(bal(&self.rec, primary), all);
                } else {
                    for (w, x) in &before.workspaces {
                        assert_eq!(bal(&self.rec, w), x.balance, "shared → budget moved {w}");
                    }
                }
            }
        }
    }

    /// The invariants, after every step.
    fn check(&self) {
        let rec = &self.rec;
        // Rule 7 on the record and on the view.
        assert!(rec.is_conserved(), "not conserved: {rec:?}");
        let v = rec.view();
        assert_eq!(v.purchased, v.total_credits + v.used, "view: {v:?}");
        let balances: u64 = v.workspaces.iter().map(|w| w.balance).sum();
        assert_eq!(v.total_credits, balances + v.held);
        assert!(v.used <= v.purchased);
        // Rule 6: in shared mode no workspace but the Primary holds anything.
        if rec.mode == Mode::Shared {
            for w in v.workspaces.iter().filter(|w| !w.primary) {
                assert_eq!(w.balance, 0, "shared mode, {} holds credits", w.workspace);
            }
        }
        // Exactly once: every Usage reported is counted once, and expiries on top.
        assert_eq!(
            v.used,
            self.settled + self.expired,
            "used = settled usage + expired"
        );
        let live: u64 = self.nodes.iter().map(SimNode::unsettled_usage).sum();
        let unclosed: u64 = self
            .nodes
            .iter()
            .filter_map(|n| n.unclosed.map(|u| u.1))
            .sum();
        assert_eq!(
            self.allowed,
            self.settled + live + unclosed + self.forgiven + self.lost_counted,
            "every allowed credit is settled, pending, or lost with a life"
        );
        assert!(
            self.lost_counted <= self.expired,
            "lost usage was counted as consumed"
        );
        // Rule 8: what the nodes let callers consume never exceeds what was purchased, nor what
        // the store counts as consumed plus what it still has out with the nodes.
        let consumed = self.allowed - self.forgiven;
        assert!(
            consumed <= rec.purchased,
            "overspend: {consumed} > {}",
            rec.purchased
        );
        let out: u64 = rec
            .nodes
            .values()
            .flat_map(|s| s.leases.values().chain(s.held.values()))
            .sum();
        assert!(
            consumed <= v.used + out + unclosed,
            "overspend against the store"
        );

        for node in self.nodes.iter().filter(|n| n.unclosed.is_none()) {
            self.check_node(node);
        }
    }

    /// A node's local leases and reservations agree with what the store says it holds.
    fn check_node(&self, node: &SimNode) {
        let share = self.rec.nodes.get(&node.id).cloned().unwrap_or_default();
        if self.rec.nodes.contains_key(&node.id) {
            assert!(share.epoch <= node.epoch);
        }
        for s in node.lease.keys() {
            assert_eq!(
                self.rec.spender_of(s),
                Some(s),
                "{} spends from {s}",
                node.id
            );
        }
        let mut expect_lease: BTreeMap<WorkspaceId, i128> = BTreeMap::new();
        let mut expect_held: BTreeMap<WorkspaceId, i128> = BTreeMap::new();
        let mut released: BTreeMap<WorkspaceId, u64> = BTreeMap::new();
        for (s, a) in node.lease.iter().chain(&node.retired) {
            *expect_lease.entry(s.clone()).or_default() += *a as i128;
        }
        if let Some(u) = &node.unanswered {
            for (s, g) in &u.grants {
                *expect_lease.entry(s.clone()).or_default() += *g as i128;
            }
        }
        for ((w, s), c) in &node.unsettled {
            let [consumed, reserved, committed, back] = c.map(|x| x as i128);
            *expect_lease.entry(s.clone()).or_default() += consumed + reserved - back;
            *expect_held.entry(w.clone()).or_default() += committed + back - reserved;
            *released.entry(s.clone()).or_default() += c[3];
        }
        for r in &node.reservations {
            *expect_held.entry(r.workspace.clone()).or_default() += r.amount as i128;
        }
        let keys: BTreeSet<&WorkspaceId> = expect_lease.keys().chain(share.leases.keys()).collect();
        for s in keys {
            let store = share.leases.get(s).copied().unwrap_or(0);
            assert_eq!(
                store as i128,
                expect_lease.get(s).copied().unwrap_or(0),
                "{}: store lease of {s} disagrees with the node",
                node.id
            );
            let local = node.lease.get(s).copied().unwrap_or(0);
            assert!(local <= store + released.get(s).copied().unwrap_or(0));
        }
        let keys: BTreeSet<&WorkspaceId> = expect_held.keys().chain(share.held.keys()).collect();
        for w in keys {
            assert_eq!(
                share.held.get(w).copied().unwrap_or(0) as i128,
                expect_held.get(w).copied().unwrap_or(0),
                "{}: store held of {w} disagrees with the node",
                node.id
            );
        }
    }
}

proptest! {
    // 1,000 cases run in a few seconds in debug; with 500, a fresh run found the line-order bug
    // fixed in `OrgRecord::settle` about one time in seven, with 1,000 about two times in three.
    // Failures are kept in `proptest-regressions/` at the crate root and replayed first.
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model_props.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_conserve_and_never_overspend(
        start in start(),
        steps in prop::collection::vec(step(), 10..=60),
    ) {
        let mut sim = Sim::new(&start);
        sim.check();
        for step in &steps {
            sim.run(step);
            sim.check();
        }
        // In the end every node cancels its reservations and gives everything back (a clean
        // stop): nothing is stranded on a node.
        for i in 0..sim.nodes.len() {
            while !sim.nodes[i].reservations.is_empty() {
                sim.finish(i, 0, 0);
            }
            sim.settle(i, None, false, false, true);
            sim.check();
        }
        for (node, share) in &sim.rec.nodes {
            prop_assert!(share.leases.is_empty() && share.held.is_empty(), "{node} holds {share:?}");
        }
        let v = sim.rec.view();
        prop_assert_eq!(v.purchased, v.total_credits + v.used);
        prop_assert_eq!(v.held, 0);
    }
}
