//! Stage 4, **guard**: host-side safety checks that hold whatever a policy
//! asks for. A rejection is an outcome, not an error: it gets a reason, is
//! logged and counted, and the non-accepted verdicts are fed back to the
//! policies in the next snapshot.
//!
//! Rules, in the order they are checked:
//! - **A domain that is not answering** (its monitor busy with a call that
//!   has not returned, `not_answering_ms > 0`) gets no action at all: libvirt
//!   would block on it (30 s for the job lock), and the daemon with it.
//! - **Conflicts** are settled by slot order: the first slot to act on a vCPU
//!   (or on a domain's memory) this quantum wins; later ones are rejected.
//! - **Pins**: the domain must be managed and present, the vCPU in range, the
//!   CPU set non-empty, online and not reserved. A pin that changes nothing
//!   is dropped silently. A vCPU re-pinned less than `pin_cooldown_quanta`
//!   ago is refused (first pins of unpinned vCPUs are exempt), and at most
//!   `max_pins_per_quantum` pins pass per quantum.
//! - **Balloon targets**: clamped to the domain's max; never below the guest
//!   floor `max(guest_floor_mib, used + guest_margin_mib)`; shrinking a guest
//!   without balloon stats, or whose stats are older than `stale_after_ms`,
//!   is refused (its use is unknown, or was); each step is
//!   clamped to `max_shrink_pct` / `max_grow_pct` of the guest's max.
//! - **Host OOM guard**: memory given this quantum may not take host
//!   available memory below the reserve; when the host is already below it,
//!   only reclaiming passes. Reclaims are not credited within the quantum
//!   (the balloon takes time to inflate), which errs on the safe side.

use std::collections::{HashMap, HashSet};

use vm_balancer_sdk::{Action, Domain, Outcome, Rule, Snapshot, Verdict};

use crate::config::GuardConfig;
use crate::proposal::Proposal;
use crate::KIB_PER_MIB;

/// Counters of the guard's outcomes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuardStats {
    /// Applied as asked.
    pub accepted: u64,
    /// Applied with a changed value.
    pub clamped: u64,
    /// Refused.
    pub rejected: u64,
    /// Dropped because they changed nothing.
    pub dropped: u64,
}

/// The guard's decision on a quantum's proposals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checked {
    /// Actions to apply, in order.
    pub accepted: Vec<Action>,
    /// A verdict for every action not dropped.
    pub verdicts: Vec<Verdict>,
    /// For each proposal, in order, the index of its verdict in
    /// `verdicts`; `None` when it was dropped (it changed nothing). The
    /// timeline and the record join proposals to verdicts through it.
    pub verdict_of: Vec<Option<usize>>,
}

impl Checked {
    /// The verdicts a policy should hear about: rejected and clamped.
    pub fn feedback(&self) -> Vec<Verdict> {
        self.verdicts.iter().filter(|v| v.outcome != Outcome::Accepted).cloned().collect()
    }
}

/// The guard, with the little state its rate limits need.
#[derive(Debug)]
pub struct Guard {
    config: GuardConfig,
    /// (domain, vCPU) → quantum of its last accepted re-pin.
    last_pinned: HashMap<(String, u32), u64>,
    stats: GuardStats,
}

/// One action's check result.
enum Check {
    /// Apply it as asked.
    Accept(Action),
    /// Apply this changed action, by this rule, for this reason.
    Clamp(Action, Rule, String),
    /// Do not apply it, by this rule, for this reason (fed back as a verdict).
    Reject(Rule, String),
    /// It would change nothing (already so): dropped silently, no verdict.
    NoChange,
}

impl Guard {
    /// A guard with these settings.
    pub fn new(config: GuardConfig) -> Self {
        Guard { config, last_pinned: HashMap::new(), stats: GuardStats::default() }
    }

    /// Counters so far.
    pub fn stats(&self) -> &GuardStats {
        &self.stats
    }

    /// Checks a quantum's proposals against the snapshot they were made on.
    pub fn check(&mut self, snapshot: &Snapshot, proposals: Vec<Proposal>) -> Checked {
        let domains: HashMap<&str, &Domain> = snapshot.domains.iter().map(|d| (d.name.as_str(), d)).collect();
        let usable: HashSet<u32> = snapshot.usable_cpus().map(|c| c.id).collect();
        let cooldown = self.config.pin_cooldown_quanta;
        let quantum = snapshot.quantum;
        self.last_pinned.retain(|(d, _), q| domains.contains_key(d.as_str()) && quantum.saturating_sub(*q) < cooldown);

        let host = &snapshot.host.memory;
        let host_short = host.available_kib < host.reserve_kib;
        let mut grow_budget_kib = host.available_kib.saturating_sub(host.reserve_kib);
        let mut pinned_by: HashMap<(&str, u32), String> = HashMap::new();
        let mut memory_by: HashMap<&str, String> = HashMap::new();
        let mut pins = 0usize;
        let mut checked = Checked::default();

        for Proposal { slot, action, from_fallback } in proposals {
            // Who really decided: a fallback action carries the failed
            // slot's name (it decides for that slot), so the log says so, and
            // the built-in default's pin never reads as the author's.
            let by = if from_fallback { "built-in fallback" } else { "policy" };
            let result = match &action {
                Action::Pin { domain, .. } | Action::SetMemory { domain, .. }
                    if domains.get(domain.as_str()).is_some_and(|d| d.not_answering_ms > 0) =>
                {
                    Check::Reject(
                        Rule::NotAnswering,
                        format!(
                            "domain {domain:?} has not answered for {} ms (its monitor is busy): any change would block in libvirt",
                            domains[domain.as_str()].not_answering_ms
                        ),
                    )
                }
                Action::Pin { domain, vcpu, cpus, .. } => match domains.get(domain.as_str()) {
                    None => Check::Reject(Rule::Unmanaged, format!("domain {domain:?} is not managed or no longer exists")),
                    Some(d) => {
                        let key = (d.name.as_str(), *vcpu);
                        let check = self.check_pin(d, *vcpu, cpus, &usable, pinned_by.get(&key), pins, quantum);
                        if matches!(check, Check::Accept(_)) {
                            pinned_by.insert(key, slot.clone());
                            pins += 1;
                        }
                        check
                    }
                },
                Action::SetMemory { domain, target_kib, .. } => match domains.get(domain.as_str()) {
                    None => Check::Reject(Rule::Unmanaged, format!("domain {domain:?} is not managed or no longer exists")),
                    Some(d) => {
                        let check =
                            self.check_memory(d, *target_kib, memory_by.get(d.name.as_str()), host_short, host, &mut grow_budget_kib);
                        if matches!(check, Check::Accept(_) | Check::Clamp(..)) {
                            memory_by.insert(d.name.as_str(), slot.clone());
                        }
                        check
                    }
                },
            };
            let (outcome, applied, reason, rule) = match result {
                Check::NoChange => {
                    checked.verdict_of.push(None);
                    self.stats.dropped += 1;
                    tracing::debug!(%slot, by, %action, "dropped: changes nothing");
                    continue;
                }
                Check::Accept(a) => {
                    let a = with_reason(a, action.reason());
                    self.stats.accepted += 1;
                    if let Action::Pin { domain, vcpu, .. } = &a {
                        self.last_pinned.insert((domain.clone(), *vcpu), quantum);
                    }
                    tracing::debug!(%slot, by, action = %a, reason = a.reason(), "accepted");
                    checked.accepted.push(a.clone());
                    (Outcome::Accepted, a, action.reason().to_string(), Rule::Other)
                }
                Check::Clamp(a, rule, why) => {
                    let a = with_reason(a, action.reason());
                    self.stats.clamped += 1;
                    tracing::info!(%slot, by, asked = %action, applied = %a, why, "clamped by the guard");
                    checked.accepted.push(a.clone());
                    (Outcome::Clamped, a, why, rule)
                }
                Check::Reject(rule, why) => {
                    self.stats.rejected += 1;
                    tracing::info!(%slot, by, %action, why, "rejected by the guard");
                    (Outcome::Rejected, action, why, rule)
                }
            };
            checked.verdict_of.push(Some(checked.verdicts.len()));
            checked.verdicts.push(Verdict { slot, action: applied, outcome, reason, rule });
        }
        checked
    }

    #[allow(clippy::too_many_arguments)]
    fn check_pin(
        &self,
        d: &Domain,
        vcpu: u32,
        cpus: &[u32],
        usable: &HashSet<u32>,
        earlier: Option<&String>,
        pins: usize,
        quantum: u64,
    ) -> Check {
        let Some(v) = d.vcpus.iter().find(|v| v.id == vcpu) else {
            return Check::Reject(Rule::NoSuchVcpu, format!("domain {:?} has no vCPU {vcpu} (it has {})", d.name, d.vcpus.len()));
        };
        if cpus.is_empty() {
            return Check::Reject(Rule::EmptyCpuSet, format!("empty CPU set for domain {:?} vCPU {vcpu}", d.name));
        }
        if let Some(bad) = cpus.iter().find(|c| !usable.contains(c)) {
            return Check::Reject(Rule::BadCpu, format!("CPU {bad} is offline, reserved for the host, or does not exist"));
        }
        if let Some(slot) = earlier {
            return Check::Reject(
                Rule::Conflict,
                format!("conflict: slot {slot} already pinned domain {:?} vCPU {vcpu} this quantum", d.name),
            );
        }
        let mut wanted = cpus.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut current = v.affinity.clone();
        current.sort_unstable();
        if wanted[..] == current[..] {
            return Check::NoChange;
        }
        let first_pin = v.pinned_to().is_none();
        if let Some(q) = self.last_pinned.get(&(d.name.clone(), vcpu)) {
            if !first_pin {
                return Check::Reject(
                    Rule::PinCooldown,
                    format!(
                        "rate limit: domain {:?} vCPU {vcpu} was re-pinned {} quanta ago (cooldown {})",
                        d.name,
                        quantum - q,
                        self.config.pin_cooldown_quanta
                    ),
                );
            }
        }
        if self.config.max_pins_per_quantum > 0 && pins >= self.config.max_pins_per_quantum {
            return Check::Reject(Rule::PinRateLimit, format!("rate limit: at most {} pins per quantum", self.config.max_pins_per_quantum));
        }
        Check::Accept(Action::Pin { domain: d.name.clone(), vcpu, cpus: wanted, reason: String::new() })
    }

    fn check_memory(
        &self,
        d: &Domain,
        asked_kib: u64,
        earlier: Option<&String>,
        host_short: bool,
        host: &vm_balancer_sdk::HostMemory,
        grow_budget_kib: &mut u64,
    ) -> Check {
        if let Some(slot) = earlier {
            return Check::Reject(Rule::Conflict, format!("conflict: slot {slot} already set domain {:?} memory this quantum", d.name));
        }
        let m = &d.memory;
        let current = m.target_kib;
        let mut target = asked_kib;
        // Each clamp with its rule; the verdict names the last one, which
        // set the target applied.
        let mut why: Vec<(Rule, String)> = Vec::new();
        if target > m.max_kib {
            why.push((Rule::MaxMemory, format!("above max memory {} KiB", m.max_kib)));
            target = m.max_kib;
        }
        if target < current {
            let Some(used) = m.used_kib() else {
                return Check::Reject(
                    Rule::NoBalloonStats,
                    format!("domain {:?} reports no balloon stats: cannot shrink it safely", d.name),
                );
            };
            if m.age_ms > self.config.stale_after_ms {
                return Check::Reject(
                    Rule::StaleStats,
                    format!(
                        "domain {:?} memory figures are {} ms old (stale after {} ms): cannot shrink it safely",
                        d.name, m.age_ms, self.config.stale_after_ms
                    ),
                );
            }
            let floor = (self.config.guest_floor_mib * KIB_PER_MIB).max(used + self.config.guest_margin_mib * KIB_PER_MIB).min(m.max_kib);
            if target < floor {
                if floor >= current {
                    return Check::Reject(Rule::GuestFloor, format!(
                        "target {asked_kib} KiB is below the guest floor {floor} KiB (used {used} KiB + margin) and the guest is already at or below it"
                    ));
                }
                why.push((Rule::GuestFloor, format!("below guest floor {floor} KiB (used {used} KiB + margin)")));
                target = floor;
            }
            let max_step = (m.max_kib as f64 * self.config.max_shrink_pct / 100.0) as u64;
            if current - target > max_step {
                why.push((Rule::StepLimit, format!("shrink step over {max_step} KiB per quantum")));
                target = current - max_step;
            }
        } else if target > current {
            let max_step = (m.max_kib as f64 * self.config.max_grow_pct / 100.0) as u64;
            if target - current > max_step {
                why.push((Rule::StepLimit, format!("grow step over {max_step} KiB per quantum")));
                target = current + max_step;
            }
            if host_short {
                return Check::Reject(
                    Rule::HostReserve,
                    format!(
                        "host available {} KiB is below the reserve {} KiB: only reclaiming is allowed",
                        host.available_kib, host.reserve_kib
                    ),
                );
            }
            let delta = target - current;
            if delta > *grow_budget_kib {
                if *grow_budget_kib < KIB_PER_MIB {
                    return Check::Reject(
                        Rule::HostReserve,
                        format!(
                            "host OOM guard: giving {delta} KiB would take host available memory below the reserve {} KiB",
                            host.reserve_kib
                        ),
                    );
                }
                why.push((Rule::HostReserve, format!("host OOM guard: only {} KiB left above the reserve", *grow_budget_kib)));
                target = current + *grow_budget_kib;
            }
            *grow_budget_kib -= target - current;
        }
        let rule = why.last().map_or(Rule::Other, |(rule, _)| *rule);
        let words = || why.iter().map(|(_, w)| w.as_str()).collect::<Vec<_>>().join("; ");
        if target == current {
            return if why.is_empty() { Check::NoChange } else { Check::Reject(rule, words()) };
        }
        let action = Action::SetMemory { domain: d.name.clone(), target_kib: target, reason: String::new() };
        if why.is_empty() {
            Check::Accept(action)
        } else {
            Check::Clamp(action, rule, words())
        }
    }
}

/// The applied action keeps the policy's reason for the log.
fn with_reason(mut action: Action, why: &str) -> Action {
    match &mut action {
        Action::Pin { reason, .. } | Action::SetMemory { reason, .. } => *reason = why.to_string(),
    }
    action
}
