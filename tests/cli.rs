//! Proves the operator CLI: every subcommand of the built binary, run against a live node,
//! prints aligned tables or the API's JSON, and exits 1 on refusals and 64 on usage errors.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{TestNode, TOKEN};
use creditd::config::EXIT_CONFIG;
use serde_json::Value;

/// Longest one CLI run may take; it makes one request, so this only bounds a broken binary.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// What one run of the binary did.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:?}");
        assert!(self.stderr.is_empty(), "stderr on success: {self:?}");
        &self.stdout
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("--json printed no JSON ({e}): {self:?}"))
    }

    /// Asserts a refusal from the node: exit 1, nothing on stdout, `error: <code>: ` on stderr.
    fn refused(&self, code: &str) {
        assert_eq!(self.code, Some(1), "expected exit 1: {self:?}");
        assert!(self.stdout.is_empty(), "stdout on a refusal: {self:?}");
        let prefix = format!("error: {code}: ");
        assert!(
            self.stderr.starts_with(&prefix) && self.stderr.trim_end().len() > prefix.len(),
            "expected {prefix:?} and a message on stderr: {self:?}"
        );
    }

    fn usage_error(&self) {
        assert_eq!(self.code, Some(EXIT_CONFIG), "expected exit 64: {self:?}");
        assert!(self.stdout.is_empty(), "stdout on a usage error: {self:?}");
        assert!(!self.stderr.is_empty(), "no message on a usage error");
    }
}

/// Runs `creditd <args>` with exactly `env` (plus PATH), in a blocking task so that the
/// in-process node keeps serving; kills it after [`RUN_LIMIT`].
async fn run(args: &[&str], env: &[(&str, &str)]) -> Out {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || run_blocking(&args, &env))
        .await
        .expect("CLI runner")
}

fn run_blocking(args: &[String], env: &[(String, String)]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_creditd"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let done = common::run_bounded(cmd, None, RUN_LIMIT, &format!("creditd {args:?}"));
    Out {
        code: done.status.code(),
        stdout: done.stdout,
        stderr: done.stderr,
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Runs an operator command against `addr` with the right token, given as flags.
async fn op(addr: SocketAddr, args: &[&str]) -> Out {
    let url = url(addr);
    let mut all = args.to_vec();
    all.extend(["--url", &url, "--token", TOKEN]);
    run(&all, &[]).await
}

/// The `key  value` lines before the first blank line, as pairs.
fn pairs(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("not a pair: {l:?}"));
            (k.to_string(), v.trim_start().to_string())
        })
        .collect()
}

fn pair<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {pairs:?}"))
}

/// The table starting at the line that begins with `first_header`: header and rows, each row
/// as its cells. Asserts the alignment: text columns start where their header starts, number
/// columns (`right`) end where their header ends.
fn table(stdout: &str, first_header: &str, right: &[&str]) -> Vec<Vec<String>> {
    let lines: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(first_header))
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(!lines.is_empty(), "no table {first_header:?} in:\n{stdout}");
    let header = lines[0];
    // Column names are separated by two or more blanks (a name may hold one: "TIME (UTC)").
    let hb = header.as_bytes();
    let mut starts = Vec::new();
    let mut names = Vec::new();
    let mut i = 0;
    while i < hb.len() {
        while i < hb.len() && hb[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < hb.len() && !(hb[i] == b' ' && hb.get(i + 1).map_or(true, |&c| c == b' ')) {
            i += 1;
        }
        if i > start {
            starts.push(start);
            names.push(&header[start..i]);
        }
    }
    // Cells hold no blanks (ids, numbers, times), except the last column's: a left-aligned
    // cell is the word that starts where its header starts, a right-aligned one the word that
    // ends where its header ends; blank there means an empty cell.
    let mut rows = Vec::new();
    for line in &lines[1..] {
        let b = line.as_bytes();
        let mut cells = Vec::new();
        for (n, name) in names.iter().enumerate() {
            let cell = if right.contains(name) {
                let end = starts[n] + name.len();
                assert!(
                    b.get(end).map_or(true, |&c| c == b' '),
                    "column {name} not right-aligned in {line:?}"
                );
                let head = line.get(..end.min(line.len())).unwrap_or("");
                if head.ends_with(' ') {
                    ""
                } else {
                    head.rsplit(' ').next().unwrap_or("")
                }
            } else {
                let start = starts[n];
                assert!(
                    start == 0 || b.get(start - 1).map_or(true, |&c| c == b' '),
                    "column {name} not left-aligned in {line:?}"
                );
                let tail = line.get(start..).unwrap_or("");
                if n + 1 == names.len() {
                    tail.trim()
                } else if tail.starts_with(' ') {
                    ""
                } else {
                    tail.split(' ').next().unwrap_or("")
                }
            };
            cells.push(cell.to_string());
        }
        rows.push(cells);
    }
    rows
}

const WS_NUMBERS: &[&str] = &["BALANCE", "HELD", "USED"];

/// Row of `ws` in the workspace table of an org view: [workspace, primary, balance, held, used].
fn ws_row(stdout: &str, ws: &str) -> Vec<String> {
    table(stdout, "WORKSPACE", WS_NUMBERS)
        .into_iter()
        .find(|r| r[0] == ws)
        .unwrap_or_else(|| panic!("no row for {ws} in:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_an_aligned_table() {
    let node = TestNode::start().await;
    let addr = node.server.addr();
    let c = &node.client;

    let out = op(
        addr,
        &[
            "org",
            "create",
            "acme",
            "--mode",
            "budget",
            "--primary",
            "main",
        ],
    )
    .await;
    let p = pairs(out.ok());
    assert_eq!(pair(&p, "org"), "acme");
    assert_eq!(pair(&p, "mode"), "budget");
    assert_eq!(pair(&p, "primary"), "main");
    assert_eq!(pair(&p, "purchased"), "0");
    assert_eq!(ws_row(&out.stdout, "main"), ["main", "yes", "0", "0", "0"]);

    // Twice with one key: added once.
    for _ in 0..2 {
        let out = op(
            addr,
            &[
                "credits",
                "add",
                "acme",
                "10000",
                "--idempotency-key",
                "inv-1",
            ],
        )
        .await;
        let p = pairs(out.ok());
        assert_eq!(pair(&p, "purchased"), "10000");
        assert_eq!(pair(&p, "total_credits"), "10000");
        assert_eq!(
            ws_row(&out.stdout, "main"),
            ["main", "yes", "10000", "0", "0"]
        );
    }

    for ws in ["ws-a", "ws-b"] {
        let out = op(addr, &["workspace", "create", "acme", ws]).await;
        assert_eq!(ws_row(out.ok(), ws), [ws, "no", "0", "0", "0"]);
    }

    // A dry run shows the outcome and changes nothing.
    let out = op(
        addr,
        &["transfer", "acme", "main", "ws-a", "2000", "--dry-run"],
    )
    .await;
    let rows = table(out.ok(), "SIDE", &["BALANCE"]);
    assert_eq!(rows, [["from", "main", "8000"], ["to", "ws-a", "2000"]]);
    assert!(out.stdout.contains("dry run"), "{}", out.stdout);
    assert_eq!(common::balance(&c.org("acme").await, "ws-a"), 0);

    let out = op(
        addr,
        &[
            "transfer",
            "acme",
            "main",
            "ws-a",
            "2000",
            "--idempotency-key",
            "t-1",
        ],
    )
    .await;
    let rows = table(out.ok(), "SIDE", &["BALANCE"]);
    assert_eq!(rows, [["from", "main", "8000"], ["to", "ws-a", "2000"]]);
    assert!(!out.stdout.contains("dry run"), "{}", out.stdout);
    let out = op(addr, &["transfer", "acme", "main", "ws-b", "500"]).await;
    assert_eq!(
        table(out.ok(), "SIDE", &["BALANCE"]),
        [["from", "main", "7500"], ["to", "ws-b", "500"]]
    );
    assert_eq!(c.debit("acme", "ws-a", 300).await.status.as_u16(), 200);

    let out = op(addr, &["org", "show", "acme"]).await;
    let p = pairs(out.ok());
    assert_eq!(pair(&p, "used"), "300");
    assert_eq!(
        ws_row(&out.stdout, "ws-a"),
        ["ws-a", "no", "1700", "0", "300"]
    );
    assert_eq!(ws_row(&out.stdout, "ws-b"), ["ws-b", "no", "500", "0", "0"]);

    // Deleting returns the workspace's credits to the Primary.
    let out = op(addr, &["workspace", "delete", "acme", "ws-b"]).await;
    let p = pairs(out.ok());
    assert_eq!(pair(&p, "returned_to_primary"), "500");
    assert_eq!(ws_row(&out.stdout, "main")[2], "8000");
    assert!(
        !table(&out.stdout, "WORKSPACE", WS_NUMBERS)
            .iter()
            .any(|r| r[0] == "ws-b"),
        "{}",
        out.stdout
    );

    // budget -> shared sweeps ws-a's 1700 into the Primary.
    let out = op(addr, &["mode", "set", "acme", "shared"]).await;
    let p = pairs(out.ok());
    assert_eq!(pair(&p, "mode"), "shared");
    assert_eq!(ws_row(&out.stdout, "main")[2], "9700");
    assert_eq!(ws_row(&out.stdout, "ws-a")[2], "0");

    // The ledger, one page at a time, with the hint to read on.
    let ledger_numbers = &["SEQ", "AMOUNT"];
    let out = op(addr, &["ledger", "acme", "--limit", "3"]).await;
    let first = table(out.ok(), "SEQ", ledger_numbers);
    assert_eq!(first.len(), 3, "{}", out.stdout);
    assert_eq!(first[0][0], "1");
    assert_eq!(first[0][2], "org_created");
    assert!(first[0][8].contains("mode=budget"), "{first:?}");
    assert!(first[0][8].contains("primary=main"), "{first:?}");
    assert_eq!(&first[1][2..7], ["purchase", "main", "", "", "10000"]);
    // Times are UTC, to the millisecond.
    let time = &first[0][1];
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time:?}"
    );
    assert!(
        out.stdout.contains("creditd ledger acme --after 3"),
        "{}",
        out.stdout
    );
    let out = op(addr, &["ledger", "acme", "--after", "3"]).await;
    let rest = table(out.ok(), "SEQ", ledger_numbers);
    let kinds: Vec<&str> = rest.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(rest[0][0], "4", "{}", out.stdout);
    for kind in ["transfer", "workspace_deleted", "mode_changed", "sweep"] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    let transfer = rest.iter().find(|r| r[2] == "transfer").unwrap();
    assert_eq!(&transfer[4..7], ["main", "ws-a", "2000"]);
    let deleted = rest.iter().find(|r| r[2] == "workspace_deleted").unwrap();
    assert!(
        deleted[8].contains("returned_to_primary=500"),
        "{deleted:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_prints_the_api_answer() {
    let node = TestNode::start().await;
    let addr = node.server.addr();
    let c = &node.client;

    let created = op(addr, &["org", "create", "acme", "--json"]).await.json();
    assert_eq!(created["mode"], "shared", "the node's default mode");
    assert_eq!(created["primary"], "primary");
    let added = op(addr, &["credits", "add", "acme", "100", "--json"])
        .await
        .json();
    assert_eq!(added["purchased"], 100);
    let ws = op(addr, &["workspace", "create", "acme", "ws-a", "--json"])
        .await
        .json();
    assert_eq!(ws["workspaces"].as_array().map(Vec::len), Some(2));
    let budget = op(addr, &["mode", "set", "acme", "budget", "--json"])
        .await
        .json();
    assert_eq!(budget["mode"], "budget");
    let moved = op(
        addr,
        &["transfer", "acme", "primary", "ws-a", "40", "--json"],
    )
    .await
    .json();
    assert_eq!(
        moved,
        serde_json::json!({"dry_run": false, "from": {"workspace": "primary", "balance": 60},
                           "to": {"workspace": "ws-a", "balance": 40}})
    );
    let dry = op(
        addr,
        &[
            "transfer",
            "acme",
            "primary",
            "ws-a",
            "10",
            "--dry-run",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["to"]["balance"], 50);

    // The same document the API answers.
    let shown = op(addr, &["org", "show", "acme", "--json"]).await.json();
    assert_eq!(shown, c.org("acme").await);
    let page = op(addr, &["ledger", "acme", "--limit", "2", "--json"])
        .await
        .json();
    let api = c.get("/v1/orgs/acme/ledger?limit=2").await.body;
    assert_eq!(page, api);
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["next"], 2);

    let deleted = op(addr, &["workspace", "delete", "acme", "ws-a", "--json"])
        .await
        .json();
    assert_eq!(deleted["returned_to_primary"], 40);
    assert_eq!(deleted["workspaces"].as_array().map(Vec::len), Some(1));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exit_1_with_the_error_code() {
    let node = TestNode::start().await;
    let addr = node.server.addr();
    op(addr, &["org", "create", "acme"]).await.ok();
    op(addr, &["credits", "add", "acme", "100"]).await.ok();
    op(addr, &["workspace", "create", "acme", "ws-a"])
        .await
        .ok();

    // Transfers need budget mode; the org is shared.
    let out = op(addr, &["transfer", "acme", "primary", "ws-a", "10"]).await;
    out.refused("wrong_mode");
    assert!(out.stderr.contains("budget"), "{out:?}");
    // The same with --json: the error still goes to stderr.
    op(
        addr,
        &["transfer", "acme", "primary", "ws-a", "10", "--json"],
    )
    .await
    .refused("wrong_mode");

    op(addr, &["org", "show", "nope"])
        .await
        .refused("unknown_org");
    op(addr, &["org", "create", "acme"])
        .await
        .refused("org_exists");
    op(addr, &["workspace", "create", "acme", "ws-a"])
        .await
        .refused("workspace_exists");
    op(addr, &["workspace", "delete", "acme", "primary"])
        .await
        .refused("primary_workspace");
    op(addr, &["workspace", "delete", "acme", "ws-z"])
        .await
        .refused("unknown_workspace");
    op(addr, &["credits", "add", "acme", "0"])
        .await
        .refused("invalid_request");
    op(addr, &["ledger", "acme", "--limit", "0"])
        .await
        .refused("invalid_request");
    // An id with a slash stays one (invalid) id instead of reaching another route.
    op(addr, &["org", "show", "acme/ledger"])
        .await
        .refused("invalid_request");
    op(
        addr,
        &["credits", "add", "acme", "5", "--idempotency-key", "k"],
    )
    .await
    .ok();
    op(
        addr,
        &["credits", "add", "acme", "6", "--idempotency-key", "k"],
    )
    .await
    .refused("idempotency_mismatch");
    assert_eq!(node.client.org("acme").await["purchased"], 105);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_and_url_come_from_flags_or_the_environment() {
    let node = TestNode::start().await;
    let addr = node.server.addr();
    let url = url(addr);
    op(addr, &["org", "create", "acme"]).await.ok();

    // No token at all: the node says unauthorized.
    run(&["org", "show", "acme", "--url", &url], &[])
        .await
        .refused("unauthorized");
    run(
        &["org", "show", "acme", "--url", &url, "--token", "wrong"],
        &[],
    )
    .await
    .refused("unauthorized");
    // CREDITD_URL and CREDITD_ADMIN_TOKEN are the defaults; flags win over them.
    let env = [
        ("CREDITD_URL", url.as_str()),
        ("CREDITD_ADMIN_TOKEN", TOKEN),
    ];
    let shown = run(&["org", "show", "acme", "--json"], &env).await.json();
    assert_eq!(shown["org"], "acme");
    run(&["org", "show", "acme", "--token", "wrong"], &env)
        .await
        .refused("unauthorized");
    // Options go before or after the subcommand's arguments.
    let shown = run(
        &[
            "org", "--url", &url, "--json", "show", "acme", "--token", TOKEN,
        ],
        &[],
    )
    .await
    .json();
    assert_eq!(shown["org"], "acme");
    node.stop().await;

    // Nothing listening there any more: exit 1 with the reason.
    let out = run(&["org", "show", "acme"], &env).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.starts_with("error: cannot connect to "),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64() {
    // No node is needed: none of these sends a request (the URL goes nowhere).
    let env = [
        ("CREDITD_URL", "http://127.0.0.1:9"),
        ("CREDITD_ADMIN_TOKEN", TOKEN),
    ];
    let cases: &[&[&str]] = &[
        &["org"],
        &["org", "create"],
        &["org", "create", "acme", "--mode", "pooled"],
        &["credits", "add", "acme"],
        &["credits", "add", "acme", "ten"],
        &["credits", "add", "acme", "-5"],
        &["transfer", "acme", "primary", "ws-a"],
        &["mode", "set", "acme"],
        &["mode", "set", "acme", "both"],
        &["ledger", "acme", "--limit", "many"],
        &["workspace", "rename", "acme", "a", "b"],
        &["org", "show", "acme", "--url", "https://127.0.0.1:8787"],
        &["org", "show", "acme", "--url", "127.0.0.1:8787"],
        &["org", "show", "acme", "--url", "http://127.0.0.1:8787/v1"],
    ];
    for args in cases {
        let out = run(args, &env).await;
        assert_eq!(out.code, Some(EXIT_CONFIG), "creditd {args:?}: {out:?}");
        out.usage_error();
    }
    let help = run(&["transfer", "--help"], &[]).await;
    assert_eq!(help.code, Some(0), "{help:?}");
    assert!(help.stdout.contains("--dry-run"), "{help:?}");
}
