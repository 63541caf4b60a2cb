//! Each operator command as the one HTTP request it makes, and how its answer is shown.

use hyper::Method;
use serde_json::{json, Value};

use super::args::{CreditsCommand, ModeCommand, Operator, OrgCommand, Remote, WorkspaceCommand};
use super::client;

/// How an answer is shown as a table.
#[derive(Debug, Clone, Copy)]
pub(super) enum View {
    Org,
    Transfer,
    Ledger,
}

/// One request to make and how to show its answer.
pub(super) struct Call {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
    pub view: View,
    /// The org, for the ledger's "read on" hint.
    pub org: String,
}

impl Call {
    /// A request on `org`'s resource `tail` (`""`, `/credits`…), answered with an org view
    /// unless `view` says otherwise.
    fn on_org(method: Method, org: String, tail: &str, body: Option<Value>, view: View) -> Call {
        Call {
            method,
            path: format!("/v1/orgs/{}{tail}", client::segment(&org)),
            body,
            view,
            org,
        }
    }
}

/// Adds `"idempotency_key"` to `body` when given.
fn with_key(mut body: Value, key: Option<String>) -> Value {
    if let Some(key) = key {
        body["idempotency_key"] = json!(key);
    }
    body
}

impl Operator {
    pub(super) fn into_call(self) -> (Remote, Call) {
        match self {
            Operator::Org { remote, command } => (remote, org_call(command)),
            Operator::Credits {
                remote,
                command:
                    CreditsCommand::Add {
                        org,
                        amount,
                        idempotency_key,
                    },
            } => {
                let body = with_key(json!({ "amount": amount }), idempotency_key);
                let call = Call::on_org(Method::POST, org, "/credits", Some(body), View::Org);
                (remote, call)
            }
            Operator::Workspace { remote, command } => (remote, workspace_call(command)),
            Operator::Transfer {
                remote,
                org,
                from,
                to,
                amount,
                dry_run,
                idempotency_key,
            } => {
                let body = json!({ "from": from, "to": to, "amount": amount, "dry_run": dry_run });
                let body = with_key(body, idempotency_key);
                let call =
                    Call::on_org(Method::POST, org, "/transfers", Some(body), View::Transfer);
                (remote, call)
            }
            Operator::Mode {
                remote,
                command: ModeCommand::Set { org, mode },
            } => {
                let body = json!({ "mode": mode.as_str() });
                (
                    remote,
                    Call::on_org(Method::PUT, org, "/mode", Some(body), View::Org),
                )
            }
            Operator::Ledger {
                remote,
                org,
                limit,
                after,
            } => (remote, ledger_call(org, limit, after)),
        }
    }
}

fn org_call(command: OrgCommand) -> Call {
    match command {
        OrgCommand::Create { org, mode, primary } => {
            let mut body = json!({ "org": org });
            if let Some(mode) = mode {
                body["mode"] = json!(mode.as_str());
            }
            if let Some(primary) = primary {
                body["primary"] = json!(primary);
            }
            Call {
                method: Method::POST,
                path: "/v1/orgs".into(),
                body: Some(body),
                view: View::Org,
                org,
            }
        }
        OrgCommand::Show { org } => Call::on_org(Method::GET, org, "", None, View::Org),
    }
}

fn workspace_call(command: WorkspaceCommand) -> Call {
    match command {
        WorkspaceCommand::Create { org, workspace } => {
            let body = json!({ "workspace": workspace });
            Call::on_org(Method::POST, org, "/workspaces", Some(body), View::Org)
        }
        WorkspaceCommand::Delete { org, workspace } => {
            let tail = format!("/workspaces/{}", client::segment(&workspace));
            Call::on_org(Method::DELETE, org, &tail, None, View::Org)
        }
    }
}

fn ledger_call(org: String, limit: Option<u64>, after: Option<u64>) -> Call {
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
    Call::on_org(Method::GET, org, &tail, None, View::Ledger)
}
