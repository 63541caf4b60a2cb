//! Why an operation on an org was refused.

use super::ids::WorkspaceId;
use super::Mode;

/// A rule the operation would break; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("unknown workspace {0}")]
    UnknownWorkspace(WorkspaceId),
    #[error("workspace {0} already exists")]
    WorkspaceExists(WorkspaceId),
    #[error("the Primary Workspace {0} cannot be deleted")]
    PrimaryWorkspace(WorkspaceId),
    #[error("transfers are allowed in budget mode only; this org is in {} mode", .0.as_str())]
    WrongMode(Mode),
    #[error("from and to must be different workspaces")]
    SameWorkspace,
    #[error("workspace {workspace} has {available} credits, fewer than {wanted}")]
    InsufficientCredits {
        workspace: WorkspaceId,
        available: u64,
        wanted: u64,
    },
    /// The credits exist but some are leased to nodes: the caller recalls leases and retries.
    #[error("{leased} credits of {workspace} are leased to nodes; recall them first")]
    LeasesOutstanding { workspace: WorkspaceId, leased: u64 },
    #[error("credit arithmetic would overflow")]
    Overflow,
    /// A settle batch that does not fit the store's books (a bug or a forged batch).
    #[error("settle batch refused: {0}")]
    BatchRefused(String),
    /// A batch from an earlier life (epoch) of the node: ignored, never applied.
    #[error("settle batch from epoch {batch} but node is at epoch {current}")]
    StaleEpoch { batch: u64, current: u64 },
}
