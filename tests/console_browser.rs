//! Proves the web console works for a person in a real browser: headless Chromium, driven over
//! WebDriver, walks the product's example through the Workspaces tab (10,000 purchased, 2,000 to
//! A and 3,000 to B through Manage Credits, the Primary shows 5,000, an over-transfer refused
//! with the server's message, deleting B returns its credits, Shared Pool sweeps A), partly by
//! keyboard alone, finding every control by its accessible name, and checks each step against
//! the API.
//!
//! Screenshots are saved under `target/tmp/console-screenshots/`. Chromium and chromedriver
//! (Debian's `chromium` and `chromium-driver`) must be installed: without them this test fails.

mod common;

use common::webdriver;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{assert_conserved, balance, Client, TestNode, TOKEN};
use hyper::StatusCode;
use serde_json::{json, Value};
use webdriver::{keys, Browser, Element, WAIT};

/// The whole walk must stay well inside this on a slow, busy 2-core machine.
const WALK_DURATION_MAX: Duration = Duration::from_secs(120);

fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

/// Waits for a displayed control matching `css` whose accessible name is `name`.
async fn control(b: &Browser, css: &str, name: &str) -> Element {
    let what = format!("a {css} named {name:?}");
    b.until(&what, WAIT, move || {
        Box::pin(async move {
            match b.find_named(css, name).await {
                Ok(Some(e)) => Ok(e),
                Ok(None) => Err(format!(
                    "names shown: {:?}",
                    b.names(css).await.unwrap_or_default()
                )),
                Err(e) => Err(e.to_string()),
            }
        })
    })
    .await
}

/// Clicks the control named `name`, waiting until it is there and enabled.
async fn click(b: &Browser, css: &str, name: &str) {
    let what = format!("click the {css} named {name:?}");
    b.until(&what, WAIT, move || {
        Box::pin(async move {
            let Some(e) = b.find_named(css, name).await.map_err(|e| e.to_string())? else {
                return Err("not shown".into());
            };
            if !b.enabled(&e).await.map_err(|e| e.to_string())? {
                return Err("disabled".into());
            }
            b.click(&e).await.map_err(|e| e.to_string())
        })
    })
    .await
}

/// Replaces the text of the field labelled `label`.
async fn fill(b: &Browser, label: &str, text: &str) {
    let field = control(b, "input", label).await;
    b.clear(&field).await.expect("clear");
    b.send_keys(&field, text).await.expect("type");
}

/// Chooses the option shown as `option` in the `select` labelled `label`.
async fn choose(b: &Browser, label: &str, option: &str) {
    let what = format!("choose {option:?} in the select labelled {label:?}");
    b.until(&what, WAIT, move || {
        Box::pin(async move {
            let err = |e: webdriver::WdError| e.to_string();
            let Some(select) = b.find_named("select", label).await.map_err(err)? else {
                return Err("no such select shown".into());
            };
            let mut shown = Vec::new();
            for o in b.find_all_in(&select, "option").await.map_err(err)? {
                let text = b.text(&o).await.map_err(err)?;
                if text == option {
                    return b.click(&o).await.map_err(err);
                }
                shown.push(text);
            }
            Err(format!("options: {shown:?}"))
        })
    })
    .await
}

/// The rows of the displayed workspaces table: workspace -> column header -> cell text.
async fn table(b: &Browser) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let script = "const out = {};
        for (const t of document.querySelectorAll('table')) {
          if (!t.offsetParent || !t.tHead) continue;
          const heads = Array.from(t.tHead.rows[0].cells, (c) => c.textContent.trim());
          if (!heads.includes('Balance')) continue;
          for (const r of t.tBodies[0].rows) {
            const cells = Array.from(r.cells, (c) => c.textContent.trim());
            out[cells[0]] = Object.fromEntries(heads.map((h, i) => [h, cells[i]]));
          }
        }
        return out;";
    let v = b
        .execute(script, json!([]))
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Waits until the table shows exactly these workspaces with these balances.
async fn wait_balances(b: &Browser, expected: &[(&str, u64)]) {
    let want: BTreeMap<String, String> = expected
        .iter()
        .map(|(ws, n)| (ws.to_string(), n.to_string()))
        .collect();
    let what = format!("the workspaces table shows balances {want:?}");
    b.until(&what, WAIT, || {
        let want = want.clone();
        Box::pin(async move {
            let rows = table(b).await?;
            let shown: BTreeMap<String, String> = rows
                .iter()
                .map(|(ws, cells)| (ws.clone(), cells["Balance"].clone()))
                .collect();
            if shown == want {
                Ok(())
            } else {
                Err(format!("{shown:?}"))
            }
        })
    })
    .await
}

/// Waits until the totals above the table show these figures.
async fn wait_totals(b: &Browser, expected: &[(&str, u64)]) {
    let what = format!("the totals show {expected:?}");
    b.until(&what, WAIT, || {
        Box::pin(async move {
            let script = "return Object.fromEntries(Array.from(document.querySelectorAll('dt'),
                (dt) => [dt.textContent.trim(), dt.nextElementSibling.textContent.trim()]));";
            let shown = b
                .execute(script, json!([]))
                .await
                .map_err(|e| e.to_string())?;
            for (name, n) in expected {
                if shown[*name].as_str().and_then(|t| t.parse::<u64>().ok()) != Some(*n) {
                    return Err(format!("{shown}"));
                }
            }
            Ok(())
        })
    })
    .await
}

/// The cell of `column` in the row of `ws`.
async fn cell(b: &Browser, ws: &str, column: &str) -> String {
    let rows = table(b).await.expect("table");
    rows.get(ws)
        .and_then(|r| r.get(column))
        .unwrap_or_else(|| panic!("no {column} for {ws} in {rows:?}"))
        .clone()
}

/// The open dialog (role dialog, displayed), once there is one.
async fn open_dialog(b: &Browser) -> Element {
    b.until("a dialog is open", WAIT, || {
        Box::pin(async move { shown_dialog(b).await?.ok_or_else(|| "none".to_string()) })
    })
    .await
}

async fn shown_dialog(b: &Browser) -> Result<Option<Element>, String> {
    for d in b
        .find_all("[role=dialog]")
        .await
        .map_err(|e| e.to_string())?
    {
        if b.displayed(&d).await.map_err(|e| e.to_string())? {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

async fn wait_no_dialog(b: &Browser) {
    b.until("every dialog is closed", WAIT, || {
        Box::pin(async move {
            match shown_dialog(b).await? {
                None => Ok(()),
                Some(d) => Err(b.text(&d).await.unwrap_or_default()),
            }
        })
    })
    .await
}

/// Waits until the text of the displayed element `css` named `name` (or any displayed `css`
/// when `name` is empty) contains `fragment`; returns the whole text.
async fn wait_text(b: &Browser, css: &str, name: &str, fragment: &str) -> String {
    let what = format!("{css} {name:?} shows {fragment:?}");
    b.until(&what, WAIT, move || {
        Box::pin(async move {
            let mut seen = Vec::new();
            for e in b.find_all(css).await.map_err(|e| e.to_string())? {
                if !b.displayed(&e).await.map_err(|e| e.to_string())? {
                    continue;
                }
                if !name.is_empty() && b.label(&e).await.map_err(|e| e.to_string())? != name {
                    continue;
                }
                let text = b.text(&e).await.map_err(|e| e.to_string())?;
                if text.contains(fragment) {
                    return Ok(text);
                }
                seen.push(text);
            }
            Err(format!("{seen:?}"))
        })
    })
    .await
}

/// Waits until the focused element's accessible name is `name`; returns it.
async fn wait_focus(b: &Browser, name: &str) -> Element {
    let what = format!("focus on {name:?}");
    b.until(&what, WAIT, move || {
        Box::pin(async move {
            let active = b.active().await.map_err(|e| e.to_string())?;
            let label = b.label(&active).await.map_err(|e| e.to_string())?;
            if label == name {
                Ok(active)
            } else {
                Err(format!("focus on {label:?}"))
            }
        })
    })
    .await
}

/// The accessible names of the items of the open menu.
async fn menu_items(b: &Browser) -> Vec<String> {
    b.until("a menu with items is shown", WAIT, || {
        Box::pin(async move {
            let names = b
                .names("[role=menu] [role=menuitem]")
                .await
                .map_err(|e| e.to_string())?;
            if names.is_empty() {
                Err("no menu".into())
            } else {
                Ok(names)
            }
        })
    })
    .await
}

async fn select_value(b: &Browser, label: &str) -> Value {
    let select = control(b, "select", label).await;
    b.property(&select, "value").await.expect("value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_product_example_through_the_workspaces_tab() {
    let started = Instant::now();
    let node = TestNode::start().await;
    let c = &node.client;
    let base = format!("http://{}/console/", node.server.addr());
    // Only this run's screenshots (a failed wait adds one named after it).
    let _ = std::fs::remove_dir_all(artifacts());
    let b = Browser::start(&artifacts()).await;

    sign_in(&b, &base).await;
    create_org_and_buy(&b, c).await;
    allocate_with_manage_credits(&b, c).await;
    over_transfer_is_refused(&b, c).await;
    delete_returns_credits(&b, c).await;
    switch_modes(&b, c).await;
    live_refresh_and_ledger(&b, c).await;
    org_from_the_address(&b, c, &base).await;

    // Nothing the page did was refused by its Content-Security-Policy, and no script failed.
    let log = b.console_log().await;
    for (level, message) in &log {
        assert!(
            !message.contains("Content Security Policy") && !message.contains("Uncaught"),
            "browser console: {level} {message}"
        );
    }
    b.quit().await;
    node.stop().await;
    let took = started.elapsed();
    println!(
        "console walk took {took:?}; screenshots in {}",
        artifacts().display()
    );
    assert!(
        took < WALK_DURATION_MAX,
        "the walk took {took:?}, over {WALK_DURATION_MAX:?}"
    );
}

/// A wrong token is refused with the server's message; the right one opens the console and is
/// kept in the tab's session storage only, never in the page.
async fn sign_in(b: &Browser, base: &str) {
    b.navigate(base).await;
    let token = control(b, "input", "Admin token").await;
    assert_eq!(b.property(&token, "type").await.unwrap(), "password");
    fill(b, "Admin token", "not-the-token").await;
    click(b, "button", "Sign in").await;
    let alert = wait_text(b, "[role=alert]", "", "wrong admin token").await;
    assert_eq!(alert, "The admin token was refused: wrong admin token");
    fill(b, "Admin token", TOKEN).await;
    click(b, "button", "Sign in").await;
    control(b, "select", "Organization").await;
    let stored = b
        .execute(
            "return [document.documentElement.outerHTML, JSON.stringify(localStorage), \
             Object.values(sessionStorage)];",
            json!([]),
        )
        .await
        .expect("read storage");
    assert!(
        !stored[0].as_str().unwrap().contains(TOKEN),
        "token in the page"
    );
    assert!(
        !stored[1].as_str().unwrap().contains(TOKEN),
        "token in localStorage"
    );
    assert_eq!(
        stored[2],
        json!([TOKEN]),
        "the token is kept in sessionStorage"
    );
}

/// Creates the org in Workspace Budget mode, buys 10,000 credits and creates A and B.
async fn create_org_and_buy(b: &Browser, c: &Client) {
    fill(b, "New organization", "acme").await;
    choose(b, "Starting mode", "Workspace Budget").await;
    click(b, "button", "Create organization").await;
    wait_balances(b, &[("primary", 0)]).await;
    assert_eq!(cell(b, "primary", "Role").await, "Primary");
    assert_eq!(select_value(b, "Credit mode").await, "budget");
    assert_eq!(select_value(b, "Organization").await, "acme");
    assert!(b.current_url().await.ends_with("/console/?org=acme"));

    fill(b, "Credits to add", "10000").await;
    click(b, "button", "Add credits").await;
    wait_balances(b, &[("primary", 10000)]).await;
    wait_totals(
        b,
        &[("Purchased", 10000), ("Available", 10000), ("Used", 0)],
    )
    .await;
    for ws in ["ws-a", "ws-b"] {
        fill(b, "New workspace", ws).await;
        click(b, "button", "Create workspace").await;
    }
    wait_balances(b, &[("primary", 10000), ("ws-a", 0), ("ws-b", 0)]).await;
    assert_eq!(
        cell(b, "ws-a", "Role").await,
        "",
        "only the Primary is marked"
    );
    let view = c.org("acme").await;
    assert_eq!(view["mode"], "budget");
    assert_eq!(view["purchased"], 10000);
}

/// 2,000 to A with the mouse, 3,000 to B with the keyboard alone; the Primary shows 5,000.
async fn allocate_with_manage_credits(b: &Browser, c: &Client) {
    click(b, "button", "Actions for ws-a").await;
    assert_eq!(menu_items(b).await, ["Manage Credits", "Delete workspace"]);
    click(b, "[role=menuitem]", "Manage Credits").await;
    let dialog = open_dialog(b).await;
    assert_eq!(b.role(&dialog).await.unwrap(), "dialog");
    assert_eq!(b.label(&dialog).await.unwrap(), "Manage Credits: ws-a");
    choose(b, "Source workspace", "primary (10000 available)").await;
    fill(b, "Amount", "2000").await;
    let preview = wait_text(
        b,
        "[role=region]",
        "Updated balances",
        "primary: 10000 → 8000",
    )
    .await;
    assert!(preview.contains("ws-a: 0 → 2000"), "{preview}");
    b.screenshot("manage-credits-preview").await;
    click(b, "button", "Transfer").await;
    wait_no_dialog(b).await;
    wait_balances(b, &[("primary", 8000), ("ws-a", 2000), ("ws-b", 0)]).await;

    // Keyboard only: the menu button, Enter, Enter on "Manage Credits", Tab to the amount
    // (the source is the Primary by default), type, Enter.
    let actions = control(b, "button", "Actions for ws-b").await;
    assert_eq!(b.role(&actions).await.unwrap(), "button");
    assert_eq!(b.property(&actions, "ariaHasPopup").await.unwrap(), "menu");
    b.send_keys(&actions, keys::ENTER).await.expect("Enter");
    let item = wait_focus(b, "Manage Credits").await;
    b.send_keys(&item, keys::ENTER).await.expect("Enter");
    let source = wait_focus(b, "Source workspace").await;
    assert_eq!(b.property(&source, "value").await.unwrap(), "primary");
    b.send_keys(&source, keys::TAB).await.expect("Tab");
    let amount = wait_focus(b, "Amount").await;
    b.send_keys(&amount, "3000").await.expect("type");
    let preview = wait_text(
        b,
        "[role=region]",
        "Updated balances",
        "primary: 8000 → 5000",
    )
    .await;
    assert!(preview.contains("ws-b: 0 → 3000"), "{preview}");
    b.send_keys(&amount, keys::ENTER).await.expect("Enter");
    wait_no_dialog(b).await;
    wait_balances(b, &[("primary", 5000), ("ws-a", 2000), ("ws-b", 3000)]).await;
    wait_focus(b, "Actions for ws-b").await;
    wait_text(
        b,
        "[role=status]",
        "",
        "Transferred 3000 credits from primary to ws-b",
    )
    .await;
    b.screenshot("workspaces-budget").await;

    let view = c.org("acme").await;
    assert_eq!(balance(&view, "primary"), 5000, "{view}");
    assert_eq!(balance(&view, "ws-a"), 2000, "{view}");
    assert_eq!(balance(&view, "ws-b"), 3000, "{view}");
    assert_conserved(&view);
}

/// More than the source holds: the server's message is shown and nothing moves.
async fn over_transfer_is_refused(b: &Browser, c: &Client) {
    let refusal = c
        .post(
            "/v1/orgs/acme/transfers",
            json!({"from": "primary", "to": "ws-a", "amount": 6000, "dry_run": true}),
        )
        .await;
    assert_eq!(refusal.status, StatusCode::CONFLICT, "{}", refusal.text);
    let message = refusal.body["message"].as_str().unwrap().to_string();
    let before = c.org("acme").await;

    click(b, "button", "Actions for ws-a").await;
    click(b, "[role=menuitem]", "Manage Credits").await;
    open_dialog(b).await;
    fill(b, "Amount", "6000").await;
    click(b, "button", "Transfer").await;
    let alert = wait_text(b, "[role=dialog] [role=alert]", "", &message).await;
    assert_eq!(alert, message);
    open_dialog(b).await;
    b.screenshot("over-transfer-refused").await;
    assert_eq!(
        c.org("acme").await,
        before,
        "a refused transfer changed the org"
    );
    let amount = control(b, "input", "Amount").await;
    b.send_keys(&amount, keys::ESCAPE).await.expect("Escape");
    wait_no_dialog(b).await;
    wait_focus(b, "Actions for ws-a").await;
}

/// The Primary has no delete action; deleting B says and does what returns to the Primary.
async fn delete_returns_credits(b: &Browser, c: &Client) {
    click(b, "button", "Actions for primary").await;
    assert_eq!(menu_items(b).await, ["Manage Credits"]);
    let item = wait_focus(b, "Manage Credits").await;
    b.send_keys(&item, keys::ESCAPE).await.expect("Escape");
    wait_focus(b, "Actions for primary").await;

    // By keyboard: Enter opens the menu, ArrowDown moves to "Delete workspace", Enter asks for
    // confirmation with the confirming button focused, Enter confirms.
    let actions = control(b, "button", "Actions for ws-b").await;
    b.send_keys(&actions, keys::ENTER).await.expect("Enter");
    let item = wait_focus(b, "Manage Credits").await;
    b.send_keys(&item, keys::ARROW_DOWN)
        .await
        .expect("ArrowDown");
    let item = wait_focus(b, "Delete workspace").await;
    b.send_keys(&item, keys::ENTER).await.expect("Enter");
    let dialog = open_dialog(b).await;
    let text = b.text(&dialog).await.unwrap();
    assert!(
        text.contains("3000 credits return to the Primary (primary)"),
        "{text}"
    );
    let confirm = wait_focus(b, "Delete workspace").await;
    assert_eq!(b.role(&confirm).await.unwrap(), "button");
    b.send_keys(&confirm, keys::ENTER).await.expect("Enter");
    wait_no_dialog(b).await;
    wait_balances(b, &[("primary", 8000), ("ws-a", 2000)]).await;
    wait_text(b, "[role=status]", "", "3000 credits returned to primary").await;
    let view = c.org("acme").await;
    assert_eq!(balance(&view, "primary"), 8000, "{view}");
    assert_conserved(&view);
}

/// Switching to Shared Pool says what moves and sweeps A into the Primary; in Shared Pool mode
/// Manage Credits explains that transfers need Workspace Budget mode; a cancelled switch moves
/// nothing.
async fn switch_modes(b: &Browser, c: &Client) {
    choose(b, "Credit mode", "Shared Pool").await;
    let dialog = open_dialog(b).await;
    let text = b.text(&dialog).await.unwrap();
    assert!(
        text.contains(
            "all workspace balances return to the Primary (2000 credits move to primary)"
        ),
        "{text}"
    );
    b.screenshot("switch-to-shared-pool").await;
    click(b, "[role=dialog] button", "Switch to Shared Pool").await;
    wait_no_dialog(b).await;
    wait_balances(b, &[("primary", 10000), ("ws-a", 0)]).await;
    assert_eq!(select_value(b, "Credit mode").await, "shared");
    let view = c.org("acme").await;
    assert_eq!(view["mode"], "shared");
    assert_eq!(balance(&view, "primary"), 10000, "{view}");

    click(b, "button", "Actions for ws-a").await;
    click(b, "[role=menuitem]", "Manage Credits").await;
    let dialog = open_dialog(b).await;
    let text = b.text(&dialog).await.unwrap();
    assert!(
        text.contains("Transfers need Workspace Budget mode"),
        "{text}"
    );
    let transfer = control(b, "button", "Transfer").await;
    assert!(
        !b.enabled(&transfer).await.unwrap(),
        "Transfer is enabled in Shared Pool mode"
    );
    click(b, "[role=dialog] button", "Cancel").await;
    wait_no_dialog(b).await;

    choose(b, "Credit mode", "Workspace Budget").await;
    let dialog = open_dialog(b).await;
    let text = b.text(&dialog).await.unwrap();
    assert!(
        text.contains("workspaces start at 0 until credits are assigned"),
        "{text}"
    );
    click(b, "[role=dialog] button", "Cancel").await;
    wait_no_dialog(b).await;
    assert_eq!(select_value(b, "Credit mode").await, "shared");
    assert_eq!(c.org("acme").await["mode"], "shared");
}

/// Usage from the data plane appears without a reload; the ledger pages match the API's.
async fn live_refresh_and_ledger(b: &Browser, c: &Client) {
    let a = c.debit("acme", "ws-a", 25).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    wait_balances(b, &[("primary", 9975), ("ws-a", 0)]).await;
    wait_totals(
        b,
        &[("Purchased", 10000), ("Available", 9975), ("Used", 25)],
    )
    .await;
    b.until("ws-a's usage is shown", WAIT, || {
        Box::pin(async move {
            let rows = table(b).await?;
            let used = rows
                .get("ws-a")
                .and_then(|r| r.get("Used"))
                .cloned()
                .unwrap_or_default();
            if used == "25" {
                Ok(())
            } else {
                Err(used)
            }
        })
    })
    .await;

    click(b, "[role=tab]", "Ledger").await;
    fill(b, "Entries per page", "4").await;
    click(b, "button", "Show").await;
    let api_page = |after: Option<u64>| async move {
        let path = match after {
            None => "/v1/orgs/acme/ledger?limit=4".to_string(),
            Some(a) => format!("/v1/orgs/acme/ledger?limit=4&after={a}"),
        };
        let page = c.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        page.body
    };
    let first = api_page(None).await;
    wait_ledger(b, &first).await;
    b.screenshot("ledger").await;
    click(b, "button", "Next page").await;
    let next = first["next"].as_u64();
    assert!(
        next.is_some(),
        "the ledger has more than 4 entries: {first}"
    );
    let second = api_page(next).await;
    wait_ledger(b, &second).await;
    click(b, "button", "Previous page").await;
    wait_ledger(b, &first).await;
    click(b, "[role=tab]", "Workspaces").await;
    control(b, "select", "Credit mode").await;
}

/// Waits until the ledger table shows exactly the sequence numbers of `page`.
async fn wait_ledger(b: &Browser, page: &Value) {
    let want: Vec<String> = page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["seq"].to_string())
        .collect();
    assert!(!want.is_empty(), "an empty ledger page: {page}");
    let what = format!("the ledger shows entries {want:?}");
    b.until(&what, WAIT, || {
        let want = want.clone();
        Box::pin(async move {
            let script = "const t = document.getElementById('ledger');
                return t.offsetParent ? Array.from(t.tBodies[0].rows, (r) => r.cells[0].textContent) : [];";
            let shown: Vec<String> = serde_json::from_value(
                b.execute(script, json!([]))
                    .await
                    .map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            if shown == want {
                Ok(())
            } else {
                Err(format!("{shown:?}"))
            }
        })
    })
    .await;
}

/// `/console/?org={org}` opens that org; the picker then lists both and switches between them.
async fn org_from_the_address(b: &Browser, c: &Client, base: &str) {
    c.create_org("beta", "shared").await;
    c.purchase("beta", 700).await;
    b.navigate(&format!("{base}?org=beta")).await;
    wait_balances(b, &[("primary", 700)]).await;
    assert_eq!(select_value(b, "Organization").await, "beta");
    choose(b, "Organization", "acme").await;
    wait_balances(b, &[("primary", 9975), ("ws-a", 0)]).await;
    assert!(b.current_url().await.ends_with("/console/?org=acme"));
}
