//! The embedded default policies (compiled to components by `host/build.rs`)
//! and their native twins, which decide whenever a policy fails.
//!
//! The defaults run as wasm like any user policy, so the sandbox path is
//! exercised on every host; the native twin is the same Rust code linked
//! into the daemon, so the fallback itself cannot trap or time out.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use vm_balancer_sdk::{Action, Policy, Snapshot};
use vmb_policy_classic::ClassicPolicy;
use vmb_policy_cpu::CpuPolicy;
use vmb_policy_mem::MemPolicy;
use wasmtime::component::Component;

use super::sandbox::{compile, PolicyError};

const CPU_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/components/vmb_policy_cpu.wasm"));
const MEM_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/components/vmb_policy_mem.wasm"));
const CLASSIC_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/components/vmb_policy_classic.wasm"));

/// A policy shipped inside the binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// The default CPU policy.
    Cpu,
    /// The default memory policy.
    Mem,
    /// The original algorithms, for comparison.
    Classic,
}

impl Builtin {
    /// All builtins.
    pub const ALL: [Builtin; 3] = [Builtin::Cpu, Builtin::Mem, Builtin::Classic];

    /// Parses `cpu`, `mem` or `classic` (with or without a `builtin:` prefix).
    pub fn parse(spec: &str) -> Option<Builtin> {
        match spec.strip_prefix("builtin:").unwrap_or(spec) {
            "cpu" => Some(Builtin::Cpu),
            "mem" => Some(Builtin::Mem),
            "classic" => Some(Builtin::Classic),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Cpu => "cpu",
            Builtin::Mem => "mem",
            Builtin::Classic => "classic",
        }
    }

    /// The component bytes.
    pub fn wasm(self) -> &'static [u8] {
        match self {
            Builtin::Cpu => CPU_WASM,
            Builtin::Mem => MEM_WASM,
            Builtin::Classic => CLASSIC_WASM,
        }
    }

    /// The compiled component, compiled once per process.
    pub fn component(self) -> Result<Component, PolicyError> {
        static COMPILED: [OnceLock<Component>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let cell = &COMPILED[self as usize];
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let component = compile(&format!("builtin:{}", self.name()), self.wasm())?;
        Ok(cell.get_or_init(|| component).clone())
    }

    /// A fresh native instance of the same policy.
    pub fn native(self) -> NativePolicy {
        match self {
            Builtin::Cpu => NativePolicy::Cpu(CpuPolicy::default()),
            Builtin::Mem => NativePolicy::Mem(MemPolicy::default()),
            Builtin::Classic => NativePolicy::Classic(ClassicPolicy),
        }
    }
}

/// A builtin policy compiled natively.
#[derive(Debug)]
pub enum NativePolicy {
    /// Default CPU.
    Cpu(CpuPolicy),
    /// Default memory.
    Mem(MemPolicy),
    /// Classic.
    Classic(ClassicPolicy),
}

impl NativePolicy {
    /// Runs the policy natively.
    pub fn decide(&mut self, snapshot: &Snapshot) -> Result<Vec<Action>, String> {
        match self {
            NativePolicy::Cpu(p) => p.decide(snapshot),
            NativePolicy::Mem(p) => p.decide(snapshot),
            NativePolicy::Classic(p) => p.decide(snapshot),
        }
    }
}

/// What decides a slot's quantum when its policy fails: the native default
/// CPU and/or memory policy, matching what the failed policy manages.
#[derive(Debug)]
pub struct Fallback {
    policies: Vec<NativePolicy>,
}

impl Fallback {
    /// A fallback covering CPU and/or memory.
    pub fn new(cpu: bool, memory: bool) -> Self {
        let mut policies = Vec::new();
        if cpu {
            policies.push(Builtin::Cpu.native());
        }
        if memory {
            policies.push(Builtin::Mem.native());
        }
        Fallback { policies }
    }

    /// Decides natively. A panic here would be a bug in the defaults; it is
    /// contained and logged rather than taking the daemon down.
    pub fn decide(&mut self, snapshot: &Snapshot) -> Vec<Action> {
        let mut actions = Vec::new();
        for policy in &mut self.policies {
            match catch_unwind(AssertUnwindSafe(|| policy.decide(snapshot))) {
                Ok(Ok(a)) => actions.extend(a),
                Ok(Err(e)) => tracing::error!(error = %e, "native default policy refused to decide"),
                Err(_) => tracing::error!("native default policy panicked; no actions from it this quantum"),
            }
        }
        actions
    }
}
