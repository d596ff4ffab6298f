//! `vm-balancer replay DIR --policy X`: feeds a record's snapshots
//! ([`crate::record`]) to candidate policies through the guard the
//! recording daemon ran, and reports where they would have acted
//! differently.
//!
//! **Open loop.** The snapshots are what the host did under the recording
//! policies; they do not react to the candidate's actions. A difference in
//! quantum 10 cannot change quantum 11's snapshot, so figures after the
//! first difference say what the candidate would have done *on that
//! host*, not where it would have taken it. The quality figures are
//! therefore projections onto each snapshot alone: the demand each vCPU
//! showed, placed where the actions put it; balloon targets as set.
//!
//! **Exactness.** Replaying the recording policies reproduces the recorded
//! actions bit for bit: the snapshots come back exactly (verdicts of the
//! previous quantum included, as recorded), the policies start fresh where
//! the daemon's started (a record session is one daemon run), and the
//! guard runs over the same quanta in the same order, so its rate limits
//! and cooldowns see the same history.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use vm_balancer_sdk::{Action, Outcome, Snapshot};

use crate::config::{Config, GuardConfig};
use crate::guard::Guard;
use crate::pipeline::Trace;
use crate::policy::cache::CompileCache;
use crate::policy::slots::{SlotError, SlotStats};
use crate::policy::PolicySet;
use crate::proposal::Decided;
use crate::record::{Frame, RecordError, RecordItem, RecordReader};
use crate::timeline::{cpu_figures, pinned_cpu};
use crate::KIB_PER_MIB;

/// What `replay` prints first, and the docs say: the limits of an
/// open-loop replay.
pub const OPEN_LOOP_NOTE: &str = "open loop: the recorded snapshots do not react to the candidate's actions; \
figures are projections of each quantum's actions onto that quantum's snapshot";

/// Errors of a replay (damage inside the record is not one: the report
/// says where the replay stopped).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The record could not be opened.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A candidate policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] SlotError),
    /// The record's first frame is not a segment header.
    #[error("record file {path}: does not start with a header frame")]
    NoHeader {
        /// The file.
        path: PathBuf,
    },
    /// The timeline could not be written.
    #[error(transparent)]
    Timeline(#[from] crate::timeline::TimelineError),
}

/// What to replay.
pub struct ReplayOptions {
    /// The record directory.
    pub dir: PathBuf,
    /// The candidate policy specs, in slot order (as `run --policy`).
    pub specs: Vec<String>,
    /// Limits the candidates run under (the guard's settings come from the
    /// record).
    pub config: Config,
    /// Compile cache for policy files.
    pub cache: Option<Arc<CompileCache>>,
}

/// Quality figures over the replayed quanta.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Quality {
    /// Busiest pCPU's demand over the lower bound, mean (1.0 is ideal).
    pub mean_load_ratio: f64,
    /// Its worst quantum.
    pub max_load_ratio: f64,
    /// Domain-quanta whose balloon target is within 5 % of max memory of
    /// the guard's floor (used + margin) or under it.
    pub guests_near_floor: u64,
    /// Lowest host memory above the reserve, MiB (negative: below it).
    pub lowest_headroom_mib: i64,
}

/// Quality figures three ways.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QualityReport {
    /// The snapshots as observed (what the host was, before each quantum's actions).
    pub observed: Quality,
    /// The recorded actions projected onto each snapshot.
    pub recorded: Quality,
    /// The candidate's accepted actions projected onto each snapshot.
    pub candidate: Quality,
}

/// One quantum where the candidate differs from the record.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QuantumDiff {
    /// Quantum number.
    pub quantum: u64,
    /// Applied by the candidate (after the guard), not by the record.
    pub only_candidate: Vec<String>,
    /// Applied in the record, not by the candidate.
    pub only_recorded: Vec<String>,
    /// The candidate's actions the guard rejected: `slot: action: reason`.
    pub rejected: Vec<String>,
    /// Candidate slots the fallback decided for.
    pub fell_back: Vec<String>,
}

/// The whole replay.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    /// [`OPEN_LOOP_NOTE`].
    pub note: String,
    /// The record directory.
    pub dir: PathBuf,
    /// The candidate slots.
    pub policies: Vec<String>,
    /// The recorded slots (of the first segment).
    pub recorded_slots: Vec<String>,
    /// Quanta replayed.
    pub quanta: u64,
    /// Daemon runs in the record (the candidates restart at each).
    pub sessions: u64,
    /// Quanta whose applied actions equal the record's exactly.
    pub identical_quanta: u64,
    /// Quanta that differ.
    pub differing_quanta: u64,
    /// Actions only the candidate applied.
    pub only_candidate: u64,
    /// Actions only the record applied.
    pub only_recorded: u64,
    /// Candidate actions the guard rejected.
    pub candidate_rejected: u64,
    /// Candidate actions the guard clamped.
    pub candidate_clamped: u64,
    /// Quanta in which some candidate slot fell back.
    pub candidate_fallback_quanta: u64,
    /// Quality figures.
    pub quality: QualityReport,
    /// Per-slot counters of the candidates.
    pub slots: BTreeMap<String, SlotStats>,
    /// Every differing quantum.
    pub differences: Vec<QuantumDiff>,
    /// Cut-short frames skipped (file, offset, frame).
    pub skipped: Vec<String>,
    /// Why the replay stopped before the record's end, if it did.
    pub stopped: Option<String>,
}

/// Running sums of a [`Quality`].
#[derive(Default)]
struct QualitySum {
    ratio_sum: f64,
    n: u64,
    q: Quality,
}

impl QualitySum {
    fn add(&mut self, snapshot: &Snapshot, actions: &[Action], guard: &GuardConfig) {
        let (ratio, near, headroom) = project(snapshot, actions, guard);
        if self.n == 0 {
            self.q.lowest_headroom_mib = headroom;
        }
        self.ratio_sum += ratio;
        self.n += 1;
        self.q.max_load_ratio = self.q.max_load_ratio.max(ratio);
        self.q.guests_near_floor += near;
        self.q.lowest_headroom_mib = self.q.lowest_headroom_mib.min(headroom);
    }

    fn finish(mut self) -> Quality {
        self.q.mean_load_ratio = if self.n == 0 { 0.0 } else { self.ratio_sum / self.n as f64 };
        self.q
    }
}

/// `actions` projected onto `snapshot`: (busiest over bound, guests near
/// their floor, host memory above the reserve in MiB).
pub fn project(snapshot: &Snapshot, actions: &[Action], guard: &GuardConfig) -> (f64, u64, i64) {
    let ran: HashMap<(&str, u32), u32> =
        snapshot.domains.iter().flat_map(|d| d.vcpus.iter().map(move |v| ((d.name.as_str(), v.id), v.cpu))).collect();
    let mut placement: HashMap<(&str, u32), u32> = HashMap::new();
    let mut targets: HashMap<&str, u64> = HashMap::new();
    for a in actions {
        match a {
            Action::Pin { domain, vcpu, cpus, .. } => {
                if let Some((&key, &cpu)) = ran.get_key_value(&(domain.as_str(), *vcpu)) {
                    placement.insert(key, pinned_cpu(cpus, cpu));
                }
            }
            Action::SetMemory { domain, target_kib, .. } => {
                targets.insert(domain.as_str(), *target_kib);
            }
        }
    }
    let ratio = cpu_figures(snapshot, &placement).load_ratio;
    let mut near = 0;
    let mut held_delta: i64 = 0;
    for d in &snapshot.domains {
        let m = &d.memory;
        let target = targets.get(d.name.as_str()).copied().unwrap_or(m.target_kib);
        held_delta += target as i64 - m.target_kib as i64;
        if let Some(used) = m.used_kib() {
            let floor = (guard.guest_floor_mib * KIB_PER_MIB).max(used + guard.guest_margin_mib * KIB_PER_MIB).min(m.max_kib);
            if target <= floor + m.max_kib / 20 {
                near += 1;
            }
        }
    }
    let h = &snapshot.host.memory;
    let headroom_kib = h.available_kib as i64 - held_delta - h.reserve_kib as i64;
    (ratio, near, headroom_kib.div_euclid(KIB_PER_MIB as i64))
}

/// Sorted action descriptions (what was done, not why): the comparison key.
fn keys(actions: &[Action]) -> Vec<String> {
    let mut k: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
    k.sort();
    k
}

/// `a` without what `b` has (multisets, both sorted).
fn minus(a: &[String], b: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut j = 0;
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j < b.len() && b[j] == *x {
            j += 1;
        } else {
            out.push(x.clone());
        }
    }
    out
}

/// The candidates and the guard of one recorded daemon run.
struct Session {
    id: u64,
    policies: PolicySet,
    guard: Guard,
    guard_config: GuardConfig,
}

/// Replays the record; `on_quantum` sees each quantum's candidate trace
/// (on the recorded snapshot) with the recorded frame, and how far the
/// read is (bytes of the record, of its total).
pub fn replay(
    options: &ReplayOptions,
    mut on_quantum: impl FnMut(&Trace, &Frame, (u64, u64)) -> Result<(), ReplayError>,
) -> Result<ReplayReport, ReplayError> {
    let reader = RecordReader::open(&options.dir)?;
    let total_bytes = reader.total_bytes();
    let mut reader = reader;
    let mut report = ReplayReport { note: OPEN_LOOP_NOTE.into(), dir: options.dir.clone(), ..ReplayReport::default() };
    let load = || -> Result<PolicySet, SlotError> {
        PolicySet::new(&options.config.limits)
            .with_cache(options.cache.clone())
            .with_file_rules(crate::policy::file::FileRules::offline(&options.config))
            .with_specs(&options.specs)
    };
    report.policies = load()?.slots().iter().map(|s| s.name().to_string()).collect();
    let mut session: Option<Session> = None;
    let (mut observed, mut recorded, mut candidate) = (QualitySum::default(), QualitySum::default(), QualitySum::default());
    let mut slot_stats: BTreeMap<String, SlotStats> = BTreeMap::new();
    let mut read_before = 0u64;
    let mut last_path: Option<Arc<PathBuf>> = None;
    for item in reader.by_ref() {
        let item = match item {
            Ok(item) => item,
            Err(error) => {
                report.stopped = Some(crate::error_chain(&error));
                break;
            }
        };
        if last_path.as_ref().is_some_and(|p| *p != item.path) {
            read_before += last_path.as_ref().and_then(|p| std::fs::metadata(&***p).ok()).map_or(0, |m| m.len());
        }
        last_path = Some(item.path.clone());
        match item.item {
            RecordItem::Header(header) => {
                if report.recorded_slots.is_empty() {
                    report.recorded_slots = header.slots.clone();
                }
                if session.as_ref().is_none_or(|s| s.id != header.session) {
                    if let Some(old) = session.take() {
                        merge_stats(&mut slot_stats, &old.policies);
                    }
                    report.sessions += 1;
                    session = Some(Session {
                        id: header.session,
                        policies: load()?,
                        guard: Guard::new(header.guard.clone()),
                        guard_config: header.guard,
                    });
                }
            }
            RecordItem::Quantum(frame) => {
                let Some(s) = session.as_mut() else {
                    return Err(ReplayError::NoHeader { path: (*item.path).clone() });
                };
                let Decided { proposals, fell_back } = s.policies.decide(&frame.snapshot);
                let checked = s.guard.check(&frame.snapshot, proposals.clone());
                report.quanta += 1;
                observed.add(&frame.snapshot, &[], &s.guard_config);
                recorded.add(&frame.snapshot, &frame.applied, &s.guard_config);
                candidate.add(&frame.snapshot, &checked.accepted, &s.guard_config);
                let (mine, theirs) = (keys(&checked.accepted), keys(&frame.applied));
                let diff = QuantumDiff {
                    quantum: frame.quantum,
                    only_candidate: minus(&mine, &theirs),
                    only_recorded: minus(&theirs, &mine),
                    rejected: checked
                        .verdicts
                        .iter()
                        .filter(|v| v.outcome == Outcome::Rejected)
                        .map(|v| format!("{}: {}: {}", v.slot, v.action, v.reason))
                        .collect(),
                    fell_back: fell_back.clone(),
                };
                report.candidate_rejected += diff.rejected.len() as u64;
                report.candidate_clamped += checked.verdicts.iter().filter(|v| v.outcome == Outcome::Clamped).count() as u64;
                report.candidate_fallback_quanta += u64::from(!fell_back.is_empty());
                if checked.accepted == frame.applied {
                    report.identical_quanta += 1;
                } else {
                    report.differing_quanta += 1;
                }
                report.only_candidate += diff.only_candidate.len() as u64;
                report.only_recorded += diff.only_recorded.len() as u64;
                let trace = Trace { snapshot: std::sync::Arc::new(frame.snapshot.clone()), proposals, fell_back, checked };
                if !diff.only_candidate.is_empty()
                    || !diff.only_recorded.is_empty()
                    || !diff.rejected.is_empty()
                    || !diff.fell_back.is_empty()
                {
                    report.differences.push(diff);
                }
                on_quantum(&trace, &frame, (read_before + item.offset, total_bytes))?;
            }
        }
    }
    if let Some(old) = session.take() {
        merge_stats(&mut slot_stats, &old.policies);
    }
    report.slots = slot_stats;
    report.skipped = reader.damage().iter().map(|d| d.to_string()).collect();
    report.quality = QualityReport { observed: observed.finish(), recorded: recorded.finish(), candidate: candidate.finish() };
    Ok(report)
}

fn merge_stats(into: &mut BTreeMap<String, SlotStats>, policies: &PolicySet) {
    for slot in policies.slots() {
        let s = into.entry(slot.name().to_string()).or_default();
        let t = slot.stats();
        s.decided += t.decided;
        s.fallbacks += t.fallbacks;
        s.disabled += t.disabled;
        for (k, v) in &t.failures {
            *s.failures.entry(k).or_default() += v;
        }
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "replay {}  ({} quanta, {} daemon run(s))", self.dir.display(), self.quanta, self.sessions)?;
        writeln!(f, "note     {OPEN_LOOP_NOTE}")?;
        writeln!(f, "recorded {}", self.recorded_slots.join(", "))?;
        writeln!(f, "policies {}", self.policies.join(", "))?;
        for d in &self.skipped {
            writeln!(f, "skipped  {d}")?;
        }
        if let Some(why) = &self.stopped {
            writeln!(f, "STOPPED  {why}")?;
        }
        const SHOWN: usize = 20;
        for d in self.differences.iter().take(SHOWN) {
            let mut parts = Vec::new();
            if !d.only_candidate.is_empty() {
                parts.push(format!("candidate only: {}", d.only_candidate.join("; ")));
            }
            if !d.only_recorded.is_empty() {
                parts.push(format!("recorded only: {}", d.only_recorded.join("; ")));
            }
            if !d.rejected.is_empty() {
                parts.push(format!("guard would reject: {}", d.rejected.join("; ")));
            }
            if !d.fell_back.is_empty() {
                parts.push(format!("fell back: {}", d.fell_back.join(", ")));
            }
            writeln!(f, "quantum {:>6}  {}", d.quantum, parts.join("  |  "))?;
        }
        if self.differences.len() > SHOWN {
            writeln!(f, "... and {} more quanta with differences (--json lists all)", self.differences.len() - SHOWN)?;
        }
        writeln!(
            f,
            "actions  {} quanta identical, {} differ; {} applied only by the candidate, {} only in the record",
            self.identical_quanta, self.differing_quanta, self.only_candidate, self.only_recorded
        )?;
        writeln!(
            f,
            "guard    {} candidate actions would be rejected, {} clamped; fallback in {} quanta",
            self.candidate_rejected, self.candidate_clamped, self.candidate_fallback_quanta
        )?;
        writeln!(f, "quality (projected onto each snapshot)   observed   recorded   candidate")?;
        let q = &self.quality;
        writeln!(
            f,
            "  busiest pCPU / lower bound, mean       {:>8.3}   {:>8.3}   {:>9.3}",
            q.observed.mean_load_ratio, q.recorded.mean_load_ratio, q.candidate.mean_load_ratio
        )?;
        writeln!(
            f,
            "  busiest pCPU / lower bound, worst      {:>8.3}   {:>8.3}   {:>9.3}",
            q.observed.max_load_ratio, q.recorded.max_load_ratio, q.candidate.max_load_ratio
        )?;
        writeln!(
            f,
            "  guest-quanta near their floor          {:>8}   {:>8}   {:>9}",
            q.observed.guests_near_floor, q.recorded.guests_near_floor, q.candidate.guests_near_floor
        )?;
        writeln!(
            f,
            "  lowest host memory above reserve, MiB  {:>8}   {:>8}   {:>9}",
            q.observed.lowest_headroom_mib, q.recorded.lowest_headroom_mib, q.candidate.lowest_headroom_mib
        )?;
        for (name, s) in &self.slots {
            let failures: u64 = s.failures.values().sum();
            write!(f, "slot {name:<10} decided {}, fallback {}, failures {}", s.decided, s.fallbacks, failures)?;
            if failures > 0 {
                write!(f, " {:?}", s.failures)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_multiset_differences() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(minus(&v(&["a", "a", "b", "c"]), &v(&["a", "c", "d"])), v(&["a", "b"]));
        assert_eq!(minus(&v(&[]), &v(&["a"])), v(&[]));
        assert_eq!(minus(&v(&["a"]), &v(&[])), v(&["a"]));
    }

    #[test]
    fn a_projection_moves_demand_where_the_pins_put_it() {
        use vm_balancer_sdk::builder::{DomainBuilder, SnapshotBuilder};
        // Two busy vCPUs on pCPU 0 of 2: ratio 2; one moved to pCPU 1: ratio 1.
        let s = SnapshotBuilder::new(2, 8 << 20)
            .domain(DomainBuilder::new("a").vcpu(0, 0.9).memory_mib(1024, 1024, Some(100)))
            .domain(DomainBuilder::new("b").vcpu(0, 0.9).memory_mib(1024, 1024, Some(100)))
            .build();
        let guard = GuardConfig::default();
        let (before, _, _) = project(&s, &[], &guard);
        let pin = Action::Pin { domain: "b".into(), vcpu: 0, cpus: vec![1], reason: String::new() };
        let (after, _, _) = project(&s, &[pin], &guard);
        assert!((before - 2.0).abs() < 0.05 && (after - 1.0).abs() < 0.05, "{before} {after}");
        // Shrinking a guest to its floor counts it as near the floor, and
        // what it gives back is host headroom.
        let (_, near0, room0) = project(&s, &[], &guard);
        let shrink = Action::SetMemory { domain: "a".into(), target_kib: 160 << 10, reason: String::new() };
        let (_, near1, room1) = project(&s, &[shrink], &guard);
        assert_eq!((near0, near1), (0, 1));
        assert!(room1 > room0, "{room0} {room1}");
    }
}
