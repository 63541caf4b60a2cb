//! Data-plane handlers: called by gateways per request.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::StatusCode;
use metrics::{Counter, Histogram};
use serde::Deserialize;
use serde_json::json;

use super::{
    check_amount, json, json_with, parse_json, query_param, read_body, with_body, ApiError, App,
    Resp,
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

/// A `POST /v1/debit` body. Its strings borrow from the request's bytes: parsing it allocates
/// nothing unless a string holds a JSON escape (then that one string is owned). Unknown fields
/// are refused (`400 invalid_request` naming them).
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebitBody<'a> {
    #[serde(borrow)]
    pub org: Cow<'a, str>,
    #[serde(borrow)]
    pub workspace: Cow<'a, str>,
    pub amount: u64,
    #[serde(default, borrow, deserialize_with = "optional_borrowed")]
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// An optional string, borrowed when it has no escape. serde borrows a `Cow<str>` field only
/// when it is the field's whole type: inside an `Option` it would always be an owned copy.
fn optional_borrowed<'de: 'a, 'a, D>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'a>>::deserialize(d)?.map(|b| b.0))
}

/// Parses a debit body, borrowing its strings from `bytes`. Checks the JSON and the field
/// names only: ids and amounts are checked by the handler, as for every other body.
///
/// The common form is read by [`fast_debit`] without serde; anything it does not take is
/// parsed by serde, which decides every error. The fast path only ever gives serde's answer
/// (`tests::the_fast_parse_agrees_with_serde` checks it on generated bodies).
pub fn parse_debit(bytes: &[u8]) -> Result<DebitBody<'_>, ApiError> {
    match fast_debit(bytes) {
        Some(body) => Ok(body),
        None => parse_json(bytes),
    }
}

/// A debit body of the common form, or `None` for serde to parse: one JSON object whose
/// members are `org`, `workspace`, `amount` and optionally `idempotency_key`, each at most
/// once, in any order; strings of printable ASCII without escapes; `amount` plain digits
/// without a leading zero that fit a `u64`; JSON whitespace between tokens. A missing field,
/// another field, a duplicate, a `null`, an escape, a non-ASCII byte, a float or trailing text
/// all go to serde.
fn fast_debit(bytes: &[u8]) -> Option<DebitBody<'_>> {
    let mut p = Scan { bytes, at: 0 };
    p.space();
    p.eat(b'{')?;
    let (mut org, mut ws, mut amount, mut key) = (None, None, None, None);
    loop {
        p.space();
        let name = p.string()?;
        p.space();
        p.eat(b':')?;
        p.space();
        match name {
            "org" if org.is_none() => org = Some(p.string()?),
            "workspace" if ws.is_none() => ws = Some(p.string()?),
            "amount" if amount.is_none() => amount = Some(p.number()?),
            "idempotency_key" if key.is_none() => key = Some(p.string()?),
            _ => return None,
        }
        p.space();
        match p.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    p.space();
    if p.at != bytes.len() {
        return None;
    }
    Some(DebitBody {
        org: Cow::Borrowed(org?),
        workspace: Cow::Borrowed(ws?),
        amount: amount?,
        idempotency_key: key.map(Cow::Borrowed),
    })
}

/// A cursor over a JSON body for [`fast_debit`]; each method is `None` where serde must decide.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// A string of printable ASCII (0x20 to 0x7e) without a backslash.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => return None,
                0x20..=0x7e => {}
                _ => return None,
            }
        }
        std::str::from_utf8(&self.bytes[start..self.at - 1]).ok()
    }

    /// Digits without a leading zero (a lone `0` is fine), fitting a `u64`. A sign, fraction
    /// or exponent that follows is left for the caller, which then gives up.
    fn number(&mut self) -> Option<u64> {
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.bytes.get(self.at) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (digits > 1 && self.bytes[start] == b'0') {
            return None;
        }
        Some(n)
    }
}

/// Appends an allowed debit's JSON answer to `out`:
/// `{"allowed":true,"amount":..,"org":..,"remaining":..,"workspace":..}`, the bytes
/// `serde_json` wrote for the `serde_json::Value` answer before (its keys in alphabetical
/// order: a `BTreeMap`). Allocates only if `out` has to grow.
pub fn write_debit_allowed(out: &mut Vec<u8>, org: &str, ws: &str, amount: u64, remaining: u64) {
    out.extend_from_slice(br#"{"allowed":true,"amount":"#);
    push_u64(out, amount);
    out.extend_from_slice(br#","org":"#);
    push_str(out, org);
    out.extend_from_slice(br#","remaining":"#);
    push_u64(out, remaining);
    out.extend_from_slice(br#","workspace":"#);
    push_str(out, ws);
    out.push(b'}');
}

/// What an `insufficient_credits` refusal is for, and its fixed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Debit,
    Request,
    Reservation,
}

impl Refused {
    fn message(self) -> &'static str {
        match self {
            Refused::Debit => "not enough credits for this debit",
            Refused::Request => "not enough credits for this request",
            Refused::Reservation => "not enough credits for this reservation",
        }
    }
}

/// Appends an `insufficient_credits` refusal to `out`:
/// `{"allowed":false,"error":"insufficient_credits","message":..,"remaining":..}` (keys in
/// alphabetical order, as above). Allocates only if `out` has to grow.
pub fn write_insufficient(out: &mut Vec<u8>, what: Refused, remaining: u64) {
    out.extend_from_slice(br#"{"allowed":false,"error":"insufficient_credits","message":"#);
    push_str(out, what.message());
    out.extend_from_slice(br#","remaining":"#);
    push_u64(out, remaining);
    out.push(b'}');
}

/// `n` in decimal, as serde_json writes it.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(u64_digits(n, &mut [0u8; 20]));
}

/// The decimal digits of `n`, written at the end of `buf`.
fn u64_digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// `s` as a JSON string, as serde_json writes it: copied between quotes when nothing in it
/// needs an escape (a valid id never does), else escaped by serde_json itself.
fn push_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, s).expect("a string serializes");
    }
}

fn insufficient(status: StatusCode, remaining: u64, what: Refused) -> Resp {
    json_with(status, |out| write_insufficient(out, what, remaining))
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
    let req = parse_debit(&bytes)?;
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
        Decision::Allowed { remaining } => json_with(StatusCode::OK, |out| {
            write_debit_allowed(out, org, ws, amount.get(), remaining)
        }),
        Decision::Insufficient { remaining } => {
            insufficient(StatusCode::PAYMENT_REQUIRED, remaining, Refused::Debit)
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
            let mut r =
                remaining_header(insufficient(deny, remaining, Refused::Request), remaining);
            r.headers_mut().insert(
                X_CREDITS_ERROR,
                HeaderValue::from_static("insufficient_credits"),
            );
            r
        }
        Err(e) => {
            let mut r = super::error_response(&e);
            r.headers_mut()
                .insert(X_CREDITS_ERROR, HeaderValue::from_static(e.code));
            r
        }
    };
    response
        .headers_mut()
        .insert(hyper::header::CACHE_CONTROL, NO_STORE);
    Ok(response)
}

const X_CREDITS_ERROR: HeaderName = HeaderName::from_static("x-credits-error");
const X_CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

fn remaining_header(mut response: Resp, remaining: u64) -> Resp {
    response
        .headers_mut()
        .insert(X_CREDITS_REMAINING, remaining_value(remaining));
    response
}

/// `remaining` as a header value: one allocation of its exact size (`HeaderValue::from(u64)`
/// makes two: a 20-byte buffer, then the shared handle `freeze` adds to it).
pub fn remaining_value(remaining: u64) -> HeaderValue {
    HeaderValue::from_bytes(u64_digits(remaining, &mut [0u8; 20]))
        .expect("digits are a valid header value")
}

const X_CREDITS_ORG: HeaderName = HeaderName::from_static("x-credits-org");
const X_CREDITS_WORKSPACE: HeaderName = HeaderName::from_static("x-credits-workspace");
const X_CREDITS_AMOUNT: HeaderName = HeaderName::from_static("x-credits-amount");
const X_CREDITS_IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("x-credits-idempotency-key");

fn header<'a>(parts: &'a Parts, name: &HeaderName) -> Result<Option<&'a str>, ApiError> {
    match parts.headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::invalid(format!("header {name} is not text"))),
    }
}

async fn authorize_inner(app: &App, parts: &Parts) -> Result<Decision, ApiError> {
    let org = header(parts, &X_CREDITS_ORG)?
        .ok_or_else(|| ApiError::invalid("header X-Credits-Org is required"))?;
    let ws = header(parts, &X_CREDITS_WORKSPACE)?
        .ok_or_else(|| ApiError::invalid("header X-Credits-Workspace is required"))?;
    let org = check_id(org, "X-Credits-Org")?;
    let ws = check_id(ws, "X-Credits-Workspace")?;
    let amount = match header(parts, &X_CREDITS_AMOUNT)? {
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
    let decision = match header(parts, &X_CREDITS_IDEMPOTENCY_KEY)? {
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
    #[serde(default, borrow, deserialize_with = "optional_borrowed")]
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
            insufficient(
                StatusCode::PAYMENT_REQUIRED,
                *remaining,
                Refused::Reservation,
            )
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_debit(bytes: &[u8]) -> Option<DebitBody<'_>> {
        serde_json::from_slice(bytes).ok()
    }

    #[test]
    fn the_common_form_takes_the_fast_path() {
        for body in [
            r#"{"org":"acme","workspace":"ws-a","amount":25}"#,
            r#" { "amount" : 0 , "workspace":"w", "org":"o", "idempotency_key":"k:1" } "#,
            "{\"org\":\"a\",\r\n\t\"workspace\":\"b\",\"amount\":18446744073709551615}",
        ] {
            let fast = fast_debit(body.as_bytes()).expect(body);
            assert_eq!(Some(&fast), serde_debit(body.as_bytes()).as_ref(), "{body}");
        }
    }

    #[test]
    fn everything_else_goes_to_serde() {
        for body in [
            r#"{"org":"acme","workspace":"ws-a"}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":1,"extra":1}"#,
            r#"{"org":"acme","org":"acme","workspace":"ws-a","amount":1}"#,
            r#"{"org":"ac\u006de","workspace":"ws-a","amount":1}"#,
            r#"{"org":"acmé","workspace":"ws-a","amount":1}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":01}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":1.0}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":-1}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":18446744073709551616}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":1,"idempotency_key":null}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":1,}"#,
            r#"{"org":"acme","workspace":"ws-a","amount":1} x"#,
            r#"{"org":"acme","workspace":"ws-a","amount":1"#,
            "",
        ] {
            assert_eq!(fast_debit(body.as_bytes()), None, "{body}");
        }
        // serde still reads the valid ones among them, as before.
        let key_null = br#"{"org":"acme","workspace":"ws-a","amount":1,"idempotency_key":null}"#;
        assert_eq!(parse_debit(key_null).unwrap().idempotency_key, None);
        let escaped = br#"{"org":"ac\u006de","workspace":"ws-a","amount":1}"#;
        assert_eq!(parse_debit(escaped).unwrap().org, "acme");
    }

    /// Bodies of the common form (members in a random order, random whitespace), then often
    /// broken in one or more ways: a value replaced by another (an escape, a non-ASCII or
    /// control character, a float, a leading zero, a null...), a key replaced, a member added
    /// or dropped, another separator, text after the object, no closing brace.
    fn body() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "\"org\"",
            "\"workspace\"",
            "\"amount\"",
            "\"idempotency_key\"",
            "\"other\"",
            "\"or\\u0067\"",
            "org",
            "\"Org\"",
        ]);
        let value = prop_oneof![
            "\"[a-z0-9:._-]{0,6}\"",
            "\"[ -~]{0,4}\"",
            "\"[a\\\\\"\u{e9}\u{1}\u{7f}]{0,3}\"",
            "(0|[1-9][0-9]{0,20}|0[0-9]|-[0-9]|[0-9]\\.[0-9]|[0-9]e[0-9])",
            Just("null".to_string()),
            Just("true".to_string()),
            Just("{}".to_string()),
        ];
        let space = || "[ \t\r\n]{0,2}";
        let id = "\"[a-z0-9:._-]{1,6}\"";
        let number = "(0|[1-9][0-9]{0,19})";
        (
            (id, id, number, prop::option::of(id)),
            Just(()).prop_perturb(|_, mut rng| rng.next_u64()),
            prop::collection::vec((0usize..6, key, value, space()), 0..3),
            (space(), space(), space()),
            prop::sample::select(vec![",", ",", ",", ", ", ";"]),
            prop::sample::select(vec!["", "", "", " ", "x", "}", "\n"]),
            prop::sample::select(vec![true, true, true, false]),
        )
            .prop_map(
                |(
                    (org, ws, amount, key),
                    order,
                    changes,
                    (lead, around, tail_space),
                    sep,
                    tail,
                    close,
                )| {
                    let mut members = vec![
                        ("\"org\"".to_string(), org),
                        ("\"workspace\"".to_string(), ws),
                        ("\"amount\"".to_string(), amount),
                    ];
                    if let Some(k) = key {
                        members.push(("\"idempotency_key\"".to_string(), k));
                    }
                    let n = members.len() as u64;
                    members.rotate_left((order % n) as usize);
                    if order & 0x100 != 0 {
                        members.swap(0, 1);
                    }
                    for (i, key, value, _) in &changes {
                        match i {
                            0 => members[0].1 = value.clone(),
                            1 => members[1].0 = key.to_string(),
                            2 => members.push((key.to_string(), value.clone())),
                            3 => {
                                members.pop();
                            }
                            _ => members.last_mut().unwrap().1 = value.clone(),
                        }
                    }
                    let s = changes.first().map(|c| c.3.clone()).unwrap_or_default();
                    let members: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("{around}{k}{s}:{around}{v}{s}"))
                        .collect();
                    let close = if close { "}" } else { "" };
                    format!("{lead}{{{}{close}{tail_space}{tail}", members.join(sep))
                },
            )
    }

    #[test]
    fn the_fast_parse_agrees_with_serde() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut fast_taken, mut serde_only) = (0, 0);
        for _ in 0..20_000 {
            let body = body().new_tree(&mut runner).unwrap().current();
            match fast_debit(body.as_bytes()) {
                Some(fast) => {
                    fast_taken += 1;
                    assert_eq!(Some(fast), serde_debit(body.as_bytes()), "{body}");
                }
                None => serde_only += 1,
            }
        }
        // Both sides were exercised.
        assert!(
            fast_taken > 1000 && serde_only > 1000,
            "{fast_taken} / {serde_only}"
        );
    }

    #[test]
    fn answers_are_the_bytes_serde_json_wrote() {
        let ids = [
            "acme",
            "ws-a",
            "a\"b",
            "a\\b",
            "tab\there",
            "\u{1}",
            "é",
            "\u{7f}",
        ];
        for org in ids {
            for ws in ids {
                for (amount, remaining) in [(1, 0), (25, 1975), (u64::MAX, 10), (0, u64::MAX)] {
                    let mut out = Vec::new();
                    write_debit_allowed(&mut out, org, ws, amount, remaining);
                    let value = json!({"allowed": true, "org": org, "workspace": ws, "amount": amount, "remaining": remaining});
                    assert_eq!(out, serde_json::to_vec(&value).unwrap());
                }
            }
        }
        for what in [Refused::Debit, Refused::Request, Refused::Reservation] {
            for remaining in [0, 7, u64::MAX] {
                let mut out = Vec::new();
                write_insufficient(&mut out, what, remaining);
                let value = json!({
                    "allowed": false,
                    "error": "insufficient_credits",
                    "message": what.message(),
                    "remaining": remaining,
                });
                assert_eq!(out, serde_json::to_vec(&value).unwrap());
            }
        }
    }
}
