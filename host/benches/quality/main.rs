//! Benchmark: placement quality against the best placement, on families of
//! random constant-demand instances, for the default CPU policy
//! (plan-then-move), `classic`, and the previous default (the greedy local
//! search, `policies/cpu-greedy`).
//! Run: `cargo bench --bench quality` (`VMB_QUALITY_SEEDS=N` seeds a cell,
//! default 2; `VMB_QUALITY_CPUS=2,4` to pick host sizes;
//! `VMB_QUALITY_ONLY=CPUS,VCPUS_PER_VM,MIX,PINS,SEED` to rerun one
//! instance, a miss for instance, quantum by quantum).
//!
//! Each instance is a scenario built in memory and run on the real
//! simulator (`SimBackend`: fair sharing, steal, pin bookkeeping, and the
//! best placement from the SDK's `makespan` solver, exact on small
//! instances). The policies run natively, as the daemon's fallback would:
//! the quality is the same code's, and decide times are native.
//!
//! Families: pCPUs 2, 4, 8, 16, 64, 256; vCPUs per VM 1, 2, 4; demand mixes
//! uniform, bimodal heavy/light, a few giants; initial pins random, all on
//! pCPU 0, round-robin. About 2 vCPUs per pCPU. Columns: fraction within
//! 1.05 × the best after 3 and after 10 quanta, mean and worst ratio to the
//! best (after 10), pin changes to converge (until within 1.05 for good,
//! else all), pin changes in steady state (from then on), decide time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vm_balancer::backend::sim::{Scenario, SimBackend};
use vm_balancer::backend::Backend;
use vm_balancer::sdk::{Action, Host, HostCpu, HostMemory, Policy, Snapshot};
use vm_balancer::simulate::within_of_best;

const QUANTA: u64 = 16;
const MIXES: [&str; 3] = ["uniform", "bimodal", "giants"];
const PINS: [&str; 3] = ["random", "first", "round-robin"];

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    at3: f64,
    at10: f64,
    to_converge: u64,
    steady: u64,
    decide_us: f64,
    /// The last quantum's busiest pCPU demand and best placement, CPUs:
    /// a miss whose gap is under `cpu.min_gain` is the dead band.
    busiest: f64,
    best: f64,
}

/// A scenario: `cpus` pCPUs, VMs of `per_vm` vCPUs, about 2 vCPUs a pCPU.
fn scenario(cpus: u32, per_vm: u32, mix: &str, pins: &str, seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(cpus) << 32) ^ (u64::from(per_vm) << 48));
    let vms = (2 * cpus).div_ceil(per_vm).max(2);
    let mut text = format!(
        "name = \"quality\"\nseed = {seed}\nquanta = {QUANTA}\n[host]\ncpus = {cpus}\nmemory_mib = {}\n",
        u64::from(vms) * 1024 + 4096
    );
    for i in 0..vms {
        let demand: f64 = match mix {
            "uniform" => rng.gen_range(0.05..0.75),
            "bimodal" => {
                if rng.gen_bool(0.35) {
                    rng.gen_range(0.8..1.0)
                } else {
                    rng.gen_range(0.1..0.3)
                }
            }
            _ => {
                if rng.gen_bool(0.1) {
                    1.0
                } else {
                    rng.gen_range(0.02..0.25)
                }
            }
        };
        text.push_str(&format!(
            "[[vm]]\nname = \"vm{i}\"\nvcpus = {per_vm}\nmax_mib = 1024\nplacement = \"{pins}\"\ncpu = {{ kind = \"constant\", value = {demand:.4} }}\nmem_mib = {{ kind = \"constant\", value = 100 }}\n"
        ));
    }
    Scenario::parse(&text, Path::new("quality.toml")).expect("the generated scenario is valid")
}

/// Collects quantum `q` and builds the snapshot a policy sees.
fn snapshot(sc: &Scenario, sim: &mut SimBackend, q: u64) -> Snapshot {
    let obs = sim.collect().expect("the simulator collects");
    Snapshot {
        schema_version: vm_balancer::sdk::SCHEMA_VERSION,
        quantum: q,
        quantum_ms: sc.quantum_ms,
        host: Host {
            cpus: obs
                .host
                .cpus
                .iter()
                .map(|c| HostCpu { id: c.id, online: c.online, reserved: false, usage: c.usage, node: c.node })
                .collect(),
            memory: HostMemory { total_kib: obs.host.memory.total_kib, available_kib: obs.host.memory.available_kib, reserve_kib: 0 },
        },
        domains: obs.domains,
        verdicts: Vec::new(),
        params: BTreeMap::new(),
    }
}

/// Runs `policy` natively on the simulator for `QUANTA` quanta.
fn run<P: Policy>(sc: &Scenario) -> Run {
    let mut sim = SimBackend::new(sc.clone());
    let mut policy = P::default();
    let mut times = Vec::new();
    for q in 0..QUANTA {
        let snap = snapshot(sc, &mut sim, q);
        let start = Instant::now();
        let actions = policy.decide(&snap).expect("the policy decides");
        times.push(start.elapsed().as_secs_f64() * 1e6);
        for a in actions {
            if let Action::Pin { domain, vcpu, cpus, .. } = a {
                sim.pin_vcpu(&domain, vcpu, &cpus).expect("the pin applies");
            }
        }
    }
    let m = sim.metrics();
    let ratio = &m.best_ratio;
    let converged = within_of_best(ratio, 1.05).map_or(ratio.len(), |q| q as usize);
    // pin_changes[q] are the pins decided after observing quantum q; they
    // show in observation q + 1.
    let to_converge: u64 = m.pin_changes.iter().take(converged.saturating_sub(1)).sum();
    let steady: u64 = m.pin_changes.iter().skip(converged.max(1)).sum();
    times.sort_by(f64::total_cmp);
    let last = sim.last_quantum();
    let busiest = last.cpu_demand.iter().copied().fold(0.0, f64::max);
    Run { at3: ratio[3], at10: ratio[10], to_converge, steady, decide_us: times[times.len() / 2], busiest, best: last.best }
}

/// `VMB_QUALITY_ONLY="CPUS,VCPUS_PER_VM,MIX,PINS,SEED"` (a miss's line,
/// e.g. `16,4,giants,random,2`): that one instance, quantum by quantum, for
/// the default, to see where it stopped.
fn rerun(only: &str) {
    let f: Vec<&str> = only.split(',').map(str::trim).collect();
    let usage = "VMB_QUALITY_ONLY=CPUS,VCPUS_PER_VM,MIX,PINS,SEED, e.g. 16,4,giants,random,2";
    let [cpus, per_vm, mix, pins, seed] = f[..] else { panic!("{usage}") };
    let (Ok(cpus), Ok(per_vm), Ok(seed)) = (cpus.parse(), per_vm.parse(), seed.parse()) else { panic!("{usage}") };
    assert!(MIXES.contains(&mix) && PINS.contains(&pins), "{usage}; mixes {MIXES:?}, pins {PINS:?}");
    let sc = scenario(cpus, per_vm, mix, pins, seed);
    let mut sim = SimBackend::new(sc.clone());
    let mut policy = vmb_policy_cpu::CpuPolicy::default();
    println!("quantum | busiest pCPU demand | best placement | ratio | pins decided");
    for q in 0..QUANTA {
        let snap = snapshot(&sc, &mut sim, q);
        let actions = policy.decide(&snap).expect("the policy decides");
        let (busiest, best) = {
            let last = sim.last_quantum();
            (last.cpu_demand.iter().copied().fold(0.0, f64::max), last.best)
        };
        let mut pinned = 0;
        for a in actions {
            if let Action::Pin { domain, vcpu, cpus, reason } = a {
                println!("        pin {domain} vCPU {vcpu} -> {cpus:?}: {reason}");
                sim.pin_vcpu(&domain, vcpu, &cpus).expect("the pin applies");
                pinned += 1;
            }
        }
        println!("{q:>7} | {busiest:.3} | {best:.3} | {:.3} | {pinned}", busiest / best.max(1e-9));
    }
}

/// Figures of many runs.
#[derive(Default)]
struct Cell {
    runs: Vec<Run>,
}

impl Cell {
    fn row(&self) -> String {
        let n = self.runs.len().max(1) as f64;
        let frac = |f: &dyn Fn(&Run) -> bool| 100.0 * self.runs.iter().filter(|r| f(r)).count() as f64 / n;
        let mean = |f: &dyn Fn(&Run) -> f64| self.runs.iter().map(f).sum::<f64>() / n;
        let worst = self.runs.iter().map(|r| r.at10).fold(1.0, f64::max);
        format!(
            "{:>5.0} % | {:>5.0} % | {:.3} / {:.3} | {:>6.1} | {:>4.1} | {:>7.1} µs",
            frac(&|r| r.at3 <= 1.05 + 1e-9),
            frac(&|r| r.at10 <= 1.05 + 1e-9),
            mean(&|r| r.at10),
            worst,
            mean(&|r| r.to_converge as f64),
            mean(&|r| r.steady as f64),
            mean(&|r| r.decide_us),
        )
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(only) = std::env::var("VMB_QUALITY_ONLY") {
        return rerun(&only);
    }
    let seeds: u64 = std::env::var("VMB_QUALITY_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let cpus: Vec<u32> = std::env::var("VMB_QUALITY_CPUS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2, 4, 8, 16, 64, 256]);
    let policies = ["default", "classic", "previous default"];
    // (group label, policy) → runs; groups: per host size, per vCPUs/VM, per mix, per pins, all.
    let mut cells: BTreeMap<(String, usize), Cell> = BTreeMap::new();
    let mut misses: Vec<String> = Vec::new();
    let started = Instant::now();
    for &c in &cpus {
        for per_vm in [1u32, 2, 4] {
            for mix in MIXES {
                for pins in PINS {
                    for seed in 1..=seeds {
                        let sc = scenario(c, per_vm, mix, pins, seed);
                        let runs = [
                            run::<vmb_policy_cpu::CpuPolicy>(&sc),
                            run::<vmb_policy_classic::ClassicPolicy>(&sc),
                            run::<vmb_policy_cpu_greedy::CpuPolicy>(&sc),
                        ];
                        if runs[0].at3 > 1.05 + 1e-9 {
                            misses.push(format!(
                                "{c} pCPUs, {per_vm} vCPUs/VM, {mix}, {pins}, seed {seed}: {:.3} after 3, {:.3} after 10 (busiest {:.3} CPU, best {:.3})",
                                runs[0].at3, runs[0].at10, runs[0].busiest, runs[0].best
                            ));
                        }
                        for (p, r) in runs.iter().enumerate() {
                            for group in [
                                format!("1 pCPUs {c:>3}"),
                                format!("2 vCPUs/VM {per_vm}"),
                                format!("3 mix {mix}"),
                                format!("4 pins {pins}"),
                                "5 all".to_string(),
                            ] {
                                cells.entry((group, p)).or_default().runs.push(*r);
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{seeds} seeds a cell, {QUANTA} quanta each, {:.0} s", started.elapsed().as_secs_f64());
    println!();
    println!(
        "| group | policy | within 1.05× best after 3 | after 10 | ratio mean / worst | pins to converge | steady pins | decide median |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ((group, p), cell) in &cells {
        println!("| {} | {} | {} |", &group[2..], policies[*p], cell.row());
    }
    println!();
    println!("default: {} instances not within 1.05 × best after 3 quanta", misses.len());
    for m in misses {
        println!("  {m}");
    }
}
