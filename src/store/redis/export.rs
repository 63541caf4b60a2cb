//! Export and import on Redis ([`crate::store::export`]): listing orgs by `SCAN` on every
//! master, one script reading an org whole (`export.lua`), one writing it (`import.lua`).
//!
//! There is no index of orgs: a set beside the orgs' keys would live in another slot of a
//! cluster, and `create_org` could not write both atomically. Listing scans each master for
//! `creditd:{*}:meta`; it is for exports, never for the request path.

use std::collections::BTreeMap;

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::conn::{store_error, Conn};
use super::reply::Tokens;
use super::{org_keys, prefix, status, unexpected, RedisStore};
use crate::model::{NodeId, NodeShare, OrgId, OrgRecord, WorkspaceRecord};
use crate::store::export::{KeyDump, OrgDump};
use crate::store::{ControlOutcome, LedgerEntry, StoreError};

/// Keys asked per `SCAN` call.
const SCAN_COUNT: usize = 1000;

/// `SCAN` rounds per master at most: 10^6 rounds of [`SCAN_COUNT`] is far beyond any store.
const SCAN_ROUNDS_MAX: usize = 1_000_000;

/// The node an imported remembered outcome says held its reservations: a remembered outcome
/// keeps only the org's view, and a view's `held` needs a holder.
const IMPORTED_HOLDER: &str = "imported";

/// The six keys the export and import scripts take.
fn keys(org: &OrgId) -> Vec<String> {
    let mut keys = org_keys(org);
    keys.push(format!("{}idem", prefix(org)));
    keys
}

/// The org of a `creditd:{org}:meta` key.
fn org_of_meta_key(key: &str) -> Option<OrgId> {
    let org = key.strip_prefix("creditd:{")?.strip_suffix("}:meta")?;
    OrgId::parse(org, "org").ok()
}

/// An org state as `state_tokens` of common.lua writes it, so that a remembered outcome
/// imported from another store reads back like one Redis wrote.
fn state_tokens(record: &OrgRecord) -> Vec<String> {
    let mut t = vec![
        "org".to_string(),
        record.org.to_string(),
        record.mode.as_str().to_string(),
        record.primary.to_string(),
        record.purchased.to_string(),
        record.used_deleted.to_string(),
        record.version.to_string(),
        record.workspaces.len().to_string(),
    ];
    for (ws, w) in &record.workspaces {
        t.extend([ws.to_string(), w.balance.to_string(), w.used.to_string()]);
    }
    t.push(record.nodes.len().to_string());
    for (node, s) in &record.nodes {
        t.extend([
            node.to_string(),
            s.epoch.to_string(),
            s.seq.to_string(),
            s.seen_ms.to_string(),
            (s.expired as u8).to_string(),
            (s.last_expired as u8).to_string(),
            s.last_prev_seq.to_string(),
        ]);
        for map in [&s.leases, &s.held, &s.held_from] {
            t.push(map.len().to_string());
            for (ws, n) in map {
                t.extend([ws.to_string(), n.to_string()]);
            }
        }
        t.push(s.last_grants.len().to_string());
        for (ws, n) in &s.last_grants {
            t.extend([ws.to_string(), n.to_string()]);
        }
    }
    t
}

/// A record whose view is `outcome.view`: balances as the view shows them, what is held
/// held by [`IMPORTED_HOLDER`] (from each workspace's own balance).
fn record_of_view(outcome: &ControlOutcome) -> Result<OrgRecord, StoreError> {
    let view = &outcome.view;
    let mut workspaces = BTreeMap::new();
    let mut held = BTreeMap::new();
    let mut used_ws = 0u64;
    for w in &view.workspaces {
        workspaces.insert(
            w.workspace.clone(),
            WorkspaceRecord {
                balance: w.balance,
                used: w.used,
            },
        );
        used_ws = used_ws.saturating_add(w.used);
        if w.held > 0 {
            held.insert(w.workspace.clone(), w.held);
        }
    }
    let mut nodes = BTreeMap::new();
    if !held.is_empty() {
        let holder = NodeId::parse(IMPORTED_HOLDER, "node")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        nodes.insert(
            holder,
            NodeShare {
                held_from: held.clone(),
                held,
                ..NodeShare::default()
            },
        );
    }
    Ok(OrgRecord {
        org: view.org.clone(),
        mode: view.mode,
        primary: view.primary.clone(),
        purchased: view.purchased,
        used_deleted: view.used.saturating_sub(used_ws),
        workspaces,
        nodes,
        version: 0,
    })
}

impl RedisStore {
    /// Every org, by `SCAN` of each master (one, for a standalone Redis).
    pub(super) async fn scan_orgs(&self) -> Result<Vec<OrgId>, StoreError> {
        let redis = &self.inner.redis;
        let mut orgs = Vec::new();
        match &redis.conn {
            Conn::Single(_) => {
                self.scan_one(None, &mut orgs).await?;
            }
            Conn::Cluster(_) => {
                for (host, port) in self.masters().await? {
                    self.scan_one(Some((host, port)), &mut orgs).await?;
                }
            }
        }
        orgs.sort();
        orgs.dedup();
        Ok(orgs)
    }

    /// The masters of the cluster, from `CLUSTER NODES` of any node.
    async fn masters(&self) -> Result<Vec<(String, u16)>, StoreError> {
        let text: String = self
            .route(
                &redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let mut masters = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if !flags.split(',').any(|f| f == "master") {
                continue;
            }
            // Its orgs would be missing from the export without a word: refuse instead.
            if flags.contains("fail") || flags.contains("noaddr") {
                return Err(StoreError::Unavailable(format!(
                    "redis cluster: master {addr} is {flags}; an export needs every master"
                )));
            }
            // ip:port@cport[,hostname]
            let hostport = addr.split('@').next().unwrap_or("");
            if let Some((host, port)) = hostport.rsplit_once(':') {
                if let Ok(port) = port.parse() {
                    masters.push((host.to_string(), port));
                }
            }
        }
        if masters.is_empty() {
            return Err(StoreError::Unavailable(
                "redis cluster: CLUSTER NODES lists no master".into(),
            ));
        }
        Ok(masters)
    }

    /// A command to one node of the cluster (or the standalone server), within the timeout.
    async fn route<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        routing: RoutingInfo,
    ) -> Result<T, StoreError> {
        let redis = &self.inner.redis;
        let Conn::Cluster(c) = &redis.conn else {
            return redis.call("redis_export_scan", cmd).await;
        };
        crate::metrics::store_call("redis_export_scan");
        let value = tokio::time::timeout(redis.call_timeout, c.clone().route_command(cmd, routing))
            .await
            .map_err(|_| StoreError::Unavailable("redis did not answer in time".into()))?
            .map_err(|e| store_error("redis_export_scan", &e))?;
        redis::from_redis_value(&value).map_err(|e| store_error("redis_export_scan", &e))
    }

    /// Scans one master (`None`: the standalone server) for orgs' meta keys.
    async fn scan_one(
        &self,
        node: Option<(String, u16)>,
        orgs: &mut Vec<OrgId>,
    ) -> Result<(), StoreError> {
        let mut cursor = 0u64;
        for _ in 0..SCAN_ROUNDS_MAX {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg("creditd:{*}:meta")
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let routing = match &node {
                Some((host, port)) => RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                }),
                None => RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            };
            let (next, keys): (u64, Vec<String>) = self.route(&cmd, routing).await?;
            orgs.extend(keys.iter().filter_map(|k| org_of_meta_key(k)));
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
        Err(StoreError::Unavailable(format!(
            "SCAN did not finish within {SCAN_ROUNDS_MAX} rounds"
        )))
    }

    pub(super) async fn export_one(&self, org: &OrgId) -> Result<Option<OrgDump>, StoreError> {
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.export, &keys(org), &[org.to_string()])
            .await?;
        let rest = match status(org, None, &tokens)? {
            ("none", _) => return Ok(None),
            ("ok", rest) => rest,
            (other, _) => return Err(unexpected("export", other)),
        };
        let mut t = Tokens::new(rest, "export");
        let bad = |why: String| StoreError::Corrupt(format!("export of org {org}: {why}"));
        let ledger_trimmed = t.u64()?;
        let entries = t.u64()?;
        let mut ledger = Vec::new();
        for _ in 0..entries {
            let json = t.str()?;
            let entry: LedgerEntry =
                serde_json::from_str(json).map_err(|e| bad(format!("ledger entry {json}: {e}")))?;
            ledger.push(entry);
        }
        let count = t.u64()?;
        let mut keys = Vec::new();
        for _ in 0..count {
            let name = t.str()?;
            let fingerprint = t.str()?.to_string();
            let returned = t.u64()?;
            let state: Vec<String> = t.str()?.split(' ').map(str::to_string).collect();
            let score = t.str()?;
            // Scores are doubles; expiry times in ms are well within their exact range.
            let expires_ms = score
                .parse::<f64>()
                .map_err(|_| bad(format!("key {name} expires at `{score}`")))?
                as u64;
            let (scope, key) = name
                .split_once(':')
                .ok_or_else(|| bad(format!("key name `{name}`")))?;
            let record = Tokens::new(&state, "remembered outcome").record(org)?;
            keys.push(KeyDump {
                scope: scope.to_string(),
                key: key.to_string(),
                fingerprint,
                expires_ms,
                outcome: ControlOutcome {
                    view: record.view(),
                    returned,
                    replayed: false,
                },
            });
        }
        let record = t.record(org)?;
        Ok(Some(OrgDump {
            record,
            ledger_trimmed,
            ledger,
            keys,
        }))
    }

    pub(super) async fn import_one(&self, dump: &OrgDump) -> Result<(), StoreError> {
        dump.validate()
            .map_err(|why| StoreError::Corrupt(format!("org {}: {why}", dump.record.org)))?;
        // A ledger longer than this store keeps is trimmed as an append would trim it.
        let mut dump = dump.clone();
        dump.trim_ledger(self.inner.options.ledger_retain);
        let dump = &dump;
        let r = &dump.record;
        let org = &r.org;
        let mut args = vec![
            org.to_string(),
            r.mode.as_str().to_string(),
            r.primary.to_string(),
            r.purchased.to_string(),
            r.used_deleted.to_string(),
            r.version.to_string(),
            r.workspaces.len().to_string(),
        ];
        for (ws, w) in &r.workspaces {
            args.extend([ws.to_string(), w.balance.to_string(), w.used.to_string()]);
        }
        args.push(dump.ledger_trimmed.to_string());
        args.push(dump.ledger.len().to_string());
        for entry in &dump.ledger {
            args.push(
                serde_json::to_string(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        args.push(dump.keys.len().to_string());
        for k in &dump.keys {
            let record = record_of_view(&k.outcome)?;
            args.extend([
                format!("{}:{}", k.scope, k.key),
                k.fingerprint.clone(),
                k.outcome.returned.to_string(),
                state_tokens(&record).join(" "),
                k.expires_ms.to_string(),
            ]);
        }
        let tokens = self
            .inner
            .redis
            .eval(&self.inner.scripts.import, &keys(org), &args)
            .await?;
        match status(org, None, &tokens)? {
            ("ok", _) => Ok(()),
            (other, _) => Err(unexpected("import", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Amount, Mode, WorkspaceId};

    #[test]
    fn a_remembered_view_reads_back_as_the_same_view() {
        let org = OrgId::parse("acme", "org").unwrap();
        let primary = WorkspaceId::parse("primary", "w").unwrap();
        let ws = WorkspaceId::parse("ws-a", "w").unwrap();
        let (mut record, _) = OrgRecord::new(org.clone(), Mode::Budget, primary.clone());
        record.purchase(Amount::new(1_000).unwrap()).unwrap();
        record.create_workspace(ws.clone()).unwrap();
        record
            .transfer(&primary, &ws, Amount::new(300).unwrap())
            .unwrap();
        let mut view = record.view();
        // A view with credits held by reservations and some usage, as a remembered outcome
        // may show.
        for w in &mut view.workspaces {
            if w.workspace == ws {
                w.balance -= 120;
                w.held = 70;
                w.used = 50;
            }
        }
        view.held = 70;
        view.used = 50;
        view.total_credits = 950;
        let outcome = ControlOutcome {
            view: view.clone(),
            returned: 0,
            replayed: false,
        };
        let synthesized = record_of_view(&outcome).unwrap();
        assert!(synthesized.is_conserved());
        let tokens = state_tokens(&synthesized);
        let read = Tokens::new(&tokens, "test").record(&org).unwrap();
        assert_eq!(read.view(), view);
    }

    #[test]
    fn org_ids_come_from_meta_keys_only() {
        assert_eq!(
            org_of_meta_key("creditd:{acme}:meta").map(|o| o.to_string()),
            Some("acme".to_string())
        );
        assert_eq!(org_of_meta_key("creditd:{acme}:bal"), None);
        assert_eq!(org_of_meta_key("creditd:node:n1:epoch"), None);
    }
}
