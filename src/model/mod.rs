//! The rules of the product as plain types and pure functions: no I/O, no clock, no tokio.

mod ids;
mod org;
#[cfg(test)]
mod tests;

pub use ids::{
    is_valid_id, Amount, InvalidInput, NodeId, OrgId, WorkspaceId, AMOUNT_MAX, ID_BYTES_MAX,
    ID_RULE,
};
pub use org::{
    LedgerEvent, Mode, NodeShare, OrgRecord, OrgView, PriorLife, RuleError, SettleBatch,
    SettleReply, UsageLine, WorkspaceRecord, WorkspaceView, CREDITS_MAX,
};
