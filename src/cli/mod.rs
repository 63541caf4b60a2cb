//! Operator commands of the `creditd` binary, talking to a running node over HTTP.
//!
//! - `healthcheck`: the container probe, against this host's configured listen port.
//! - `org`, `credits`, `workspace`, `transfer`, `mode`, `ledger`: the control plane of
//!   API.md, one request each, to the node named by `--url` (default `CREDITD_URL`, else
//!   `http://127.0.0.1:8787`) with the admin token of `--token` (default
//!   `CREDITD_ADMIN_TOKEN`).
//!
//! Output is an aligned table by default and the API's own JSON with `--json`. Exit codes:
//! 0 on success; 1 when the node refuses (`error: <code>: <message>` on stderr) or cannot be
//! reached; 64 ([`EXIT_CONFIG`]) for a usage error.

mod client;
pub mod data;
mod render;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use crate::config::{Config, EXIT_CONFIG};
pub use client::BaseUrl;

/// Where the operator commands go when neither `--url` nor `CREDITD_URL` says otherwise: the
/// default listen address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8787";

/// Exit code of a refused or failed operator command.
pub const EXIT_FAILED: u8 = 1;

/// How to reach the node; every operator command takes these, before or after its arguments.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The node's base URL, http://HOST:PORT.
    #[arg(long, global = true, env = "CREDITD_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// The admin token (sent as Authorization: Bearer).
    #[arg(
        long,
        global = true,
        env = "CREDITD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A credit mode, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Every workspace spends from the Primary's balance.
    Shared,
    /// Each workspace spends only from its own balance.
    Budget,
}

impl ModeArg {
    fn as_str(self) -> &'static str {
        match self {
            ModeArg::Shared => "shared",
            ModeArg::Budget => "budget",
        }
    }
}

/// The control-plane commands (API.md, "Control plane").
#[derive(Debug, Subcommand)]
pub enum Operator {
    /// Create or show an org.
    Org {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Add credits to an org; they land in its Primary Workspace.
    Credits {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Create or delete a workspace.
    Workspace {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// Move credits between two workspaces of a budget-mode org.
    Transfer {
        #[command(flatten)]
        remote: Remote,
        /// The org id.
        org: String,
        /// The workspace giving the credits.
        from: String,
        /// The workspace receiving them.
        to: String,
        /// Credits, an integer from 1 to 10^15.
        amount: u64,
        /// Change nothing; show the balances as they would be.
        #[arg(long)]
        dry_run: bool,
        /// Retrying with the same key moves the credits once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Switch an org's credit mode.
    Mode {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ModeCommand,
    },
    /// Show an org's ledger, oldest first, one page at a time.
    Ledger {
        #[command(flatten)]
        remote: Remote,
        /// The org id.
        org: String,
        /// Entries per page (the node's default is 100).
        #[arg(long)]
        limit: Option<u64>,
        /// Cursor: the `next` of the previous page.
        #[arg(long)]
        after: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an org with its Primary Workspace.
    Create {
        /// The org id.
        org: String,
        /// Credit mode (the node's default: shared).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Name of the Primary Workspace (the node's default: primary).
        #[arg(long)]
        primary: Option<String>,
    },
    /// Show the org view: figures and every workspace.
    Show {
        /// The org id.
        org: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add (purchase) credits.
    Add {
        /// The org id.
        org: String,
        /// Credits, an integer from 1 to 10^15.
        amount: u64,
        /// Retrying with the same key adds the credits once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Add a workspace (balance 0).
    Create {
        /// The org id.
        org: String,
        /// The new workspace id.
        workspace: String,
    },
    /// Delete a workspace; its credits return to the Primary.
    Delete {
        /// The org id.
        org: String,
        /// The workspace to delete (never the Primary).
        workspace: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModeCommand {
    /// Set the mode: budget -> shared sweeps every balance into the Primary.
    Set {
        /// The org id.
        org: String,
        #[arg(value_enum)]
        mode: ModeArg,
    },
}

/// How an answer is shown as a table.
#[derive(Debug, Clone, Copy)]
enum View {
    Org,
    Transfer,
    Ledger,
}

/// One request to make and how to show its answer.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    view: View,
    /// The org, for the ledger's "read on" hint.
    org: String,
}

fn org_path(org: &str, tail: &str) -> String {
    format!("/v1/orgs/{}{tail}", client::segment(org))
}

impl Operator {
    fn into_call(self) -> (Remote, Call) {
        match self {
            Operator::Org { remote, command } => match command {
                OrgCommand::Create { org, mode, primary } => {
                    let mut body = json!({ "org": org });
                    if let Some(mode) = mode {
                        body["mode"] = json!(mode.as_str());
                    }
                    if let Some(primary) = primary {
                        body["primary"] = json!(primary);
                    }
                    let call = Call {
                        method: Method::POST,
                        path: "/v1/orgs".into(),
                        body: Some(body),
                        view: View::Org,
                        org,
                    };
                    (remote, call)
                }
                OrgCommand::Show { org } => {
                    let call = Call {
                        method: Method::GET,
                        path: org_path(&org, ""),
                        body: None,
                        view: View::Org,
                        org,
                    };
                    (remote, call)
                }
            },
            Operator::Credits {
                remote,
                command:
                    CreditsCommand::Add {
                        org,
                        amount,
                        idempotency_key,
                    },
            } => {
                let mut body = json!({ "amount": amount });
                if let Some(key) = idempotency_key {
                    body["idempotency_key"] = json!(key);
                }
                let call = Call {
                    method: Method::POST,
                    path: org_path(&org, "/credits"),
                    body: Some(body),
                    view: View::Org,
                    org,
                };
                (remote, call)
            }
            Operator::Workspace { remote, command } => match command {
                WorkspaceCommand::Create { org, workspace } => {
                    let call = Call {
                        method: Method::POST,
                        path: org_path(&org, "/workspaces"),
                        body: Some(json!({ "workspace": workspace })),
                        view: View::Org,
                        org,
                    };
                    (remote, call)
                }
                WorkspaceCommand::Delete { org, workspace } => {
                    let tail = format!("/workspaces/{}", client::segment(&workspace));
                    let call = Call {
                        method: Method::DELETE,
                        path: org_path(&org, &tail),
                        body: None,
                        view: View::Org,
                        org,
                    };
                    (remote, call)
                }
            },
            Operator::Transfer {
                remote,
                org,
                from,
                to,
                amount,
                dry_run,
                idempotency_key,
            } => {
                let mut body =
                    json!({ "from": from, "to": to, "amount": amount, "dry_run": dry_run });
                if let Some(key) = idempotency_key {
                    body["idempotency_key"] = json!(key);
                }
                let call = Call {
                    method: Method::POST,
                    path: org_path(&org, "/transfers"),
                    body: Some(body),
                    view: View::Transfer,
                    org,
                };
                (remote, call)
            }
            Operator::Mode {
                remote,
                command: ModeCommand::Set { org, mode },
            } => {
                let call = Call {
                    method: Method::PUT,
                    path: org_path(&org, "/mode"),
                    body: Some(json!({ "mode": mode.as_str() })),
                    view: View::Org,
                    org,
                };
                (remote, call)
            }
            Operator::Ledger {
                remote,
                org,
                limit,
                after,
            } => {
                let mut query = Vec::new();
                if let Some(limit) = limit {
                    query.push(format!("limit={limit}"));
                }
                if let Some(after) = after {
                    query.push(format!("after={after}"));
                }
                let tail = if query.is_empty() {
                    "/ledger".to_string()
                } else {
                    format!("/ledger?{}", query.join("&"))
                };
                let call = Call {
                    method: Method::GET,
                    path: org_path(&org, &tail),
                    body: None,
                    view: View::Ledger,
                    org,
                };
                (remote, call)
            }
        }
    }
}

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
    match tokio::time::timeout(HEALTHCHECK_TIMEOUT, http_get(addr, "/readyz")).await {
        Ok(Ok(200)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("creditd healthcheck: /readyz answered {status}");
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

/// A minimal HTTP/1.1 GET returning the status code.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}
