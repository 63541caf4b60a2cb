//! Operations endpoints: metrics and health.

use hyper::StatusCode;
use serde_json::json;

use super::{json, with_body, ApiError, App, Resp};

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(app: &App) -> Result<Resp, ApiError> {
    let text = app.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    Ok(with_body(
        StatusCode::OK,
        text.into_bytes(),
        "text/plain; version=0.0.4",
    ))
}

/// `GET /healthz`, `GET /livez`: the process answers.
pub(super) async fn alive() -> Result<Resp, ApiError> {
    Ok(json(StatusCode::OK, &json!({"status": "ok"})))
}

/// `GET /readyz`: the node answers debits and its store can be written (not stopping); a 503
/// says why in `reason`.
pub(super) async fn ready(app: &App) -> Result<Resp, ApiError> {
    match app.node.readiness().await {
        Ok(()) => Ok(json(StatusCode::OK, &json!({"status": "ok"}))),
        Err(reason) => Ok(json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unavailable", "reason": reason}),
        )),
    }
}
