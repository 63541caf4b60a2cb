//! Control-plane handlers: operators and scripts, behind `Authorization: Bearer <token>`.

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{check_amount, json, parse_json, query_param, read_body, ApiError, App, Resp};
use crate::model::{Amount, Mode, OrgId, OrgView, WorkspaceId};
use crate::store::{ControlOp, IdempotencyKey};

/// Checks the bearer token in constant time. Without a configured token nothing passes.
pub(super) fn authorize(app: &App, parts: &Parts) -> Result<(), ApiError> {
    let Some(expected) = app.options.admin_token.as_deref() else {
        return Err(ApiError::unauthorized(
            "the control plane is off: no admin token is configured (set CREDITD_ADMIN_TOKEN)",
        ));
    };
    let given = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <admin token>"))?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong admin token"))
    }
}

pub(super) async fn route(
    app: &App,
    parts: &Parts,
    body: Incoming,
    segments: &[&str],
) -> Result<Resp, ApiError> {
    authorize(app, parts)?;
    let method = &parts.method;
    match segments {
        [] | [""] => match *method {
            Method::POST => create_org(app, parts, body).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org] => match *method {
            Method::GET => org_view(app, parts, org_id(org)?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org, "mode"] => match *method {
            Method::PUT => set_mode(app, parts, body, org_id(org)?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org, "credits"] => match *method {
            Method::POST => purchase(app, parts, body, org_id(org)?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org, "workspaces"] => match *method {
            Method::POST => create_workspace(app, parts, body, org_id(org)?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org, "workspaces", ws] => match *method {
            Method::DELETE => delete_workspace(app, org_id(org)?, ws_id(ws, "workspace")?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org, "transfers"] => match *method {
            Method::POST => transfer(app, parts, body, org_id(org)?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        [org, "ledger"] => match *method {
            Method::GET => ledger(app, parts, org_id(org)?).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        _ => Err(ApiError::not_found()),
    }
}

fn org_id(s: &str) -> Result<OrgId, ApiError> {
    OrgId::parse(s, "org").map_err(|e| ApiError::invalid(e.to_string()))
}

fn ws_id(s: &str, field: &'static str) -> Result<WorkspaceId, ApiError> {
    WorkspaceId::parse(s, field).map_err(|e| ApiError::invalid(e.to_string()))
}

fn amount(n: u64) -> Result<Amount, ApiError> {
    check_amount(n, "amount")
}

fn mode(s: &str) -> Result<Mode, ApiError> {
    Mode::parse(s).ok_or_else(|| {
        ApiError::invalid(format!("mode must be \"shared\" or \"budget\", not {s:?}"))
    })
}

fn idempotency_key(
    key: Option<String>,
    scope: &'static str,
    fingerprint: String,
) -> Result<Option<IdempotencyKey>, ApiError> {
    key.map(|k| {
        ws_id(&k, "idempotency_key")?;
        Ok(IdempotencyKey {
            scope,
            key: k,
            fingerprint,
        })
    })
    .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrgBody {
    org: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    primary: Option<String>,
}

async fn create_org(app: &App, parts: &Parts, body: Incoming) -> Result<Resp, ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: CreateOrgBody = parse_json(&bytes)?;
    let org = org_id(&req.org)?;
    let mode = mode(req.mode.as_deref().unwrap_or("shared"))?;
    let primary = ws_id(req.primary.as_deref().unwrap_or("primary"), "primary")?;
    let view = app.node.create_org(&org, mode, &primary).await?;
    Ok(json(StatusCode::CREATED, &view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    mode: String,
}

async fn set_mode(app: &App, parts: &Parts, body: Incoming, org: OrgId) -> Result<Resp, ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: ModeBody = parse_json(&bytes)?;
    let op = ControlOp::SetMode {
        mode: mode(&req.mode)?,
    };
    let outcome = app.node.change(org.as_str(), op, None).await?;
    Ok(json(StatusCode::OK, &outcome.view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditsBody {
    amount: u64,
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn purchase(app: &App, parts: &Parts, body: Incoming, org: OrgId) -> Result<Resp, ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: CreditsBody = parse_json(&bytes)?;
    let amount = amount(req.amount)?;
    let key = idempotency_key(req.idempotency_key, "purchase", amount.get().to_string())?;
    let outcome = app
        .node
        .change(org.as_str(), ControlOp::Purchase { amount }, key)
        .await?;
    Ok(json(StatusCode::OK, &outcome.view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceBody {
    workspace: String,
}

async fn create_workspace(
    app: &App,
    parts: &Parts,
    body: Incoming,
    org: OrgId,
) -> Result<Resp, ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: WorkspaceBody = parse_json(&bytes)?;
    let op = ControlOp::CreateWorkspace {
        workspace: ws_id(&req.workspace, "workspace")?,
    };
    let outcome = app.node.change(org.as_str(), op, None).await?;
    Ok(json(StatusCode::CREATED, &outcome.view))
}

async fn delete_workspace(app: &App, org: OrgId, ws: WorkspaceId) -> Result<Resp, ApiError> {
    let outcome = app
        .node
        .change(
            org.as_str(),
            ControlOp::DeleteWorkspace { workspace: ws },
            None,
        )
        .await?;
    let mut body =
        serde_json::to_value(&outcome.view).map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(map) = body.as_object_mut() {
        map.insert("returned_to_primary".into(), json!(outcome.returned));
    }
    Ok(json(StatusCode::OK, &body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    from: String,
    to: String,
    amount: u64,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

fn transfer_answer(
    view: &OrgView,
    from: &WorkspaceId,
    to: &WorkspaceId,
    dry_run: bool,
) -> serde_json::Value {
    let balance = |ws: &WorkspaceId| view.workspace(ws.as_str()).map_or(0, |w| w.balance);
    json!({
        "dry_run": dry_run,
        "from": {"workspace": from, "balance": balance(from)},
        "to": {"workspace": to, "balance": balance(to)},
    })
}

async fn transfer(app: &App, parts: &Parts, body: Incoming, org: OrgId) -> Result<Resp, ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: TransferBody = parse_json(&bytes)?;
    let from = ws_id(&req.from, "from")?;
    let to = ws_id(&req.to, "to")?;
    let amount = amount(req.amount)?;
    if from == to {
        return Err(ApiError::invalid(
            "from and to must be different workspaces",
        ));
    }
    if req.dry_run {
        let view = app
            .node
            .preview_transfer(org.as_str(), &from, &to, amount)
            .await?;
        return Ok(json(
            StatusCode::OK,
            &transfer_answer(&view, &from, &to, true),
        ));
    }
    let fingerprint = format!("{from}\u{1f}{to}\u{1f}{}", amount.get());
    let key = idempotency_key(req.idempotency_key, "transfer", fingerprint)?;
    let op = ControlOp::Transfer {
        from: from.clone(),
        to: to.clone(),
        amount,
    };
    let outcome = app.node.change(org.as_str(), op, key).await?;
    Ok(json(
        StatusCode::OK,
        &transfer_answer(&outcome.view, &from, &to, false),
    ))
}

/// `limit` from the query string: from 1 to `max`; `default` when absent.
fn page_limit(parts: &Parts, default: usize, max: usize) -> Result<usize, ApiError> {
    match query_param(parts, "limit") {
        None => Ok(default.min(max)),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 && n <= max => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "limit must be an integer from 1 to {max}"
            ))),
        },
    }
}

/// The org view: every workspace, or with `limit` or `after` one page of them (totals always
/// those of the whole org).
async fn org_view(app: &App, parts: &Parts, org: OrgId) -> Result<Resp, ApiError> {
    let max = app.options.view_page_max;
    let after = query_param(parts, "after");
    let paged = after.is_some() || query_param(parts, "limit").is_some();
    let limit = page_limit(parts, max, max)?;
    if let Some(a) = &after {
        ws_id(a, "after")?;
    }
    let view = app.node.org_view(org.as_str()).await?;
    let view = if paged {
        view.page(after.as_deref(), limit)
    } else {
        view
    };
    Ok(json(StatusCode::OK, &view))
}

async fn ledger(app: &App, parts: &Parts, org: OrgId) -> Result<Resp, ApiError> {
    let limit = page_limit(parts, 100, app.options.ledger_page_max)?;
    let after = match query_param(parts, "after") {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::invalid("after must be a cursor from a previous page"))?,
    };
    let page = app.node.ledger(org.as_str(), after, limit).await?;
    Ok(json(StatusCode::OK, &page))
}
