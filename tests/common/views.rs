//! Reading and checking answers: org views, errors, metrics, and a seeded budget org.

use hyper::StatusCode;
use serde_json::Value;

use super::{Answer, Client};

/// The balance of `ws` in an org view.
pub fn balance(view: &Value, ws: &str) -> u64 {
    workspace(view, ws)["balance"]
        .as_u64()
        .unwrap_or_else(|| panic!("no balance for {ws} in {view}"))
}

/// The `used` of `ws` in an org view.
pub fn used(view: &Value, ws: &str) -> u64 {
    workspace(view, ws)["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("no used for {ws} in {view}"))
}

pub fn workspace<'a>(view: &'a Value, ws: &str) -> &'a Value {
    view["workspaces"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["workspace"] == ws))
        .unwrap_or_else(|| panic!("no workspace {ws} in {view}"))
}

/// Asserts rule 7 on an org view: purchased == total_credits + used, and the sums add up.
pub fn assert_conserved(view: &Value) {
    let n = |k: &str| {
        view[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {view}"))
    };
    assert_eq!(
        n("purchased"),
        n("total_credits") + n("used"),
        "conservation broken: {view}"
    );
    let ws = view["workspaces"].as_array().expect("workspaces");
    let balances: u64 = ws.iter().map(|w| w["balance"].as_u64().unwrap()).sum();
    assert_eq!(
        n("total_credits"),
        balances + n("held"),
        "total_credits != balances + held: {view}"
    );
}

/// Asserts an error answer: status, stable code, a fragment of the message, JSON body.
pub fn assert_error(a: &Answer, status: u16, code: &str, fragment: &str) {
    assert_eq!(a.status.as_u16(), status, "status of {}", a.text);
    assert_eq!(a.error_code(), code, "code of {}", a.text);
    let message = a.body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {}", a.text));
    assert!(
        message.contains(fragment),
        "message {message:?} does not contain {fragment:?}"
    );
    assert_eq!(
        a.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "error bodies are JSON: {a:?}"
    );
}

/// A budget-mode org with `purchased` credits and workspaces given `allot` credits each.
pub async fn budget_org(c: &Client, org: &str, purchased: u64, allot: &[(&str, u64)]) -> Value {
    c.create_org(org, "budget").await;
    c.purchase(org, purchased).await;
    for (ws, amount) in allot {
        c.create_workspace(org, ws).await;
        if *amount > 0 {
            let a = c.transfer(org, "primary", ws, *amount).await;
            assert_eq!(a.status, StatusCode::OK, "transfer: {}", a.text);
        }
    }
    c.org(org).await
}

/// The value of metric `name` in a Prometheus text exposition: the sum of its samples (all
/// label sets), or 0 when it is absent (a counter that was never incremented is not rendered).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // `name{labels} value` or `name value`; not `name_suffix ...`.
            let rest = match rest.chars().next()? {
                '{' => &rest[rest.find('}')? + 1..],
                ' ' => rest,
                _ => return None,
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}
