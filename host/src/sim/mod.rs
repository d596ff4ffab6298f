//! The offline simulator: a deterministic backend driven by a TOML scenario,
//! and the quality report `vm-balancer simulate` prints.
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
pub mod report;
pub mod scenario;

pub use model::SimBackend;
pub use report::{simulate, simulate_cached, Report, SimulateError};
pub use scenario::{Scenario, ScenarioError};
