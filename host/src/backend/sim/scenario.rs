//! Scenario files (TOML). See `examples/scenarios/README.md` for the format.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::validate::InvalidScenario;

/// Errors reading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Unreadable file.
    #[error("cannot read scenario {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a valid scenario.
    #[error("invalid scenario {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What and where.
        #[source]
        source: toml::de::Error,
    },
    /// A value out of range. `what` is in the message, not a source: the
    /// one line then names the file, the VM, the key and the value.
    #[error("scenario {path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the VM and value (boxed: it is the
        /// largest variant, and errors travel in every `Result`).
        what: Box<InvalidScenario>,
    },
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name.
    pub name: String,
    /// What it exercises.
    #[serde(default)]
    pub description: String,
    /// Seed of every random choice.
    #[serde(default)]
    pub seed: u64,
    /// Default run length, quanta.
    pub quanta: u64,
    /// Quantum length, milliseconds.
    #[serde(default = "default_quantum_ms")]
    pub quantum_ms: u32,
    /// The host.
    pub host: HostSpec,
    /// VM groups.
    #[serde(rename = "vm", default)]
    pub vms: Vec<VmSpec>,
}

fn default_quantum_ms() -> u32 {
    1000
}

/// The simulated host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Number of pCPUs.
    pub cpus: u32,
    /// Physical memory, MiB.
    pub memory_mib: u64,
    /// Memory the host itself uses, MiB.
    #[serde(default)]
    pub base_used_mib: u64,
    /// Guard reserve for this scenario, MiB (overrides the config's).
    #[serde(default)]
    pub reserve_mib: Option<u64>,
    /// Busy fraction of each pCPU from non-VM work, by CPU id (missing = 0).
    #[serde(default)]
    pub background: Vec<f32>,
    /// NUMA nodes; the pCPUs are split evenly into contiguous blocks
    /// (pCPU `c` is on node `c * numa_nodes / cpus`).
    #[serde(default = "one")]
    pub numa_nodes: u32,
}

impl HostSpec {
    /// The NUMA node of pCPU `cpu`.
    pub fn node_of(&self, cpu: u32) -> u32 {
        (u64::from(cpu) * u64::from(self.numa_nodes.max(1)) / u64::from(self.cpus.max(1))) as u32
    }
}

/// Initial placement of a group's vCPUs.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Every vCPU pinned to pCPU 0 (the worst case).
    First,
    /// Pinned round-robin over the pCPUs, continuing across VMs.
    #[default]
    RoundRobin,
    /// Pinned to seeded random pCPUs.
    Random,
    /// Not pinned; running on a seeded random pCPU.
    Unpinned,
}

/// A group of identical VMs (`count` of them, named `name-0`, `name-1`, ...,
/// or just `name` when `count` is 1).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Name or name prefix.
    pub name: String,
    /// How many.
    #[serde(default = "one")]
    pub count: u32,
    /// vCPUs each.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Max memory, MiB.
    pub max_mib: u64,
    /// Initial balloon target, MiB (default: max).
    #[serde(default)]
    pub initial_mib: Option<u64>,
    /// Guest swap, MiB: pressure beyond it is an OOM.
    #[serde(default)]
    pub swap_mib: u64,
    /// Whether the guest has a balloon driver reporting stats.
    #[serde(default = "yes")]
    pub balloon_stats: bool,
    /// Tags passed to policies.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Initial placement.
    #[serde(default)]
    pub placement: Placement,
    /// Quantum it is created.
    #[serde(default)]
    pub start: u64,
    /// Quantum it is destroyed (never if absent).
    #[serde(default)]
    pub stop: Option<u64>,
    /// For groups: each VM starts `stagger` quanta after the previous one.
    #[serde(default)]
    pub stagger: u64,
    /// Per-vCPU CPU demand, fraction of a pCPU.
    #[serde(default = "idle_cpu")]
    pub cpu: Profile,
    /// Guest used memory, MiB.
    #[serde(default = "idle_mem")]
    pub mem_mib: Profile,
    /// Per-instance random spread of profile values, ±fraction (0.2 = ±20 %).
    #[serde(default)]
    pub spread: f64,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn idle_cpu() -> Profile {
    Profile::Constant { value: 0.02 }
}
fn idle_mem() -> Profile {
    Profile::Constant { value: 100.0 }
}

/// A value over time (t = quanta since the VM started).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Profile {
    /// Always `value`.
    Constant {
        /// The value.
        value: f64,
    },
    /// `before` until `at`, then `after`.
    Step {
        /// Before.
        before: f64,
        /// From `at` on.
        after: f64,
        /// Quantum of the step.
        at: u64,
    },
    /// Linear from `from` at `start` to `to` at `end`, flat outside.
    Ramp {
        /// Start value.
        from: f64,
        /// End value.
        to: f64,
        /// Start quantum.
        start: u64,
        /// End quantum.
        end: u64,
    },
    /// Square wave: `high` for the first half of each period, then `low`.
    Periodic {
        /// Low value.
        low: f64,
        /// High value.
        high: f64,
        /// Period, quanta.
        period: u64,
        /// Phase shift, quanta.
        #[serde(default)]
        offset: u64,
    },
    /// Seeded random walk: each quantum moves by up to ±`step`, kept in [`min`, `max`]
    /// (`min` ≤ `max`, `start` between them: see [`Scenario::validate`]).
    RandomWalk {
        /// Initial value.
        start: f64,
        /// Largest move per quantum.
        step: f64,
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// Phases: `values[i]` for `every` quanta each, cycling.
    Phases {
        /// The values.
        values: Vec<f64>,
        /// Quanta per phase.
        every: u64,
    },
}

impl Profile {
    /// The value at `t`, for the deterministic kinds; random walks are
    /// advanced by the model, which passes its previous value.
    pub fn at(&self, t: u64, previous: f64, noise: f64) -> f64 {
        match self {
            Profile::Constant { value } => *value,
            Profile::Step { before, after, at } => {
                if t < *at {
                    *before
                } else {
                    *after
                }
            }
            Profile::Ramp { from, to, start, end } => {
                if t <= *start {
                    *from
                } else if t >= *end {
                    *to
                } else {
                    from + (to - from) * (t - start) as f64 / (end - start) as f64
                }
            }
            Profile::Periodic { low, high, period, offset } => {
                let period = (*period).max(1);
                // Sum of remainders: `t + offset` could wrap.
                if ((t % period + offset % period) % period) < period.div_ceil(2) {
                    *high
                } else {
                    *low
                }
            }
            Profile::RandomWalk { start, step, min, max } => {
                if t == 0 {
                    *start
                } else {
                    // Not `clamp`, which panics when min > max: validation
                    // refuses that, and an unvalidated profile must not
                    // take the daemon down either.
                    (previous + noise * step).min(*max).max(*min)
                }
            }
            Profile::Phases { values, every } => {
                if values.is_empty() {
                    0.0
                } else {
                    values[((t / (*every).max(1)) % values.len() as u64) as usize]
                }
            }
        }
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.into(), source })?;
        Scenario::parse(&text, path)
    }

    /// Parses and validates scenario text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|source| ScenarioError::Parse { path: path.into(), source })?;
        scenario.validate().map_err(|what| ScenarioError::Invalid { path: path.into(), what: Box::new(what) })?;
        Ok(scenario)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let step = Profile::Step { before: 1.0, after: 2.0, at: 3 };
        assert_eq!((step.at(2, 0.0, 0.0), step.at(3, 0.0, 0.0)), (1.0, 2.0));
        let ramp = Profile::Ramp { from: 0.0, to: 1.0, start: 0, end: 10 };
        assert_eq!(ramp.at(5, 0.0, 0.0), 0.5);
        let wave = Profile::Periodic { low: 0.0, high: 1.0, period: 4, offset: 0 };
        assert_eq!([0, 1, 2, 3].map(|t| wave.at(t, 0.0, 0.0)), [1.0, 1.0, 0.0, 0.0]);
        let walk = Profile::RandomWalk { start: 0.5, step: 0.1, min: 0.0, max: 0.55 };
        assert_eq!(walk.at(1, 0.5, 1.0), 0.55);
        let phases = Profile::Phases { values: vec![1.0, 2.0], every: 2 };
        assert_eq!([0, 1, 2, 3, 4].map(|t| phases.at(t, 0.0, 0.0)), [1.0, 1.0, 2.0, 2.0, 1.0]);
    }
}
