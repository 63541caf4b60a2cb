//! Data-plane handlers: called by gateways per request.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use hyper::StatusCode;
use metrics::{Counter, Histogram};
use serde::Deserialize;
use serde_json::json;

use super::{
    check_amount, json, parse_json, query_param, read_body, with_body, ApiError, App, Resp,
};
use crate::metrics::{self as m, Outcome};
use crate::model::{is_valid_id, InvalidInput, AMOUNT_MAX};
use crate::node::{Decision, Reserved};

/// Metric handles of the hot path, registered once instead of looked up per request.
struct HotMetrics {
    outcomes: [Counter; 6],
    duration: Histogram,
}

impl HotMetrics {
    fn get() -> &'static HotMetrics {
        static HOT: OnceLock<HotMetrics> = OnceLock::new();
        HOT.get_or_init(|| {
            let c = |o: Outcome| metrics::counter!(m::DEBIT_REQUESTS, "outcome" => o.label());
            HotMetrics {
                outcomes: [
                    c(Outcome::Allowed),
                    c(Outcome::Insufficient),
                    c(Outcome::Unknown),
                    c(Outcome::Invalid),
                    c(Outcome::Unavailable),
                    c(Outcome::Limited),
                ],
                duration: metrics::histogram!(m::DEBIT_DURATION),
            }
        })
    }

    fn record(&self, outcome: Outcome, started: Instant) {
        let i = match outcome {
            Outcome::Allowed => 0,
            Outcome::Insufficient => 1,
            Outcome::Unknown => 2,
            Outcome::Invalid => 3,
            Outcome::Unavailable => 4,
            Outcome::Limited => 5,
        };
        self.outcomes[i].increment(1);
        self.duration.record(started.elapsed().as_secs_f64());
    }
}

fn outcome_of<T>(result: &Result<T, ApiError>, decision: impl Fn(&T) -> Outcome) -> Outcome {
    match result {
        Ok(v) => decision(v),
        Err(e) => e.outcome(),
    }
}

fn check_id<'a>(value: &'a str, field: &'static str) -> Result<&'a str, ApiError> {
    if is_valid_id(value) {
        Ok(value)
    } else {
        Err(ApiError::invalid(InvalidInput::Id { field }.to_string()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DebitBody<'a> {
    #[serde(borrow)]
    org: Cow<'a, str>,
    #[serde(borrow)]
    workspace: Cow<'a, str>,
    amount: u64,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

fn insufficient(status: StatusCode, remaining: u64, what: &str) -> Resp {
    json(
        status,
        &json!({
            "allowed": false,
            "error": "insufficient_credits",
            "message": format!("not enough credits for this {what}"),
            "remaining": remaining,
        }),
    )
}

/// `POST /v1/debit`.
pub(super) async fn debit(app: &App, parts: &Parts, body: Incoming) -> Result<Resp, ApiError> {
    let started = Instant::now();
    let result = debit_inner(app, parts, body).await;
    HotMetrics::get().record(
        outcome_of(&result, |(d, _)| match d {
            Decision::Allowed { .. } => Outcome::Allowed,
            Decision::Insufficient { .. } => Outcome::Insufficient,
        }),
        started,
    );
    result.map(|(_, r)| r)
}

async fn debit_inner(
    app: &App,
    parts: &Parts,
    body: Incoming,
) -> Result<(Decision, Resp), ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: DebitBody = parse_json(&bytes)?;
    let org = check_id(&req.org, "org")?;
    let ws = check_id(&req.workspace, "workspace")?;
    let amount = check_amount(req.amount, "amount")?;
    let decision = match req.idempotency_key.as_deref() {
        Some(key) => {
            app.node
                .debit_once(org, ws, amount, check_id(key, "idempotency_key")?)
                .await?
        }
        None => app.node.debit(org, ws, amount).await?,
    };
    let response = match decision {
        Decision::Allowed { remaining } => json(
            StatusCode::OK,
            &json!({"allowed": true, "org": org, "workspace": ws, "amount": amount.get(), "remaining": remaining}),
        ),
        Decision::Insufficient { remaining } => {
            insufficient(StatusCode::PAYMENT_REQUIRED, remaining, "debit")
        }
    };
    Ok((decision, response))
}

/// `* /v1/authorize[/...]`: the forward-auth form. Reads headers, answers with headers.
pub(super) async fn authorize(app: &App, parts: &Parts) -> Result<Resp, ApiError> {
    let started = Instant::now();
    let result = authorize_inner(app, parts).await;
    let outcome = match &result {
        Ok(Decision::Allowed { .. }) => Outcome::Allowed,
        Ok(Decision::Insufficient { .. }) => Outcome::Insufficient,
        Err(e) => e.outcome(),
    };
    HotMetrics::get().record(outcome, started);
    let mut response = match result {
        Ok(Decision::Allowed { remaining }) => remaining_header(
            with_body(StatusCode::OK, Vec::new(), "text/plain"),
            remaining,
        ),
        Ok(Decision::Insufficient { remaining }) => {
            let deny = app.options.authorize_deny_status;
            let mut r = remaining_header(insufficient(deny, remaining, "request"), remaining);
            r.headers_mut().insert(
                "x-credits-error",
                HeaderValue::from_static("insufficient_credits"),
            );
            r
        }
        Err(e) => {
            let mut r = super::error_response(&e);
            r.headers_mut()
                .insert("x-credits-error", HeaderValue::from_static(e.code));
            r
        }
    };
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(response)
}

fn remaining_header(mut response: Resp, remaining: u64) -> Resp {
    response
        .headers_mut()
        .insert("x-credits-remaining", HeaderValue::from(remaining));
    response
}

fn header<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a str>, ApiError> {
    match parts.headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::invalid(format!("header {name} is not text"))),
    }
}

async fn authorize_inner(app: &App, parts: &Parts) -> Result<Decision, ApiError> {
    let org = header(parts, "x-credits-org")?
        .ok_or_else(|| ApiError::invalid("header X-Credits-Org is required"))?;
    let ws = header(parts, "x-credits-workspace")?
        .ok_or_else(|| ApiError::invalid("header X-Credits-Workspace is required"))?;
    let org = check_id(org, "X-Credits-Org")?;
    let ws = check_id(ws, "X-Credits-Workspace")?;
    let amount = match header(parts, "x-credits-amount")? {
        None => check_amount(1, "X-Credits-Amount")?,
        Some(s) => {
            // Digits only: no sign, no fraction, no exponent.
            let n = s
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse::<u64>().ok())
                .flatten()
                .unwrap_or(0);
            check_amount(n, "X-Credits-Amount")?
        }
    };
    let decision = match header(parts, "x-credits-idempotency-key")? {
        Some(key) => {
            app.node
                .debit_once(org, ws, amount, check_id(key, "X-Credits-Idempotency-Key")?)
                .await?
        }
        None => app.node.debit(org, ws, amount).await?,
    };
    Ok(decision)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody<'a> {
    #[serde(borrow)]
    org: Cow<'a, str>,
    #[serde(borrow)]
    workspace: Cow<'a, str>,
    amount: u64,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// `POST /v1/reservations`.
pub(super) async fn reserve(app: &App, parts: &Parts, body: Incoming) -> Result<Resp, ApiError> {
    let started = Instant::now();
    let result = reserve_inner(app, parts, body).await;
    HotMetrics::get().record(
        outcome_of(&result, |(r, _)| match r.decision {
            Decision::Allowed { .. } => Outcome::Allowed,
            Decision::Insufficient { .. } => Outcome::Insufficient,
        }),
        started,
    );
    result.map(|(_, r)| r)
}

async fn reserve_inner(
    app: &App,
    parts: &Parts,
    body: Incoming,
) -> Result<(Reserved, Resp), ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: ReserveBody = parse_json(&bytes)?;
    let org = check_id(&req.org, "org")?;
    let ws = check_id(&req.workspace, "workspace")?;
    let amount = check_amount(req.amount, "amount")?;
    let ttl_max = app.options.reservation_ttl_max;
    let ttl = match req.ttl_ms {
        None => None,
        Some(ms) if ms >= 1 && ms <= ttl_max.as_millis() as u64 => Some(Duration::from_millis(ms)),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "ttl_ms must be from 1 to {}",
                ttl_max.as_millis()
            )));
        }
    };
    let key = match req.idempotency_key.as_deref() {
        Some(k) => Some(check_id(k, "idempotency_key")?),
        None => None,
    };
    let reserved = app.node.reserve(org, ws, amount, ttl, key).await?;
    let response = match (&reserved.decision, &reserved.id) {
        (Decision::Allowed { remaining }, Some(id)) => json(
            StatusCode::CREATED,
            &json!({
                "reservation": id,
                "org": org,
                "workspace": ws,
                "amount": amount.get(),
                "remaining": remaining,
                "expires_in_ms": reserved.expires_in_ms,
            }),
        ),
        (Decision::Allowed { remaining }, None) | (Decision::Insufficient { remaining }, _) => {
            insufficient(StatusCode::PAYMENT_REQUIRED, *remaining, "reservation")
        }
    };
    Ok((reserved, response))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    amount: u64,
}

/// `POST /v1/reservations/{id}/commit`.
pub(super) async fn commit(
    app: &App,
    parts: &Parts,
    body: Incoming,
    id: &str,
) -> Result<Resp, ApiError> {
    let bytes = read_body(app, parts, body).await?;
    let req: CommitBody = parse_json(&bytes)?;
    if req.amount > AMOUNT_MAX {
        return Err(ApiError::invalid(format!(
            "amount must be an integer from 0 to {AMOUNT_MAX}"
        )));
    }
    let (charged, released) = app.node.commit(id, req.amount)?;
    Ok(json(
        StatusCode::OK,
        &json!({"reservation": id, "charged": charged, "released": released}),
    ))
}

/// `DELETE /v1/reservations/{id}`.
pub(super) async fn release(app: &App, id: &str) -> Result<Resp, ApiError> {
    let released = app.node.release(id)?;
    Ok(json(
        StatusCode::OK,
        &json!({"reservation": id, "released": released}),
    ))
}

/// `GET /v1/balance?org=&workspace=`.
pub(super) async fn balance(app: &App, parts: &Parts) -> Result<Resp, ApiError> {
    let org = query_param(parts, "org")
        .ok_or_else(|| ApiError::invalid("query parameter org is required"))?;
    let ws = query_param(parts, "workspace")
        .ok_or_else(|| ApiError::invalid("query parameter workspace is required"))?;
    check_id(&org, "org")?;
    check_id(&ws, "workspace")?;
    let (remaining, mode) = app.node.balance(&org, &ws).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"org": org, "workspace": ws, "mode": mode.as_str(), "remaining": remaining}),
    ))
}
