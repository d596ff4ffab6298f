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
}
