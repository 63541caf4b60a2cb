//! Control-plane operations on a node: each is applied by the store, atomically and durably,
//! while the org's leases are out of the way.
//!
//! The protocol for an operation that moves credits (transfer, deletion, mode switch):
//! 1. take the org's `control` lock (refills of the org wait behind it);
//! 2. recall: settle the org's usage and give every lease back, so the store holds the credits;
//! 3. apply the operation in the store (it refuses with `LeasesOutstanding` if a debit that was
//!    already past its check put usage in flight; then recall again and retry, bounded);
//! 4. rebuild the org's cache from the new record and lease again.
//!
//! Purchases and new workspaces move no leased credits: they skip step 2.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::settle::Wants;
use super::{
    Node, NodeError, OrgSlot, Pause, CONTROL_WAIT_MAX, RECALL_ATTEMPTS_MAX, RECALL_REPEAT,
};
use crate::metrics as m;
use crate::model::{Amount, Mode, OrgId, OrgRecord, OrgView, RuleError, WorkspaceId};
use crate::store::{ControlOp, ControlOutcome, IdempotencyKey, LedgerPage, Notice, StoreError};

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
    pub async fn change(
        &self,
        org: &str,
        op: ControlOp,
        key: Option<IdempotencyKey>,
    ) -> Result<ControlOutcome, NodeError> {
        let slot = self.slot(org).await?;
        let _control = tokio::time::timeout(CONTROL_WAIT_MAX, slot.control.lock())
            .await
            .map_err(|_| {
                NodeError::Unavailable(format!(
                    "wait for the org's other operations exceeded {}s",
                    CONTROL_WAIT_MAX.as_secs()
                ))
            })?;
        // Checked under the control lock: the state then includes every workspace created before,
        // so concurrent creations cannot all pass the check at once.
        if matches!(op, ControlOp::CreateWorkspace { .. }) {
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
        if let ControlOp::DeleteWorkspace { workspace } = &op {
            self.release_reservations_of(&slot.org, workspace);
        }
        let moves_leased = matches!(
            op,
            ControlOp::Transfer { .. }
                | ControlOp::DeleteWorkspace { .. }
                | ControlOp::SetMode { .. }
        );
        let result = self
            .apply_recalled(&slot, &op, key.as_ref(), moves_leased)
            .await;
        // Whatever happened, rebuild from the truth and lease again: a recall emptied the leases.
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
        op: &ControlOp,
        key: Option<&IdempotencyKey>,
        moves_leased: bool,
    ) -> Result<ControlOutcome, NodeError> {
        let deadline = tokio::time::Instant::now() + self.options.recall_wait_max;
        // A deletion also needs other nodes' reservations of the workspace back.
        let cancel = match op {
            ControlOp::DeleteWorkspace { workspace } => Some(workspace.clone()),
            _ => None,
        };
        let mut attempt = 0;
        let mut recalling: Option<RecallGuard<'_>> = None;
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
                    match &recalling {
                        None => recalling = Some(self.announce_recall(slot, cancel.clone()).await),
                        Some(recall) => self.repeat_recall(recall, cancel.clone()).await,
                    }
                    let pause = if attempt < RECALL_ATTEMPTS_MAX { 1 } else { 10 };
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                result => {
                    if let Some(recall) = recalling.take() {
                        self.announce_resume(&recall).await;
                    }
                    return Ok(result?);
                }
            }
        }
    }

    /// Asks every node to give the org's leases back (and, with `cancel`, to release their
    /// reservations of that workspace). While the returned guard lives, recalls from nodes
    /// with a higher id wait for this one.
    pub(crate) async fn announce_recall<'a>(
        &self,
        slot: &'a OrgSlot,
        cancel: Option<WorkspaceId>,
    ) -> RecallGuard<'a> {
        slot.recalling.fetch_add(1, Ordering::AcqRel);
        let id = self.recall_ids.fetch_add(1, Ordering::AcqRel) + 1;
        self.announce(Notice::Recall {
            org: slot.org.clone(),
            from: Some(self.node_id.clone()),
            id,
            cancel,
        })
        .await;
        RecallGuard {
            slot,
            id,
            announced: parking_lot::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Announces a recall again, under the same id, if `RECALL_REPEAT` passed since it was.
    pub(crate) async fn repeat_recall(
        &self,
        recall: &RecallGuard<'_>,
        cancel: Option<WorkspaceId>,
    ) {
        {
            let mut announced = recall.announced.lock();
            if announced.elapsed() < RECALL_REPEAT {
                return;
            }
            *announced = tokio::time::Instant::now();
        }
        self.announce(Notice::Recall {
            org: recall.slot.org.clone(),
            from: Some(self.node_id.clone()),
            id: recall.id,
            cancel,
        })
        .await;
    }

    /// Tells the other nodes that this recall is over, so they lease again.
    pub(crate) async fn announce_resume(&self, recall: &RecallGuard<'_>) {
        self.announce(Notice::Resume {
            org: recall.slot.org.clone(),
            from: Some(self.node_id.clone()),
            id: recall.id,
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
    /// caller holds the org's control lock.
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
                // Missed notices are not lost changes: settles carry the org version.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let Some(this) = node.upgrade() else { return };
            this.follow(notice);
        }
    }

    /// Acts on one notice. Notices are hints, delivered at most once, in any order: what is
    /// safe never depends on them (the store grants only to the current version; the lease
    /// term bounds what a node spends without hearing from the store).
    fn follow(self: Arc<Self>, notice: Notice) {
        tracing::debug!(?notice, "notice");
        let org = match &notice {
            Notice::Changed { org, .. }
            | Notice::Recall { org, .. }
            | Notice::Resume { org, .. } => org.clone(),
        };
        self.unknown_orgs.remove(org.as_str());
        let Some(slot) = self.orgs.get(&org).map(|s| Arc::clone(s.value())) else {
            return;
        };
        match notice {
            Notice::Changed { version, .. } => {
                // Only a newer version than the state's says something: an older notice may
                // arrive late. (A settle reply says when the store went back.)
                if version > slot.current().version {
                    slot.notified_version.fetch_max(version, Ordering::AcqRel);
                    let node = Arc::clone(&self);
                    tokio::spawn(async move {
                        if let Ok(_control) = slot.control.try_lock() {
                            if let Err(e) = node.reload(&slot).await {
                                tracing::warn!(org = %slot.org, error = %e, "reload after a change notice failed");
                            }
                        }
                    });
                }
            }
            Notice::Resume { from, id, .. } => {
                // Lifts only the pause of that recall: another one may still be in progress.
                slot.pauses
                    .lock()
                    .retain(|p| !(p.from == from && p.id == id));
            }
            Notice::Recall {
                from, id, cancel, ..
            } => {
                if from.as_ref() == Some(&self.node_id) {
                    return;
                }
                // Two nodes recalling each other would each wait for the other: the lower
                // node id goes first, the other gives back.
                let busy = slot.recalling.load(Ordering::Acquire) > 0;
                if busy && from.as_ref().is_some_and(|f| *f > self.node_id) {
                    return;
                }
                // The pause starts now, before this notice stream goes on: the recall's
                // `Resume` may be next, and must find it.
                let until = tokio::time::Instant::now() + self.options.recall_wait_max;
                slot.pauses.lock().push(Pause { from, id, until });
                let node = Arc::clone(&self);
                tokio::spawn(async move { node.give_back(&slot, cancel).await });
            }
        }
    }

    /// Answers another node's recall: settle and return every lease of the org (and release
    /// reservations of a workspace being deleted). The caller has paused leasing until that
    /// recall resumes, at most `recall_wait_max`: otherwise this node's own debits would lease
    /// the credits again and the recall would never converge under load. Debits that need a
    /// lease meanwhile ask for just what they need. It takes the settle stream, not the control
    /// lock: the node may be recalling itself.
    async fn give_back(&self, slot: &Arc<OrgSlot>, cancel: Option<WorkspaceId>) {
        if let Some(ws) = cancel {
            self.release_reservations_of(&slot.org, &ws);
        }
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
pub(crate) struct RecallGuard<'a> {
    slot: &'a OrgSlot,
    pub id: u64,
    /// When it was last announced.
    announced: parking_lot::Mutex<tokio::time::Instant>,
}

impl Drop for RecallGuard<'_> {
    fn drop(&mut self) {
        self.slot.recalling.fetch_sub(1, Ordering::AcqRel);
    }
}
