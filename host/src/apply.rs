//! Stage 5, **apply**: accepted actions go to the backend. A domain that
//! vanished between collect and apply is logged once, not as an error storm.

use std::collections::HashSet;

use vm_balancer_sdk::{Action, Snapshot};

use crate::backend::{Backend, BackendError};

/// Counters of the apply stage.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Pins applied.
    pub pins: u64,
    /// Balloon targets applied.
    pub memory: u64,
    /// Actions skipped because the domain was gone.
    pub gone: u64,
    /// Actions the backend refused.
    pub failed: u64,
}

/// Applies actions; remembers which vanished domains it already reported.
#[derive(Debug, Default)]
pub struct Applier {
    reported_gone: HashSet<String>,
    stats: ApplyStats,
}

impl Applier {
    /// Counters so far.
    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// Applies `actions` in order; with `dry_run` only logs them. Each
    /// applied action is one info line with its old and new value (from
    /// `snapshot`) and the policy's reason: the journal says why a guest
    /// changed.
    pub fn apply(&mut self, backend: &mut dyn Backend, snapshot: &Snapshot, actions: &[Action], dry_run: bool) {
        for action in actions {
            let change = crate::status::describe(action, snapshot);
            if dry_run {
                tracing::info!(domain = action.domain(), change, reason = action.reason(), "dry run: would apply");
                continue;
            }
            let result = match action {
                Action::Pin { domain, vcpu, cpus, .. } => backend.pin_vcpu(domain, *vcpu, cpus).map(|()| self.stats.pins += 1),
                Action::SetMemory { domain, target_kib, .. } => backend.set_memory(domain, *target_kib).map(|()| self.stats.memory += 1),
            };
            match result {
                Ok(()) => {
                    tracing::info!(domain = action.domain(), change, reason = action.reason(), "action applied");
                    tracing::debug!(%action, reason = action.reason(), "applied");
                }
                Err(BackendError::DomainGone { domain }) => {
                    self.stats.gone += 1;
                    if self.reported_gone.len() > 10_000 {
                        self.reported_gone.clear();
                    }
                    if self.reported_gone.insert(domain.clone()) {
                        tracing::info!(domain, "domain disappeared before its action was applied; skipped");
                    }
                }
                Err(error) => {
                    self.stats.failed += 1;
                    tracing::warn!(error = &error as &dyn std::error::Error, "backend refused an action");
                }
            }
        }
    }
}
