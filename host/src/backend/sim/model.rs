//! The simulated hypervisor: a [`Backend`] whose clock advances one quantum
//! per [`collect`](Backend::collect).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vm_balancer_sdk::{Domain, DomainMemory, Vcpu};

use super::scenario::{Placement, Profile, Scenario};
use crate::backend::{Backend, BackendError, Observation, ObservedCpu, ObservedHost, ObservedMemory};
use crate::KIB_PER_MIB;

const URI: &str = "sim://";

/// What the simulator measured, per quantum and in total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Busiest pCPU's demand over the lower bound, per quantum (1.0 when idle).
    pub load_ratio: Vec<f64>,
    /// Demand that could not be served, CPU-seconds, per quantum.
    pub unserved_cpu_s: Vec<f64>,
    /// Total demand, CPU-seconds, per quantum.
    pub demand_cpu_s: Vec<f64>,
    /// Pin changes decided after each quantum.
    pub pin_changes: Vec<u64>,
    /// VM-quanta whose balloon was below the guest's use.
    pub pressure_events: u64,
    /// VM-quanta whose shortfall exceeded the guest's swap.
    pub oom_events: u64,
    /// Quanta in which guests held more than the host has.
    pub host_oom_events: u64,
    /// Memory taken back from guests, KiB.
    pub reclaimed_kib: u64,
    /// Memory given to guests, KiB.
    pub given_kib: u64,
    /// Lowest host available memory seen, KiB.
    pub lowest_host_available_kib: u64,
    /// Host available memory, KiB, per quantum (the report counts the
    /// quanta below the guard's reserve, which the model does not know).
    pub host_available_kib: Vec<u64>,
    /// Most VMs alive at once.
    pub peak_vms: usize,
    /// Busiest pCPU's demand over the best placement's (1.0 when idle), per quantum.
    pub best_ratio: Vec<f64>,
    /// Quanta whose best placement is the best found, not proven optimal
    /// (large instances: the pair lower bound / found brackets it).
    pub best_unproven_quanta: u64,
    /// VMs whose vCPUs sit on more than one NUMA node, per quantum.
    pub cross_node_vms: Vec<u64>,
    /// Free memory in the guests (balloon target above use, summed), KiB,
    /// per quantum: what ballooning left idle.
    pub guest_free_kib: Vec<u64>,
    /// Spread of balloon targets among the live VMs of one `[[vm]]` group
    /// (identical guests), `(max - min) / mean`, the largest over groups of
    /// two or more, per quantum (0 without such a group).
    pub group_spread: Vec<f64>,
}

/// What the simulator saw in its last quantum, beyond what the snapshot
/// carries: the exact per-pCPU demand (background included), the lower
/// bound, and each guest's true use and pressure. The per-quantum timeline
/// reads it, so its figures add up to the report's totals exactly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimQuantum {
    /// Demand on each pCPU (background + its vCPUs' demand), CPUs.
    pub cpu_demand: Vec<f64>,
    /// What each pCPU served (its busy fraction), CPUs.
    pub cpu_load: Vec<f64>,
    /// `max(total demand / pCPUs, largest vCPU demand)`, CPUs.
    pub lower_bound: f64,
    /// Busiest pCPU's demand over the lower bound (1.0 when idle), as in
    /// [`Metrics::load_ratio`].
    pub load_ratio: f64,
    /// The best placement's busiest pCPU demand (proven optimal on small
    /// instances, the best found on large ones), CPUs.
    pub best: f64,
    /// Per live domain, in the observation's order.
    pub domains: Vec<SimDomainQuantum>,
}

/// One guest's memory truth in a quantum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimDomainQuantum {
    /// Domain name.
    pub name: String,
    /// Memory the guest uses, KiB (may exceed its balloon target).
    pub used_kib: u64,
    /// Its balloon is below its use (it swaps).
    pub pressure: bool,
    /// The shortfall exceeds its swap.
    pub oom: bool,
}

struct SimVcpu {
    affinity: Vec<u32>,
    cpu: u32,
    demand: f64,
}

struct SimVm {
    name: String,
    uuid: String,
    spec: usize,
    start: u64,
    stop: Option<u64>,
    scale: f64,
    alive: bool,
    vcpus: Vec<SimVcpu>,
    target_kib: u64,
    used_mib: f64,
}

/// The simulator backend.
pub struct SimBackend {
    scenario: Scenario,
    rng: ChaCha8Rng,
    t: u64,
    vms: Vec<SimVm>,
    next_cpu: u32,
    metrics: Metrics,
    last: SimQuantum,
    /// The last best placement: (vCPU demands, its makespan, proven).
    /// Constant demands are solved once, not every quantum.
    best_cache: Option<(Vec<f64>, f64, bool)>,
}

/// Branch-and-bound nodes per distinct demand vector: small instances are
/// solved exactly, large ones keep LPT plus local search (certified by the
/// lower bound).
fn node_budget(vcpus: usize) -> u64 {
    if vcpus <= 64 {
        200_000
    } else {
        2_000
    }
}

impl SimBackend {
    /// A simulator at quantum 0 of `scenario`.
    pub fn new(scenario: Scenario) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
        let mut vms = Vec::new();
        for (spec_index, spec) in scenario.vms.iter().enumerate() {
            for i in 0..spec.count {
                let name = if spec.count == 1 { spec.name.clone() } else { format!("{}-{i}", spec.name) };
                let scale = if spec.spread > 0.0 { 1.0 + rng.gen_range(-spec.spread..=spec.spread) } else { 1.0 };
                let start = spec.start + u64::from(i) * spec.stagger;
                vms.push(SimVm {
                    uuid: format!("5151{:04x}-0000-4000-8000-{:012x}", spec_index, vms.len()),
                    name,
                    spec: spec_index,
                    start,
                    stop: spec.stop.map(|s| s + u64::from(i) * spec.stagger),
                    scale,
                    alive: false,
                    vcpus: Vec::new(),
                    target_kib: spec.initial_mib.unwrap_or(spec.max_mib) * KIB_PER_MIB,
                    used_mib: 0.0,
                });
            }
        }
        let lowest = scenario.host.memory_mib * KIB_PER_MIB;
        SimBackend {
            scenario,
            rng,
            t: 0,
            vms,
            next_cpu: 0,
            metrics: Metrics { lowest_host_available_kib: lowest, ..Metrics::default() },
            last: SimQuantum::default(),
            best_cache: None,
        }
    }

    /// What was measured so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What the last [`collect`](Backend::collect) saw (the timeline's
    /// exact figures).
    pub fn last_quantum(&self) -> &SimQuantum {
        &self.last
    }

    /// The scenario.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    /// Current affinity of every live vCPU: (domain, vCPU, CPUs).
    pub fn placements(&self) -> Vec<(String, u32, Vec<u32>)> {
        self.vms
            .iter()
            .filter(|vm| vm.alive)
            .flat_map(|vm| vm.vcpus.iter().enumerate().map(|(i, v)| (vm.name.clone(), i as u32, v.affinity.clone())))
            .collect()
    }

    /// Current balloon target of a live VM, KiB.
    pub fn target_kib(&self, domain: &str) -> Option<u64> {
        self.vms.iter().find(|vm| vm.alive && vm.name == domain).map(|vm| vm.target_kib)
    }

    fn place(&mut self, placement: Placement) -> (Vec<u32>, u32) {
        let cpus = self.scenario.host.cpus;
        match placement {
            Placement::First => (vec![0], 0),
            Placement::RoundRobin => {
                let cpu = self.next_cpu % cpus;
                self.next_cpu += 1;
                (vec![cpu], cpu)
            }
            Placement::Random => {
                let cpu = self.rng.gen_range(0..cpus);
                (vec![cpu], cpu)
            }
            Placement::Unpinned => (Vec::new(), self.rng.gen_range(0..cpus)),
        }
    }

    /// Creates and destroys VMs whose time has come.
    fn lifecycle(&mut self) {
        let t = self.t;
        for i in 0..self.vms.len() {
            let (start, stop, alive) = (self.vms[i].start, self.vms[i].stop, self.vms[i].alive);
            if !alive && start == t {
                let spec = &self.scenario.vms[self.vms[i].spec];
                let (vcpus, placement) = (spec.vcpus, spec.placement);
                let mut made = Vec::new();
                for _ in 0..vcpus {
                    let (affinity, cpu) = self.place(placement);
                    made.push(SimVcpu { affinity, cpu, demand: 0.0 });
                }
                let vm = &mut self.vms[i];
                vm.vcpus = made;
                vm.alive = true;
            }
            if alive && stop == Some(t) {
                let vm = &mut self.vms[i];
                vm.alive = false;
                vm.vcpus.clear();
            }
        }
        let alive = self.vms.iter().filter(|vm| vm.alive).count();
        self.metrics.peak_vms = self.metrics.peak_vms.max(alive);
    }

    /// Advances every live VM's demand and memory use to quantum `t`.
    fn advance_workloads(&mut self) {
        let t = self.t;
        // Split borrows: profiles are read from the scenario in place (no
        // clone per VM per quantum) while VMs and the RNG are updated.
        let SimBackend { scenario, vms, rng, .. } = self;
        for vm in vms.iter_mut().filter(|vm| vm.alive) {
            let spec = &scenario.vms[vm.spec];
            let (age, scale) = (t - vm.start, vm.scale);
            for vcpu in &mut vm.vcpus {
                let noise = noise(rng, &spec.cpu);
                let raw = spec.cpu.at(age, vcpu.demand / scale, noise);
                vcpu.demand = (raw * scale).clamp(0.0, 1.0);
            }
            let noise = noise(rng, &spec.mem_mib);
            vm.used_mib = (spec.mem_mib.at(age, vm.used_mib / scale, noise) * scale).clamp(0.0, spec.max_mib as f64);
        }
    }

    /// The largest `(max - min) / mean` of balloon targets among the live
    /// VMs of one `[[vm]]` group of two or more (0 without one).
    fn group_spread(&self) -> f64 {
        let mut by_group: HashMap<usize, (u64, u64, u64, u64)> = HashMap::new();
        for vm in self.vms.iter().filter(|vm| vm.alive) {
            let e = by_group.entry(vm.spec).or_insert((u64::MAX, 0, 0, 0));
            *e = (e.0.min(vm.target_kib), e.1.max(vm.target_kib), e.2 + vm.target_kib, e.3 + 1);
        }
        by_group
            .values()
            .filter(|(_, _, sum, n)| *n >= 2 && *sum > 0)
            .map(|(min, max, sum, n)| (max - min) as f64 / (*sum as f64 / *n as f64))
            .fold(0.0, f64::max)
    }

    /// The best placement's makespan of the live vCPUs' demands over the
    /// pCPUs' background, cached while the demands stay the same.
    fn best_placement(&mut self, background: &[f64]) -> f64 {
        let demands: Vec<f64> = self.vms.iter().filter(|vm| vm.alive).flat_map(|vm| vm.vcpus.iter().map(|v| v.demand)).collect();
        if let Some((cached, best, _)) = &self.best_cache {
            if *cached == demands {
                let best = *best;
                if !self.best_cache.as_ref().is_some_and(|c| c.2) {
                    self.metrics.best_unproven_quanta += 1;
                }
                return best;
            }
        }
        let budget = node_budget(demands.len());
        let found = vm_balancer_sdk::makespan::best_placement_with_base(&demands, background, budget);
        if !found.proven_optimal {
            self.metrics.best_unproven_quanta += 1;
        }
        self.best_cache = Some((demands, found.makespan, found.proven_optimal));
        found.makespan
    }

    fn vm_mut(&mut self, domain: &str) -> Result<&mut SimVm, BackendError> {
        self.vms.iter_mut().find(|vm| vm.alive && vm.name == domain).ok_or_else(|| BackendError::DomainGone { domain: domain.to_string() })
    }
}

/// A random-walk step in [-1, 1]; other profiles need no randomness (and
/// draw none, so adding a random VM does not reshuffle the others).
fn noise(rng: &mut ChaCha8Rng, profile: &Profile) -> f64 {
    match profile {
        Profile::RandomWalk { .. } => rng.gen_range(-1.0..=1.0),
        _ => 0.0,
    }
}

/// Max-min fair shares of `capacity` among `demands` (what CFS converges to).
fn water_fill(demands: &[f64], capacity: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|a, b| demands[*a].total_cmp(&demands[*b]));
    let mut served = vec![0.0; demands.len()];
    let mut left = capacity.max(0.0);
    for (k, &i) in order.iter().enumerate() {
        let share = left / (order.len() - k) as f64;
        served[i] = demands[i].min(share);
        left -= served[i];
    }
    served
}

impl Backend for SimBackend {
    fn collect(&mut self) -> Result<Observation, BackendError> {
        self.lifecycle();
        self.advance_workloads();
        let ncpu = self.scenario.host.cpus as usize;
        let quantum_s = f64::from(self.scenario.quantum_ms) / 1000.0;
        let background: Vec<f64> = (0..ncpu).map(|c| f64::from(self.scenario.host.background.get(c).copied().unwrap_or(0.0))).collect();

        // Who runs where, and what each pCPU can serve.
        let mut on_cpu: Vec<Vec<(usize, usize)>> = vec![Vec::new(); ncpu];
        for (i, vm) in self.vms.iter().enumerate().filter(|(_, vm)| vm.alive) {
            for (j, v) in vm.vcpus.iter().enumerate() {
                let cpu = match v.affinity.as_slice() {
                    [only] => *only,
                    _ => v.cpu,
                };
                on_cpu[cpu as usize].push((i, j));
            }
        }
        let mut served = vec![vec![]; self.vms.len()];
        for (i, vm) in self.vms.iter().enumerate() {
            served[i] = vec![0.0; vm.vcpus.len()];
        }
        let mut cpu_usage = vec![0.0; ncpu];
        let mut cpu_demand = vec![0.0; ncpu];
        let (mut total_demand, mut max_vcpu_demand, mut unserved) = (0.0, 0.0f64, 0.0);
        for c in 0..ncpu {
            let demands: Vec<f64> = on_cpu[c].iter().map(|&(i, j)| self.vms[i].vcpus[j].demand).collect();
            let shares = water_fill(&demands, 1.0 - background[c]);
            for (k, &(i, j)) in on_cpu[c].iter().enumerate() {
                served[i][j] = shares[k];
                self.vms[i].vcpus[j].cpu = c as u32;
            }
            cpu_usage[c] = (background[c] + shares.iter().sum::<f64>()).min(1.0);
            cpu_demand[c] = background[c] + demands.iter().sum::<f64>();
            total_demand += cpu_demand[c];
            max_vcpu_demand = demands.iter().copied().fold(max_vcpu_demand, f64::max);
            unserved += demands.iter().sum::<f64>() - shares.iter().sum::<f64>();
        }
        let lower_bound = (total_demand / ncpu as f64).max(max_vcpu_demand);
        let busiest = cpu_demand.iter().copied().fold(0.0, f64::max);
        let load_ratio = if lower_bound > 1e-9 { busiest / lower_bound } else { 1.0 };
        self.metrics.load_ratio.push(load_ratio);
        let best = self.best_placement(&background).max(lower_bound.min(busiest));
        self.metrics.best_ratio.push(if best > 1e-9 { (busiest / best).max(1.0) } else { 1.0 });
        let host_spec = &self.scenario.host;
        let cross = self
            .vms
            .iter()
            .filter(|vm| vm.alive)
            .filter(|vm| vm.vcpus.windows(2).any(|w| host_spec.node_of(w[0].cpu) != host_spec.node_of(w[1].cpu)))
            .count();
        self.metrics.cross_node_vms.push(cross as u64);
        let mut last_domains = Vec::new();
        self.metrics.unserved_cpu_s.push(unserved * quantum_s);
        self.metrics.demand_cpu_s.push(total_demand * quantum_s);
        self.metrics.pin_changes.push(0);

        // Memory: guests hold their balloon target on the host.
        let host = &self.scenario.host;
        let held_kib: u64 = self.vms.iter().filter(|vm| vm.alive).map(|vm| vm.target_kib).sum();
        let capacity_kib = (host.memory_mib.saturating_sub(host.base_used_mib)) * KIB_PER_MIB;
        if held_kib > capacity_kib {
            self.metrics.host_oom_events += 1;
        }
        let available_kib = capacity_kib.saturating_sub(held_kib);
        self.metrics.lowest_host_available_kib = self.metrics.lowest_host_available_kib.min(available_kib);
        self.metrics.host_available_kib.push(available_kib);

        self.metrics.group_spread.push(self.group_spread());
        let mut guest_free_kib = 0;
        let mut domains = Vec::new();
        for (i, vm) in self.vms.iter().enumerate().filter(|(_, vm)| vm.alive) {
            let spec = &self.scenario.vms[vm.spec];
            let used_kib = (vm.used_mib * KIB_PER_MIB as f64) as u64;
            guest_free_kib += vm.target_kib.saturating_sub(used_kib);
            let deficit_kib = used_kib.saturating_sub(vm.target_kib);
            let (pressure, oom) = (deficit_kib > 0, deficit_kib > spec.swap_mib * KIB_PER_MIB);
            if pressure {
                self.metrics.pressure_events += 1;
                if oom {
                    self.metrics.oom_events += 1;
                }
            }
            last_domains.push(SimDomainQuantum { name: vm.name.clone(), used_kib, pressure, oom });
            let free_kib = vm.target_kib.saturating_sub(used_kib);
            let stats = spec.balloon_stats;
            domains.push(Domain {
                name: vm.name.clone(),
                uuid: vm.uuid.clone(),
                tags: spec.tags.clone(),
                vcpus: vm
                    .vcpus
                    .iter()
                    .enumerate()
                    .map(|(j, v)| Vcpu {
                        id: j as u32,
                        cpu: v.cpu,
                        affinity: v.affinity.as_slice().into(),
                        usage: served[i][j] as f32,
                        steal: Some((v.demand - served[i][j]).max(0.0) as f32),
                    })
                    .collect(),
                memory: DomainMemory {
                    max_kib: spec.max_mib * KIB_PER_MIB,
                    target_kib: vm.target_kib,
                    unused_kib: stats.then_some(free_kib),
                    available_kib: stats.then_some(vm.target_kib),
                    usable_kib: stats.then_some(free_kib),
                    rss_kib: Some(vm.target_kib),
                    swap_in_kib: stats.then_some(deficit_kib.min(spec.swap_mib * KIB_PER_MIB)),
                    swap_out_kib: stats.then_some(0),
                    major_faults: stats.then_some(deficit_kib / 4),
                    autodeflate: false,
                    free_page_reporting: false,
                    age_ms: 0,
                },
                not_answering_ms: 0,
            });
        }
        let observation = Observation {
            host: ObservedHost {
                cpus: (0..ncpu)
                    .map(|c| ObservedCpu { id: c as u32, online: true, usage: cpu_usage[c] as f32, node: host.node_of(c as u32) })
                    .collect(),
                memory: ObservedMemory { total_kib: host.memory_mib * KIB_PER_MIB, available_kib },
            },
            domains,
        };
        self.metrics.guest_free_kib.push(guest_free_kib);
        self.last = SimQuantum { cpu_demand, cpu_load: cpu_usage, lower_bound, load_ratio, best, domains: last_domains };
        self.t += 1;
        Ok(observation)
    }

    fn pin_vcpu(&mut self, domain: &str, vcpu: u32, cpus: &[u32]) -> Result<(), BackendError> {
        let ncpu = self.scenario.host.cpus;
        if let Some(bad) = cpus.iter().find(|c| **c >= ncpu) {
            return Err(BackendError::Pin {
                domain: domain.into(),
                vcpu,
                cpus: cpus.to_vec(),
                message: format!("{URI} host has no CPU {bad}"),
            });
        }
        let vm = self.vm_mut(domain)?;
        let v = vm.vcpus.get_mut(vcpu as usize).ok_or_else(|| BackendError::NoSuchVcpu { domain: domain.into(), vcpu })?;
        if v.affinity != cpus {
            v.affinity = cpus.to_vec();
            if let Some(last) = self.metrics.pin_changes.last_mut() {
                *last += 1;
            }
        }
        Ok(())
    }

    fn set_memory(&mut self, domain: &str, target_kib: u64) -> Result<(), BackendError> {
        let vm = self.vm_mut(domain)?;
        let before = vm.target_kib;
        vm.target_kib = target_kib;
        if target_kib < before {
            self.metrics.reclaimed_kib += before - target_kib;
        } else {
            self.metrics.given_kib += target_kib - before;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_fill_is_max_min_fair() {
        assert_eq!(water_fill(&[1.0, 1.0], 1.0), vec![0.5, 0.5]);
        assert_eq!(water_fill(&[0.2, 1.0], 1.0), vec![0.2, 0.8]);
        assert_eq!(water_fill(&[0.2, 0.3], 1.0), vec![0.2, 0.3]);
        assert!(water_fill(&[], 1.0).is_empty());
    }
}
