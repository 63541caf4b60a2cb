//! Control-plane operations on a node: each is applied by the store, atomically and durably,
//! while the org's leases are out of the way.
//!
//! The protocol for an operation that moves credits (transfer, deletion, mode switch):
//! 1. take the org's `admin` lock (refills of the org wait behind it);
//! 2. recall: settle the org's usage and give every lease back, so the store holds the credits;
//! 3. apply the operation in the store (it refuses with `LeasesOutstanding` if a debit that was
//!    already past its check put usage in flight; then recall again and retry, bounded);
//! 4. rebuild the org's cache from the new record and lease again.
//!
//! Purchases and new workspaces move no leased credits: they skip step 2.

use std::sync::Arc;

use super::settle::Wants;
use super::{Node, NodeError, OrgSlot, ADMIN_WAIT_MAX, RECALL_ATTEMPTS_MAX};
use crate::metrics as m;
use crate::model::{Amount, Mode, OrgId, OrgRecord, OrgView, RuleError, WorkspaceId};
use crate::store::{AdminOp, AdminOutcome, IdempotencyKey, LedgerPage, Notice, StoreError};

impl Node {
    /// Creates an org with its Primary Workspace.
    pub async fn create_org(
        &self,
        org: &OrgId,
        mode: Mode,
        primary: &WorkspaceId,
    ) -> Result<OrgView, NodeError> {
        m::store_call("create_org");
        let record = self.store.create_org(org, mode, primary).await?;
        self.unknown_orgs.remove(org.as_str());
        metrics::counter!(m::ADMIN_OPERATIONS, "op" => "create_org").increment(1);
        tracing::info!(target: "audit", org = %org, mode = mode.as_str(), primary = %primary, "org created");
        Ok(record.view())
    }

    /// The org as it stands, including every debit this node already answered.
    pub async fn org_view(&self, org: &str) -> Result<OrgView, NodeError> {
        Ok(self.settled_record(org).await?.view())
    }

    /// A page of the org's ledger, after this node's usage so far is settled.
    pub async fn ledger(
        &self,
        org: &str,
        after: u64,
        limit: usize,
    ) -> Result<LedgerPage, NodeError> {
        let record = self.settled_record(org).await?;
        m::store_call("ledger");
        Ok(self.store.ledger(&record.org, after, limit).await?)
    }

    /// Settles this node's usage of the org (if it has the org loaded) and reads the record.
    async fn settled_record(&self, org: &str) -> Result<OrgRecord, NodeError> {
        let org_id =
            OrgId::parse(org, "org").map_err(|_| NodeError::UnknownOrg(org.to_string()))?;
        let loaded = self.orgs.get(org).map(|s| Arc::clone(s.value()));
        if let Some(slot) = loaded {
            self.settle_slots(&[slot], Wants::None).await?;
        }
        m::store_call("load_org");
        self.store
            .load_org(&org_id)
            .await?
            .ok_or_else(|| NodeError::UnknownOrg(org.to_string()))
    }

    /// What a transfer would leave, without doing it (`dry_run`). Credits leased to nodes count
    /// as the balance they came from, as they would be recalled by the real transfer.
    pub async fn preview_transfer(
        &self,
        org: &str,
        from: &WorkspaceId,
        to: &WorkspaceId,
        amount: Amount,
    ) -> Result<OrgView, NodeError> {
        let mut record = self.settled_record(org).await?.with_leases_returned()?;
        record.transfer(from, to, amount)?;
        Ok(record.view())
    }

    /// Applies a control-plane change with the recall protocol.
    pub async fn admin(
        &self,
        org: &str,
        op: AdminOp,
        key: Option<IdempotencyKey>,
    ) -> Result<AdminOutcome, NodeError> {
        let slot = self.slot(org).await?;
        let _admin = tokio::time::timeout(ADMIN_WAIT_MAX, slot.admin.lock())
            .await
            .map_err(|_| {
                NodeError::Unavailable(format!(
                    "wait for the org's other operations exceeded {}s",
                    ADMIN_WAIT_MAX.as_secs()
                ))
            })?;
        // Checked under the admin lock: the state then includes every workspace created before,
        // so concurrent creations cannot all pass the check at once.
        if matches!(op, AdminOp::CreateWorkspace { .. }) {
            if slot.current().accounts.len() >= self.options.workspaces_max {
                m::limit_hit("workspaces");
                return Err(NodeError::LimitExceeded {
                    limit: "workspaces",
                    message: format!(
                        "org {org} reached the limit of {} workspaces",
                        self.options.workspaces_max
                    ),
                });
            }
            // A new workspace of a cached org is one more cached account.
            if self.cache.len() >= self.options.accounts_max {
                m::limit_hit("accounts");
                return Err(NodeError::LimitExceeded {
                    limit: "accounts",
                    message: format!(
                        "accounts cached reached the limit of {}",
                        self.options.accounts_max
                    ),
                });
            }
        }
        if let AdminOp::DeleteWorkspace { workspace } = &op {
            self.release_reservations_of(&slot.org, workspace);
        }
        let moves_leased = matches!(
            op,
            AdminOp::Transfer { .. } | AdminOp::DeleteWorkspace { .. } | AdminOp::SetMode { .. }
        );
        let result = self
            .apply_recalled(&slot, &op, key.as_ref(), moves_leased)
            .await;
        // Whatever happened, rebuild from the truth and lease again: a recall emptied the pools.
        let refreshed = self.refresh(&slot).await;
        let outcome = result?;
        refreshed?;
        if !outcome.replayed {
            metrics::counter!(m::ADMIN_OPERATIONS, "op" => op.name()).increment(1);
            tracing::info!(target: "audit", org = %slot.org, op = ?op, returned = outcome.returned, "admin operation applied");
        }
        Ok(outcome)
    }

    async fn apply_recalled(
        &self,
        slot: &Arc<OrgSlot>,
        op: &AdminOp,
        key: Option<&IdempotencyKey>,
        moves_leased: bool,
    ) -> Result<AdminOutcome, NodeError> {
        let deadline = tokio::time::Instant::now() + self.options.recall_wait_max;
        let mut attempt = 0;
        let mut _recalling = None;
        loop {
            attempt += 1;
            if moves_leased {
                self.settle_slots(std::slice::from_ref(slot), Wants::Recall)
                    .await?;
            }
            m::store_call("apply");
            match self.store.apply(&slot.org, op, key).await {
                Err(StoreError::Rule(RuleError::LeasesOutstanding { .. }))
                    if attempt < RECALL_ATTEMPTS_MAX || tokio::time::Instant::now() < deadline =>
                {
                    // Our own leases are back; what is still out is held by other nodes (or by
                    // debits of ours that were past their check): ask everyone, then retry.
                    if _recalling.is_none() {
                        _recalling = Some(self.announce_recall(slot).await);
                    }
                    let pause = if attempt < RECALL_ATTEMPTS_MAX { 1 } else { 10 };
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                result => {
                    if _recalling.is_some() {
                        self.announce_resume(slot).await;
                    }
                    return Ok(result?);
                }
            }
        }
    }

    /// Asks every node to give the org's leases back. While the returned guard lives, this
    /// node ignores recall notices for the org (its own among them).
    pub(crate) async fn announce_recall<'a>(&self, slot: &'a OrgSlot) -> RecallGuard<'a> {
        slot.recalling
            .store(true, std::sync::atomic::Ordering::Release);
        self.announce(Notice::Recall {
            org: slot.org.clone(),
        })
        .await;
        RecallGuard(slot)
    }

    /// Tells the other nodes that this node's recall is over, so they lease again.
    pub(crate) async fn announce_resume(&self, slot: &OrgSlot) {
        self.announce(Notice::Resume {
            org: slot.org.clone(),
        })
        .await;
    }

    /// Publishes a notice, best effort: a lost one only slows the others down (the change
    /// epoch, or `recall_wait_max`, bounds what it costs).
    async fn announce(&self, notice: Notice) {
        m::store_call("announce");
        if let Err(e) = self.store.announce(&notice).await {
            tracing::warn!(?notice, error = %e, "notice not published");
        }
    }

    /// Rebuilds an org another node changed: give leases back, reload, lease again. The
    /// caller holds the org's admin lock.
    pub(crate) async fn reload(&self, slot: &Arc<OrgSlot>) -> Result<(), NodeError> {
        tracing::debug!(org = %slot.org, "reloading an org changed elsewhere");
        self.settle_slots(std::slice::from_ref(slot), Wants::Recall)
            .await?;
        self.refresh(slot).await
    }

    /// Follows notices from other nodes until the store's notice stream ends or the node is
    /// gone. It holds the node weakly: the stream's sender lives in the store the node owns,
    /// so a strong reference would keep both alive forever.
    pub(crate) async fn listen(
        node: std::sync::Weak<Node>,
        mut notices: tokio::sync::broadcast::Receiver<Notice>,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let notice = match notices.recv().await {
                Ok(n) => n,
                // Missed notices are not lost changes: settles carry the change epoch.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let Some(this) = node.upgrade() else { return };
            this.follow(notice);
        }
    }

    /// Acts on one notice.
    fn follow(self: Arc<Self>, notice: Notice) {
        tracing::debug!(?notice, "notice");
        let org = match &notice {
            Notice::Changed { org, .. } | Notice::Recall { org } | Notice::Resume { org } => {
                org.clone()
            }
        };
        self.unknown_orgs.remove(org.as_str());
        let Some(slot) = self.orgs.get(&org).map(|s| Arc::clone(s.value())) else {
            return;
        };
        match notice {
            Notice::Changed { version, .. } => {
                // A change ends any recall in progress: lease again.
                *slot.recalled_until.lock() = None;
                slot.seen_version
                    .fetch_max(version, std::sync::atomic::Ordering::AcqRel);
                if version > slot.current().version {
                    let node = Arc::clone(&self);
                    tokio::spawn(async move {
                        if let Ok(_admin) = slot.admin.try_lock() {
                            if let Err(e) = node.reload(&slot).await {
                                tracing::warn!(org = %slot.org, error = %e, "reload after a change notice failed");
                            }
                        }
                    });
                }
            }
            Notice::Resume { .. } => {
                *slot.recalled_until.lock() = None;
            }
            Notice::Recall { .. } => {
                if slot.recalling.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let node = Arc::clone(&self);
                tokio::spawn(async move { node.give_back(&slot).await });
            }
        }
    }

    /// Answers another node's recall: settle and return every lease of the org, then take no
    /// new lease until the recalling node resumes (or changes the org), at most
    /// `recall_wait_max`: otherwise this node's own debits would lease the credits again and
    /// the recall would never converge under load. Debits that need a lease meanwhile wait.
    async fn give_back(&self, slot: &Arc<OrgSlot>) {
        let window = self.options.recall_wait_max;
        *slot.recalled_until.lock() = Some(tokio::time::Instant::now() + window);
        let Ok(_admin) =
            tokio::time::timeout(self.options.recall_wait_max, slot.admin.lock()).await
        else {
            return;
        };
        if let Err(e) = self
            .settle_slots(std::slice::from_ref(slot), Wants::Recall)
            .await
        {
            tracing::warn!(org = %slot.org, error = %e, "giving leases back failed");
        }
    }

    /// Rebuilds the org's cache from the store and takes leases again.
    pub(crate) async fn refresh(&self, slot: &Arc<OrgSlot>) -> Result<(), NodeError> {
        m::store_call("load_org");
        let record = self
            .store
            .load_org(&slot.org)
            .await?
            .ok_or_else(|| NodeError::UnknownOrg(slot.org.to_string()))?;
        self.rebuild(slot, &record);
        self.settle_slots(std::slice::from_ref(slot), Wants::All)
            .await
    }
}

/// Marks an org as recalling leases on this node until dropped (also when the waiting call is
/// cancelled by its timeout).
pub(crate) struct RecallGuard<'a>(&'a OrgSlot);

impl Drop for RecallGuard<'_> {
    fn drop(&mut self) {
        self.0
            .recalling
            .store(false, std::sync::atomic::Ordering::Release);
    }
}
