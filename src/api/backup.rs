//! `GET /v1/admin/export`: every org of the node's store as JSON lines (the format of
//! [`crate::store::export`]), for `creditd backup`. It works on a running node with either
//! store, and is how the embedded store is backed up at all while its file is open.

use hyper::http::request::Parts;
use hyper::StatusCode;

use super::{control, with_body, ApiError, App, Resp};
use crate::node::NodeError;

/// Media type of the export: one JSON object per line.
pub const NDJSON: &str = "application/x-ndjson";

pub(super) async fn export(app: &App, parts: &Parts) -> Result<Resp, ApiError> {
    control::authorize(app, parts)?;
    // No settle round of its own first: one beside the settler's could start two new lives
    // of the node at once. The export lacks at most one settle interval of this node's usage.
    let mut out = Vec::new();
    let orgs = crate::store::export::export(&**app.node.store(), &mut out)
        .await
        .map_err(|e| ApiError::from(NodeError::from(e)))?;
    tracing::info!(target: "audit", orgs, bytes = out.len(), "export taken");
    Ok(with_body(StatusCode::OK, out, NDJSON))
}
