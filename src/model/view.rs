//! The org as the API shows it: leases folded back into the balances they came from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{OrgId, WorkspaceId};
use super::{Mode, OrgRecord};

/// A workspace as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceView {
    pub workspace: WorkspaceId,
    pub primary: bool,
    pub balance: u64,
    pub held: u64,
    pub used: u64,
}

/// An org as the API shows it: leases are folded back into the balances they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgView {
    pub org: OrgId,
    pub mode: Mode,
    pub primary: WorkspaceId,
    pub purchased: u64,
    pub total_credits: u64,
    pub held: u64,
    pub used: u64,
    pub workspaces: Vec<WorkspaceView>,
}

impl OrgView {
    pub fn workspace(&self, ws: &str) -> Option<&WorkspaceView> {
        self.workspaces.iter().find(|w| w.workspace.as_str() == ws)
    }
}

impl OrgRecord {
    /// The org as the API shows it.
    pub fn view(&self) -> OrgView {
        let mut held_total = 0u64;
        let mut held_by_ws: BTreeMap<&WorkspaceId, u64> = BTreeMap::new();
        for share in self.nodes.values() {
            for (ws, h) in &share.held {
                *held_by_ws.entry(ws).or_default() += h;
                held_total += h;
            }
        }
        let mut used = self.used_deleted;
        let mut balances = 0u64;
        let workspaces = self
            .workspaces
            .iter()
            .map(|(ws, w)| {
                let balance = w.balance + self.leased(ws);
                balances += balance;
                used += w.used;
                WorkspaceView {
                    workspace: ws.clone(),
                    primary: *ws == self.primary,
                    balance,
                    held: held_by_ws.get(ws).copied().unwrap_or(0),
                    used: w.used,
                }
            })
            .collect();
        OrgView {
            org: self.org.clone(),
            mode: self.mode,
            primary: self.primary.clone(),
            purchased: self.purchased,
            total_credits: balances + held_total,
            held: held_total,
            used,
            workspaces,
        }
    }
}
