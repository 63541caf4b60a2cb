//! The control-plane rules (1-6 of docs/api.md): purchases, workspaces, transfers, deletion
//! and mode switches. Each works on the record and is refused, changing nothing, when it would
//! break a rule.

use super::ids::{Amount, WorkspaceId};
use super::org::add;
use super::{LedgerEvent, Mode, OrgRecord, RuleError, WorkspaceRecord, CREDITS_MAX};

impl OrgRecord {
    /// Rule 1: purchased credits land in the Primary.
    pub fn purchase(&mut self, amount: Amount) -> Result<LedgerEvent, RuleError> {
        let purchased = add(self.purchased, amount.get())?;
        if purchased > CREDITS_MAX {
            return Err(RuleError::Overflow);
        }
        let primary = self.primary.clone();
        let ws = self.ws_mut(&primary)?;
        ws.balance = add(ws.balance, amount.get())?;
        self.purchased = purchased;
        self.version += 1;
        Ok(LedgerEvent::Purchase {
            workspace: primary,
            amount: amount.get(),
        })
    }

    pub fn create_workspace(&mut self, ws: WorkspaceId) -> Result<LedgerEvent, RuleError> {
        if self.workspaces.contains_key(&ws) {
            return Err(RuleError::WorkspaceExists(ws));
        }
        self.workspaces
            .insert(ws.clone(), WorkspaceRecord::default());
        self.version += 1;
        Ok(LedgerEvent::WorkspaceCreated { workspace: ws })
    }

    /// Checks a transfer (rule 3) without applying it. Leased credits of the source must be
    /// recalled first: a transfer only moves what no node can be spending.
    pub fn check_transfer(
        &self,
        from: &WorkspaceId,
        to: &WorkspaceId,
        amount: Amount,
    ) -> Result<(), RuleError> {
        if self.mode != Mode::Budget {
            return Err(RuleError::WrongMode(self.mode));
        }
        if from == to {
            return Err(RuleError::SameWorkspace);
        }
        let available = self.balance_of(from)?;
        let to_balance = self.balance_of(to)?;
        add(to_balance, amount.get())?;
        if available < amount.get() {
            let leased = self.leased(from);
            if add(available, leased)? >= amount.get() {
                return Err(RuleError::LeasesOutstanding {
                    workspace: from.clone(),
                    leased,
                });
            }
            return Err(RuleError::InsufficientCredits {
                workspace: from.clone(),
                available: available + leased,
                wanted: amount.get(),
            });
        }
        Ok(())
    }

    /// Rule 3: move credits between two workspaces of a budget-mode org.
    pub fn transfer(
        &mut self,
        from: &WorkspaceId,
        to: &WorkspaceId,
        amount: Amount,
    ) -> Result<LedgerEvent, RuleError> {
        self.check_transfer(from, to, amount)?;
        self.ws_mut(from)?.balance -= amount.get();
        self.ws_mut(to)?.balance += amount.get();
        self.version += 1;
        Ok(LedgerEvent::Transfer {
            from: from.clone(),
            to: to.clone(),
            amount: amount.get(),
        })
    }

    /// Rule 5: a deleted workspace's credits return to the Primary; the Primary stays.
    /// Returns the credits returned.
    pub fn delete_workspace(&mut self, ws: &WorkspaceId) -> Result<(u64, LedgerEvent), RuleError> {
        if *ws == self.primary {
            return Err(RuleError::PrimaryWorkspace(ws.clone()));
        }
        let record = self
            .workspaces
            .get(ws)
            .ok_or_else(|| RuleError::UnknownWorkspace(ws.clone()))?;
        // Credits of the workspace held by nodes, leased or reserved, must be back first: a
        // reservation committed after the deletion would otherwise charge a workspace of the
        // same name created later.
        let leased = add(self.leased(ws), self.held(ws))?;
        if leased > 0 {
            return Err(RuleError::LeasesOutstanding {
                workspace: ws.clone(),
                leased,
            });
        }
        let (returned, used) = (record.balance, record.used);
        let used_deleted = add(self.used_deleted, used)?;
        let primary = self.primary.clone();
        let p = self.ws_mut(&primary)?;
        p.balance = add(p.balance, returned)?;
        self.used_deleted = used_deleted;
        self.workspaces.remove(ws);
        self.version += 1;
        Ok((
            returned,
            LedgerEvent::WorkspaceDeleted {
                workspace: ws.clone(),
                returned_to_primary: returned,
            },
        ))
    }

    /// Rule 6: budget → shared sweeps every other balance into the Primary; shared → budget
    /// moves nothing. Setting the current mode again changes nothing and records nothing.
    pub fn set_mode(&mut self, mode: Mode) -> Result<Vec<LedgerEvent>, RuleError> {
        if mode == self.mode {
            return Ok(Vec::new());
        }
        let mut events = vec![LedgerEvent::ModeChanged {
            from: self.mode,
            to: mode,
        }];
        // shared -> budget: the Primary's leases were the whole org's pool, and nodes spend them
        // for every workspace until they learn of the switch. They must be back first, or a
        // workspace with no budget could spend the Primary's credits in the meantime.
        if mode == Mode::Budget {
            let leased = self.leased(&self.primary);
            if leased > 0 {
                return Err(RuleError::LeasesOutstanding {
                    workspace: self.primary.clone(),
                    leased,
                });
            }
        }
        if mode == Mode::Shared {
            for ws in self.workspaces.keys().filter(|w| **w != self.primary) {
                let leased = self.leased(ws);
                if leased > 0 {
                    return Err(RuleError::LeasesOutstanding {
                        workspace: ws.clone(),
                        leased,
                    });
                }
            }
            let mut swept = 0u64;
            for (ws, record) in self
                .workspaces
                .iter_mut()
                .filter(|(w, _)| **w != self.primary)
            {
                if record.balance > 0 {
                    events.push(LedgerEvent::Sweep {
                        workspace: ws.clone(),
                        to: self.primary.clone(),
                        amount: record.balance,
                    });
                    swept = add(swept, record.balance)?;
                    record.balance = 0;
                }
            }
            let primary = self.primary.clone();
            let p = self.ws_mut(&primary)?;
            p.balance = add(p.balance, swept)?;
        }
        self.mode = mode;
        self.version += 1;
        Ok(events)
    }
}
