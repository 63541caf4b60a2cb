//! Reading the scripts' replies: flat arrays of strings (see `state_tokens` in common.lua) into
//! an [`OrgRecord`], and `{'err', code, ...}` into the same errors the embedded store gives.

use std::collections::BTreeMap;

use crate::model::{
    Mode, NodeId, NodeShare, OrgId, OrgRecord, RuleError, SettleView, SpenderView, WorkspaceId,
    WorkspaceRecord,
};
use crate::store::StoreError;

/// A reader over a reply's tokens.
pub(super) struct Tokens<'a> {
    items: &'a [String],
    pos: usize,
    /// The script, for error messages.
    what: &'static str,
}

impl<'a> Tokens<'a> {
    pub fn new(items: &'a [String], what: &'static str) -> Self {
        Tokens {
            items,
            pos: 0,
            what,
        }
    }

    fn bad(&self, why: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(format!(
            "unexpected reply of {} at token {}: {why}",
            self.what, self.pos
        ))
    }

    pub fn str(&mut self) -> Result<&'a str, StoreError> {
        let item = self
            .items
            .get(self.pos)
            .ok_or_else(|| self.bad("reply too short"))?;
        self.pos += 1;
        Ok(item)
    }

    pub fn u64(&mut self) -> Result<u64, StoreError> {
        let s = self.str()?;
        s.parse::<u64>()
            .map_err(|_| self.bad(format!("`{s}` is not a count")))
    }

    /// A count of items that follow, each of `width` tokens: never more than the reply holds.
    fn count(&mut self, width: usize) -> Result<usize, StoreError> {
        let n = self.u64()?;
        let left = (self.items.len() - self.pos) as u64;
        if n.saturating_mul(width as u64) > left {
            return Err(self.bad(format!("count {n} exceeds the reply")));
        }
        Ok(n as usize)
    }

    pub fn flag(&mut self) -> Result<bool, StoreError> {
        match self.str()? {
            "1" => Ok(true),
            "0" => Ok(false),
            other => Err(self.bad(format!("`{other}` is not 0 or 1"))),
        }
    }

    fn workspace(&mut self) -> Result<WorkspaceId, StoreError> {
        let s = self.str()?;
        WorkspaceId::parse(s, "workspace").map_err(|_| self.bad(format!("bad workspace `{s}`")))
    }

    fn node(&mut self) -> Result<NodeId, StoreError> {
        let s = self.str()?;
        NodeId::parse(s, "node").map_err(|_| self.bad(format!("bad node `{s}`")))
    }

    fn mode(&mut self) -> Result<Mode, StoreError> {
        let s = self.str()?;
        Mode::parse(s).ok_or_else(|| self.bad(format!("bad mode `{s}`")))
    }

    /// `n` then `n` pairs of (workspace, amount), in order.
    pub fn pairs(&mut self) -> Result<Vec<(WorkspaceId, u64)>, StoreError> {
        let n = self.count(2)?;
        (0..n)
            .map(|_| Ok((self.workspace()?, self.u64()?)))
            .collect()
    }

    fn map(&mut self) -> Result<BTreeMap<WorkspaceId, u64>, StoreError> {
        Ok(self.pairs()?.into_iter().collect())
    }

    /// A settle's view (settle.lua's reply after its grants), which must be the rest of the
    /// reply: the org's version, then the view.
    pub fn settle_view(&mut self) -> Result<(u64, SettleView), StoreError> {
        let version = self.u64()?;
        let epoch = self.u64()?;
        let seq = self.u64()?;
        let seen_ms = self.u64()?;
        let mut spenders = Vec::new();
        for _ in 0..self.count(3)? {
            let spender = self.workspace()?;
            let left = self.u64()?;
            let mut others = Vec::new();
            for _ in 0..self.count(3)? {
                let node = self.node()?;
                let seen = self.u64()?;
                others.push((node, seen, self.u64()?));
            }
            spenders.push(SpenderView {
                spender,
                left,
                others,
            });
        }
        if self.pos != self.items.len() {
            return Err(self.bad("tokens left after the settle view"));
        }
        Ok((
            version,
            SettleView {
                epoch,
                seq,
                seen_ms,
                spenders,
            },
        ))
    }

    /// The org's whole state, which must be the rest of the reply, for org `org`, conserved.
    pub fn record(&mut self, org: &OrgId) -> Result<OrgRecord, StoreError> {
        if self.str()? != "org" {
            return Err(self.bad("state does not start with `org`"));
        }
        let id = self.str()?;
        if id != org.as_str() {
            return Err(self.bad(format!("state of org `{id}`, expected `{org}`")));
        }
        let mode = self.mode()?;
        let primary = self.workspace()?;
        let purchased = self.u64()?;
        let used_deleted = self.u64()?;
        let version = self.u64()?;
        let mut workspaces = BTreeMap::new();
        for _ in 0..self.count(3)? {
            let ws = self.workspace()?;
            let balance = self.u64()?;
            let used = self.u64()?;
            workspaces.insert(ws, WorkspaceRecord { balance, used });
        }
        let mut nodes = BTreeMap::new();
        for _ in 0..self.count(11)? {
            let node = self.node()?;
            let epoch = self.u64()?;
            let seq = self.u64()?;
            let seen_ms = self.u64()?;
            let expired = self.flag()?;
            let last_expired = self.flag()?;
            let last_prev_seq = self.u64()?;
            let leases = self.map()?;
            let held = self.map()?;
            let held_from = self.map()?;
            let last_grants = self.pairs()?;
            nodes.insert(
                node,
                NodeShare {
                    leases,
                    held,
                    held_from,
                    epoch,
                    seq,
                    last_grants,
                    seen_ms,
                    expired,
                    last_expired,
                    last_prev_seq,
                },
            );
        }
        if self.pos != self.items.len() {
            return Err(self.bad("tokens left after the state"));
        }
        let record = OrgRecord {
            org: org.clone(),
            mode,
            primary,
            purchased,
            used_deleted,
            workspaces,
            nodes,
            version,
        };
        if !record.workspaces.contains_key(&record.primary) || !record.is_conserved() {
            return Err(StoreError::Corrupt(format!(
                "org {org} read from redis is not conserved or has no Primary"
            )));
        }
        Ok(record)
    }
}

/// The error a script's `{'err', code, ...}` reply stands for; `tokens` starts at the code.
/// `key` is the idempotency key of the call, if any.
pub(super) fn refusal(org: &OrgId, key: Option<&str>, tokens: &[String]) -> StoreError {
    let mut t = Tokens::new(tokens, "refusal");
    let parsed = (|| -> Result<StoreError, StoreError> {
        let code = t.str()?;
        Ok(match code {
            "unknown_org" => StoreError::UnknownOrg(org.clone()),
            "org_exists" => StoreError::OrgExists(org.clone()),
            "unknown_workspace" => RuleError::UnknownWorkspace(t.workspace()?).into(),
            "workspace_exists" => RuleError::WorkspaceExists(t.workspace()?).into(),
            "primary_workspace" => RuleError::PrimaryWorkspace(t.workspace()?).into(),
            "wrong_mode" => RuleError::WrongMode(t.mode()?).into(),
            "same_workspace" => RuleError::SameWorkspace.into(),
            "insufficient" => RuleError::InsufficientCredits {
                workspace: t.workspace()?,
                available: t.u64()?,
                wanted: t.u64()?,
            }
            .into(),
            "leases_outstanding" => RuleError::LeasesOutstanding {
                workspace: t.workspace()?,
                leased: t.u64()?,
            }
            .into(),
            "overflow" => RuleError::Overflow.into(),
            "batch_refused" => RuleError::BatchRefused(t.str()?.to_string()).into(),
            "stale_epoch" => RuleError::StaleEpoch {
                batch: t.u64()?,
                current: t.u64()?,
            }
            .into(),
            "idempotency_mismatch" => {
                StoreError::IdempotencyMismatch(key.unwrap_or_default().to_string())
            }
            "limit_exceeded" => StoreError::LimitExceeded(format!(
                "idempotency keys remembered reached the limit of {}",
                t.str()?
            )),
            "invalid" => {
                StoreError::Corrupt(format!("a script refused its arguments: {}", t.str()?))
            }
            "corrupt" => StoreError::Corrupt(t.str()?.to_string()),
            other => StoreError::Corrupt(format!("unknown refusal `{other}` from a script")),
        })
    })();
    parsed.unwrap_or_else(|e| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn a_state_reads_back_into_a_conserved_record() {
        let org = OrgId::parse("acme", "org").unwrap();
        let tokens = strings(
            "org acme budget primary 100 5 7 2 a 10 0 primary 60 20 1 n1 3 9 1234 0 1 8 1 a 5 0 0 1 a 5",
        );
        let record = Tokens::new(&tokens, "test").record(&org).unwrap();
        assert_eq!(record.version, 7);
        assert_eq!(record.workspaces.len(), 2);
        let n1 = &record.nodes[&NodeId::parse("n1", "n").unwrap()];
        assert_eq!((n1.epoch, n1.seq, n1.seen_ms), (3, 9, 1234));
        assert!(!n1.expired && n1.last_expired);
        assert_eq!(n1.last_grants.len(), 1);
        assert!(record.is_conserved());
    }

    #[test]
    fn a_short_or_unconserved_state_is_corrupt() {
        let org = OrgId::parse("acme", "org").unwrap();
        let short = strings("org acme budget primary 100 0 1 5");
        assert!(matches!(
            Tokens::new(&short, "test").record(&org),
            Err(StoreError::Corrupt(_))
        ));
        let unconserved = strings("org acme budget primary 100 0 1 1 primary 99 0 0");
        assert!(matches!(
            Tokens::new(&unconserved, "test").record(&org),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn refusals_become_the_embedded_stores_errors() {
        let org = OrgId::parse("acme", "org").unwrap();
        assert_eq!(
            refusal(&org, None, &strings("insufficient a 5 9")),
            StoreError::Rule(RuleError::InsufficientCredits {
                workspace: WorkspaceId::parse("a", "w").unwrap(),
                available: 5,
                wanted: 9
            })
        );
        assert_eq!(
            refusal(&org, Some("k1"), &strings("idempotency_mismatch")),
            StoreError::IdempotencyMismatch("k1".into())
        );
        assert!(matches!(
            refusal(&org, None, &strings("insufficient a")),
            StoreError::Corrupt(_)
        ));
    }
}
