//! Human-readable output of the operator commands: aligned tables built from the API's JSON.
//! They read the answer as generic JSON, so that a field added to the API does not break them;
//! `--json` is the stable form for scripts.

use serde_json::Value;

/// Text columns are left-aligned, numbers right-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table with a header row; columns are separated by two spaces, trailing blanks trimmed.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, ((cell, w), (_, align))) in
                cells.iter().zip(&widths).zip(&self.headers).enumerate()
            {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = w.saturating_sub(cell.chars().count());
                match align {
                    Align::Left => {
                        out.push_str(cell);
                        out.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(cell);
                    }
                }
            }
            let trimmed = out.trim_end().len();
            out.truncate(trimmed);
            out.push('\n');
            out
        };
        let mut out = line(self.headers.iter().map(|(h, _)| *h).collect());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// `key  value` lines with the values aligned.
fn pairs(items: &[(&str, String)]) -> String {
    let width = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    items
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// A JSON scalar as a cell: strings without quotes, null and absent as blank.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The org view: its figures, then one row per workspace. `returned_to_primary` (the answer to
/// a deletion) comes first when present.
pub fn org_view(view: &Value) -> String {
    let mut items = Vec::new();
    if let Some(n) = view.get("returned_to_primary") {
        items.push(("returned_to_primary", cell(n)));
    }
    for key in [
        "org",
        "mode",
        "primary",
        "purchased",
        "total_credits",
        "held",
        "used",
    ] {
        items.push((key, cell(&view[key])));
    }
    let mut table = Table::new(&[
        ("WORKSPACE", Align::Left),
        ("PRIMARY", Align::Left),
        ("BALANCE", Align::Right),
        ("HELD", Align::Right),
        ("USED", Align::Right),
    ]);
    for ws in view["workspaces"].as_array().into_iter().flatten() {
        table.row(vec![
            cell(&ws["workspace"]),
            if ws["primary"] == Value::Bool(true) {
                "yes".into()
            } else {
                "no".into()
            },
            cell(&ws["balance"]),
            cell(&ws["held"]),
            cell(&ws["used"]),
        ]);
    }
    format!("{}\n{}", pairs(&items), table.render())
}

/// A transfer's answer: both workspaces' balances after it (or as they would be).
pub fn transfer(answer: &Value) -> String {
    let mut table = Table::new(&[
        ("SIDE", Align::Left),
        ("WORKSPACE", Align::Left),
        ("BALANCE", Align::Right),
    ]);
    for side in ["from", "to"] {
        table.row(vec![
            side.to_string(),
            cell(&answer[side]["workspace"]),
            cell(&answer[side]["balance"]),
        ]);
    }
    let mut out = table.render();
    if answer["dry_run"] == Value::Bool(true) {
        out.push_str("\ndry run: nothing was changed; the balances are as they would be\n");
    }
    out
}

/// The fields of a ledger entry that have a column; any other field goes to DETAIL as
/// `key=value`, so that new entry kinds still show everything.
const LEDGER_COLUMNS: [&str; 8] = [
    "seq",
    "at_ms",
    "kind",
    "workspace",
    "from",
    "to",
    "amount",
    "node",
];

/// A ledger page, oldest first, and how to read on.
pub fn ledger(page: &Value, org: &str) -> String {
    let mut table = Table::new(&[
        ("SEQ", Align::Right),
        ("TIME (UTC)", Align::Left),
        ("KIND", Align::Left),
        ("WORKSPACE", Align::Left),
        ("FROM", Align::Left),
        ("TO", Align::Left),
        ("AMOUNT", Align::Right),
        ("NODE", Align::Left),
        ("DETAIL", Align::Left),
    ]);
    for entry in page["entries"].as_array().into_iter().flatten() {
        let time = entry["at_ms"]
            .as_u64()
            .map(utc_millis)
            .unwrap_or_else(|| cell(&entry["at_ms"]));
        let detail = entry
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !LEDGER_COLUMNS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(" ");
        table.row(vec![
            cell(&entry["seq"]),
            time,
            cell(&entry["kind"]),
            cell(&entry["workspace"]),
            cell(&entry["from"]),
            cell(&entry["to"]),
            cell(&entry["amount"]),
            cell(&entry["node"]),
            detail,
        ]);
    }
    let mut out = table.render();
    if let Some(trimmed) = page["trimmed"].as_u64().filter(|n| *n > 0) {
        out.push_str(&format!(
            "\ntrimmed: the {trimmed} oldest entries are no longer kept (ledger_retain); the \
             first kept is seq {}. The totals still count them.\n",
            trimmed + 1
        ));
    }
    if let Some(next) = page["next"].as_u64() {
        out.push_str(&format!("\nmore: creditd ledger {org} --after {next}\n"));
    }
    out
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
pub fn utc_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`, for
/// non-negative day counts only (ledger times are never before 1970).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let mut t = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        t.row(vec!["a".into(), "1000".into()]);
        t.row(vec!["longer".into(), "7".into()]);
        assert_eq!(t.render(), "NAME       N\na       1000\nlonger     7\n");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_millis(1_732_440_001_000), "2024-11-24T09:20:01.000Z");
    }

    #[test]
    fn ledger_puts_unknown_fields_in_detail() {
        let page = json!({"entries": [
            {"seq": 1, "at_ms": 0, "kind": "org_created", "mode": "budget", "primary": "main"},
        ], "next": 1});
        let out = ledger(&page, "acme");
        assert!(out.contains("mode=budget primary=main"), "{out}");
        assert!(out.contains("creditd ledger acme --after 1"), "{out}");
        assert!(!out.contains("trimmed"), "{out}");
    }

    #[test]
    fn ledger_says_what_was_trimmed() {
        let page = json!({"entries": [
            {"seq": 41, "at_ms": 0, "kind": "purchase", "workspace": "main", "amount": 5},
        ], "next": null, "trimmed": 40});
        let out = ledger(&page, "acme");
        assert!(out.contains("the 40 oldest entries"), "{out}");
        assert!(out.contains("first kept is seq 41"), "{out}");
    }
}
