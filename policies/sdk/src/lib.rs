//! The vm-balancer policy SDK.
//!
//! One definition of the contract: the daemon serializes exactly these types
//! into the MessagePack snapshot, and policies written with this crate
//! decode them. The field-by-field description for authors in other
//! languages is `wit/SCHEMA.md`.
//!
//! Design decisions:
//! - **Bytes across the WIT boundary, named MessagePack maps inside.** Adding a
//!   field never needs a new WIT world; every decoder ignores fields it does
//!   not know (serde's default, kept on purpose: no `deny_unknown_fields`).
//! - **Policies are plain Rust.** A policy implements [`Policy`]; the
//!   [`export_policy!`] macro wires it to the component exports on wasm, and
//!   on the host the same type is an ordinary value that unit tests (and the
//!   daemon's fallback) call natively.
//! - **State lives in the policy value.** The instance is kept across quanta,
//!   so `&mut self` persists; after a trap or a reload it starts from
//!   `Default::default()` again.
#![deny(missing_docs)]

mod action;
pub mod builder;
mod codec;
mod log;
pub mod makespan;
mod param;
mod snapshot;

pub use action::{Action, Decision, Outcome, Rule, Verdict};
pub use codec::DecodeError;
pub use log::{log, set_native_log_hook, Level};
pub use param::Param;
pub use smallvec::smallvec;
pub use snapshot::{CpuList, Domain, DomainMemory, Host, HostCpu, HostMemory, Snapshot, Vcpu, SCHEMA_VERSION};

/// What a policy says about itself (mirrors the WIT `policy-info` record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Short name, e.g. `"cpu-default"`.
    pub name: &'static str,
    /// Free-form version string.
    pub version: &'static str,
    /// Emits `pin` actions.
    pub cpu: bool,
    /// Emits `set-memory` actions.
    pub memory: bool,
}

/// Which parts of the snapshot a policy reads. Decoding is most of the cost
/// of a call at scale, and most of the snapshot is vCPUs: a memory policy
/// that says it does not read them skips 4,000 vCPUs at 1,000 domains.
/// Parts not read are left empty in the snapshot the policy gets (in wasm;
/// natively, e.g. as the daemon's fallback, it may get a full one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reads {
    /// `domains[].vcpus`.
    pub vcpus: bool,
    /// `domains[].memory`.
    pub domain_memory: bool,
}

impl Reads {
    /// Everything (the default).
    pub const ALL: Reads = Reads { vcpus: true, domain_memory: true };
}

/// A policy: turns a snapshot into actions. Implement this and call
/// [`export_policy!`] once in the crate.
pub trait Policy: Default {
    /// The parts of the snapshot `decide` reads; the rest is not decoded.
    const READS: Reads = Reads::ALL;
    /// Describes the policy.
    fn info() -> Info;
    /// Decides this quantum's actions. An `Err` makes the daemon fall back to
    /// its built-in default for this quantum and counts as a failure.
    fn decide(&mut self, snapshot: &Snapshot) -> Result<Vec<Action>, String>;
}

/// Errors of the byte-level glue, named so a policy's `err(..)` says what broke.
#[derive(Debug)]
pub enum CodecError {
    /// The snapshot bytes did not decode.
    Snapshot(DecodeError),
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Snapshot(e) => write!(f, "cannot decode snapshot: {e}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// Encodes a snapshot the way the daemon does (named MessagePack map; the
/// same bytes as `rmp_serde::to_vec_named`, written faster: see the `codec` module).
pub fn encode_snapshot(snapshot: &Snapshot) -> Vec<u8> {
    // Sized from the typical encoded size (about 60 bytes a vCPU, 50 a host
    // CPU, 200 a domain besides its vCPUs): growing a 350 KB buffer by
    // doubling costs a third of the encode.
    let vcpus: usize = snapshot.domains.iter().map(|d| d.vcpus.len()).sum();
    let mut buf = Vec::with_capacity(1024 + vcpus * 60 + snapshot.domains.len() * 200 + snapshot.host.cpus.len() * 50);
    codec::encode(snapshot, &mut buf);
    buf
}

/// Decodes a snapshot; unknown fields are ignored, missing required ones
/// are an error naming them (see the `codec` module for why this is not plain rmp_serde).
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, CodecError> {
    let mut snapshot = Snapshot::default();
    decode_snapshot_into(bytes, &mut snapshot, Reads::ALL).map(|()| snapshot)
}

/// Decodes a snapshot into `snapshot`, replacing all of it but reusing its
/// strings' and lists' memory (decoding into last quantum's snapshot
/// allocates almost nothing on a host whose domains did not change), and
/// storing only the parts in `reads`: the rest is skipped and left empty.
pub fn decode_snapshot_into(bytes: &[u8], snapshot: &mut Snapshot, reads: Reads) -> Result<(), CodecError> {
    codec::decode_into(bytes, snapshot, reads).map_err(CodecError::Snapshot)
}

/// Encodes a policy's answer as `{ "actions": [...] }` (the same bytes as
/// `rmp_serde::to_vec_named(&Decision { actions })`).
pub fn encode_actions(actions: &[Action]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + 64 * actions.len());
    codec::encode_decision(actions, &mut buf);
    buf
}

/// Decodes a policy's MessagePack answer when it is laid out plainly (as
/// [`encode_actions`] writes it: known keys in any order, unsigned
/// integers); `None` otherwise, and then serde must decode it (and word its
/// error). Never accepts what serde refuses; the daemon's fast path.
pub fn decode_actions(bytes: &[u8]) -> Option<Vec<Action>> {
    codec::decode_decision(bytes)
}

/// A policy and the snapshot it decodes into: the byte-level `decide` that
/// the wasm export glue runs, one per instance. Public so native harnesses
/// (benchmarks, tests) can run the exact same path.
#[derive(Default)]
pub struct Runner<P> {
    policy: P,
    /// Last quantum's snapshot, decoded into again (see [`decode_snapshot_into`]).
    snapshot: Snapshot,
}

impl<P: Policy> Runner<P> {
    /// Decode, run the policy, encode.
    pub fn decide(&mut self, snapshot: &[u8]) -> Result<Vec<u8>, String> {
        decode_snapshot_into(snapshot, &mut self.snapshot, P::READS).map_err(|e| e.to_string())?;
        let actions = self.policy.decide(&self.snapshot)?;
        Ok(encode_actions(&actions))
    }
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_policy_world",
        default_bindings_module: "vm_balancer_sdk::bindings",
    });
}

/// Exports a [`Policy`] type as the component's `describe` and `decide`.
/// On non-wasm targets it expands to nothing, so the crate still builds and
/// tests natively.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __VmbExport;
            ::std::thread_local! {
                static __VMB_STATE: ::std::cell::RefCell<::std::option::Option<$crate::Runner<$ty>>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }
            impl $crate::bindings::Guest for __VmbExport {
                fn describe() -> $crate::bindings::PolicyInfo {
                    let info = <$ty as $crate::Policy>::info();
                    $crate::bindings::PolicyInfo {
                        name: info.name.into(),
                        version: info.version.into(),
                        cpu: info.cpu,
                        memory: info.memory,
                    }
                }
                fn decide(snapshot: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    __VMB_STATE.with(|state| {
                        let mut state = state.borrow_mut();
                        let runner = state.get_or_insert_with(::std::default::Default::default);
                        runner.decide(&snapshot)
                    })
                }
            }
    $crate::bindings::__export_policy_world!(__VmbExport with_types_in $crate::bindings);
        };
        // Natively there is nothing to export; naming the type keeps it "used".
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            let _ = <$ty as $crate::Policy>::decide;
        };
    };
}
