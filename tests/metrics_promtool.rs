//! Proves the metrics contract with promtool: the real binary's /metrics passes `promtool check
//! metrics` and shows every metric of src/metrics.rs (and of the README's table), and every
//! dashboard query and alert rule compiles, passes its unit tests and names only real metrics.

mod common;

use common::yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, Process};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// Longest one promtool run may take.
const PROMTOOL_LIMIT: Duration = Duration::from_secs(60);

/// Runs `promtool <args>` in `cwd` with `stdin`, bounded; returns (success, stdout + stderr).
/// A missing promtool fails the test: it is never skipped.
fn promtool(args: &[&str], cwd: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(cwd);
    let what = "promtool (install the Debian package prometheus: .ci/run does; this test is never skipped)";
    let done = common::run_bounded(cmd, stdin, PROMTOOL_LIMIT, what);
    (
        done.status.success(),
        format!("{}{}", done.stdout, done.stderr),
    )
}

/// Every metric name declared in src/metrics.rs (`pub const X: &str = "creditd_..."`).
fn declared_metrics() -> BTreeSet<String> {
    let source = include_str!("../src/metrics.rs");
    let names: BTreeSet<String> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": &str = \"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_string()))
        .filter(|name| name.starts_with("creditd_"))
        .collect();
    assert!(
        names.len() >= 10,
        "src/metrics.rs lists only {names:?}: did its layout change?"
    );
    names
}

/// Each metric family of an exposition and its type, from the `# TYPE` lines.
fn exposed_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// The value of the sample `name{labels}` (exactly as rendered, `labels` may be empty).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

/// The sum of every sample of `name`, whatever the labels.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            let family = s.split('{').next()?;
            (family == name).then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Every `creditd_*` identifier in a PromQL expression (or any text).
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("creditd_") {
        let start = i + at;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The family a series name belongs to: `x_bucket`, `x_sum`, `x_count` of histogram `x`.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, String>) -> &'a str {
    if families.contains_key(name) {
        return name;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if families.get(base).is_some_and(|t| t == "histogram") {
                return base;
            }
        }
    }
    name
}

/// The README's metrics table (name → type), when the README has a "## Metrics" section.
fn readme_metrics() -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(yaml::repo_path("README.md")).ok()?;
    let section = text.split("\n## Metrics").nth(1)?;
    let section = section.split("\n## ").next().unwrap_or(section);
    Some(
        section
            .lines()
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let name = cells.next()?.trim_matches('`');
                let kind = cells.next()?;
                name.starts_with("creditd_")
                    .then(|| (name.to_string(), kind.to_string()))
            })
            .collect(),
    )
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(list: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in list.as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(&p["panels"]));
    }
    out
}

/// A Grafana query as plain PromQL: its variables replaced by values Prometheus accepts.
fn grafana_to_promql(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "5m")
        .replace("${__rate_interval}", "5m")
        .replace("$__interval", "1m")
        .replace("${__interval}", "1m")
        .replace("$__range", "1h")
        .replace("${__range}", "1h")
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(
        !out.contains('$'),
        "dashboard query uses a variable this test does not know: {expr}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_dashboard_and_alerts_agree_and_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Process::spawn(dir.path(), &[]).await;
    let c = &node.client;

    // Traffic that touches every metric: allowed and refused debits, reservations (one
    // committed, one left to expire), a body over the limit, settling.
    c.create_org("acme", "budget").await;
    c.purchase("acme", 100).await;
    c.create_workspace("acme", "ws-a").await;
    let t = c.transfer("acme", "primary", "ws-a", 3).await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.text);
    for _ in 0..3 {
        assert_eq!(c.debit("acme", "ws-a", 1).await.status, StatusCode::OK);
    }
    let refused = c.debit("acme", "ws-a", 1).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refused.text
    );
    let r = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "primary", "amount": 5, "ttl_ms": 60000}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["reservation"].as_str().expect("reservation id");
    let committed = c
        .post(
            &format!("/v1/reservations/{id}/commit"),
            json!({"amount": 2}),
        )
        .await;
    assert_eq!(committed.status, StatusCode::OK, "{}", committed.text);
    let short = c
        .post(
            "/v1/reservations",
            json!({"org": "acme", "workspace": "primary", "amount": 1, "ttl_ms": 1}),
        )
        .await;
    assert_eq!(short.status, StatusCode::CREATED, "{}", short.text);
    let big = format!(
        r#"{{"org":"acme","workspace":"ws-a","amount":1}}{}"#,
        " ".repeat(70_000)
    );
    let a = c.send(Method::POST, "/v1/debit", Some(&big), &[]).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);

    // Wait (bounded) until the usage is settled and the short reservation has expired.
    let scraper = Client {
        token: None,
        ..c.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let a = scraper.get("/metrics").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let settled = total(&a.text, "creditd_settle_batches_total") > 0.0
            && sample(&a.text, "creditd_unsettled_credits") == Some(0.0);
        let expired = total(&a.text, "creditd_reservations_expired_total") >= 1.0;
        if settled && expired {
            break a.text;
        }
        assert!(
            Instant::now() < deadline,
            "not settled ({settled}) or reservation not expired ({expired}) within 20s:\n{}",
            a.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let a = scraper.get("/metrics").await;
    assert_eq!(
        a.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/plain; version=0.0.4"),
        "the Prometheus text format's content type"
    );

    // promtool accepts the exposition (format and lint).
    let repo = yaml::repo_path("");
    let (ok, out) = promtool(&["check", "metrics"], &repo, Some(&text));
    assert!(
        ok,
        "promtool check metrics refused /metrics:\n{out}\n---\n{text}"
    );

    // Every metric of src/metrics.rs is exposed, and nothing else under creditd_.
    let families = exposed_families(&text);
    let declared = declared_metrics();
    let missing: Vec<&String> = declared
        .iter()
        .filter(|n| !families.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "declared in src/metrics.rs but not on /metrics: {missing:?}\n{text}"
    );
    let undeclared: Vec<&String> = families
        .keys()
        .filter(|n| n.starts_with("creditd_") && !declared.contains(*n))
        .collect();
    assert!(
        undeclared.is_empty(),
        "on /metrics but not declared in src/metrics.rs: {undeclared:?}"
    );
    let version = format!(
        "creditd_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), Some(1.0), "{version}:\n{text}");
    assert_eq!(sample(&text, "creditd_ready"), Some(1.0));
    // The traffic above, counted.
    let outcome = |o: &str| {
        sample(
            &text,
            &format!("creditd_debit_requests_total{{outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(outcome("allowed"), Some(5.0), "3 debits + 2 reservations");
    assert_eq!(outcome("insufficient"), Some(1.0));
    assert_eq!(outcome("invalid"), Some(1.0), "the body over the limit");
    assert_eq!(
        sample(&text, "creditd_credits_debited_total"),
        Some(5.0),
        "3 debited + 2 committed"
    );
    assert_eq!(
        sample(&text, "creditd_limit_hits_total{limit=\"body_bytes\"}"),
        Some(1.0)
    );
    // Counters an alert reads exist from the start, at 0 (rate() misses a series born at 1).
    assert_eq!(sample(&text, "creditd_settle_errors_total"), Some(0.0));
    assert_eq!(sample(&text, "creditd_unclean_restarts_total"), Some(0.0));
    assert_eq!(
        sample(&text, "creditd_limit_hits_total{limit=\"connections\"}"),
        Some(0.0)
    );
    // Histograms, not summaries: explicit buckets.
    for h in [
        "creditd_debit_duration_seconds",
        "creditd_settle_duration_seconds",
    ] {
        assert_eq!(
            families.get(h).map(String::as_str),
            Some("histogram"),
            "{h}"
        );
    }

    // The README's table documents every metric with its type, once it has a table.
    match readme_metrics() {
        Some(table) => {
            for name in &declared {
                let documented = table.get(name).unwrap_or_else(|| {
                    panic!("README.md's \"## Metrics\" table does not list {name}")
                });
                assert_eq!(
                    Some(documented),
                    families.get(name),
                    "README.md gives {name} the type {documented}"
                );
            }
            for name in table.keys() {
                assert!(
                    declared.contains(name),
                    "README.md documents {name}, which src/metrics.rs does not declare"
                );
            }
        }
        None => eprintln!(
            "README.md has no \"## Metrics\" section yet: only src/metrics.rs was checked \
             against /metrics"
        ),
    }

    // Every dashboard query compiles (as a recording rule) and names only exposed metrics.
    let dashboard: Value =
        serde_json::from_str(include_str!("../docker/grafana/dashboards/creditd.json"))
            .expect("dashboard JSON");
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in panels(&dashboard["panels"]) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((format!("panel {:?}", panel["title"]), expr.to_string()));
            }
        }
    }
    assert!(
        queries.len() >= 10,
        "only {} dashboard queries",
        queries.len()
    );
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        let expr = serde_json::to_string(&grafana_to_promql(expr)).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {expr}\n"
        ));
    }
    let rule_file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&rule_file, &rules).expect("write rule file");
    let (ok, out) = promtool(
        &["check", "rules", rule_file.to_str().unwrap()],
        &repo,
        None,
    );
    assert!(
        ok,
        "a dashboard query does not compile:\n{out}\n---\n{rules}"
    );
    let mut referenced: Vec<(String, String)> = Vec::new();
    for (place, expr) in &queries {
        for name in metric_names_in(expr) {
            referenced.push((place.clone(), name));
        }
    }
    // Template variables query metrics too (label_values(creditd_ready, instance)).
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .or(var["definition"].as_str())
            .unwrap_or("");
        for name in metric_names_in(query) {
            referenced.push((format!("variable {:?}", var["name"]), name));
        }
    }

    // The alert rules: compile, pass their unit tests, name only exposed metrics.
    let prom_dir = yaml::repo_path("docker/prometheus");
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], &prom_dir, None);
    assert!(ok, "promtool check rules alerts.yml:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"], &prom_dir, None);
    assert!(ok, "promtool test rules alerts.test.yml:\n{out}");
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"], &prom_dir, None);
    assert!(ok, "promtool check config prometheus.yml:\n{out}");
    let alerts = yaml::load("docker/prometheus/alerts.yml");
    let mut alert_count = 0;
    for group in alerts["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            alert_count += 1;
            let expr = rule["expr"].as_str().expect("expr");
            let place = format!("alert {:?}", rule["alert"]);
            for name in metric_names_in(expr) {
                referenced.push((place.clone(), name));
            }
        }
    }
    assert!(alert_count >= 3, "only {alert_count} alert rules");

    let mut seen = BTreeSet::new();
    for (place, name) in &referenced {
        let family = family_of(name, &families);
        assert!(
            families.contains_key(family),
            "{place} reads {name}, which the running node does not expose"
        );
        seen.insert(family.to_string());
    }
    assert!(
        seen.len() >= 10,
        "the dashboard and alerts read only {seen:?}"
    );
    assert!(node.terminate().success(), "SIGTERM must exit 0");
}
