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
    /// The org's workspaces in byte order; one page of them when the view is paged.
    pub workspaces: Vec<WorkspaceView>,
    /// On a page with more workspaces after it: the cursor of the next page (the last
    /// workspace shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

impl OrgView {
    pub fn workspace(&self, ws: &str) -> Option<&WorkspaceView> {
        self.workspaces.iter().find(|w| w.workspace.as_str() == ws)
    }

    /// At most `limit` workspaces named after `after` (in byte order), and the cursor of the
    /// next page if more follow. The org's totals stay those of every workspace.
    pub fn page(mut self, after: Option<&str>, limit: usize) -> OrgView {
        let start = after.map_or(0, |a| {
            self.workspaces
                .partition_point(|w| w.workspace.as_str().as_bytes() <= a.as_bytes())
        });
        let end = start.saturating_add(limit).min(self.workspaces.len());
        self.next = (end < self.workspaces.len())
            .then(|| self.workspaces[end - 1].workspace.to_string())
            .filter(|_| end > start);
        self.workspaces.truncate(end);
        self.workspaces.drain(..start);
        self
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
            next: None,
        }
    }
}
