//! The ordered set of policy slots the daemon runs each quantum.
//!
//! Slot order is the conflict rule: when two slots act on the same vCPU or
//! the same domain's memory, the earlier slot wins (see [`crate::guard`]).
//! With no policy given, the slots are `cpu` then `mem` (the builtins).
//!
//! Failure handling follows sched_ext: a failing policy's quantum is decided
//! by the native default; after `max_consecutive_failures` in a row the
//! policy is disabled for `retry_backoff_quanta`, then retried once; each
//! further failure doubles the backoff (capped), so a broken policy does not
//! flap between loaded and ejected every quantum.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vm_balancer_sdk::{encode_snapshot, Action, Snapshot};

use super::answer::Encoding;
use super::builtin::{Builtin, Fallback};
use super::file::{read_policy_file, FileRules, PolicyFileError};
use super::sandbox::{LoadedPolicy, PolicyError, Sandbox};
use crate::config::Limits;
use crate::proposal::{Decided, Proposal};

/// Longest backoff, quanta.
const MAX_BACKOFF_QUANTA: u64 = 3600;
/// Quanta in a row over half the deadline before the daemon warns that a
/// policy lives near its deadline (once per slot).
pub const SLOW_STREAK_QUANTA: usize = 5;
/// Decide times kept per slot for its median and p99 (a ring: the daemon
/// runs for months; 4096 quanta is over an hour at 1 s).
const TIMES_KEPT: usize = 4096;

/// Decide-time figures of one slot (its own policy's calls, not the
/// fallback's), microseconds. Not part of [`SlotStats`]: times differ run to
/// run, counters do not.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DecideTimes {
    /// Calls measured (at most the last 4096).
    pub calls: usize,
    /// Median, µs.
    pub median_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Slowest, µs.
    pub max_us: u64,
    /// The deadline it runs under, µs.
    pub deadline_us: u64,
}

/// Counters of one slot.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SlotStats {
    /// Quanta the slot's own policy decided.
    pub decided: u64,
    /// Quanta the fallback decided (failures plus disabled quanta).
    pub fallbacks: u64,
    /// Failures by kind (`timeout`, `trap`, ...).
    pub failures: BTreeMap<&'static str, u64>,
    /// Times the policy was disabled.
    pub disabled: u64,
}

/// One policy slot.
pub struct Slot {
    name: String,
    policy: Option<LoadedPolicy>,
    fallback: Fallback,
    consecutive_failures: u32,
    disabled_until: Option<u64>,
    backoff_quanta: u64,
    stats: SlotStats,
    /// Last decide times, µs (a ring of [`TIMES_KEPT`]).
    times_us: Vec<u32>,
    next_time: usize,
    /// Times of the consecutive calls over half the deadline, µs.
    slow_streak: Vec<u32>,
    slow_warned: bool,
    last_failure: Option<String>,
}

impl Slot {
    /// A slot running `policy`, falling back to the defaults for what it manages.
    pub fn new(name: &str, policy: LoadedPolicy) -> Self {
        let info = policy.info();
        let fallback = Fallback::new(info.cpu, info.memory);
        Slot::with(name, Some(policy), fallback)
    }

    /// A slot whose policy could not be loaded: the defaults decide everything.
    pub fn fallback_only(name: &str) -> Self {
        Slot::with(name, None, Fallback::new(true, true))
    }

    fn with(name: &str, policy: Option<LoadedPolicy>, fallback: Fallback) -> Self {
        Slot {
            name: name.to_string(),
            policy,
            fallback,
            consecutive_failures: 0,
            disabled_until: None,
            backoff_quanta: 0,
            stats: SlotStats::default(),
            times_us: Vec::new(),
            next_time: 0,
            slow_streak: Vec::new(),
            slow_warned: false,
            last_failure: None,
        }
    }

    /// True once the slot warned that its policy lives near its deadline.
    pub fn warned_near_deadline(&self) -> bool {
        self.slow_warned
    }

    /// Decide-time figures of the slot's own policy.
    pub fn decide_times(&self) -> DecideTimes {
        let mut sorted = self.times_us.clone();
        sorted.sort_unstable();
        let at = |p: usize| sorted.get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1))).map_or(0, |t| u64::from(*t));
        DecideTimes {
            calls: sorted.len(),
            median_us: at(50),
            p99_us: at(99),
            max_us: sorted.last().map_or(0, |t| u64::from(*t)),
            deadline_us: self.policy.as_ref().map_or(0, |p| p.limits().timeout_ms * 1000),
        }
    }

    /// Records one call's time; warns once when the policy has used more
    /// than half its deadline [`SLOW_STREAK_QUANTA`] times in a row, so an
    /// operator hears of it before it starts timing out.
    fn record_time(&mut self, took_us: u32, deadline_ms: u64) {
        if self.times_us.len() < TIMES_KEPT {
            self.times_us.push(took_us);
        } else {
            self.times_us[self.next_time] = took_us;
        }
        self.next_time = (self.next_time + 1) % TIMES_KEPT;
        if self.slow_warned {
            return;
        }
        if u64::from(took_us) * 2 > deadline_ms * 1000 {
            self.slow_streak.push(took_us);
        } else {
            self.slow_streak.clear();
        }
        if self.slow_streak.len() >= SLOW_STREAK_QUANTA {
            self.slow_warned = true;
            let mut recent = std::mem::take(&mut self.slow_streak);
            recent.sort_unstable();
            tracing::warn!(
                slot = %self.name,
                policy = self.policy.as_ref().map_or("", |p| p.info().name.as_str()),
                median_ms = f64::from(recent[recent.len() / 2]) / 1000.0,
                deadline_ms,
                quanta = SLOW_STREAK_QUANTA,
                "policy uses more than half of its deadline; raise [limits.policy.\"{}\"] decide_timeout_ms or make it faster before it times out",
                self.name
            );
        }
    }

    /// Slot name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loaded policy, if any.
    pub fn policy(&self) -> Option<&LoadedPolicy> {
        self.policy.as_ref()
    }

    /// The loaded policy, if any, mutably (`policy check` takes its warnings).
    pub fn policy_mut(&mut self) -> Option<&mut LoadedPolicy> {
        self.policy.as_mut()
    }

    /// The last failure of its policy, in words.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Counters.
    pub fn stats(&self) -> &SlotStats {
        &self.stats
    }

    /// True while the policy is disabled after repeated failures.
    pub fn is_disabled(&self, quantum: u64) -> bool {
        self.disabled_until.is_some_and(|until| quantum < until)
    }

    fn decide(&mut self, snapshot: &Snapshot, inputs: &mut Inputs, limits: &Limits) -> (Vec<Action>, bool) {
        let quantum = snapshot.quantum;
        let Some(policy) = self.policy.as_mut().filter(|_| self.disabled_until.is_none_or(|u| quantum >= u)) else {
            self.stats.fallbacks += 1;
            return (self.fallback.decide(snapshot), true);
        };
        let result = policy.decide(inputs.get(policy.encoding(), snapshot));
        let took_us = policy.last_decide().as_micros().min(u128::from(u32::MAX)) as u32;
        let deadline_ms = policy.limits().timeout_ms;
        self.record_time(took_us, deadline_ms);
        let policy = self.policy.as_mut().expect("checked above");
        match result {
            Ok(actions) => {
                if self.disabled_until.take().is_some() || self.consecutive_failures > 0 {
                    tracing::info!(slot = %self.name, source = policy.source_name(), "policy recovered; it decides again");
                }
                self.consecutive_failures = 0;
                self.backoff_quanta = 0;
                self.stats.decided += 1;
                (actions, false)
            }
            Err(error) => {
                self.last_failure = Some(error.to_string());
                self.consecutive_failures += 1;
                *self.stats.failures.entry(error.kind()).or_default() += 1;
                self.stats.fallbacks += 1;
                tracing::warn!(slot = %self.name, kind = error.kind(), %error, "policy failed; the built-in default decides this quantum");
                if self.consecutive_failures >= limits.max_consecutive_failures {
                    self.backoff_quanta = if self.backoff_quanta == 0 {
                        limits.retry_backoff_quanta.max(1)
                    } else {
                        (self.backoff_quanta * 2).min(MAX_BACKOFF_QUANTA)
                    };
                    self.disabled_until = Some(quantum + self.backoff_quanta);
                    self.stats.disabled += 1;
                    tracing::error!(
                        slot = %self.name,
                        source = policy.source_name(),
                        failures = self.consecutive_failures,
                        retry_in_quanta = self.backoff_quanta,
                        "policy disabled after consecutive failures; the default decides until the retry"
                    );
                }
                (self.fallback.decide(snapshot), true)
            }
        }
    }
}

/// Errors naming which policy spec could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The file was refused before compiling (unreadable, owner, mode,
    /// type, size; a bad header is [`SlotError::Policy`]).
    #[error(transparent)]
    File(#[from] PolicyFileError),
    /// An unknown `builtin:` name.
    #[error("unknown builtin policy {spec:?} (known: builtin:cpu, builtin:mem, builtin:classic)")]
    UnknownBuiltin {
        /// What was asked for.
        spec: String,
    },
    /// The component was refused.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Every slot, in order, and the sandbox they run in.
pub struct PolicySet {
    sandbox: Sandbox,
    limits: Limits,
    slots: Vec<Slot>,
    last_snapshot: LastSnapshot,
    cache: Option<Arc<super::cache::CompileCache>>,
    file_rules: FileRules,
}

/// The most recent encoded (MessagePack) snapshot, shared with the policy
/// loader, whose trial runs of new files decide on what the running
/// policies saw last. Written here, by [`PolicySet::decide`], once per
/// quantum.
#[derive(Clone, Debug, Default)]
pub struct LastSnapshot(Arc<Mutex<Option<Arc<Vec<u8>>>>>);

impl LastSnapshot {
    /// Keeps `bytes` as the latest snapshot.
    pub fn store(&self, bytes: Arc<Vec<u8>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
    }

    /// The latest snapshot, if any quantum ran yet.
    pub fn latest(&self) -> Option<Arc<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl PolicySet {
    /// An empty set.
    pub fn new(limits: &Limits) -> Self {
        PolicySet {
            sandbox: Sandbox::new(limits),
            limits: limits.clone(),
            slots: Vec::new(),
            last_snapshot: LastSnapshot::default(),
            cache: None,
            file_rules: FileRules::default(),
        }
    }

    /// The default slots: builtin `cpu` then builtin `mem`.
    pub fn defaults(limits: &Limits) -> Result<Self, SlotError> {
        PolicySet::from_specs(limits, &["builtin:cpu".into(), "builtin:mem".into()])
    }

    /// Slots from specs (`builtin:NAME` or a file path), in order; the first
    /// bad spec is an error naming it.
    pub fn from_specs(limits: &Limits, specs: &[String]) -> Result<Self, SlotError> {
        PolicySet::new(limits).with_specs(specs)
    }

    /// Adds a slot for each spec, in order; the first bad spec is an error
    /// naming it.
    pub fn with_specs(mut self, specs: &[String]) -> Result<Self, SlotError> {
        for spec in specs {
            let policy = self.load_spec(spec)?;
            self.slots.push(Slot::new(&slot_name(spec), policy));
        }
        Ok(self)
    }

    /// Adds a slot for each spec, in order; a spec that cannot be loaded
    /// becomes a fallback-only slot (the built-in defaults decide for it)
    /// and is returned with its error, so a daemon always starts.
    pub fn with_specs_lenient(mut self, specs: &[String]) -> (Self, Vec<(String, SlotError)>) {
        let mut failures = Vec::new();
        for spec in specs {
            let name = slot_name(spec);
            match self.load_spec(spec) {
                Ok(policy) => self.slots.push(Slot::new(&name, policy)),
                Err(error) => {
                    failures.push((spec.clone(), error));
                    self.slots.push(Slot::fallback_only(&name));
                }
            }
        }
        (self, failures)
    }

    /// Loads one spec into a policy without adding it.
    pub fn load_spec(&self, spec: &str) -> Result<LoadedPolicy, SlotError> {
        let name = slot_name(spec);
        if spec.starts_with("builtin:") {
            let builtin = Builtin::parse(spec).ok_or_else(|| SlotError::UnknownBuiltin { spec: spec.into() })?;
            return Ok(self.sandbox.load_compiled(&name, spec, builtin.component()?)?);
        }
        let path = Path::new(spec);
        if self.file_rules.strict {
            if let Ok(link) = std::fs::read_link(path) {
                let target = std::fs::canonicalize(path).unwrap_or_else(|_| link.clone());
                tracing::info!(file = spec, link = %link.display(), target = %target.display(), "policy file is a symlink; following it");
            }
        }
        // A bad header is the component's fault, as it was when the whole
        // file was read first: the same error, found sooner.
        let bytes = read_policy_file(path, &self.file_rules).map_err(|e| match e {
            PolicyFileError::Header(e) => SlotError::Policy(e),
            other => SlotError::File(other),
        })?;
        match &self.cache {
            Some(cache) => Ok(self.sandbox.load_compiled(&name, spec, cache.component(spec, &bytes)?)?),
            None => Ok(self.sandbox.load(&name, spec, &bytes)?),
        }
    }

    /// Compiles policy files through `cache` from now on (a restart, or
    /// the next `simulate`, then deserializes instead of compiling).
    pub fn with_cache(mut self, cache: Option<Arc<super::cache::CompileCache>>) -> Self {
        self.cache = cache;
        self
    }

    /// Reads policy files under `rules` from now on (the daemon's are
    /// strict: owner, mode and ancestors; the default bounds the size only).
    pub fn with_file_rules(mut self, rules: FileRules) -> Self {
        self.file_rules = rules;
        self
    }

    /// Appends a slot.
    pub fn push(&mut self, slot: Slot) {
        self.slots.push(slot);
    }

    /// The slots, in order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The slots, mutably (`policy check` reads each policy's warnings).
    pub fn slots_mut(&mut self) -> &mut [Slot] {
        &mut self.slots
    }

    /// The sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The sandbox limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Where the last encoded snapshot is kept, for trial runs of new policies.
    pub fn last_snapshot(&self) -> LastSnapshot {
        self.last_snapshot.clone()
    }

    /// Removes and returns the slots (the reloader's plan replaces them).
    pub(super) fn take_slots(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.slots)
    }

    /// Replaces the slots (the reloader's plan).
    pub(super) fn set_slots(&mut self, slots: Vec<Slot>) {
        self.slots = slots;
    }

    /// Runs every slot on the snapshot. The snapshot is encoded once per
    /// encoding in use (JSON only when a slot speaks it).
    pub fn decide(&mut self, snapshot: &Snapshot) -> Decided {
        let bytes = Arc::new(encode_snapshot(snapshot));
        self.last_snapshot.store(bytes.clone());
        let mut inputs = Inputs { msgpack: bytes, json: None };
        let mut decided = Decided::default();
        for slot in &mut self.slots {
            let (actions, from_fallback) = slot.decide(snapshot, &mut inputs, &self.limits);
            if from_fallback {
                decided.fell_back.push(slot.name.clone());
            }
            decided.proposals.extend(actions.into_iter().map(|action| Proposal { slot: slot.name.clone(), action, from_fallback }));
        }
        decided
    }
}

/// One quantum's snapshot in each encoding, encoded on first use.
struct Inputs {
    msgpack: Arc<Vec<u8>>,
    json: Option<Vec<u8>>,
}

impl Inputs {
    fn get(&mut self, encoding: Encoding, snapshot: &Snapshot) -> &[u8] {
        match encoding {
            Encoding::MessagePack => &self.msgpack,
            Encoding::Json => self.json.get_or_insert_with(|| Encoding::Json.encode(snapshot)),
        }
    }
}

/// A slot's name: the builtin's name, or the file name.
pub fn slot_name(spec: &str) -> String {
    match Builtin::parse(spec) {
        Some(b) if spec.starts_with("builtin:") => b.name().to_string(),
        _ => Path::new(spec).file_name().map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Slot {
        Slot::fallback_only("30-web.wasm")
    }

    #[test]
    fn a_policy_near_its_deadline_is_warned_of_once_after_a_streak() {
        let mut s = slot();
        // 60 ms of a 100 ms deadline: over half. A fast call breaks the streak.
        for _ in 0..SLOW_STREAK_QUANTA - 1 {
            s.record_time(60_000, 100);
        }
        s.record_time(10_000, 100);
        assert!(!s.warned_near_deadline(), "a broken streak does not warn");
        for _ in 0..SLOW_STREAK_QUANTA {
            s.record_time(60_000, 100);
        }
        assert!(s.warned_near_deadline());
        // Once: nothing more is collected for the warning afterwards.
        for _ in 0..10 * SLOW_STREAK_QUANTA {
            s.record_time(90_000, 100);
        }
        assert!(s.slow_streak.is_empty());
    }

    #[test]
    fn decide_times_are_a_bounded_ring_with_median_and_p99() {
        let mut s = slot();
        for i in 0..(TIMES_KEPT as u32 + 1000) {
            s.record_time(i % 100, 100);
        }
        let t = s.decide_times();
        assert_eq!(t.calls, TIMES_KEPT);
        assert_eq!(t.max_us, 99);
        assert!((45..=55).contains(&t.median_us) && (97..=99).contains(&t.p99_us), "{t:?}");
        assert_eq!(s.times_us.len(), TIMES_KEPT, "bounded");
    }
}
