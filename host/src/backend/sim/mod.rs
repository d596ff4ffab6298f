//! The simulator backend: a deterministic host driven by a TOML scenario.
//! `vm-balancer simulate` ([`crate::simulate`]) runs policies on it and
//! reports; `run --connect sim:X.toml` runs the daemon on it in real time.
//!
//! What it models, and why that is enough to rank policies:
//! - vCPUs sharing a pCPU share its time fairly (max-min water-filling, what
//!   CFS converges to); unserved demand is reported as steal.
//! - A vCPU with a single-CPU affinity runs there; an unpinned vCPU stays on
//!   the CPU it last ran on (the simulated kernel does not migrate).
//! - A balloon target below the guest's used memory is a pressure event:
//!   the guest swaps what fits in its swap and OOMs past that.
//! - Host memory is finite: each guest holds its whole balloon target on the
//!   host; the host's own use is fixed.
//!
//! Same scenario, same seed, same policies: same report, bit for bit.

pub mod model;
pub mod scenario;
pub mod validate;

pub use model::{Metrics, SimBackend, SimDomainQuantum, SimQuantum};
pub use scenario::{Scenario, ScenarioError};
pub use validate::InvalidScenario;
