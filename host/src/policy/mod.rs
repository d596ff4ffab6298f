//! Stage 3, **decide**: policies in their sandbox, and the fallback.
//!
//! - [`answer`]: the two encodings (worlds) and the answer decoder with
//!   messages that name the action and field.
//! - [`sandbox`]: wasmtime: load a component, check its imports and world,
//!   call `decide` under a deadline and a memory limit.
//! - [`builtin`]: the embedded default components and their native twins,
//!   which are the fallback.
//! - [`slots`]: the ordered set of policies the daemon runs, failure
//!   counting, disabling with backoff.
//! - [`source`]: where the policies come from (specs or the directory) and
//!   the one reload path.
//! - [`dir`], [`file`], [`reload`], [`cache`]: the drop-in policy
//!   directory, reading one policy file (who may own it, its size and
//!   header), hot swap at quantum boundaries, and the compile cache.

pub mod answer;
pub mod builtin;
pub mod cache;
pub mod dir;
pub mod file;
pub mod reload;
pub mod samples;
pub mod sandbox;
pub mod slots;
pub mod source;

pub use crate::proposal::{Decided, Proposal};
pub use sandbox::{LoadedPolicy, PolicyError, Sandbox};
pub use slots::{LastSnapshot, PolicySet, Slot};
