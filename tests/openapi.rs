//! Proves openapi.yaml describes the running server: every operation in it, called for real,
//! answers a status the spec lists with a body and headers of the documented shape, and every
//! route the server's router answers is in the spec.

mod common;

use common::yaml;

use std::collections::{BTreeMap, BTreeSet};

use common::{Answer, Client, TestNode};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// Follows `$ref`s (local JSON pointers) to the schema, response or parameter they name.
fn deref<'a>(spec: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..32 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("non-local $ref {r}"));
                v = spec
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {r}"));
            }
            None => return v,
        }
    }
    panic!("$ref chain longer than 32: {v}");
}

/// A schema with its `allOf` parts merged: what a value must look like.
#[derive(Debug, Default)]
struct Shape {
    required: BTreeSet<String>,
    properties: BTreeMap<String, Value>,
    additional: bool,
    items: Option<Value>,
    ty: Option<String>,
    one_of_values: Option<Vec<Value>>,
    nullable: bool,
}

fn shape(spec: &Value, schema: &Value) -> Shape {
    let s = deref(spec, schema);
    let mut out = Shape::default();
    for part in s["allOf"].as_array().into_iter().flatten() {
        let p = shape(spec, part);
        out.required.extend(p.required);
        out.properties.extend(p.properties);
        out.additional |= p.additional;
        out.items = out.items.or(p.items);
        out.ty = out.ty.or(p.ty);
        out.one_of_values = out.one_of_values.or(p.one_of_values);
        out.nullable |= p.nullable;
    }
    for r in s["required"].as_array().into_iter().flatten() {
        out.required
            .insert(r.as_str().expect("required name").to_string());
    }
    for (k, v) in s["properties"].as_object().into_iter().flatten() {
        out.properties.insert(k.clone(), v.clone());
    }
    out.additional |= s["additionalProperties"] == Value::Bool(true);
    if !s["items"].is_null() {
        out.items = Some(s["items"].clone());
    }
    if let Some(t) = s["type"].as_str() {
        out.ty = Some(t.to_string());
    }
    if let Some(e) = s["enum"].as_array() {
        out.one_of_values = Some(e.clone());
    }
    out.nullable |= s["nullable"] == Value::Bool(true);
    out
}

/// Checks `value` against `schema`: required keys present, no undocumented keys in objects
/// (unless the schema allows them), types and enums of scalars, recursively.
fn conform(spec: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let s = shape(spec, schema);
    if value.is_null() {
        if !s.nullable {
            problems.push(format!("{at}: null, not nullable"));
        }
        return;
    }
    let is_object = s.ty.as_deref() == Some("object") || !s.properties.is_empty();
    if is_object {
        let Some(map) = value.as_object() else {
            problems.push(format!("{at}: expected an object, got {value}"));
            return;
        };
        for r in &s.required {
            if !map.contains_key(r) {
                problems.push(format!("{at}: required key {r:?} missing"));
            }
        }
        for (k, v) in map {
            match s.properties.get(k) {
                Some(p) => conform(spec, p, v, &format!("{at}.{k}"), problems),
                None if s.additional => {}
                None => problems.push(format!("{at}: undocumented key {k:?}")),
            }
        }
        return;
    }
    match s.ty.as_deref() {
        Some("array") => match value.as_array() {
            Some(items) => {
                if let Some(item) = &s.items {
                    for (i, v) in items.iter().enumerate() {
                        conform(spec, item, v, &format!("{at}[{i}]"), problems);
                    }
                }
            }
            None => problems.push(format!("{at}: expected an array, got {value}")),
        },
        Some("integer") if !(value.is_u64() || value.is_i64()) => {
            problems.push(format!("{at}: expected an integer, got {value}"))
        }
        Some("string") if !value.is_string() => {
            problems.push(format!("{at}: expected a string, got {value}"))
        }
        Some("boolean") if !value.is_boolean() => {
            problems.push(format!("{at}: expected a boolean, got {value}"))
        }
        _ => {}
    }
    if let Some(allowed) = &s.one_of_values {
        if !allowed.contains(value) {
            problems.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
}

/// One real request for one operation of the spec.
struct Call {
    /// `METHOD /spec/path`, as the spec spells it.
    op: &'static str,
    path: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
    token: bool,
    /// What this request must get (a sanity check of the test itself).
    expect: u16,
}

fn call(op: &'static str, path: impl Into<String>, body: Option<Value>, expect: u16) -> Call {
    Call {
        op,
        path: path.into(),
        body,
        headers: Vec::new(),
        token: true,
        expect,
    }
}

/// The spec's operations: `METHOD /path` → operation object.
fn operations(spec: &Value) -> BTreeMap<String, Value> {
    let mut ops = BTreeMap::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if ["get", "put", "post", "delete", "patch", "head", "options"]
                .contains(&method.as_str())
            {
                ops.insert(format!("{} {path}", method.to_uppercase()), op.clone());
            }
        }
    }
    ops
}

/// Checks one answer against the operation: a listed status, the documented headers, the
/// content type, and the body's shape.
fn check_answer(spec: &Value, key: &str, op: &Value, c: &Call, a: &Answer) -> Vec<String> {
    let mut problems = Vec::new();
    let status = a.status.as_u16().to_string();
    let Some(response) = op["responses"].get(&status) else {
        let listed: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        return vec![format!(
            "{key} ({} {}): status {status} is not in the spec's {listed:?}; body {}",
            c.op, c.path, a.text
        )];
    };
    let response = deref(spec, response);
    for (name, _) in response["headers"].as_object().into_iter().flatten() {
        if a.headers.get(name.as_str()).is_none() {
            problems.push(format!("{key} {status}: documented header {name} missing"));
        }
    }
    let Some(content) = response["content"].as_object() else {
        return problems;
    };
    let content_type = a
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let Some(media) = content.get(&content_type) else {
        problems.push(format!(
            "{key} {status}: content type {content_type:?}, the spec has {:?}",
            content.keys().collect::<Vec<_>>()
        ));
        return problems;
    };
    if content_type == "application/json" {
        if a.body.is_null() {
            problems.push(format!("{key} {status}: no JSON body: {:?}", a.text));
        } else {
            conform(
                spec,
                &media["schema"],
                &a.body,
                &format!("{key} {status}"),
                &mut problems,
            );
        }
    }
    problems
}

/// A route as the router matches it: a method (`*` for any) and a path pattern with `{}` for
/// a parameter and `**` for any suffix.
type Route = (String, String);

/// The match arms of `fn_name`'s body in `source`: each arm's pattern and the methods its
/// handler accepts (`Method::X` in the arm; none means any method).
fn arms(source: &str, fn_name: &str) -> Vec<(String, Vec<String>)> {
    let start = source
        .find(fn_name)
        .unwrap_or_else(|| panic!("no {fn_name} in the router source"));
    let body = &source[start..];
    let body = &body[..body.find("\n}\n").expect("end of fn")];
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in body.lines() {
        let t = line.trim();
        if (t.starts_with('[') || t.starts_with("\"/")) && t.contains("=>") {
            let pattern = t.split("=>").next().unwrap().trim().to_string();
            out.push((pattern, Vec::new()));
        } else if t.starts_with("_ =>") {
            // The fallback arm: its methods belong to nobody.
            out.push((String::new(), Vec::new()));
        }
        if let Some(last) = out.last_mut() {
            let mut rest = t;
            while let Some(i) = rest.find("Method::") {
                let m: String = rest[i + 8..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase())
                    .collect();
                if !m.is_empty() && !last.1.contains(&m) {
                    last.1.push(m);
                }
                rest = &rest[i + 8..];
            }
        }
    }
    out.retain(|(p, _)| !p.is_empty());
    out
}

/// Path patterns of a slice pattern like `["reservations", id, "commit"]` or `[] | [""]`.
fn slice_paths(pattern: &str, prefix: &str) -> Vec<String> {
    pattern
        .split('|')
        .map(|alt| {
            let inner = alt.trim().trim_start_matches('[').trim_end_matches(']');
            let mut path = prefix.trim_end_matches('/').to_string();
            for seg in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let seg = if seg == ".." {
                    "**".to_string()
                } else if let Some(lit) = seg.strip_prefix('"') {
                    lit.trim_end_matches('"').to_string()
                } else {
                    "{}".to_string()
                };
                if !seg.is_empty() {
                    path.push('/');
                    path.push_str(&seg);
                }
            }
            path
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Every route of src/api/mod.rs `route()`, src/api/control.rs `route()` and
/// src/api/console.rs `route()`.
fn server_routes() -> Vec<Route> {
    let mut routes = Vec::new();
    let top = include_str!("../src/api/mod.rs");
    for (pattern, methods) in arms(top, "async fn route(") {
        let paths = if pattern.starts_with('"') {
            pattern
                .split('|')
                .map(|p| p.trim().trim_matches('"').to_string())
                .collect()
        } else {
            slice_paths(&pattern, "/v1/")
        };
        for path in paths {
            // The control plane has its own router, read below.
            if path == "/v1/orgs/**" {
                continue;
            }
            let methods = if methods.is_empty() {
                vec!["*".to_string()]
            } else {
                methods.clone()
            };
            for m in methods {
                routes.push((m, path.clone()));
            }
        }
    }
    // The console's files have their own router, of literal paths.
    let console = include_str!("../src/api/console.rs");
    for (pattern, methods) in arms(console, "pub(super) async fn route(") {
        assert!(
            !methods.is_empty(),
            "console route {pattern} with no method"
        );
        for path in pattern.split('|') {
            for m in &methods {
                routes.push((m.clone(), path.trim().trim_matches('"').to_string()));
            }
        }
    }
    let control = include_str!("../src/api/control.rs");
    for (pattern, methods) in arms(control, "pub(super) async fn route(") {
        assert!(
            !methods.is_empty(),
            "control route {pattern} with no method"
        );
        for path in slice_paths(&pattern, "/v1/orgs") {
            for m in &methods {
                routes.push((m.clone(), path.clone()));
            }
        }
    }
    routes.sort();
    routes.dedup();
    routes
}

/// A concrete path for a route pattern, naming nothing that exists.
fn concrete(pattern: &str) -> String {
    pattern.replace("{}", "zz-none").replace("**", "zz/yy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_in_openapi_yaml_answers_as_documented() {
    let spec = yaml::load("openapi.yaml");
    let ops = operations(&spec);
    let node = TestNode::start().await;
    let c = &node.client;
    let anonymous = Client {
        token: None,
        ..c.clone()
    };

    // Seed: a budget org with workspaces, credits and open reservations.
    c.create_org("acme", "budget").await;
    c.purchase("acme", 1000).await;
    for ws in ["ws-a", "ws-b", "ws-del"] {
        c.create_workspace("acme", ws).await;
    }
    for (to, amount) in [("ws-a", 100), ("ws-del", 7)] {
        let t = c.transfer("acme", "primary", to, amount).await;
        assert_eq!(t.status, StatusCode::OK, "{}", t.text);
    }
    let mut ids = Vec::new();
    for amount in [10, 10, 5] {
        let r = c
            .post(
                "/v1/reservations",
                json!({"org": "acme", "workspace": "ws-a", "amount": amount, "ttl_ms": 60000}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        ids.push(r.body["reservation"].as_str().unwrap().to_string());
    }
    let (commit_id, release_id, small_id) = (&ids[0], &ids[1], &ids[2]);

    let debit = |ws: &str, amount: Value| json!({"org": "acme", "workspace": ws, "amount": amount});
    let auth = |org: &str, ws: &str, amount: &str| {
        vec![
            ("x-credits-org", org.to_string()),
            ("x-credits-workspace", ws.to_string()),
            ("x-credits-amount", amount.to_string()),
        ]
    };
    let authorize = |op, path: &str, headers: Vec<(&'static str, String)>, expect| Call {
        op,
        path: path.to_string(),
        body: None,
        headers,
        token: false,
        expect,
    };
    let calls = vec![
        // Data plane.
        call(
            "POST /v1/debit",
            "/v1/debit",
            Some(debit("ws-a", json!(1))),
            200,
        ),
        call(
            "POST /v1/debit",
            "/v1/debit",
            Some(debit("ws-a", json!(0))),
            400,
        ),
        call(
            "POST /v1/debit",
            "/v1/debit",
            Some(debit("ws-z", json!(1))),
            404,
        ),
        call(
            "POST /v1/debit",
            "/v1/debit",
            Some(debit("ws-b", json!(1))),
            402,
        ),
        call(
            "POST /v1/debit",
            "/v1/debit",
            Some(json!({"org": "acme", "workspace": "ws-a", "amount": 1, "idempotency_key": "k1"})),
            200,
        ),
        call(
            "POST /v1/debit",
            "/v1/debit",
            Some(json!({"org": "acme", "workspace": "ws-a", "amount": 2, "idempotency_key": "k1"})),
            409,
        ),
        authorize(
            "GET /v1/authorize",
            "/v1/authorize",
            auth("acme", "ws-a", "1"),
            200,
        ),
        authorize("GET /v1/authorize", "/v1/authorize", Vec::new(), 400),
        authorize(
            "GET /v1/authorize",
            "/v1/authorize",
            auth("nope", "ws-a", "1"),
            404,
        ),
        authorize(
            "GET /v1/authorize",
            "/v1/authorize",
            auth("acme", "ws-b", "1"),
            403,
        ),
        authorize(
            "POST /v1/authorize",
            "/v1/authorize",
            auth("acme", "ws-a", "2"),
            200,
        ),
        authorize(
            "POST /v1/authorize",
            "/v1/authorize",
            auth("acme", "ws-a", "x"),
            400,
        ),
        authorize(
            "GET /v1/authorize/{suffix}",
            "/v1/authorize/api/v2/chat?x=1",
            auth("acme", "ws-a", "1"),
            200,
        ),
        authorize(
            "POST /v1/authorize/{suffix}",
            "/v1/authorize/api/v2/chat",
            auth("acme", "ws-b", "1"),
            403,
        ),
        authorize(
            "POST /v1/authorize/{suffix}",
            "/v1/authorize/api/v2/chat",
            auth("acme", "ws-a", "1"),
            200,
        ),
        call(
            "POST /v1/reservations",
            "/v1/reservations",
            Some(json!({"org": "acme", "workspace": "ws-a", "amount": 3, "ttl_ms": 60000})),
            201,
        ),
        call(
            "POST /v1/reservations",
            "/v1/reservations",
            Some(debit("ws-b", json!(1))),
            402,
        ),
        call(
            "POST /v1/reservations",
            "/v1/reservations",
            Some(debit("ws-z", json!(1))),
            404,
        ),
        call(
            "POST /v1/reservations",
            "/v1/reservations",
            Some(json!({"org": "acme"})),
            400,
        ),
        call(
            "POST /v1/reservations/{id}/commit",
            format!("/v1/reservations/{commit_id}/commit"),
            Some(json!({"amount": 4})),
            200,
        ),
        call(
            "POST /v1/reservations/{id}/commit",
            format!("/v1/reservations/{small_id}/commit"),
            Some(json!({"amount": 6})),
            409,
        ),
        call(
            "POST /v1/reservations/{id}/commit",
            "/v1/reservations/nope/commit",
            Some(json!({"amount": 1})),
            404,
        ),
        call(
            "POST /v1/reservations/{id}/commit",
            format!("/v1/reservations/{small_id}/commit"),
            Some(json!({"amount": "1"})),
            400,
        ),
        call(
            "DELETE /v1/reservations/{id}",
            format!("/v1/reservations/{release_id}"),
            None,
            200,
        ),
        call(
            "DELETE /v1/reservations/{id}",
            format!("/v1/reservations/{release_id}"),
            None,
            404,
        ),
        call(
            "GET /v1/balance",
            "/v1/balance?org=acme&workspace=ws-a",
            None,
            200,
        ),
        call("GET /v1/balance", "/v1/balance?org=acme", None, 400),
        call(
            "GET /v1/balance",
            "/v1/balance?org=acme&workspace=ws-z",
            None,
            404,
        ),
        // Control plane.
        call(
            "POST /v1/orgs",
            "/v1/orgs",
            Some(json!({"org": "newco", "mode": "shared", "primary": "main"})),
            201,
        ),
        call(
            "POST /v1/orgs",
            "/v1/orgs",
            Some(json!({"org": "acme"})),
            409,
        ),
        call(
            "POST /v1/orgs",
            "/v1/orgs",
            Some(json!({"org": "a b"})),
            400,
        ),
        call("GET /v1/orgs/{org}", "/v1/orgs/acme", None, 200),
        call("GET /v1/orgs/{org}", "/v1/orgs/nope", None, 404),
        call(
            "POST /v1/orgs/{org}/workspaces",
            "/v1/orgs/newco/workspaces",
            Some(json!({"workspace": "x"})),
            201,
        ),
        // Transfers need budget mode; newco is still shared.
        call(
            "POST /v1/orgs/{org}/transfers",
            "/v1/orgs/newco/transfers",
            Some(json!({"from": "main", "to": "x", "amount": 1})),
            409,
        ),
        call(
            "PUT /v1/orgs/{org}/mode",
            "/v1/orgs/newco/mode",
            Some(json!({"mode": "budget"})),
            200,
        ),
        call(
            "PUT /v1/orgs/{org}/mode",
            "/v1/orgs/newco/mode",
            Some(json!({"mode": "pooled"})),
            400,
        ),
        call(
            "PUT /v1/orgs/{org}/mode",
            "/v1/orgs/nope/mode",
            Some(json!({"mode": "shared"})),
            404,
        ),
        call(
            "POST /v1/orgs/{org}/credits",
            "/v1/orgs/acme/credits",
            Some(json!({"amount": 50, "idempotency_key": "inv-1"})),
            200,
        ),
        call(
            "POST /v1/orgs/{org}/credits",
            "/v1/orgs/acme/credits",
            Some(json!({"amount": 51, "idempotency_key": "inv-1"})),
            409,
        ),
        call(
            "POST /v1/orgs/{org}/credits",
            "/v1/orgs/acme/credits",
            Some(json!({"amount": 0})),
            400,
        ),
        call(
            "POST /v1/orgs/{org}/workspaces",
            "/v1/orgs/acme/workspaces",
            Some(json!({"workspace": "ws-new"})),
            201,
        ),
        call(
            "POST /v1/orgs/{org}/workspaces",
            "/v1/orgs/acme/workspaces",
            Some(json!({"workspace": "ws-a"})),
            409,
        ),
        call(
            "DELETE /v1/orgs/{org}/workspaces/{ws}",
            "/v1/orgs/acme/workspaces/ws-del",
            None,
            200,
        ),
        call(
            "DELETE /v1/orgs/{org}/workspaces/{ws}",
            "/v1/orgs/acme/workspaces/primary",
            None,
            409,
        ),
        call(
            "DELETE /v1/orgs/{org}/workspaces/{ws}",
            "/v1/orgs/acme/workspaces/ws-z",
            None,
            404,
        ),
        call(
            "POST /v1/orgs/{org}/transfers",
            "/v1/orgs/acme/transfers",
            Some(json!({"from": "primary", "to": "ws-b", "amount": 10, "dry_run": false})),
            200,
        ),
        call(
            "POST /v1/orgs/{org}/transfers",
            "/v1/orgs/acme/transfers",
            Some(json!({"from": "primary", "to": "ws-b", "amount": 10, "dry_run": true})),
            200,
        ),
        call(
            "POST /v1/orgs/{org}/transfers",
            "/v1/orgs/acme/transfers",
            Some(json!({"from": "ws-b", "to": "ws-a", "amount": 1000})),
            409,
        ),
        call(
            "POST /v1/orgs/{org}/transfers",
            "/v1/orgs/acme/transfers",
            Some(json!({"from": "ws-a", "to": "ws-a", "amount": 1})),
            400,
        ),
        call(
            "GET /v1/orgs/{org}/ledger",
            "/v1/orgs/acme/ledger",
            None,
            200,
        ),
        call(
            "GET /v1/orgs/{org}/ledger",
            "/v1/orgs/acme/ledger?limit=2&after=1",
            None,
            200,
        ),
        call(
            "GET /v1/orgs/{org}/ledger",
            "/v1/orgs/acme/ledger?limit=0",
            None,
            400,
        ),
        call(
            "GET /v1/orgs/{org}/ledger",
            "/v1/orgs/nope/ledger",
            None,
            404,
        ),
        call("GET /v1/admin/export", "/v1/admin/export", None, 200),
        // Operations.
        call("GET /metrics", "/metrics", None, 200),
        call("GET /healthz", "/healthz", None, 200),
        call("GET /livez", "/livez", None, 200),
        call("GET /readyz", "/readyz", None, 200),
        // The console's static files (no token needed).
        Call {
            token: false,
            ..call("GET /console", "/console?org=acme", None, 308)
        },
        call("GET /console/", "/console/", None, 200),
        call("GET /console/index.html", "/console/index.html", None, 200),
        call("GET /console/console.js", "/console/console.js", None, 200),
        call(
            "GET /console/console.css",
            "/console/console.css",
            None,
            200,
        ),
        call(
            "GET /console/favicon.svg",
            "/console/favicon.svg",
            None,
            200,
        ),
    ];

    // Every operation of the spec is exercised, and nothing else.
    let called: BTreeSet<&str> = calls.iter().map(|c| c.op).collect();
    let in_spec: BTreeSet<&str> = ops.keys().map(String::as_str).collect();
    let untested: Vec<&&str> = in_spec.difference(&called).collect();
    assert!(
        untested.is_empty(),
        "operations in openapi.yaml with no request in this test: {untested:?}"
    );
    let unknown: Vec<&&str> = called.difference(&in_spec).collect();
    assert!(unknown.is_empty(), "not in openapi.yaml: {unknown:?}");

    let mut problems = Vec::new();
    let mut control_ops = BTreeSet::new();
    for call in &calls {
        let op = &ops[call.op];
        let client = if call.token { c } else { &anonymous };
        let (method, _) = call.op.split_once(' ').unwrap();
        let method: Method = method.parse().unwrap();
        let headers: Vec<(&str, &str)> =
            call.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = call.body.as_ref().map(Value::to_string);
        let a = client
            .send(method, &call.path, body.as_deref(), &headers)
            .await;
        assert_eq!(
            a.status.as_u16(),
            call.expect,
            "{} {}: this test expected {}: {}",
            call.op,
            call.path,
            call.expect,
            a.text
        );
        problems.extend(check_answer(&spec, call.op, op, call, &a));
        if op["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearerAuth").is_some()))
        {
            control_ops.insert(call.op);
        }
    }

    // Every control-plane operation refuses a caller without the token, as documented.
    assert!(control_ops.len() >= 8, "{control_ops:?}");
    for key in &control_ops {
        let c0 = calls.iter().find(|c| c.op == *key).unwrap();
        let (method, _) = key.split_once(' ').unwrap();
        let body = c0.body.as_ref().map(Value::to_string);
        let a = anonymous
            .send(method.parse().unwrap(), &c0.path, body.as_deref(), &[])
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{key}: {}", a.text);
        problems.extend(check_answer(&spec, key, &ops[*key], c0, &a));
    }
    assert!(
        problems.is_empty(),
        "openapi.yaml and the server disagree:\n  {}",
        problems.join("\n  ")
    );

    // Every route of the router is in the spec, and every operation of the spec is routed.
    let routes = server_routes();
    assert!(
        routes.len() >= 15,
        "only {} routes read: {routes:?}",
        routes.len()
    );
    let spec_ops: BTreeSet<(String, String)> = ops
        .keys()
        .map(|k| {
            let (m, p) = k.split_once(' ').unwrap();
            let mut norm = String::new();
            let mut in_param = false;
            for ch in p.chars() {
                match ch {
                    '{' => {
                        in_param = true;
                        norm.push_str("{}");
                    }
                    '}' => in_param = false,
                    _ if in_param => {}
                    _ => norm.push(ch),
                }
            }
            (m.to_string(), norm)
        })
        .collect();
    for (method, path) in &routes {
        match path.strip_suffix("/**") {
            // Any method and any suffix: the spec describes GET and POST, bare and with a
            // `{suffix}` (OpenAPI 3.0 can say no more).
            Some(base) => {
                for m in ["GET", "POST"] {
                    for p in [base.to_string(), format!("{base}/{{}}")] {
                        assert!(
                            spec_ops.contains(&(m.to_string(), p.clone())),
                            "the router answers {method} {path}; openapi.yaml lacks {m} {p}"
                        );
                    }
                }
            }
            None => assert!(
                spec_ops.contains(&(method.clone(), path.clone())),
                "the router answers {method} {path}, which openapi.yaml does not describe"
            ),
        }
    }
    for (m, p) in &spec_ops {
        let routed = routes.iter().any(|(rm, rp)| {
            let method_ok = rm == m || rm == "*";
            let path_ok = rp == p
                || rp
                    .strip_suffix("/**")
                    .is_some_and(|base| p == base || p == &format!("{base}/{{}}"));
            method_ok && path_ok
        });
        assert!(
            routed,
            "openapi.yaml describes {m} {p}; the router has no such route"
        );
    }

    // The routes read from the source are the server's: each answers its method (not
    // not_found, not 405) and refuses another method with 405.
    for (method, path) in &routes {
        let url = concrete(path);
        let m: Method = if method == "*" {
            Method::GET
        } else {
            method.parse().unwrap()
        };
        let a = c.send(m.clone(), &url, None, &[]).await;
        assert!(
            a.status != StatusCode::METHOD_NOT_ALLOWED && a.error_code() != "not_found",
            "{m} {url} (route {method} {path}) is not routed: {} {}",
            a.status,
            a.text
        );
        if method != "*" {
            let a = c.send(Method::PATCH, &url, None, &[]).await;
            assert_eq!(
                a.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "PATCH {url}: {}",
                a.text
            );
        }
    }
    node.stop().await;
}

#[test]
fn the_shape_check_catches_missing_undocumented_and_mistyped_fields() {
    let spec = json!({"components": {"schemas": {
        "Credits": {"type": "integer", "minimum": 0},
        "Base": {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}},
        "Both": {"allOf": [
            {"$ref": "#/components/schemas/Base"},
            {"type": "object", "required": ["n"], "properties": {
                "n": {"$ref": "#/components/schemas/Credits"},
                "list": {"type": "array", "items": {"$ref": "#/components/schemas/Base"}},
                "mode": {"type": "string", "enum": ["x", "y"]},
                "next": {"type": "integer", "nullable": true}
            }}
        ]}
    }}});
    let schema = json!({"$ref": "#/components/schemas/Both"});
    let check = |v: Value| {
        let mut p = Vec::new();
        conform(&spec, &schema, &v, "v", &mut p);
        p
    };
    assert!(
        check(json!({"a": "s", "n": 1, "list": [{"a": "t"}], "mode": "x", "next": null}))
            .is_empty()
    );
    let bad = check(json!({"n": "1", "extra": 1, "list": [{"b": 1}], "mode": "z"}));
    let text = bad.join("\n");
    for fragment in [
        "required key \"a\" missing",
        "undocumented key \"extra\"",
        "v.n: expected an integer",
        "v.list[0]: undocumented key \"b\"",
        "v.mode: \"z\" is not one of",
    ] {
        assert!(text.contains(fragment), "{fragment:?} not in:\n{text}");
    }
}
