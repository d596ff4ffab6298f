//! The per-quantum timeline: one JSON record per quantum of what the host
//! looked like and what every slot asked and got. `simulate --timeline
//! FILE.jsonl` writes it (exact figures from the simulator), `replay
//! --timeline` too (figures estimated from the recorded snapshots alone),
//! and `--plot` draws it ([`crate::plot`]).
//!
//! The format is documented field by field in `examples/TIMELINE.md`; the
//! structs here are its definition (`serde` field names are the keys).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_balancer_sdk::{Action, Outcome, Snapshot};

use crate::backend::sim::SimQuantum;
use crate::pipeline::Trace;

/// Version of the record layout, in every record (`"timeline": 1`).
pub const TIMELINE_VERSION: u32 = 1;

/// One quantum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineRecord {
    /// Layout version ([`TIMELINE_VERSION`]).
    pub timeline: u32,
    /// Quantum number.
    pub quantum: u64,
    /// True when the CPU and memory figures are the simulator's own; false
    /// when they were estimated from a snapshot (replay).
    pub exact: bool,
    /// Every host CPU.
    pub cpus: Vec<CpuPoint>,
    /// `max(total demand / pCPUs, largest vCPU demand)`, CPUs: no placement
    /// can make the busiest pCPU's demand lower.
    pub lower_bound: f64,
    /// Busiest pCPU's demand over the lower bound (1.0 is ideal; 1.0 when idle).
    pub load_ratio: f64,
    /// Every managed domain.
    pub domains: Vec<DomainPoint>,
    /// Host memory.
    pub host: HostPoint,
    /// Every proposal of every slot, in slot order, with the guard's verdict.
    pub actions: Vec<ActionPoint>,
}

/// One host CPU in a quantum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuPoint {
    /// Kernel CPU number.
    pub id: u32,
    /// What ran or wanted to run there (background + its vCPUs' demand), CPUs.
    pub demand: f64,
    /// What it served (busy fraction), 0-1.
    pub load: f64,
}

/// One domain in a quantum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainPoint {
    /// Domain name.
    pub name: String,
    /// Its vCPUs.
    pub vcpus: Vec<VcpuPoint>,
    /// Balloon target, KiB.
    pub target_kib: u64,
    /// Guest used memory, KiB (`null` without balloon stats).
    pub used_kib: Option<u64>,
    /// Memory the guest could still use without swapping (MemAvailable), KiB.
    pub usable_kib: Option<u64>,
    /// Max memory, KiB.
    pub max_kib: u64,
    /// The balloon is below the guest's use: it swaps.
    pub pressure: bool,
    /// The shortfall exceeds its swap: it OOMs.
    pub oom: bool,
}

/// One vCPU in a quantum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuPoint {
    /// vCPU number.
    pub id: u32,
    /// The pCPU it ran on.
    pub cpu: u32,
    /// Its affinity (empty: every CPU).
    pub affinity: Vec<u32>,
    /// What it wanted: usage + steal, CPUs.
    pub demand: f64,
}

/// Host memory in a quantum, KiB.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostPoint {
    /// Physical memory.
    pub total_kib: u64,
    /// What the host can still hand out.
    pub available_kib: u64,
    /// The reserve growing guests may never take.
    pub reserve_kib: u64,
}

/// One proposal and what the guard did with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionPoint {
    /// The slot that proposed it.
    pub slot: String,
    /// True when the built-in fallback decided for the slot.
    pub from_fallback: bool,
    /// The action as proposed (with the policy's reason).
    pub action: Action,
    /// `accepted`, `clamped`, `rejected` or `dropped` (changed nothing).
    pub verdict: String,
    /// The guard's reason (clamped, rejected), else the policy's.
    pub reason: String,
    /// What was applied, when accepted or clamped.
    pub applied: Option<Action>,
}

/// Per-pCPU figures estimated from a snapshot alone: a vCPU's demand is
/// usage + steal on the pCPU it ran on; what a pCPU served beyond its
/// vCPUs' usage is its background.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuFigures {
    /// Per host CPU, in the snapshot's order: (id, demand, load).
    pub cpus: Vec<(u32, f64, f64)>,
    /// The lower bound, CPUs.
    pub lower_bound: f64,
    /// Busiest demand over the bound (1.0 when idle).
    pub load_ratio: f64,
}

/// A vCPU's demand: what it got plus what it waited for.
pub fn vcpu_demand(v: &vm_balancer_sdk::Vcpu) -> f64 {
    f64::from(v.usage) + f64::from(v.steal.unwrap_or(0.0))
}

/// [`CpuFigures`] of a snapshot, with the vCPUs placed where `placement`
/// says (domain, vCPU) → pCPU, else where they ran: with the actions of a
/// quantum applied, this is the balance they would give on the same
/// demand (replay's projection; the snapshot is open-loop).
pub fn cpu_figures(snapshot: &Snapshot, placement: &HashMap<(&str, u32), u32>) -> CpuFigures {
    let index: HashMap<u32, usize> = snapshot.host.cpus.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    let n = snapshot.host.cpus.len();
    let mut ran_usage = vec![0.0; n];
    let mut demand = vec![0.0; n];
    let mut largest = 0.0f64;
    for d in &snapshot.domains {
        for v in &d.vcpus {
            let want = vcpu_demand(v);
            largest = largest.max(want);
            if let Some(&i) = index.get(&v.cpu) {
                ran_usage[i] += f64::from(v.usage);
            }
            let to = placement.get(&(d.name.as_str(), v.id)).copied().unwrap_or(v.cpu);
            if let Some(&i) = index.get(&to) {
                demand[i] += want;
            }
        }
    }
    let mut cpus = Vec::with_capacity(n);
    for (i, c) in snapshot.host.cpus.iter().enumerate() {
        let load = f64::from(c.usage);
        let background = (load - ran_usage[i]).max(0.0);
        cpus.push((c.id, demand[i] + background, load));
    }
    let total: f64 = cpus.iter().map(|c| c.1).sum();
    let lower_bound = if n == 0 { 0.0 } else { (total / n as f64).max(largest) };
    let busiest = cpus.iter().map(|c| c.1).fold(0.0, f64::max);
    CpuFigures { cpus, lower_bound, load_ratio: if lower_bound > 1e-9 { busiest / lower_bound } else { 1.0 } }
}

/// The pCPU a pin puts a vCPU on: a single CPU is where it runs; a set
/// keeps it where it ran if allowed, else its first CPU.
pub fn pinned_cpu(cpus: &[u32], ran_on: u32) -> u32 {
    if cpus.contains(&ran_on) || cpus.is_empty() {
        ran_on
    } else {
        cpus[0]
    }
}

impl TimelineRecord {
    /// The record of one quantum: the trace's snapshot and actions, with
    /// the simulator's exact figures when given (`sim`), else estimates
    /// from the snapshot.
    pub fn build(trace: &Trace, sim: Option<&SimQuantum>) -> TimelineRecord {
        let s = &trace.snapshot;
        let (cpus, lower_bound, load_ratio, exact) = match sim {
            Some(q) => (
                s.host
                    .cpus
                    .iter()
                    .enumerate()
                    .map(|(i, c)| CpuPoint {
                        id: c.id,
                        demand: q.cpu_demand.get(i).copied().unwrap_or(0.0),
                        load: q.cpu_load.get(i).copied().unwrap_or(0.0),
                    })
                    .collect(),
                q.lower_bound,
                q.load_ratio,
                true,
            ),
            None => {
                let f = cpu_figures(s, &HashMap::new());
                (f.cpus.iter().map(|&(id, demand, load)| CpuPoint { id, demand, load }).collect(), f.lower_bound, f.load_ratio, false)
            }
        };
        let truth: HashMap<&str, &crate::backend::sim::SimDomainQuantum> =
            sim.map(|q| q.domains.iter().map(|d| (d.name.as_str(), d)).collect()).unwrap_or_default();
        let domains = s
            .domains
            .iter()
            .map(|d| {
                let m = &d.memory;
                let (used_kib, pressure, oom) = match truth.get(d.name.as_str()) {
                    Some(t) => (Some(t.used_kib), t.pressure, t.oom),
                    // From the snapshot: swapping in is pressure; OOM is
                    // not visible to a snapshot.
                    None => (m.used_kib(), m.swap_in_kib.is_some_and(|k| k > 0), false),
                };
                DomainPoint {
                    name: d.name.clone(),
                    vcpus: d
                        .vcpus
                        .iter()
                        .map(|v| VcpuPoint { id: v.id, cpu: v.cpu, affinity: v.affinity.to_vec(), demand: vcpu_demand(v) })
                        .collect(),
                    target_kib: m.target_kib,
                    used_kib,
                    usable_kib: m.usable_kib,
                    max_kib: m.max_kib,
                    pressure,
                    oom,
                }
            })
            .collect();
        let actions = trace
            .proposals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let verdict = trace.checked.verdict_of.get(i).copied().flatten().and_then(|v| trace.checked.verdicts.get(v));
                let (word, reason, applied) = match verdict {
                    None => ("dropped", p.action.reason().to_string(), None),
                    Some(v) => match v.outcome {
                        Outcome::Accepted => ("accepted", v.reason.clone(), Some(v.action.clone())),
                        Outcome::Clamped => ("clamped", v.reason.clone(), Some(v.action.clone())),
                        Outcome::Rejected => ("rejected", v.reason.clone(), None),
                    },
                };
                ActionPoint {
                    slot: p.slot.clone(),
                    from_fallback: p.from_fallback,
                    action: p.action.clone(),
                    verdict: word.to_string(),
                    reason,
                    applied,
                }
            })
            .collect();
        let h = &s.host.memory;
        TimelineRecord {
            timeline: TIMELINE_VERSION,
            quantum: s.quantum,
            exact,
            cpus,
            lower_bound,
            load_ratio,
            domains,
            host: HostPoint { total_kib: h.total_kib, available_kib: h.available_kib, reserve_kib: h.reserve_kib },
            actions,
        }
    }

    /// Pins applied this quantum (accepted or clamped, and a change).
    pub fn pins_applied(&self) -> usize {
        self.actions.iter().filter(|a| matches!(a.applied, Some(Action::Pin { .. }))).count()
    }
}

/// Errors writing or reading a timeline file.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The file could not be written.
    #[error("cannot write timeline {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be read.
    #[error("cannot read timeline {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a timeline record.
    #[error("timeline {path} line {line}: not a timeline record")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes records as JSON lines, one per quantum, as they come (a long
/// simulation does not hold them all for the file's sake).
pub struct TimelineWriter {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl TimelineWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<TimelineWriter, TimelineError> {
        let file = std::fs::File::create(path).map_err(|source| TimelineError::Write { path: path.into(), source })?;
        Ok(TimelineWriter { path: path.into(), out: std::io::BufWriter::new(file) })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &TimelineRecord) -> Result<(), TimelineError> {
        let err = |source| TimelineError::Write { path: self.path.clone(), source };
        serde_json::to_writer(&mut self.out, record).map_err(|e| err(e.into()))?;
        self.out.write_all(b"\n").map_err(err)
    }

    /// Flushes it to the file.
    pub fn finish(mut self) -> Result<(), TimelineError> {
        self.out.flush().map_err(|source| TimelineError::Write { path: self.path.clone(), source })
    }
}

/// Reads a timeline file (for `vm-balancer plot`).
pub fn read(path: &Path) -> Result<Vec<TimelineRecord>, TimelineError> {
    let text = std::fs::read_to_string(path).map_err(|source| TimelineError::Read { path: path.into(), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|source| TimelineError::Parse { path: path.into(), line: i + 1, source }))
        .collect()
}
