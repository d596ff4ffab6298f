//! The quantum loop: collect → snapshot → decide → guard → apply, in that
//! order, once per call to [`Pipeline::step`].

use vm_balancer_sdk::Verdict;

use crate::apply::Applier;
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::guard::{Checked, Guard};
use crate::host_check;
use crate::policy::PolicySet;
use crate::proposal::Decided;
use crate::snapshot;

/// What one quantum did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantumOutcome {
    /// Quantum number.
    pub quantum: u64,
    /// Domains in the snapshot.
    pub domains: usize,
    /// Actions proposed by all slots.
    pub proposed: usize,
    /// The guard's verdicts.
    pub verdicts: Vec<Verdict>,
    /// Slots whose quantum was decided by the fallback.
    pub fallback_slots: Vec<String>,
    /// The snapshot the policies decided on (status, metrics, logs).
    pub snapshot: std::sync::Arc<vm_balancer_sdk::Snapshot>,
    /// How long collection took. Not compared: times differ run to run.
    pub collect_time: CollectTime,
}

/// A collection's duration, equal to any other: outcomes of deterministic
/// runs compare equal whatever the machine's speed.
#[derive(Clone, Copy, Debug, Default)]
pub struct CollectTime(pub std::time::Duration);

impl PartialEq for CollectTime {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Everything one quantum saw and decided, for the observers that run
/// after apply (record, shadow, timeline): the snapshot exactly as the
/// policies received it, every slot's raw proposals, and the guard's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// The snapshot the policies decided on.
    pub snapshot: std::sync::Arc<vm_balancer_sdk::Snapshot>,
    /// Every slot's proposals, in slot order, before the guard.
    pub proposals: Vec<crate::proposal::Proposal>,
    /// Slots whose quantum the fallback decided.
    pub fell_back: Vec<String>,
    /// The guard's verdicts and the actions it let through (applied, or
    /// only logged in a dry run).
    pub checked: Checked,
}

/// The daemon's pipeline over some backend. Its stages are private: each
/// quantum goes through [`step`](Self::step) in order, and the accessors
/// are for reading results (reports, tests) and for the policy source's
/// swaps at quantum boundaries.
pub struct Pipeline<B> {
    backend: B,
    policies: PolicySet,
    guard: Guard,
    applier: Applier,
    config: Config,
    /// `[params]` converted once, not every quantum.
    params: std::collections::BTreeMap<String, vm_balancer_sdk::Param>,
    quantum: u64,
    feedback: Vec<Verdict>,
    dry_run: bool,
    /// The config was checked against the first observed host (once: a
    /// warning every quantum would drown the log).
    host_checked: bool,
}

impl<B: Backend> Pipeline<B> {
    /// A pipeline; `dry_run` decides and logs but applies nothing.
    pub fn new(backend: B, policies: PolicySet, config: Config, dry_run: bool) -> Self {
        Pipeline {
            backend,
            policies,
            guard: Guard::new(config.guard.clone()),
            applier: Applier::default(),
            params: config.policy_params(),
            config,
            quantum: 0,
            feedback: Vec::new(),
            dry_run,
            host_checked: false,
        }
    }

    /// The backend (the simulator's metrics, placements).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (restore on exit).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The policy slots.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The policy slots, mutably: hot swaps between quanta.
    pub fn policies_mut(&mut self) -> &mut PolicySet {
        &mut self.policies
    }

    /// The guard (its counters).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The apply stage (its counters).
    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// The next quantum's number.
    pub fn quantum(&self) -> u64 {
        self.quantum
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Collects and assembles the snapshot the next quantum's policies would
    /// receive, without deciding (`vm-balancer snapshot`). It takes the
    /// backend's next observation, so call it last.
    pub fn next_snapshot(&mut self) -> Result<vm_balancer_sdk::Snapshot, BackendError> {
        let observation = self.backend.collect()?;
        Ok(snapshot::assemble(observation, self.quantum, &self.config, &self.params, self.feedback.clone()))
    }

    /// Logs, once, what the config's checks against this host say
    /// ([`host_check`]). A setting that cannot work is an error line, not a
    /// stop: where the host is known before the start (a scenario, a local
    /// host) the command line has refused it already, and a remote host
    /// that reports it mid-run is better balanced in part than not at all.
    fn check_host(&self, host: &crate::backend::ObservedHost) {
        match host_check::check(&self.config, &host_check::from_observation(host)) {
            Ok(warnings) => {
                for warning in warnings {
                    tracing::warn!(%warning, "config does not fit this host");
                }
            }
            Err(error) => tracing::error!(%error, "config cannot work on this host"),
        }
    }

    /// Runs one quantum. Only a backend failure to collect is an error;
    /// policy failures and guard rejections are outcomes.
    pub fn step(&mut self) -> Result<QuantumOutcome, BackendError> {
        self.step_traced().map(|(outcome, _)| outcome)
    }

    /// [`step`](Self::step), also returning what the quantum saw and
    /// decided. The trace is built from values the quantum made anyway
    /// (moved, or shared), except the verdicts the outcome shares.
    pub fn step_traced(&mut self) -> Result<(QuantumOutcome, Trace), BackendError> {
        let started = std::time::Instant::now();
        let observation = self.backend.collect()?;
        let collect_time = CollectTime(started.elapsed());
        if !self.host_checked {
            self.host_checked = true;
            self.check_host(&observation.host);
        }
        let snapshot = snapshot::assemble(observation, self.quantum, &self.config, &self.params, std::mem::take(&mut self.feedback));
        let Decided { proposals, fell_back: fallback_slots } = self.policies.decide(&snapshot);
        let proposed = proposals.len();
        let checked: Checked = self.guard.check(&snapshot, proposals.clone());
        self.applier.apply(&mut self.backend, &snapshot, &checked.accepted, self.dry_run);
        self.feedback = checked.feedback();
        let outcome = QuantumOutcome {
            quantum: self.quantum,
            domains: snapshot.domains.len(),
            proposed,
            verdicts: checked.verdicts.clone(),
            fallback_slots: fallback_slots.clone(),
            snapshot: std::sync::Arc::new(snapshot),
            collect_time,
        };
        let snapshot = std::sync::Arc::clone(&outcome.snapshot);
        self.quantum += 1;
        Ok((outcome, Trace { snapshot, proposals, fell_back: fallback_slots, checked }))
    }
}
