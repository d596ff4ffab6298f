//! vm-balancer: a KVM host daemon whose decisions come from sandboxed
//! WebAssembly component policies.
//!
//! One pipeline per quantum, one module per stage:
//!
//! | stage | module | what it does |
//! |---|---|---|
//! | collect | [`backend`] | a [`backend::Backend`] (libvirt or the simulator) observes host and domains |
//! | snapshot | [`snapshot`] | adds config (reserve, reserved CPUs, params) and last quantum's verdicts |
//! | decide | [`policy`] | every policy slot runs `decide` in its sandbox; failures fall back to the native default |
//! | guard | [`guard`] | host-side safety checks, independent of any policy |
//! | apply | [`apply`] | accepted actions go to the backend |
//!
//! [`pipeline`] runs the stages in that order. [`backend::open`] picks the
//! backend: libvirt, or the simulator ([`backend::sim`]), which
//! [`simulate`] runs offline and reports on.
//!
//! Design decisions and why:
//! - **A safety rejection is an outcome, not an error.** The guard returns
//!   verdicts that are logged, counted and fed back in the next snapshot.
//! - **The daemon never dies of a policy.** Every policy failure is a typed
//!   [`policy::PolicyError`]; the built-in default decides that quantum.
//! - **The backend trait is small and synchronous** (three methods), so the
//!   simulator and libvirt are interchangeable and tests need no hypervisor.
#![deny(missing_docs)]

pub mod apply;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod ffi;
pub mod guard;
pub mod host_check;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod persist;
pub mod pipeline;
pub mod plot;
pub mod policy;
pub mod progress;
pub mod proposal;
pub mod record;
pub mod replay;
pub mod shadow;
pub mod simulate;
pub mod snapshot;
pub mod status;
pub mod timeline;
pub mod top;

#[cfg(test)]
mod fuzz;

pub use vm_balancer_sdk as sdk;

/// Paths of the components that `host/build.rs` built: the embedded default
/// policies and the hostile fixtures used by the tests.
#[doc(hidden)]
pub mod components {
    include!(concat!(env!("OUT_DIR"), "/components.rs"));
}

/// KiB in a MiB, for readable unit conversions (`x_mib * KIB_PER_MIB`).
pub const KIB_PER_MIB: u64 = 1024;

/// An error and its sources, `: `-separated, for one log field. The one
/// place the chain is walked (wasmtime's errors print theirs with `{:#}`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
