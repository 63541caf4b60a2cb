//! Operator commands of the `creditd` binary, talking to a running node over HTTP.
//!
//! - `healthcheck`: the container probe, against this host's configured listen port.
//! - `org`, `credits`, `workspace`, `transfer`, `mode`, `ledger`: the control plane of
//!   docs/api.md, one request each, to the node named by `--url` (default `CREDITD_URL`, else
//!   `http://127.0.0.1:8787`) with the admin token of `--token` (default
//!   `CREDITD_ADMIN_TOKEN`).
//!
//! Output is an aligned table by default and the API's own JSON with `--json`. Exit codes:
//! 0 on success; 1 when the node refuses (`error: <code>: <message>` on stderr) or cannot be
//! reached; 64 ([`EXIT_CONFIG`]) for a usage error.

mod args;
mod call;
mod client;
pub mod data;
mod render;

use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use self::call::View;
use crate::config::{Config, EXIT_CONFIG};
pub use args::{CreditsCommand, ModeCommand, Operator, OrgCommand, Remote, WorkspaceCommand};
pub use client::BaseUrl;

/// Where the operator commands go when neither `--url` nor `CREDITD_URL` says otherwise: the
/// default listen address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8787";

/// Exit code of a refused or failed operator command.
pub const EXIT_FAILED: u8 = 1;

/// Runs one operator command: prints the answer on stdout (a table, or the API's JSON with
/// `--json`), or `error: <code>: <message>` on stderr.
pub async fn run(operator: Operator) -> ExitCode {
    let (remote, call) = operator.into_call();
    let base = match BaseUrl::parse(&remote.url) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let answer = match client::send(
        &base,
        remote.token.as_deref(),
        call.method,
        &call.path,
        call.body.as_ref(),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&answer.body).ok();
    if !answer.status.is_success() {
        let text = String::from_utf8_lossy(&answer.body);
        match parsed.as_ref().and_then(|v| {
            Some((
                v.get("error")?.as_str()?.to_string(),
                v.get("message").and_then(Value::as_str).unwrap_or(""),
            ))
        }) {
            Some((code, message)) => eprintln!("error: {code}: {message}"),
            // Not creditd (a proxy's page, another service on that port): show what came.
            None => eprintln!("error: http_{}: {}", answer.status.as_u16(), text.trim()),
        }
        return ExitCode::from(EXIT_FAILED);
    }
    let Some(value) = parsed else {
        eprintln!(
            "error: invalid_answer: {} answered {} without a JSON body",
            base.authority, answer.status
        );
        return ExitCode::from(EXIT_FAILED);
    };
    if remote.json {
        println!("{}", String::from_utf8_lossy(&answer.body).trim_end());
    } else {
        let text = match call.view {
            View::Org => render::org_view(&value),
            View::Transfer => render::transfer(&value),
            View::Ledger => render::ledger(&value, &call.org),
        };
        print!("{text}");
    }
    ExitCode::SUCCESS
}

/// Longest the health check waits for an answer.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// `creditd healthcheck`: GET /readyz on the configured listen port of this host; exit 0 on 200.
pub async fn healthcheck(config: &Config) -> ExitCode {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let base = match BaseUrl::parse(&format!("http://{addr}")) {
        Ok(base) => base,
        Err(e) => {
            eprintln!("creditd healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ready = client::send(&base, None, Method::GET, "/readyz", None);
    match tokio::time::timeout(HEALTHCHECK_TIMEOUT, ready).await {
        Ok(Ok(answer)) if answer.status.is_success() => ExitCode::SUCCESS,
        Ok(Ok(answer)) => {
            eprintln!(
                "creditd healthcheck: /readyz answered {}",
                answer.status.as_u16()
            );
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("creditd healthcheck: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "creditd healthcheck: no answer within {}s",
                HEALTHCHECK_TIMEOUT.as_secs()
            );
            ExitCode::FAILURE
        }
    }
}
