//! What the decide stage hands the guard: each action with the slot that
//! proposed it. A module of its own so that the guard (stage 4) does not
//! depend on the policy runtime (stage 3, wasmtime) to name its input.

use vm_balancer_sdk::Action;

/// An action and the slot that proposed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    /// Slot name.
    pub slot: String,
    /// The action.
    pub action: Action,
    /// True when the native fallback proposed it (the slot's policy failed
    /// or is disabled); logged as such, so a default's action never reads as
    /// the author's.
    pub from_fallback: bool,
}

/// What one quantum's decide stage produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decided {
    /// Every slot's actions, in slot order (the guard's conflict order).
    pub proposals: Vec<Proposal>,
    /// Slots whose quantum the fallback decided (whether or not it proposed
    /// anything).
    pub fell_back: Vec<String>,
}
