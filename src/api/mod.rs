//! The HTTP server (hyper 1): routing, limits, and the three planes.
//!
//! - [`data`]: `/v1/debit`, `/v1/authorize`, `/v1/reservations`, `/v1/balance` (the hot path).
//! - [`control`]: `/v1/orgs/...` behind the bearer token.
//! - [`backup`]: `/v1/admin/export`, every org as JSON lines, behind the bearer token.
//! - [`ops`]: `/metrics`, `/healthz`, `/livez`, `/readyz`.
//! - [`console`]: the web console's static files under `/console/`.

mod backup;
mod console;
mod control;
mod data;
pub mod error;
mod ops;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use error::ApiError;

use crate::metrics as m;
use crate::model::{Amount, InvalidInput};
use crate::node::Node;

pub type Resp = Response<Full<Bytes>>;

/// What the server needs besides the node.
#[derive(Clone)]
pub struct ApiOptions {
    pub admin_token: Option<String>,
    pub authorize_deny_status: StatusCode,
    pub body_bytes_max: usize,
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    pub ledger_page_max: usize,
    pub view_page_max: usize,
    pub reservation_ttl_max: Duration,
}

impl ApiOptions {
    pub fn from_config(config: &crate::config::Config) -> Self {
        ApiOptions {
            admin_token: config.admin_token.clone(),
            authorize_deny_status: StatusCode::from_u16(config.authorize_deny_status)
                .unwrap_or(StatusCode::FORBIDDEN),
            body_bytes_max: config.body_bytes_max,
            connections_max: config.connections_max,
            header_read_timeout: config.header_read_timeout,
            ledger_page_max: config.ledger_page_max,
            view_page_max: config.view_page_max,
            reservation_ttl_max: config.reservation_ttl_max,
        }
    }
}

/// Everything a request handler can reach.
pub struct App {
    pub node: Arc<Node>,
    pub options: ApiOptions,
    /// The Prometheus recorder's handle; `None` when another recorder owns the process.
    pub metrics: Option<PrometheusHandle>,
}

/// Which plane a route belongs to, for the request counter.
#[derive(Debug, Clone, Copy)]
enum Plane {
    Data,
    Control,
    Ops,
    Console,
}

impl Plane {
    fn label(self) -> &'static str {
        match self {
            Plane::Data => "data",
            Plane::Control => "control",
            Plane::Ops => "ops",
            Plane::Console => "console",
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then lets open connections finish
/// for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(app.options.connections_max));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Take a connection slot before accepting: when all are taken, new connections wait in
        // the kernel's backlog instead of costing memory here.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                m::limit_hit("connections");
                tokio::select! {
                    _ = &mut shutdown => break,
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                }
            }
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let header_read_timeout = app.options.header_read_timeout;
        let conn_app = Arc::clone(&app);
        let service = hyper::service::service_fn(move |req| handle(Arc::clone(&conn_app), req));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    m::limit_hit("header_timeout");
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "connections still open after the grace period"
        );
    }
}

/// Answers one request; every failure becomes a JSON error, never a dropped connection.
async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let (plane, result) = route(&app, &parts, body).await;
    let mut response = result.unwrap_or_else(|e| error_response(&e));
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        // A body that stalled leaves the connection in an unknown state: close it.
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    metrics::counter!(m::HTTP_REQUESTS, "plane" => plane.label(), "status" => status_label(response.status()))
        .increment(1);
    Ok(response)
}

async fn route(app: &App, parts: &Parts, body: Incoming) -> (Plane, Result<Resp, ApiError>) {
    let path = parts.uri.path();
    let method = &parts.method;
    if let Some(rest) = path.strip_prefix("/v1/") {
        let segments: Vec<&str> = rest.split('/').collect();
        match segments.as_slice() {
            ["debit"] => (
                Plane::Data,
                only(method, &Method::POST, data::debit(app, parts, body)).await,
            ),
            ["authorize", ..] => (Plane::Data, data::authorize(app, parts).await),
            ["reservations"] => (
                Plane::Data,
                only(method, &Method::POST, data::reserve(app, parts, body)).await,
            ),
            ["reservations", id, "commit"] => (
                Plane::Data,
                only(method, &Method::POST, data::commit(app, parts, body, id)).await,
            ),
            ["reservations", id] => (
                Plane::Data,
                only(method, &Method::DELETE, data::release(app, id)).await,
            ),
            ["balance"] => (
                Plane::Data,
                only(method, &Method::GET, data::balance(app, parts)).await,
            ),
            ["orgs", ..] => (
                Plane::Control,
                control::route(app, parts, body, &segments[1..]).await,
            ),
            ["admin", "export"] => (
                Plane::Control,
                only(method, &Method::GET, backup::export(app, parts)).await,
            ),
            _ => (Plane::Data, Err(ApiError::not_found())),
        }
    } else if path == "/console" || path.starts_with("/console/") {
        (Plane::Console, console::route(parts).await)
    } else {
        let result = match path {
            "/metrics" => only(method, &Method::GET, ops::metrics(app)).await,
            "/healthz" | "/livez" => only(method, &Method::GET, ops::alive()).await,
            "/readyz" => only(method, &Method::GET, ops::ready(app)).await,
            _ => Err(ApiError::not_found()),
        };
        (Plane::Ops, result)
    }
}

/// Runs `handler` if the method is `allowed`, else answers 405 without running it.
async fn only(
    method: &Method,
    allowed: &Method,
    handler: impl Future<Output = Result<Resp, ApiError>>,
) -> Result<Resp, ApiError> {
    if method == allowed {
        handler.await
    } else {
        Err(ApiError::method_not_allowed())
    }
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, body, "application/json"),
        Err(e) => error_response(&ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

pub(crate) fn with_body(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Resp {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(crate) fn error_response(e: &ApiError) -> Resp {
    with_body(e.status, e.body(), "application/json")
}

/// Reads the whole body within the size limit and the read timeout.
pub(crate) async fn read_body(app: &App, parts: &Parts, body: Incoming) -> Result<Bytes, ApiError> {
    let max = app.options.body_bytes_max;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        m::limit_hit("body_bytes");
        return Err(ApiError::payload_too_large(max));
    }
    let timeout = app.options.header_read_timeout;
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => {
            m::limit_hit("header_timeout");
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                format!("body not received within {}ms", timeout.as_millis()),
            ))
        }
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            m::limit_hit("body_bytes");
            Err(ApiError::payload_too_large(max))
        }
        Ok(Err(e)) => Err(ApiError::invalid(format!("cannot read body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Parses a JSON body into `T`, naming what is wrong. Every body type refuses fields it does
/// not know: a misspelt `idempotency_key` must not turn a retried purchase into a second one.
pub(crate) fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let text = e.to_string();
        match text.strip_prefix("unknown field ") {
            // serde: "unknown field `x`, expected one of `a`, `b` at line 1 column 9".
            Some(rest) => {
                let rest = rest.split(" at line ").next().unwrap_or(rest);
                ApiError::invalid(format!("unknown field {rest}"))
            }
            None => ApiError::invalid(format!("invalid JSON body: {text}")),
        }
    })
}

/// `n` as an amount of a call (1 to `AMOUNT_MAX`), or the refusal naming `field`.
pub(crate) fn check_amount(n: u64, field: &'static str) -> Result<Amount, ApiError> {
    Amount::new(n).ok_or_else(|| ApiError::invalid(InvalidInput::Amount { field }.to_string()))
}

/// The value of `name` in the query string, percent-decoded.
pub(crate) fn query_param(parts: &Parts, name: &str) -> Option<String> {
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bounded label for a status code.
fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        201 => "201",
        308 => "308",
        400 => "400",
        401 => "401",
        402 => "402",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_escapes_and_garbage() {
        assert_eq!(percent_decode("ws%2Da"), "ws-a");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
    }
}
