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

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::Counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use data::{
    parse_debit, remaining_value, write_debit_allowed, write_insufficient, DebitBody, Refused,
};
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
    const ALL: [Plane; 4] = [Plane::Data, Plane::Control, Plane::Ops, Plane::Console];

    fn label(self) -> &'static str {
        match self {
            Plane::Data => "data",
            Plane::Control => "control",
            Plane::Ops => "ops",
            Plane::Console => "console",
        }
    }
}

/// `creditd_http_requests_total{plane, status}` handles, each registered on its first use
/// (a series appears when it is first counted, as with the macro) and then kept: counting a
/// request is one atomic add, with no registry lookup.
fn count_request(plane: Plane, status: StatusCode) {
    static COUNTERS: [[OnceLock<Counter>; STATUS_LABELS.len()]; Plane::ALL.len()] =
        [const { [const { OnceLock::new() }; STATUS_LABELS.len()] }; Plane::ALL.len()];
    let s = status_index(status);
    COUNTERS[plane as usize][s]
        .get_or_init(|| {
            metrics::counter!(m::HTTP_REQUESTS, "plane" => plane.label(), "status" => STATUS_LABELS[s])
        })
        .increment(1);
}

/// The open-connections gauge, registered once.
fn connections_open() -> &'static metrics::Gauge {
    static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!(m::CONNECTIONS_OPEN))
}

/// How often the Prometheus recorder's samples are drained when nobody scrapes (the exporter's
/// own default upkeep period).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves HTTP on `listener` until `shutdown` resolves, then lets open connections finish
/// for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(app.options.connections_max));
    let upkeep = app.metrics.clone().map(spawn_upkeep);
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
            connections_open().increment(1.0);
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    m::limit_hit("header_timeout");
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            connections_open().decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    if let Some(upkeep) = &upkeep {
        upkeep.abort();
    }
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

/// Drains the Prometheus recorder every [`UPKEEP_INTERVAL`]. It keeps every histogram sample
/// until drained, by a scrape or by this: without it a node nobody scrapes grows by every
/// debit's latency sample (about 20 bytes a request under load: BENCHMARKS.md, "The HTTP hot
/// path against a bare hyper 1 server").
fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    })
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
    count_request(plane, response.status());
    Ok(response)
}

async fn route(app: &App, parts: &Parts, body: Incoming) -> (Plane, Result<Resp, ApiError>) {
    let path = parts.uri.path();
    let method = &parts.method;
    if let Some(rest) = path.strip_prefix("/v1/") {
        // The path's segments on the stack, not in a Vec allocated for each request. A
        // path deeper than the array (deeper than any route) still gets a Vec.
        let mut stack = [""; 8];
        let mut depth = 0;
        for segment in rest.split('/') {
            if depth == stack.len() {
                depth += 1;
                break;
            }
            stack[depth] = segment;
            depth += 1;
        }
        let deep: Vec<&str>;
        let segments: &[&str] = if depth <= stack.len() {
            &stack[..depth]
        } else {
            deep = rest.split('/').collect();
            &deep
        };
        match segments {
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
                // Boxed: a control-plane future is large, and inline it would make every
                // request's future as large, moved on every data-plane request.
                Box::pin(control::route(app, parts, body, &segments[1..])).await,
            ),
            ["admin", "export"] => (
                Plane::Control,
                only(method, &Method::GET, backup::export(app, parts)).await,
            ),
            _ => (Plane::Data, Err(ApiError::not_found())),
        }
    } else if path == "/console" || path.starts_with("/console/") {
        (Plane::Console, Box::pin(console::route(parts)).await)
    } else {
        let result = Box::pin(async {
            match path {
                "/metrics" => only(method, &Method::GET, ops::metrics(app)).await,
                "/healthz" | "/livez" => only(method, &Method::GET, ops::alive()).await,
                "/readyz" => only(method, &Method::GET, ops::ready(app)).await,
                _ => Err(ApiError::not_found()),
            }
        });
        (Plane::Ops, result.await)
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

/// A JSON answer written by `write`, as [`answer_body`] makes it.
pub(crate) fn json_with(status: StatusCode, write: impl FnOnce(&mut Vec<u8>)) -> Resp {
    with_bytes(status, answer_body(write), "application/json")
}

/// A response body written by `write` into this thread's scratch buffer, then copied into a
/// `Bytes` of its exact size: once the scratch buffer has room (its first use on a thread
/// allocates it), the body is the one allocation. (`Bytes::from(Vec)` of a vector with spare
/// capacity would add a second one, its shared handle.)
pub fn answer_body(write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        write(&mut scratch);
        Bytes::copy_from_slice(&scratch)
    })
}

pub(crate) fn with_body(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Resp {
    with_bytes(status, Bytes::from(body), content_type)
}

fn with_bytes(status: StatusCode, body: Bytes, content_type: &'static str) -> Resp {
    let mut response = Response::new(Full::new(body));
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
    match tokio::time::timeout(timeout, collect_limited(body, max)).await {
        Err(_) => {
            m::limit_hit("header_timeout");
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                format!("body not received within {}ms", timeout.as_millis()),
            ))
        }
        Ok(Err(BodyError::TooLarge)) => {
            m::limit_hit("body_bytes");
            Err(ApiError::payload_too_large(max))
        }
        Ok(Err(BodyError::Read(e))) => Err(ApiError::invalid(format!("cannot read body: {e}"))),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// The whole body, at most `max` bytes in all (as `http_body_util::Limited` counts them). A
/// body that comes in one data frame, as a small one does, is that frame's `Bytes`, not
/// copied; `Limited::collect` would first allocate a list of frames.
async fn collect_limited(mut body: Incoming, max: usize) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers: read and dropped, as collect() then to_bytes() did
        };
        len += data.len();
        if len > max {
            return Err(BodyError::TooLarge);
        }
        match (&mut joined, first.take()) {
            (Some(all), _) => all.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut all = bytes::BytesMut::with_capacity(earlier.len() + data.len());
                all.extend_from_slice(&earlier);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    })
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

/// Bounded labels for a status code; the last is every other status.
const STATUS_LABELS: [&str; 16] = [
    "200", "201", "308", "400", "401", "402", "403", "404", "405", "408", "409", "413", "429",
    "500", "503", "other",
];

/// The index of a status code's label in [`STATUS_LABELS`].
fn status_index(status: StatusCode) -> usize {
    match status.as_u16() {
        200 => 0,
        201 => 1,
        308 => 2,
        400 => 3,
        401 => 4,
        402 => 5,
        403 => 6,
        404 => 7,
        405 => 8,
        408 => 9,
        409 => 10,
        413 => 11,
        429 => 12,
        500 => 13,
        503 => 14,
        _ => 15,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_name_their_status() {
        for label in &STATUS_LABELS[..STATUS_LABELS.len() - 1] {
            let status = StatusCode::from_bytes(label.as_bytes()).unwrap();
            assert_eq!(STATUS_LABELS[status_index(status)], *label);
        }
        assert_eq!(
            STATUS_LABELS[status_index(StatusCode::IM_A_TEAPOT)],
            "other"
        );
    }

    #[test]
    fn percent_decoding_handles_escapes_and_garbage() {
        assert_eq!(percent_decode("ws%2Da"), "ws-a");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
    }
}
