//! The rules of the product as plain types and pure functions: no I/O, no clock, no tokio.
//!
//! - [`org`]: one org's record (mode, workspaces, what each node holds, counters) and the
//!   conservation it keeps;
//! - [`rules`]: the control-plane rules (purchase, workspaces, transfer, deletion, mode);
//! - [`settle`]: a node's settle batch applied exactly once, and the end of a node's life;
//! - [`view`]: the org as the API shows it;
//! - [`ledger`], [`error`], [`ids`]: what happened, why a change was refused, valid ids.

mod error;
mod ids;
mod ledger;
mod org;
mod rules;
mod settle;
#[cfg(test)]
mod tests;
mod view;

pub use error::RuleError;
pub use ids::{
    is_valid_id, Amount, InvalidInput, NodeId, OrgId, WorkspaceId, AMOUNT_MAX, ID_BYTES_MAX,
    ID_RULE,
};
pub use ledger::LedgerEvent;
pub use org::{Mode, NodeShare, OrgRecord, WorkspaceRecord, CREDITS_MAX};
pub use settle::{
    PriorLife, SettleBatch, SettleReply, SettleView, SpenderView, Tombstone, UsageLine,
};
pub use view::{OrgView, WorkspaceView};
