//! The export format: every org of a store as JSON lines, read back by `import` and `restore`
//! into an empty store of either kind. A backup is an export of a running node.
//!
//! # Lines
//!
//! One JSON object per line, tagged by `line`; an org's lines follow its `org` line:
//!
//! ```text
//! {"line":"creditd_export","format":1}
//! {"line":"org","record":{"org":"acme","mode":"budget","primary":"primary","purchased":…,"used_deleted":…,"workspaces":{"primary":{"balance":…,"used":…}},"nodes":{},"version":…}}
//! {"line":"ledger","org":"acme","entry":{"seq":1,"at_ms":…,"kind":"org_created",…}}
//! {"line":"key","org":"acme","key":{"scope":"purchase","key":"order-1","fingerprint":…,"expires_ms":…,"outcome":{…}}}
//! ```
//!
//! Nothing in a line depends on when or from which store kind it was taken, so an export
//! imported elsewhere and exported again is the same text.
//!
//! # A trimmed ledger
//!
//! A store keeps `ledger_retain` entries per org. An org whose oldest entries were trimmed
//! carries their count on its org line, `"ledger_trimmed":N`, and its ledger lines start at
//! seq N + 1; an import restores the same numbering. The field is left out when nothing was
//! trimmed, so an export of an untrimmed store is the text format 1 always was, and files
//! written before ledgers were trimmed import unchanged. (A creditd older than this refuses a
//! trimmed export: its ledger does not start at seq 1.)
//!
//! # Consistency
//!
//! Each org is read atomically (one redb read transaction; one Lua script on Redis); orgs are
//! independent of each other, so that is a consistent snapshot of every org. What nodes held
//! at that instant (leases, open reservations) is closed in the exported copy the way the
//! store closes a node that died (embedded: back to the balances; Redis: counted as consumed),
//! with its ledger entries: the import starts with no node holding anything, and conservation
//! holds on every exported org. Usage a running node had not settled yet is not in it (at
//! most one settle interval).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use super::{unix_ms, ControlOutcome, LedgerEntry, Store, StoreError};
use crate::model::{OrgId, OrgRecord, PriorLife};

/// Version of the export format in its header line.
pub const FORMAT: u32 = 1;

/// Scopes a remembered idempotency key can have (see [`super::IdempotencyKey`]).
pub const KEY_SCOPES: [&str; 2] = ["purchase", "transfer"];

/// A remembered control-plane idempotency key, still live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDump {
    pub scope: String,
    pub key: String,
    pub fingerprint: String,
    /// When the store forgets the key (ms since the Unix epoch).
    pub expires_ms: u64,
    /// What a retry with the key answers.
    pub outcome: ControlOutcome,
}

/// Everything a store holds about one org, read at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgDump {
    pub record: OrgRecord,
    /// Entries trimmed from the start of the ledger: `ledger` starts at seq
    /// `ledger_trimmed + 1`.
    pub ledger_trimmed: u64,
    /// The ledger as kept, oldest first; entry i (1-based) has `seq` `ledger_trimmed + i`.
    pub ledger: Vec<LedgerEntry>,
    pub keys: Vec<KeyDump>,
}

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "line", rename_all = "snake_case")]
pub enum Line {
    CreditdExport {
        format: u32,
    },
    Org {
        record: OrgRecord,
        /// Entries trimmed from the start of the org's ledger; absent when none were.
        #[serde(default, skip_serializing_if = "is_zero")]
        ledger_trimmed: u64,
    },
    Ledger {
        org: OrgId,
        entry: LedgerEntry,
    },
    Key {
        org: OrgId,
        key: KeyDump,
    },
}

/// Why an export could not be read or imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {line}: {why}")]
    Invalid { line: usize, why: String },
    #[error("org {org}: {why}")]
    Org { org: OrgId, why: String },
    #[error("the target store already holds {count} org(s) (first: {first}); import and restore only fill an empty store")]
    NotEmpty { count: usize, first: OrgId },
    #[error("cannot read the export: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl OrgDump {
    /// Closes what nodes held, as the store closes a node that died, with its ledger entries.
    pub fn close_nodes(&mut self, prior: PriorLife, at_ms: u64) -> Result<(), StoreError> {
        let nodes: Vec<_> = self.record.nodes.keys().cloned().collect();
        for node in nodes {
            for event in self.record.close_node(&node, prior)? {
                let seq = self.ledger_trimmed + self.ledger.len() as u64 + 1;
                self.ledger.push(LedgerEntry { seq, at_ms, event });
            }
        }
        self.record.nodes.clear();
        Ok(())
    }

    /// Drops the oldest entries as a store keeping `retain` would after its last append: down
    /// to `retain` once there are more than [`crate::config::ledger_trim_at`]`(retain)`.
    pub fn trim_ledger(&mut self, retain: u64) {
        let kept = self.ledger.len() as u64;
        if kept > crate::config::ledger_trim_at(retain) {
            let drop = (kept - retain) as usize;
            self.ledger.drain(..drop);
            self.ledger_trimmed += drop as u64;
        }
    }

    /// What an import requires: conserved, no node holdings, a ledger without gaps from seq
    /// `ledger_trimmed + 1`, known scopes.
    pub fn validate(&self) -> Result<(), String> {
        if !self.record.is_conserved() {
            return Err("not conserved (purchased != balances + held + used)".into());
        }
        if !self.record.nodes.is_empty() {
            return Err("nodes hold leases in it; an export never has any".into());
        }
        if !self.record.workspaces.contains_key(&self.record.primary) {
            return Err(format!(
                "its Primary Workspace {} is not among its workspaces",
                self.record.primary
            ));
        }
        let first = self
            .ledger_trimmed
            .checked_add(1)
            .ok_or("ledger_trimmed is too large")?;
        for (i, entry) in self.ledger.iter().enumerate() {
            if Some(entry.seq) != first.checked_add(i as u64) {
                return Err(format!(
                    "ledger entry {} has seq {}; the ledger must have no gap, from seq {first} \
                     ({} trimmed before it)",
                    i + 1,
                    entry.seq,
                    self.ledger_trimmed
                ));
            }
        }
        for key in &self.keys {
            if !KEY_SCOPES.contains(&key.scope.as_str()) {
                return Err(format!(
                    "idempotency key {} has unknown scope {}",
                    key.key, key.scope
                ));
            }
            if key.outcome.view.org != self.record.org {
                return Err(format!(
                    "idempotency key {} remembers an outcome of org {}",
                    key.key, key.outcome.view.org
                ));
            }
        }
        Ok(())
    }

    fn lines(&self) -> Vec<Line> {
        let org = &self.record.org;
        let mut lines = Vec::with_capacity(1 + self.ledger.len() + self.keys.len());
        lines.push(Line::Org {
            record: self.record.clone(),
            ledger_trimmed: self.ledger_trimmed,
        });
        lines.extend(self.ledger.iter().map(|entry| Line::Ledger {
            org: org.clone(),
            entry: entry.clone(),
        }));
        lines.extend(self.keys.iter().map(|key| Line::Key {
            org: org.clone(),
            key: key.clone(),
        }));
        lines
    }
}

/// How a store closes a node that died (see the module's documentation).
pub fn prior_life_of(store: &dyn Store) -> PriorLife {
    match store.kind() {
        "embedded" => PriorLife::ReturnToBalance,
        _ => PriorLife::CountAsConsumed,
    }
}

/// Writes every org of `store` to `out`, orgs in id order; returns how many.
pub async fn export(
    store: &dyn Store,
    out: &mut (impl Write + ?Sized),
) -> Result<usize, StoreError> {
    let failed =
        |e: std::io::Error| StoreError::Unavailable(format!("cannot write the export: {e}"));
    write_line(out, &Line::CreditdExport { format: FORMAT }).map_err(failed)?;
    let mut orgs = store.list_orgs().await?;
    orgs.sort();
    let prior = prior_life_of(store);
    let mut count = 0;
    for org in orgs {
        // An org deleted between the listing and its read is not exported (orgs are never
        // deleted today; the listing may also be older than a creation).
        let Some(mut dump) = store.export_org(&org).await? else {
            continue;
        };
        dump.close_nodes(prior, unix_ms())?;
        for line in dump.lines() {
            write_line(out, &line).map_err(failed)?;
        }
        count += 1;
    }
    Ok(count)
}

fn write_line(out: &mut (impl Write + ?Sized), line: &Line) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

/// Reads and checks a whole export before anything is written anywhere: a bad file changes
/// nothing.
pub fn read(input: impl BufRead) -> Result<Vec<OrgDump>, ImportError> {
    let mut dumps: BTreeMap<OrgId, OrgDump> = BTreeMap::new();
    let mut header = false;
    for (i, text) in input.lines().enumerate() {
        let number = i + 1;
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let invalid = |why: String| ImportError::Invalid { line: number, why };
        let line: Line = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        match line {
            Line::CreditdExport { format } => {
                if format != FORMAT {
                    return Err(invalid(format!(
                        "export format {format}; this creditd reads format {FORMAT}"
                    )));
                }
                header = true;
            }
            _ if !header => {
                return Err(invalid(
                    "the first line must be the header {\"line\":\"creditd_export\",…}".into(),
                ))
            }
            Line::Org {
                record,
                ledger_trimmed,
            } => {
                if dumps.contains_key(&record.org) {
                    return Err(invalid(format!("org {} appears twice", record.org)));
                }
                dumps.insert(
                    record.org.clone(),
                    OrgDump {
                        record,
                        ledger_trimmed,
                        ledger: Vec::new(),
                        keys: Vec::new(),
                    },
                );
            }
            Line::Ledger { org, entry } => match dumps.get_mut(&org) {
                Some(d) => d.ledger.push(entry),
                None => {
                    return Err(invalid(format!(
                        "ledger entry of org {org} before its org line"
                    )))
                }
            },
            Line::Key { org, key } => match dumps.get_mut(&org) {
                Some(d) => d.keys.push(key),
                None => return Err(invalid(format!("key of org {org} before its org line"))),
            },
        }
    }
    if !header {
        return Err(ImportError::Invalid {
            line: 0,
            why: "empty file: not a creditd export".into(),
        });
    }
    for dump in dumps.values() {
        dump.validate().map_err(|why| ImportError::Org {
            org: dump.record.org.clone(),
            why,
        })?;
    }
    Ok(dumps.into_values().collect())
}

/// Loads `dumps` into `store`, which must hold no org; returns how many were loaded.
pub async fn import(store: &dyn Store, dumps: &[OrgDump]) -> Result<usize, ImportError> {
    let mut existing = store.list_orgs().await?;
    existing.sort();
    if let Some(first) = existing.first() {
        return Err(ImportError::NotEmpty {
            count: existing.len(),
            first: first.clone(),
        });
    }
    let now_ms = unix_ms();
    for dump in dumps {
        let mut dump = dump.clone();
        // A key that expired since the export is not brought back.
        dump.keys.retain(|k| k.expires_ms > now_ms);
        store.import_org(&dump).await?;
    }
    Ok(dumps.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, WorkspaceId};

    fn export_text() -> String {
        text_of(&dump())
    }

    fn text_of(dump: &OrgDump) -> String {
        let mut out = Vec::new();
        write_line(&mut out, &Line::CreditdExport { format: FORMAT }).unwrap();
        for line in dump.lines() {
            write_line(&mut out, &line).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    /// An org with a ledger of two entries: seq 1 and 2.
    fn dump() -> OrgDump {
        let org = OrgId::parse("acme", "org").unwrap();
        let primary = WorkspaceId::parse("primary", "w").unwrap();
        let (mut record, created) = OrgRecord::new(org.clone(), Mode::Shared, primary);
        let bought = record
            .purchase(crate::model::Amount::new(100).unwrap())
            .unwrap();
        OrgDump {
            record,
            ledger_trimmed: 0,
            ledger: vec![
                LedgerEntry {
                    seq: 1,
                    at_ms: 1,
                    event: created,
                },
                LedgerEntry {
                    seq: 2,
                    at_ms: 2,
                    event: bought,
                },
            ],
            keys: Vec::new(),
        }
    }

    /// The same org after 40 more purchases of 1, with its ledger trimmed after every append
    /// as a store keeping 10 entries trims it.
    fn trimmed_dump() -> OrgDump {
        let mut d = dump();
        for seq in 3..=42 {
            let event = d
                .record
                .purchase(crate::model::Amount::new(1).unwrap())
                .unwrap();
            d.ledger.push(LedgerEntry {
                seq,
                at_ms: seq,
                event,
            });
            d.trim_ledger(10);
        }
        d
    }

    fn refusal(text: &str) -> String {
        read(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn a_ledger_is_trimmed_as_a_store_trims_it() {
        let d = trimmed_dump();
        // 42 entries; trimmed back to 10 whenever more than 11 were kept: at 12, 22, 32, 42.
        assert_eq!(d.ledger_trimmed, 32);
        assert_eq!(d.ledger.len(), 10);
        assert_eq!(d.ledger[0].seq, 33);
        assert_eq!(d.ledger.last().unwrap().seq, 42);
        assert_eq!(d.record.purchased, 140);
        d.validate().unwrap();
        // Short enough: nothing is trimmed.
        let mut whole = dump();
        whole.trim_ledger(1);
        assert_eq!((whole.ledger_trimmed, whole.ledger.len()), (0, 2));
    }

    #[test]
    fn a_trimmed_ledger_round_trips_with_its_numbering() {
        let d = trimmed_dump();
        let text = text_of(&d);
        assert!(text.contains("\"ledger_trimmed\":32"), "{text}");
        let read = read(text.as_bytes()).unwrap();
        assert_eq!(read, vec![d.clone()]);
        // Exported again, the same text.
        assert_eq!(text_of(&read[0]), text);
    }

    #[test]
    fn an_untrimmed_export_is_the_text_it_always_was() {
        // No `ledger_trimmed` on the org line: files written before trimming read the same.
        let text = export_text();
        assert!(!text.contains("ledger_trimmed"), "{text}");
        assert_eq!(read(text.as_bytes()).unwrap()[0].ledger_trimmed, 0);
    }

    #[test]
    fn a_trimmed_ledger_with_a_gap_or_a_wrong_count_is_refused() {
        let text = text_of(&trimmed_dump());
        // The count says 31 trimmed, but the first entry is seq 33: one is missing.
        let short = text.replace("\"ledger_trimmed\":32", "\"ledger_trimmed\":31");
        assert!(
            refusal(&short).contains("must have no gap, from seq 32"),
            "{}",
            refusal(&short)
        );
        // Without the count, a ledger starting at 33 is not whole.
        let lost = text.replace(",\"ledger_trimmed\":32", "");
        assert!(refusal(&lost).contains("has seq 33"), "{}", refusal(&lost));
        let gap = text.replacen("\"seq\":40", "\"seq\":41", 1);
        assert!(refusal(&gap).contains("has seq 41"), "{}", refusal(&gap));
    }

    #[test]
    fn an_export_reads_back_whole() {
        let dumps = read(export_text().as_bytes()).unwrap();
        assert_eq!(dumps.len(), 1);
        assert_eq!(dumps[0].ledger.len(), 2);
        assert_eq!(dumps[0].record.purchased, 100);
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_line_or_the_org() {
        let text = export_text();
        assert!(refusal("").contains("not a creditd export"));
        let headless: String = text.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert!(refusal(&headless).starts_with("line 1: the first line must be the header"));
        let newer = text.replace("\"format\":1", "\"format\":2");
        assert!(refusal(&newer).contains("export format 2"));
        let garbled = text.replacen("\"line\":\"ledger\"", "\"line\":\"ledgr\"", 1);
        assert!(
            refusal(&garbled).starts_with("line 3:"),
            "{}",
            refusal(&garbled)
        );
        let inflated = text.replacen("\"purchased\":100", "\"purchased\":101", 1);
        assert!(refusal(&inflated).contains("org acme: not conserved"));
        let gap = text.replacen("\"seq\":2", "\"seq\":3", 1);
        assert!(refusal(&gap).contains("has seq 3"), "{}", refusal(&gap));
        let twice = format!("{text}{}\n", text.lines().nth(1).unwrap());
        assert!(refusal(&twice).contains("org acme appears twice"));
    }
}
