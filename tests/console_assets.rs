//! Proves the console's files are served over real HTTP as the issue asks: every file the page
//! references, with its content type and a strict Content-Security-Policy, no inline script or
//! style, no admin token anywhere, under 100 KB in all, and no change to the API's answers.

mod common;

use common::{assert_error, Answer, Client, TestNode, TOKEN};
use hyper::{Method, StatusCode};

/// The files of the console and the content type each must have.
const FILES: &[(&str, &str)] = &[
    ("/console/", "text/html; charset=utf-8"),
    ("/console/index.html", "text/html; charset=utf-8"),
    ("/console/console.js", "text/javascript; charset=utf-8"),
    ("/console/console.css", "text/css; charset=utf-8"),
    ("/console/favicon.svg", "image/svg+xml"),
];

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header in {:?}", a.headers))
}

/// The value of every `attr="…"` in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!(" {attr}=\"");
    html.match_indices(&needle)
        .map(|(i, _)| {
            let rest = &html[i + needle.len()..];
            &rest[..rest.find('"').expect("closing quote")]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_file_has_its_type_and_a_strict_policy() {
    let node = TestNode::start().await;
    // No token: the files hold no secret, the page asks the operator for it.
    let anonymous = Client {
        token: None,
        ..node.client.clone()
    };
    let mut weight = 0;
    for (path, content_type) in FILES {
        let a = anonymous.get(path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text);
        assert_eq!(header(&a, "content-type"), *content_type, "{path}");
        let csp = header(&a, "content-security-policy");
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} not in {csp}");
        }
        for loose in [
            "unsafe-inline",
            "unsafe-eval",
            "http:",
            "https:",
            "*",
            "data:",
        ] {
            assert!(!csp.contains(loose), "{path}: {loose} in {csp}");
        }
        assert_eq!(header(&a, "x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header(&a, "referrer-policy"), "no-referrer", "{path}");
        assert!(
            !a.text.contains(TOKEN),
            "{path} contains the admin token configured on the node"
        );
        if *path != "/console/index.html" {
            weight += a.text.len();
        }
    }
    assert!(
        weight < 100 * 1024,
        "the console weighs {weight} bytes, over the 100 KB budget"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_only_its_own_files_and_nothing_inline() {
    let node = TestNode::start().await;
    let c = &node.client;
    let page = c.get("/console/").await;
    let html = page.text.as_str();
    let mut referenced: Vec<&str> = attribute_values(html, "src");
    referenced.extend(attribute_values(html, "href"));
    assert!(
        referenced.len() >= 3,
        "script, stylesheet and icon expected: {referenced:?}"
    );
    for url in &referenced {
        assert!(
            url.starts_with("/console/"),
            "the page loads {url}, which is not one of its own files"
        );
        let a = c.get(url).await;
        assert_eq!(a.status, StatusCode::OK, "{url}: {}", a.text);
    }
    assert!(!html.contains("style="), "inline style attribute");
    assert!(!html.contains("<style"), "inline <style> element");
    let inline_scripts = html.matches("<script>").count();
    assert_eq!(inline_scripts, 0, "inline <script> element");
    let script = c.get("/console/console.js").await.text;
    for forbidden in ["eval(", "new Function", "innerHTML", "document.write"] {
        assert!(
            !script.contains(forbidden),
            "console.js uses {forbidden}, which the policy forbids or which could inject markup"
        );
    }
    // The names the issue gives the controls are in the page or its script.
    for name in [
        "Admin token",
        "Sign in",
        "Organization",
        "Credit mode",
        "Shared Pool",
        "Workspace Budget",
        "Source workspace",
        "Amount",
        "Updated balances",
        "Transfer",
        "role=\"alert\"",
        "role=\"dialog\"",
    ] {
        assert!(html.contains(name), "{name} not in the page");
    }
    for name in ["Actions for ", "Manage Credits", "Delete workspace"] {
        assert!(script.contains(name), "{name} not in console.js");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_routes_redirect_refuse_and_leave_the_api_unchanged() {
    let node = TestNode::start().await;
    let c = &node.client;
    let a = c.get("/console?org=acme").await;
    assert_eq!(a.status, StatusCode::PERMANENT_REDIRECT, "{}", a.text);
    assert_eq!(header(&a, "location"), "/console/?org=acme");
    let a = c.get("/console").await;
    assert_eq!(header(&a, "location"), "/console/");
    // The page opens an org from its query; the server ignores the query.
    let a = c.get("/console/?org=acme").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text, c.get("/console/").await.text);

    for path in [
        "/console/nope.js",
        "/console/../v1/orgs",
        "/console/console.js/x",
        "/consoles",
    ] {
        assert_error(&c.get(path).await, 404, "not_found", "no such route");
    }
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let a = c.send(method.clone(), "/console/", Some("{}"), &[]).await;
        assert_error(&a, 405, "method_not_allowed", "method not allowed");
    }
    // The API answers as before: JSON, no console headers.
    let a = c.get("/v1/orgs/acme").await;
    assert_error(&a, 404, "unknown_org", "");
    assert!(a.headers.get("content-security-policy").is_none());
    let a = c.get("/").await;
    assert_error(&a, 404, "not_found", "no such route");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_requests_are_counted_under_their_own_plane() {
    // The binary, for its Prometheus recorder (an in-process node has none).
    let dir = tempfile::tempdir().expect("tempdir");
    let process = common::Process::spawn(dir.path(), &[]).await;
    let c = &process.client;
    assert_eq!(c.get("/console/").await.status, StatusCode::OK);
    let metrics = c.get("/metrics").await.text;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("creditd_http_requests_total")
                && l.contains("plane=\"console\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no console line in:\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
    let status = process.terminate();
    assert!(status.success(), "{status:?}");
}
