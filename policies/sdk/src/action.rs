//! What a policy asks for, and what the guard said about it.

use serde::{Deserialize, Serialize};

/// One requested change. Encoded as a map with a `kind` field:
/// `{"kind": "pin", ...}` or `{"kind": "set-memory", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Action {
    /// Restrict a vCPU to a set of pCPUs.
    Pin {
        /// Domain name.
        domain: String,
        /// vCPU number.
        vcpu: u32,
        /// pCPU ids; must be non-empty, online and not reserved.
        cpus: Vec<u32>,
        /// Why, for the daemon's log.
        #[serde(default)]
        reason: String,
    },
    /// Set a balloon target.
    SetMemory {
        /// Domain name.
        domain: String,
        /// New balloon target, KiB.
        target_kib: u64,
        /// Why, for the daemon's log.
        #[serde(default)]
        reason: String,
    },
}

impl Action {
    /// The domain the action is about.
    pub fn domain(&self) -> &str {
        match self {
            Action::Pin { domain, .. } | Action::SetMemory { domain, .. } => domain,
        }
    }

    /// The policy's reason.
    pub fn reason(&self) -> &str {
        match self {
            Action::Pin { reason, .. } | Action::SetMemory { reason, .. } => reason,
        }
    }

    /// A pin action.
    pub fn pin(domain: impl Into<String>, vcpu: u32, cpus: Vec<u32>, reason: impl Into<String>) -> Self {
        Action::Pin { domain: domain.into(), vcpu, cpus, reason: reason.into() }
    }

    /// A balloon-target action.
    pub fn set_memory(domain: impl Into<String>, target_kib: u64, reason: impl Into<String>) -> Self {
        Action::SetMemory { domain: domain.into(), target_kib, reason: reason.into() }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Pin { domain, vcpu, cpus, .. } => write!(f, "pin {domain} vcpu {vcpu} -> {cpus:?}"),
            Action::SetMemory { domain, target_kib, .. } => {
                write!(f, "set-memory {domain} -> {target_kib} KiB")
            }
        }
    }
}

/// A policy's answer: `{ "actions": [...] }`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The requested actions, in order.
    pub actions: Vec<Action>,
}

/// What the guard did with an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Applied as asked.
    Accepted,
    /// Applied with a changed value (the action in the verdict is the applied one).
    Clamped,
    /// Not applied.
    Rejected,
}

/// Which guard rule a verdict is about: machine-readable, so that a policy
/// (or a dashboard) acts on it without matching the words of the reason.
/// Encoded as its snake_case name (`"pin_rate_limit"`); a name this SDK
/// does not know (a newer daemon's) reads as [`Rule::Other`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Rule {
    /// The domain's monitor has not answered.
    NotAnswering,
    /// The domain is not managed or no longer exists.
    Unmanaged,
    /// The domain has no such vCPU.
    NoSuchVcpu,
    /// A pin to no CPU.
    EmptyCpuSet,
    /// A CPU offline, reserved for the host, or absent.
    BadCpu,
    /// Another slot already changed this vCPU or domain this quantum.
    Conflict,
    /// The vCPU was re-pinned too recently (`guard.pin_cooldown_quanta`).
    PinCooldown,
    /// The per-quantum pin limit (`guard.max_pins_per_quantum`).
    PinRateLimit,
    /// No balloon statistics: a shrink is not safe.
    NoBalloonStats,
    /// Balloon statistics too old: a shrink is not safe.
    StaleStats,
    /// The host's memory reserve (the OOM guard).
    HostReserve,
    /// The guest's floor (used memory plus margin, or the set minimum).
    GuestFloor,
    /// The per-quantum grow or shrink step.
    StepLimit,
    /// Above the domain's max memory.
    MaxMemory,
    /// Accepted, or a rule this SDK does not name.
    #[default]
    Other,
}

impl Rule {
    /// Every rule, in declaration order.
    pub const ALL: [Rule; 15] = [
        Rule::NotAnswering,
        Rule::Unmanaged,
        Rule::NoSuchVcpu,
        Rule::EmptyCpuSet,
        Rule::BadCpu,
        Rule::Conflict,
        Rule::PinCooldown,
        Rule::PinRateLimit,
        Rule::NoBalloonStats,
        Rule::StaleStats,
        Rule::HostReserve,
        Rule::GuestFloor,
        Rule::StepLimit,
        Rule::MaxMemory,
        Rule::Other,
    ];

    /// Its snake_case name, as encoded and as the daemon's metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::NotAnswering => "not_answering",
            Rule::Unmanaged => "unmanaged",
            Rule::NoSuchVcpu => "no_such_vcpu",
            Rule::EmptyCpuSet => "empty_cpu_set",
            Rule::BadCpu => "bad_cpu",
            Rule::Conflict => "conflict",
            Rule::PinCooldown => "pin_cooldown",
            Rule::PinRateLimit => "pin_rate_limit",
            Rule::NoBalloonStats => "no_balloon_stats",
            Rule::StaleStats => "stale_stats",
            Rule::HostReserve => "host_reserve",
            Rule::GuestFloor => "guest_floor",
            Rule::StepLimit => "step_limit",
            Rule::MaxMemory => "max_memory",
            Rule::Other => "other",
        }
    }
}

impl From<String> for Rule {
    fn from(name: String) -> Self {
        Rule::ALL.into_iter().find(|r| r.name() == name).unwrap_or(Rule::Other)
    }
}

impl From<Rule> for String {
    fn from(rule: Rule) -> Self {
        rule.name().to_string()
    }
}

/// The guard's verdict on one action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The policy slot that asked, e.g. `"cpu"` or `"20-mem.wasm"`.
    pub slot: String,
    /// The action as applied (clamped) or as asked (rejected).
    pub action: Action,
    /// What happened.
    pub outcome: Outcome,
    /// Why, in words.
    pub reason: String,
    /// The rule that clamped or rejected it, for a program to act on
    /// (absent in snapshots of daemons before it: [`Rule::Other`]).
    #[serde(default)]
    pub rule: Rule,
}
