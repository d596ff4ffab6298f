//! `vm-balancer simulate`: runs policies on the simulator backend
//! ([`crate::backend::sim`]) and builds the quality report it prints.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::backend::sim::{Metrics, Scenario, SimBackend};
use crate::backend::BackendError;
use crate::config::Config;
use crate::guard::GuardStats;
use crate::host_check::{self, HostCheckError, HostFacts};
use crate::pipeline::Pipeline;
use crate::policy::cache::CompileCache;
use crate::policy::slots::{DecideTimes, SlotError, SlotStats};
use crate::policy::PolicySet;
use crate::KIB_PER_MIB;

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// A policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] SlotError),
    /// The simulated backend failed (a bug).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A per-policy limit does not fit the scenario's quantum.
    #[error("the config does not fit this scenario's quantum")]
    Config(#[source] crate::config::ConfigError),
    /// The timeline could not be written.
    #[error(transparent)]
    Timeline(#[from] crate::timeline::TimelineError),
    /// A guard setting cannot work on the scenario's host.
    #[error("the config cannot work on scenario {scenario:?}'s host")]
    Host {
        /// The scenario's name.
        scenario: String,
        /// What cannot work.
        #[source]
        source: HostCheckError,
    },
}

/// Runs `scenario` for `quanta` (or its own length) with the policy specs
/// (`builtin:NAME` or paths; empty = the defaults).
pub fn simulate(scenario: &Scenario, specs: &[String], config: &Config, quanta: Option<u64>) -> Result<Report, SimulateError> {
    simulate_cached(scenario, specs, config, quanta, None)
}

/// [`simulate`], compiling policy files through `cache` (the command line
/// passes the per-user cache: an 18 MB Python component compiles once, not
/// at every run).
pub fn simulate_cached(
    scenario: &Scenario,
    specs: &[String],
    config: &Config,
    quanta: Option<u64>,
    cache: Option<std::sync::Arc<CompileCache>>,
) -> Result<Report, SimulateError> {
    simulate_observed(scenario, specs, config, quanta, cache, |_, _| Ok(()))
}

/// [`simulate_cached`], calling `on_quantum` after each quantum with its
/// trace and the simulator (the timeline, the plot and the progress bar
/// hang here). An error from it stops the run.
pub fn simulate_observed(
    scenario: &Scenario,
    specs: &[String],
    config: &Config,
    quanta: Option<u64>,
    cache: Option<std::sync::Arc<CompileCache>>,
    mut on_quantum: impl FnMut(&crate::pipeline::Trace, &SimBackend) -> Result<(), SimulateError>,
) -> Result<Report, SimulateError> {
    let mut pipeline = pipeline(scenario, specs, config, cache)?;
    for _ in 0..quanta.unwrap_or(scenario.quanta) {
        let (_, trace) = pipeline.step_traced()?;
        on_quantum(&trace, pipeline.backend())?;
    }
    Ok(Report::build(scenario, &pipeline))
}

/// The simulator pipeline `simulate` runs: the scenario's quantum and host
/// reserve, the given policies (empty = the defaults).
pub fn pipeline(
    scenario: &Scenario,
    specs: &[String],
    config: &Config,
    cache: Option<std::sync::Arc<CompileCache>>,
) -> Result<Pipeline<SimBackend>, SimulateError> {
    let config = scenario_config(scenario, config);
    config.validate_policy_limits().map_err(SimulateError::Config)?;
    check_host(scenario, &config)?;
    let defaults = ["builtin:cpu".to_string(), "builtin:mem".to_string()];
    let specs = if specs.is_empty() { &defaults[..] } else { specs };
    let policies = PolicySet::new(&config.limits)
        .with_cache(cache)
        .with_file_rules(crate::policy::file::FileRules::offline(&config))
        .with_specs(specs)?;
    Ok(pipeline_with(scenario, &config, policies))
}

/// The simulator pipeline over `scenario` running `policies` (`policy check
/// --scenario` brings its own, strict, policy).
pub fn pipeline_with(scenario: &Scenario, config: &Config, policies: PolicySet) -> Pipeline<SimBackend> {
    Pipeline::new(SimBackend::new(scenario.clone()), policies, scenario_config(scenario, config), false)
}

/// Refuses a config that cannot work on the scenario's host (every CPU
/// reserved, a reserve above its memory). Warnings are left to the
/// pipeline, which logs them at its first quantum.
pub fn check_host(scenario: &Scenario, config: &Config) -> Result<(), SimulateError> {
    let config = scenario_config(scenario, config);
    host_check::check(&config, &host_facts(scenario))
        .map(drop)
        .map_err(|source| SimulateError::Host { scenario: scenario.name.clone(), source })
}

/// The scenario's host as the config checks see it.
pub fn host_facts(scenario: &Scenario) -> HostFacts {
    HostFacts { cpus: (0..scenario.host.cpus).map(|c| (c, true)).collect(), memory_mib: scenario.host.memory_mib }
}

/// The config as a scenario runs it: its quantum, and its host reserve if
/// it sets one.
pub fn scenario_config(scenario: &Scenario, config: &Config) -> Config {
    let mut config = config.clone();
    config.quantum_ms = scenario.quantum_ms;
    if let Some(reserve) = scenario.host.reserve_mib {
        config.guard.host_reserve_mib = reserve;
    }
    config
}

/// CPU balance figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CpuReport {
    /// Busiest pCPU demand / lower bound, averaged over all quanta (1.0 is ideal).
    pub mean_load_ratio: f64,
    /// The same ratio averaged from convergence on.
    pub steady_load_ratio: f64,
    /// First quantum from which the ratio stays within 5 % (+0.02) of its final level.
    pub converged_at: u64,
    /// Demand that was not served, CPU-seconds.
    pub unserved_cpu_s: f64,
    /// That, as a percentage of all demand.
    pub unserved_pct: f64,
    /// Pin changes applied.
    pub pin_changes: u64,
    /// Pin changes decided from convergence on.
    pub steady_pin_changes: u64,
    /// Busiest pCPU demand / the best placement's, averaged over all quanta
    /// (1.0: as good as any placement can be; the lower bound may be unreachable).
    pub mean_best_ratio: f64,
    /// The same from convergence on.
    pub steady_best_ratio: f64,
    /// First quantum from which the busiest pCPU stays within 5 % of the
    /// best placement; `None` if it does not end there.
    pub within_5pct_of_best_at: Option<u64>,
    /// Quanta whose best placement was the best found rather than proven
    /// optimal (large instances; the lower bound still brackets it).
    pub best_unproven_quanta: u64,
    /// VMs with vCPUs on more than one NUMA node: mean over the run.
    pub mean_cross_node_vms: f64,
    /// The same in the last quantum.
    pub final_cross_node_vms: u64,
}

/// Memory figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MemoryReport {
    /// VM-quanta with the balloon below the guest's use.
    pub pressure_events: u64,
    /// VM-quanta whose shortfall exceeded the guest's swap (OOM).
    pub oom_events: u64,
    /// Memory taken back, MiB.
    pub reclaimed_mib: u64,
    /// Memory given, MiB.
    pub given_mib: u64,
    /// Lowest host available memory, MiB.
    pub lowest_host_available_mib: u64,
    /// Quanta in which guests held more memory than the host has.
    pub host_oom_events: u64,
    /// Quanta with host available memory below the guard's reserve
    /// (`guard.host_reserve_mib`, or the scenario's `reserve_mib`): guests
    /// that start or fill can spend it; the memory policy wins it back.
    pub below_reserve_quanta: u64,
    /// Free memory left in the guests (balloon above use, summed), MiB,
    /// mean over the run: what ballooning left idle.
    pub mean_guest_free_mib: u64,
    /// The same in the last quantum.
    pub final_guest_free_mib: u64,
    /// Spread of balloon targets among the VMs of one `[[vm]]` group
    /// (identical guests when the group has no `spread`), `(max - min) /
    /// mean` in %, the largest over groups, mean over the run.
    pub mean_group_spread_pct: f64,
    /// The same in the last quantum.
    pub final_group_spread_pct: f64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Policy slots, in order.
    pub policies: Vec<String>,
    /// Quanta simulated.
    pub quanta: u64,
    /// Host CPUs.
    pub cpus: u32,
    /// Most VMs alive at once.
    pub peak_vms: usize,
    /// CPU figures.
    pub cpu: CpuReport,
    /// Memory figures.
    pub memory: MemoryReport,
    /// Per-slot policy counters.
    pub slots: BTreeMap<String, SlotStats>,
    /// Guard counters.
    pub guard: GuardStats,
    /// Per-slot decide times of each slot's own policy. The only figures
    /// that differ run to run (everything else is deterministic).
    pub timing: BTreeMap<String, DecideTimes>,
}

impl Report {
    /// Builds the report from a finished pipeline.
    pub fn build(scenario: &Scenario, pipeline: &Pipeline<SimBackend>) -> Report {
        let m: &Metrics = pipeline.backend().metrics();
        let r = &m.load_ratio;
        let n = r.len().max(1);
        let tail = (n / 10).max(1);
        let final_level = r.iter().rev().take(tail).sum::<f64>() / tail as f64;
        let bound = final_level * 1.05 + 0.02;
        let converged_at = r.iter().rposition(|x| *x > bound).map_or(0, |i| i + 1);
        let steady = &r[converged_at.min(r.len())..];
        let demand: f64 = m.demand_cpu_s.iter().sum();
        let unserved: f64 = m.unserved_cpu_s.iter().sum();
        let reserve_kib = pipeline.config().guard.host_reserve_mib.saturating_mul(KIB_PER_MIB);
        Report {
            scenario: scenario.name.clone(),
            policies: pipeline.policies().slots().iter().map(|s| s.name().to_string()).collect(),
            quanta: r.len() as u64,
            cpus: scenario.host.cpus,
            peak_vms: m.peak_vms,
            cpu: CpuReport {
                mean_load_ratio: r.iter().sum::<f64>() / n as f64,
                steady_load_ratio: if steady.is_empty() { final_level } else { steady.iter().sum::<f64>() / steady.len() as f64 },
                converged_at: converged_at as u64,
                unserved_cpu_s: unserved,
                unserved_pct: if demand > 0.0 { 100.0 * unserved / demand } else { 0.0 },
                pin_changes: m.pin_changes.iter().sum(),
                steady_pin_changes: m.pin_changes.iter().skip(converged_at).sum(),
                mean_best_ratio: mean(&m.best_ratio).unwrap_or(1.0),
                steady_best_ratio: mean(&m.best_ratio[converged_at.min(m.best_ratio.len())..])
                    .unwrap_or_else(|| m.best_ratio.last().copied().unwrap_or(1.0)),
                within_5pct_of_best_at: within_of_best(&m.best_ratio, 1.05),
                best_unproven_quanta: m.best_unproven_quanta,
                mean_cross_node_vms: mean(&m.cross_node_vms.iter().map(|x| *x as f64).collect::<Vec<_>>()).unwrap_or(0.0),
                final_cross_node_vms: m.cross_node_vms.last().copied().unwrap_or(0),
            },
            memory: MemoryReport {
                pressure_events: m.pressure_events,
                oom_events: m.oom_events,
                reclaimed_mib: m.reclaimed_kib / KIB_PER_MIB,
                given_mib: m.given_kib / KIB_PER_MIB,
                lowest_host_available_mib: m.lowest_host_available_kib / KIB_PER_MIB,
                host_oom_events: m.host_oom_events,
                below_reserve_quanta: m.host_available_kib.iter().filter(|a| **a < reserve_kib).count() as u64,
                mean_guest_free_mib: mean(&m.guest_free_kib.iter().map(|x| *x as f64).collect::<Vec<_>>()).unwrap_or(0.0) as u64
                    / KIB_PER_MIB,
                final_guest_free_mib: m.guest_free_kib.last().copied().unwrap_or(0) / KIB_PER_MIB,
                mean_group_spread_pct: 100.0 * mean(&m.group_spread).unwrap_or(0.0),
                final_group_spread_pct: 100.0 * m.group_spread.last().copied().unwrap_or(0.0),
            },
            slots: pipeline.policies().slots().iter().map(|s| (s.name().to_string(), s.stats().clone())).collect(),
            guard: pipeline.guard().stats().clone(),
            timing: pipeline.policies().slots().iter().map(|s| (s.name().to_string(), s.decide_times())).collect(),
        }
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The first quantum from which every ratio is within `factor` (None if the
/// last is not).
pub fn within_of_best(ratios: &[f64], factor: f64) -> Option<u64> {
    let within = |r: &f64| *r <= factor + 1e-9;
    if !ratios.last().is_some_and(within) {
        return None;
    }
    Some(ratios.iter().rposition(|r| !within(r)).map_or(0, |i| i as u64 + 1))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cpu;
        let m = &self.memory;
        writeln!(f, "scenario {}  ({} quanta, {} pCPUs, up to {} VMs)", self.scenario, self.quanta, self.cpus, self.peak_vms)?;
        writeln!(f, "policies {}", self.policies.join(", "))?;
        writeln!(f, "cpu")?;
        writeln!(f, "  busiest pCPU / lower bound   mean {:.3}   steady {:.3}   (1.000 is ideal)", c.mean_load_ratio, c.steady_load_ratio)?;
        let unproven = if c.best_unproven_quanta > 0 {
            format!("   (best found, not proven, in {} quanta)", c.best_unproven_quanta)
        } else {
            String::new()
        };
        writeln!(f, "  busiest pCPU / best placement mean {:.3}   steady {:.3}{unproven}", c.mean_best_ratio, c.steady_best_ratio)?;
        let within = c.within_5pct_of_best_at.map_or("never".to_string(), |q| format!("quantum {q}"));
        writeln!(f, "  within 5 % of the best from  {within}")?;
        writeln!(f, "  converged at quantum         {}", c.converged_at)?;
        writeln!(f, "  unserved demand              {:.1} CPU-s ({:.2} %)", c.unserved_cpu_s, c.unserved_pct)?;
        writeln!(f, "  pin changes                  {} total, {} in steady state", c.pin_changes, c.steady_pin_changes)?;
        writeln!(f, "  VMs across NUMA nodes        mean {:.1}, last quantum {}", c.mean_cross_node_vms, c.final_cross_node_vms)?;
        writeln!(f, "memory")?;
        writeln!(f, "  guest pressure events        {} ({} OOM)", m.pressure_events, m.oom_events)?;
        writeln!(f, "  reclaimed / given            {} MiB / {} MiB", m.reclaimed_mib, m.given_mib)?;
        writeln!(
            f,
            "  lowest host available        {} MiB ({} quanta below the reserve, {} host OOM quanta)",
            m.lowest_host_available_mib, m.below_reserve_quanta, m.host_oom_events
        )?;
        writeln!(f, "  free in guests, mean / final {} MiB / {} MiB", m.mean_guest_free_mib, m.final_guest_free_mib)?;
        writeln!(f, "  same-group target spread     {:.1} % mean / {:.1} % final", m.mean_group_spread_pct, m.final_group_spread_pct)?;
        writeln!(
            f,
            "guard    {} accepted, {} clamped, {} rejected, {} dropped",
            self.guard.accepted, self.guard.clamped, self.guard.rejected, self.guard.dropped
        )?;
        for (name, s) in &self.slots {
            let failures: u64 = s.failures.values().sum();
            write!(f, "slot {name:<10} decided {}, fallback {}, failures {}", s.decided, s.fallbacks, failures)?;
            if failures > 0 {
                write!(f, " {:?}", s.failures)?;
            }
            if let Some(t) = self.timing.get(name).filter(|t| t.calls > 0) {
                let ms = |us: u64| us as f64 / 1000.0;
                write!(f, "; decide median {:.3} ms, p99 {:.3} ms (deadline {} ms)", ms(t.median_us), ms(t.p99_us), t.deadline_us / 1000)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
