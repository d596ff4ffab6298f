//! `run --shadow FILE.wasm`: a candidate policy decides beside the active
//! ones every quantum, on the same snapshot and under the same limits and
//! guard settings, and is never applied. Where its guard-accepted actions
//! differ from what the active policies applied, the log says so and the
//! counters count it.
//!
//! **It cannot slow or change the active decisions.** It runs on a thread
//! of its own (its own wasmtime store and guard), fed after apply through a
//! one-slot channel with `try_send`: a shadow still busy with the last
//! quantum (slow, or spinning to its deadline) misses this one, counted as
//! `busy`, and the daemon's loop never waits for it. Its failures are its
//! own: counted, logged, and its slot's backoff applies to it alone.
//! Loading it (a compile) happens on that thread too.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use vm_balancer_sdk::{Action, Snapshot};

use crate::config::Config;
use crate::guard::Guard;
use crate::pipeline::Trace;
use crate::policy::PolicySet;

/// Counters of a shadow policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ShadowStats {
    /// Quanta it decided on (its own policy, not a fallback).
    pub quanta: u64,
    /// Quanta its accepted actions equal the active ones (on what it manages).
    pub agreed: u64,
    /// Quanta they differ.
    pub disagreed: u64,
    /// Actions it would have applied that the active policies did not.
    pub only_shadow: u64,
    /// Actions the active policies applied that it would not have.
    pub only_active: u64,
    /// Quanta its policy failed or was disabled (trap, timeout, ...).
    pub failed: u64,
    /// Quanta it missed because it was still busy with an earlier one.
    pub busy: u64,
    /// Why it could not be loaded, if it could not.
    pub load_error: Option<String>,
}

/// One quantum handed to the shadow.
struct Job {
    snapshot: Snapshot,
    applied: Vec<Action>,
}

/// A running shadow.
pub struct Shadow {
    spec: String,
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
    stats: Arc<Mutex<ShadowStats>>,
}

impl Shadow {
    /// Starts the shadow's thread, which loads `spec` under the daemon's
    /// file rules (owner, mode, ancestors) and the config's limits.
    pub fn start(spec: &str, config: &Config) -> Shadow {
        let (tx, rx) = sync_channel::<Job>(1);
        let stats = Arc::new(Mutex::new(ShadowStats::default()));
        let (thread_stats, spec_owned, config) = (Arc::clone(&stats), spec.to_string(), config.clone());
        let handle = std::thread::Builder::new()
            .name("vmb-shadow".into())
            .spawn(move || shadow_thread(&spec_owned, &config, rx, &thread_stats))
            .map_err(|error| tracing::error!(%error, "shadow: cannot start its thread; running without it"))
            .ok();
        Shadow { spec: spec.to_string(), tx: handle.is_some().then_some(tx), handle, stats }
    }

    /// Hands the quantum to the shadow if it is idle; never waits.
    pub fn offer(&mut self, trace: &Trace) {
        let Some(tx) = &self.tx else { return };
        let job = Job { snapshot: (*trace.snapshot).clone(), applied: trace.checked.accepted.clone() };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                lock(&self.stats).busy += 1;
                tracing::debug!(quantum = trace.snapshot.quantum, "shadow: still busy with an earlier quantum; this one is skipped");
            }
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> ShadowStats {
        lock(&self.stats).clone()
    }

    /// Stops it (after the quantum it may be deciding) and returns its
    /// counters, logged as the `shadow summary` line.
    pub fn finish(mut self) -> ShadowStats {
        self.tx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        let s = self.stats();
        tracing::info!(
            shadow = %self.spec,
            quanta = s.quanta,
            agreed = s.agreed,
            disagreed = s.disagreed,
            only_shadow = s.only_shadow,
            only_active = s.only_active,
            failed = s.failed,
            busy = s.busy,
            load_error = s.load_error.as_deref().unwrap_or(""),
            "shadow summary"
        );
        s
    }
}

fn lock(stats: &Mutex<ShadowStats>) -> std::sync::MutexGuard<'_, ShadowStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

fn shadow_thread(spec: &str, config: &Config, rx: Receiver<Job>, stats: &Mutex<ShadowStats>) {
    let _span = tracing::info_span!("shadow", policy = spec).entered();
    let policies = PolicySet::new(&config.limits)
        .with_file_rules(crate::policy::file::FileRules::daemon(config))
        .with_cache(crate::policy::cache::CompileCache::open_or_warn(&config.state_dir.join("compile-cache"), config.compile_cache_max_mib))
        .with_specs(&[spec.to_string()]);
    let mut policies = match policies {
        Ok(p) => p,
        Err(error) => {
            tracing::error!(error = %crate::error_chain(&error), "shadow: cannot load the policy; running without a shadow");
            lock(stats).load_error = Some(crate::error_chain(&error));
            return;
        }
    };
    let info = policies.slots()[0].policy().map(|p| p.info().clone());
    let (cpu, memory) = info.as_ref().map_or((true, true), |i| (i.cpu, i.memory));
    tracing::info!(cpu, memory, "shadow: loaded; it decides every quantum and is never applied");
    let mut guard = Guard::new(config.guard.clone());
    let manages = |a: &Action| match a {
        Action::Pin { .. } => cpu,
        Action::SetMemory { .. } => memory,
    };
    while let Ok(job) = rx.recv() {
        let decided = policies.decide(&job.snapshot);
        if !decided.fell_back.is_empty() {
            lock(stats).failed += 1;
            continue;
        }
        let checked = guard.check(&job.snapshot, decided.proposals);
        let key = |actions: &[Action]| {
            let mut k: Vec<String> = actions.iter().filter(|a| manages(a)).map(|a| a.to_string()).collect();
            k.sort();
            k
        };
        let (mine, theirs) = (key(&checked.accepted), key(&job.applied));
        let only_shadow: Vec<&String> = mine.iter().filter(|a| !theirs.contains(a)).collect();
        let only_active: Vec<&String> = theirs.iter().filter(|a| !mine.contains(a)).collect();
        let mut s = lock(stats);
        s.quanta += 1;
        if only_shadow.is_empty() && only_active.is_empty() {
            s.agreed += 1;
        } else {
            s.disagreed += 1;
            s.only_shadow += only_shadow.len() as u64;
            s.only_active += only_active.len() as u64;
            drop(s);
            tracing::info!(
                quantum = job.snapshot.quantum,
                only_shadow = ?only_shadow.iter().take(4).collect::<Vec<_>>(),
                only_active = ?only_active.iter().take(4).collect::<Vec<_>>(),
                "shadow disagrees"
            );
        }
    }
}
