//! The baseline of the load comparison (`benches/load/compare.sh`, issue #14): a bare hyper 1
//! server with creditd's server settings and nothing else. Every request, whatever its method
//! and path, has its body read the way creditd reads it (size limit, read timeout), and gets a
//! small fixed JSON answer of the size of a debit's.
//!
//! Same as `creditd::api::serve`: a multi-thread tokio runtime with the default worker count,
//! `TCP_NODELAY`, `hyper::server::conn::http1::Builder` with a `TokioTimer` and a 5 s header
//! read timeout, each connection watched by hyper-util's `GracefulShutdown` and spawned on its
//! own task, a connection slot (semaphore permit) taken per connection. No routing, no JSON
//! parsing, no metrics, no state.
//!
//! Usage: `cargo run --release --example bare -- [ADDR]` (default `127.0.0.1:0`); prints
//! `listening on ADDR` once bound, serves until killed. Loopback only in the scripts.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// creditd's defaults (`config::DEFAULT_*`).
const BODY_BYTES_MAX: usize = 64 * 1024;
const CONNECTIONS_MAX: usize = 4096;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The size and shape of an allowed debit's answer.
const ANSWER: &[u8] =
    br#"{"allowed":true,"amount":1,"org":"bench","remaining":999999999999999,"workspace":"ws-a"}"#;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req.into_body();
    let read = tokio::time::timeout(
        HEADER_READ_TIMEOUT,
        Limited::new(body, BODY_BYTES_MAX).collect(),
    )
    .await;
    let status = match read {
        Ok(Ok(collected)) => {
            std::hint::black_box(collected.to_bytes());
            StatusCode::OK
        }
        _ => StatusCode::BAD_REQUEST,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(ANSWER)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        println!("listening on {}", listener.local_addr().expect("address"));
        let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .expect("semaphore");
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
        }
    });
}
