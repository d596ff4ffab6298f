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
//! [`pipeline`] runs the stages in that order; [`sim`] is the offline
//! simulator and its quality report.
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
pub mod guard;
pub mod pipeline;
pub mod policy;
pub mod sim;
pub mod snapshot;

pub use vm_balancer_sdk as sdk;

/// Paths of the components that `host/build.rs` built: the embedded default
/// policies and the hostile fixtures used by the tests.
#[doc(hidden)]
pub mod components {
    include!(concat!(env!("OUT_DIR"), "/components.rs"));
}

/// KiB in a MiB, for readable unit conversions.
pub const MIB: u64 = 1024;
