//! What happened to an org, as its ledger keeps it.

use serde::{Deserialize, Serialize};

use super::ids::{NodeId, WorkspaceId};
use super::Mode;

/// Something that happened to an org, as kept in its ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerEvent {
    OrgCreated {
        mode: Mode,
        primary: WorkspaceId,
    },
    Purchase {
        workspace: WorkspaceId,
        amount: u64,
    },
    Transfer {
        from: WorkspaceId,
        to: WorkspaceId,
        amount: u64,
    },
    WorkspaceCreated {
        workspace: WorkspaceId,
    },
    WorkspaceDeleted {
        workspace: WorkspaceId,
        returned_to_primary: u64,
    },
    ModeChanged {
        from: Mode,
        to: Mode,
    },
    Sweep {
        workspace: WorkspaceId,
        to: WorkspaceId,
        amount: u64,
    },
    Usage {
        node: NodeId,
        workspace: WorkspaceId,
        amount: u64,
    },
    LeaseExpired {
        node: NodeId,
        workspace: WorkspaceId,
        amount: u64,
    },
    LeaseReturned {
        node: NodeId,
        workspace: WorkspaceId,
        amount: u64,
    },
    /// Usage a node reported that no lease or reservation of its own backed in the store: it
    /// was spent from credits already counted as consumed when the node's lease expired (or
    /// granted by writes the store lost). Recorded, never charged twice.
    UsageUnbacked {
        node: NodeId,
        workspace: WorkspaceId,
        amount: u64,
    },
}
