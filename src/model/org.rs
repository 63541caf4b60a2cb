//! One org's truth: its record, as both stores keep it. The rules over it are in
//! [`super::rules`] (control plane) and [`super::settle`] (nodes); the embedded store calls
//! them and the Redis store's Lua scripts implement the same rules (the shared test suite holds
//! them to it).
//!
//! Where credits can be, for one org (rule 7 of docs/api.md):
//! `purchased == Σ balance + Σ leases + Σ held + used`, where
//! - `balance` is what a workspace holds that no node has leased,
//! - `leases` are credits handed to a node to spend locally (they still belong to the workspace
//!   they came from, and the org view counts them there),
//! - `held` are credits set aside by a node's open reservations,
//! - `used` is every credit consumed, deleted workspaces included.
//!
//! Every mutating operation works on a copy and replaces `self` only when it succeeded, so a
//! refused operation changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{NodeId, OrgId, WorkspaceId};
use super::{LedgerEvent, RuleError};

/// How the workspaces of an org spend (see the product definition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every workspace spends from the Primary's balance.
    Shared,
    /// Every workspace spends only its own balance.
    Budget,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Shared, Mode::Budget];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Budget => "budget",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "shared" => Some(Mode::Shared),
            "budget" => Some(Mode::Budget),
            _ => None,
        }
    }
}

/// What a workspace holds that no node has leased, and what it consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub balance: u64,
    pub used: u64,
}

/// What one node holds of an org, and where its settle stream stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeShare {
    /// Credits leased to the node, by spender (the workspace whose balance they came from).
    pub leases: BTreeMap<WorkspaceId, u64>,
    /// Credits held by the node's open reservations, by workspace.
    pub held: BTreeMap<WorkspaceId, u64>,
    /// The same credits by the spender whose lease they came from: where they go back if the
    /// node's life ends (a reservation can outlive a mode switch, so the workspace alone does
    /// not say). The two maps always add up to the same total.
    #[serde(default)]
    pub held_from: BTreeMap<WorkspaceId, u64>,
    /// The node's life: a restarted node takes a higher epoch.
    pub epoch: u64,
    /// Sequence number of the last batch applied in this epoch.
    pub seq: u64,
    /// Grants of the last applied batch, answered again if that batch is retried.
    pub last_grants: Vec<(WorkspaceId, u64)>,
    /// Store time (ms) of the node's last settle: its heartbeat for lease expiry.
    pub seen_ms: u64,
    /// True when an expiry closed this node's holdings (counted as consumed) since its last
    /// applied batch: the next reply tells the node, which then forfeits what it still holds
    /// in memory (it is paid for already).
    #[serde(default)]
    pub expired: bool,
    /// What the reply to the last applied batch said of `expired`, answered again on a retry.
    #[serde(default)]
    pub last_expired: bool,
    /// The sequence number the store had before the last applied batch (its reply's
    /// `prev_seq`), answered again on a retry.
    #[serde(default)]
    pub last_prev_seq: u64,
}

impl NodeShare {
    /// Drops the entries that reached zero.
    pub(super) fn drop_zeros(&mut self) {
        self.leases.retain(|_, v| *v > 0);
        self.held.retain(|_, v| *v > 0);
        self.held_from.retain(|_, v| *v > 0);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.leases.values().all(|&v| v == 0)
            && self.held.values().all(|&v| v == 0)
            && self.held_from.values().all(|&v| v == 0)
    }
}

/// One org: its mode, its workspaces, what each node holds, and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRecord {
    pub org: OrgId,
    pub mode: Mode,
    pub primary: WorkspaceId,
    /// Every credit ever added.
    pub purchased: u64,
    /// Credits consumed by workspaces that were deleted since.
    pub used_deleted: u64,
    pub workspaces: BTreeMap<WorkspaceId, WorkspaceRecord>,
    pub nodes: BTreeMap<NodeId, NodeShare>,
    /// Change epoch: bumped by every control-plane change, returned on every settle so that
    /// nodes notice changes made through other nodes.
    pub version: u64,
}

/// Largest value any credit counter of an org may reach: 2^53 - 1. The Redis store's Lua
/// scripts compute with doubles, which are exact only up to 2^53, so both stores refuse (with
/// [`RuleError::Overflow`]) a purchase that would take `purchased` beyond it. Every other counter
/// (a balance, a lease, a reservation, `used`) is a part of `purchased` by conservation, so it can
/// never exceed it either.
pub const CREDITS_MAX: u64 = (1 << 53) - 1;

pub(super) fn add(a: u64, b: u64) -> Result<u64, RuleError> {
    a.checked_add(b).ok_or(RuleError::Overflow)
}

pub(super) fn sub(a: u64, b: u64, what: &str) -> Result<u64, RuleError> {
    a.checked_sub(b)
        .ok_or_else(|| RuleError::BatchRefused(format!("{what} would go negative")))
}

impl OrgRecord {
    /// A new org holding only its Primary Workspace, with no credits.
    pub fn new(org: OrgId, mode: Mode, primary: WorkspaceId) -> (Self, LedgerEvent) {
        let mut workspaces = BTreeMap::new();
        workspaces.insert(primary.clone(), WorkspaceRecord::default());
        let record = OrgRecord {
            org,
            mode,
            primary: primary.clone(),
            purchased: 0,
            used_deleted: 0,
            workspaces,
            nodes: BTreeMap::new(),
            version: 1,
        };
        (record, LedgerEvent::OrgCreated { mode, primary })
    }

    /// The workspace whose balance `ws` spends from under the current mode, if `ws` exists.
    pub fn spender_of<'a>(&'a self, ws: &'a WorkspaceId) -> Option<&'a WorkspaceId> {
        if !self.workspaces.contains_key(ws) {
            return None;
        }
        Some(match self.mode {
            Mode::Shared => &self.primary,
            Mode::Budget => ws,
        })
    }

    /// Where credits given back for `spender` go now: the spender itself if it still spends for
    /// itself, else the Primary (deleted workspace, or shared mode).
    pub(super) fn home_of(&self, spender: &WorkspaceId) -> WorkspaceId {
        match self.spender_of(spender) {
            Some(s) => s.clone(),
            None => self.primary.clone(),
        }
    }

    /// Credits of `ws` leased to all nodes.
    pub fn leased(&self, ws: &WorkspaceId) -> u64 {
        self.nodes.values().filter_map(|n| n.leases.get(ws)).sum()
    }

    /// Credits of `ws` held by open reservations on all nodes.
    pub fn held(&self, ws: &WorkspaceId) -> u64 {
        self.nodes.values().filter_map(|n| n.held.get(ws)).sum()
    }

    pub(super) fn ws_mut(&mut self, ws: &WorkspaceId) -> Result<&mut WorkspaceRecord, RuleError> {
        self.workspaces
            .get_mut(ws)
            .ok_or_else(|| RuleError::UnknownWorkspace(ws.clone()))
    }

    pub(super) fn balance_of(&self, ws: &WorkspaceId) -> Result<u64, RuleError> {
        self.workspaces
            .get(ws)
            .map(|w| w.balance)
            .ok_or_else(|| RuleError::UnknownWorkspace(ws.clone()))
    }

    /// Rule 7: every credit added is in a balance, a lease, a reservation or consumed.
    pub fn is_conserved(&self) -> bool {
        let balances: u128 = self.workspaces.values().map(|w| w.balance as u128).sum();
        let used: u128 = self
            .workspaces
            .values()
            .map(|w| w.used as u128)
            .sum::<u128>()
            + self.used_deleted as u128;
        let nodes: u128 = self
            .nodes
            .values()
            .map(|n| {
                n.leases
                    .values()
                    .chain(n.held.values())
                    .map(|&v| v as u128)
                    .sum::<u128>()
            })
            .sum();
        let held_agrees = self.nodes.values().all(|n| {
            n.held.values().map(|&v| v as u128).sum::<u128>()
                == n.held_from.values().map(|&v| v as u128).sum::<u128>()
        });
        held_agrees && self.purchased as u128 == balances + used + nodes
    }
}
