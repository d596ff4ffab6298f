//! The public peer test suite for this job (a university course that asks
//! for the same pair of programs; `../shared/ANCHORS.md`), as simulator
//! scenarios run through the daemon's pipeline with the default policies.
//!
//! CPU: 8 one-vCPU VMs on 4 pCPUs, (1) already balanced: no change; (2) all
//! on pCPU 0: 2 per pCPU; (3) 4 heavy and 4 light, randomly pinned: one of
//! each per pCPU. Balanced within 25 quanta (the pCPUs' usage within 5 % of
//! their mean, as a standard deviation), and no unnecessary pin change.
//!
//! Memory: 4 VMs of 512 MiB, floor 200 MiB, max 2048 MiB: (1) one VM eats
//! to its max, then frees; (2) all four eat; (3) two eat, one stops, its
//! memory goes to the other. Supplied in time, no giving once the host
//! cannot afford it, reclaimed after a release, never below the floor.

use std::path::Path;

use vm_balancer::backend::sim::{Scenario, SimBackend};
use vm_balancer::config::Config;
use vm_balancer::pipeline::Pipeline;

use crate::util::relaxed_config;

const MIB: u64 = 1024;

fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, Path::new("peer.toml")).expect("the peer scenario parses")
}

/// The defaults over `text` as `simulate` runs them, with the suite's
/// 200 MiB guest floor.
fn pipeline(text: &str) -> Pipeline<SimBackend> {
    let mut config: Config = relaxed_config();
    config.guard.guest_floor_mib = 200;
    vm_balancer::simulate::pipeline(&scenario(text), &[], &config, None).expect("the defaults load")
}

/// Standard deviation of the pCPUs' usage over their mean.
fn usage_spread(usage: &[f64]) -> f64 {
    let mean = usage.iter().sum::<f64>() / usage.len() as f64;
    let var = usage.iter().map(|u| (u - mean).powi(2)).sum::<f64>() / usage.len() as f64;
    var.sqrt() / mean
}

/// 8 one-vCPU VMs on 4 pCPUs: `vms` is the `[[vm]]` tables.
fn cpu_case(seed: u64, vms: &str) -> String {
    format!("name = \"peer-cpu\"\nseed = {seed}\nquanta = 40\n[host]\ncpus = 4\nmemory_mib = 16384\nbase_used_mib = 1024\n{vms}")
}

fn vms(name: &str, count: u32, demand: f64, placement: &str) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\ncount = {count}\nmax_mib = 1024\nplacement = \"{placement}\"\n\
         cpu = {{ kind = \"constant\", value = {demand} }}\nmem_mib = {{ kind = \"constant\", value = 300 }}\n"
    )
}

/// Runs 40 quanta; from quantum 25 on, every quantum's pCPU usage is
/// within 5 % of its mean and no pin changes. Returns the pin changes and
/// the final placement (VM, vCPU, pCPUs).
fn balanced_within_25_quanta(case: &str, text: &str) -> (u64, Vec<(String, u32, Vec<u32>)>) {
    let mut p = pipeline(text);
    let mut pins_by_25 = 0;
    for q in 0..40 {
        p.step().expect("quantum runs");
        let sim = p.backend();
        if q < 25 {
            pins_by_25 = sim.metrics().pin_changes.iter().sum();
            continue;
        }
        let spread = usage_spread(&sim.last_quantum().cpu_load);
        assert!(spread <= 0.05, "{case}: quantum {q}: usage {:?}, spread {spread:.3} of the mean", sim.last_quantum().cpu_load);
    }
    let pins: u64 = p.backend().metrics().pin_changes.iter().sum();
    assert_eq!(pins, pins_by_25, "{case}: pin changes after quantum 25: {:?}", p.backend().metrics().pin_changes);
    (pins, p.backend().placements())
}

#[test]
fn cpu_already_balanced_makes_no_change() {
    let (pins, _) = balanced_within_25_quanta("balanced", &cpu_case(1, &vms("vm", 8, 0.45, "round-robin")));
    assert_eq!(pins, 0, "an already balanced host was changed");
}

#[test]
fn cpu_all_on_pcpu_0_reaches_two_per_pcpu_with_six_moves() {
    let text = cpu_case(1, &vms("vm", 8, 0.45, "first"));
    let (pins, _) = balanced_within_25_quanta("all on 0", &text);
    // Six of the eight must leave pCPU 0; any more is unnecessary.
    assert_eq!(pins, 6, "all on pCPU 0");
}

#[test]
fn cpu_four_heavy_four_light_randomly_pinned_reach_one_of_each_per_pcpu() {
    for seed in 1..=20 {
        let text = cpu_case(seed, &(vms("heavy", 4, 0.8, "random") + &vms("light", 4, 0.2, "random")));
        let case = format!("heavy and light, seed {seed}");
        let (pins, placements) = balanced_within_25_quanta(&case, &text);
        // At most one move per vCPU: a placement is reached without
        // moving anything twice.
        assert!(pins <= 8, "{case}: {pins} pin changes");
        let mut per_pcpu = [(0u32, 0u32); 4];
        for (name, _, cpus) in placements {
            let [cpu] = cpus[..] else { panic!("{case}: {name} not pinned to one pCPU: {cpus:?}") };
            let slot = &mut per_pcpu[cpu as usize];
            if name.starts_with("heavy") {
                slot.0 += 1;
            } else {
                slot.1 += 1;
            }
        }
        assert_eq!(per_pcpu, [(1, 1); 4], "{case}: (heavy, light) per pCPU");
    }
}

/// Memory a guest that eats uses at each quantum, MiB: 150, then +92.5 a
/// quantum from 5 to 25 (to 2000, its max less the margin), held, then
/// back to 150 from `free_at` (if any).
fn eating(free_at: Option<u64>) -> String {
    let values: Vec<String> = (0..60u64)
        .map(|q| match q {
            _ if free_at.is_some_and(|f| q >= f) => 150.0,
            0..=5 => 150.0,
            6..25 => 150.0 + (q - 5) as f64 * 92.5,
            _ => 2000.0,
        })
        .map(|mib| format!("{mib}"))
        .collect();
    format!("{{ kind = \"phases\", values = [{}], every = 1 }}", values.join(", "))
}

/// 4 VMs of 512 MiB (max 2048, floor 200) on a host of `host_mib` (512 MiB
/// of its own, a 512 MiB reserve): `eaters` as (name, memory profile,
/// extra keys), the rest idle at 150 MiB.
fn mem_case(host_mib: u64, eaters: &[(&str, &str, &str)]) -> String {
    let mut text = format!(
        "name = \"peer-mem\"\nseed = 1\nquanta = 60\n[host]\ncpus = 4\nmemory_mib = {host_mib}\nbase_used_mib = 512\nreserve_mib = 512\n"
    );
    let vm = |name: &str, count: usize, mem: &str, extra: &str| {
        format!(
            "[[vm]]\nname = \"{name}\"\ncount = {count}\nmax_mib = 2048\ninitial_mib = 512\ntags = [\"min_mib=200\"]\n{extra}\n\
             cpu = {{ kind = \"constant\", value = 0.1 }}\nmem_mib = {mem}\n"
        )
    };
    for (name, mem, extra) in eaters {
        text += &vm(name, 1, mem, extra);
    }
    if eaters.len() < 4 {
        text += &vm("idle", 4 - eaters.len(), "{ kind = \"constant\", value = 150 }", "");
    }
    text
}

/// One VM in one quantum: balloon target and use, MiB, and whether the
/// balloon is below its use.
#[derive(Clone, Debug)]
struct Seen {
    target: u64,
    used: u64,
    pressure: bool,
}

/// Runs 60 quanta, checking every target against the floor and the max
/// and the host against its reserve; returns each quantum's VMs by name.
fn run_mem(text: &str) -> Vec<std::collections::BTreeMap<String, Seen>> {
    let mut p = pipeline(text);
    let mut quanta = Vec::new();
    for q in 0..60 {
        p.step().expect("quantum runs");
        let sim = p.backend();
        let mut vms = std::collections::BTreeMap::new();
        for d in &sim.last_quantum().domains {
            let target = sim.target_kib(&d.name).unwrap_or(0) / MIB;
            assert!((200..=2048).contains(&target), "quantum {q}: {} at {target} MiB", d.name);
            vms.insert(d.name.clone(), Seen { target, used: d.used_kib / MIB, pressure: d.pressure });
        }
        let available = sim.metrics().host_available_kib.last().copied().unwrap_or(0) / MIB;
        assert!(available >= 512, "quantum {q}: host available {available} MiB, below its 512 MiB reserve: {vms:?}");
        quanta.push(vms);
    }
    quanta
}

#[test]
fn mem_one_vm_eats_to_its_max_is_supplied_in_time_and_reclaimed_after_it_frees() {
    let quanta = run_mem(&mem_case(8192, &[("eater", &eating(Some(40)), "")]));
    // Use is never above the balloon (`pressure`), so never past swap either.
    let short: Vec<usize> = (0..60).filter(|&q| quanta[q]["eater"].pressure).collect();
    assert!(short.is_empty(), "the eater was short of memory at quanta {short:?}");
    assert!(quanta[35]["eater"].target >= 2000, "holding 2000 MiB in {:?}", quanta[35]["eater"]);
    // Freed at 40: back below its initial 512 MiB by the end.
    assert!(quanta[59]["eater"].target <= 512, "19 quanta after freeing: {:?}", quanta[59]["eater"]);
    for name in ["idle-0", "idle-1", "idle-2"] {
        assert!(quanta[59][name].target <= 512 - 100, "{name} idle at 150 MiB kept {:?}", quanta[59][name]);
    }
}

#[test]
fn mem_all_four_eat_the_host_stops_giving_at_its_reserve_and_shares_fairly() {
    // 6 GiB: 5 GiB above the host's own, 4.5 above the reserve; four
    // guests at 2 GiB do not fit. `run_mem` checks the reserve each quantum.
    let (eat, names) = (eating(Some(40)), ["eater-0", "eater-1", "eater-2", "eater-3"]);
    let quanta = run_mem(&mem_case(6144, &names.map(|n| (n, eat.as_str(), ""))));
    let at_35: Vec<u64> = (0..4).map(|i| quanta[35][&format!("eater-{i}")].target).collect();
    let (lo, hi) = (*at_35.iter().min().unwrap(), *at_35.iter().max().unwrap());
    assert!((hi - lo) * 20 <= lo, "identical guests 5 % apart or more in a shortage: {at_35:?}");
    assert!(at_35.iter().sum::<u64>() >= 4096, "the host's memory went to the guests: {at_35:?}");
    let end: Vec<u64> = (0..4).map(|i| quanta[59][&format!("eater-{i}")].target).collect();
    assert!(end.iter().all(|&t| t <= 512), "reclaimed after the release: {end:?}");
}

#[test]
fn mem_two_eat_one_stops_and_its_memory_goes_to_the_other() {
    // 4 GiB: 3 above the host's own, 2.5 above the reserve; two idle
    // guests keep ~280 MiB each, so the eaters share what is left until
    // one stops at quantum 40.
    let eat = eating(None);
    let quanta = run_mem(&mem_case(4096, &[("eater-a", &eat, "stop = 40"), ("eater-b", &eat, "")]));
    let (a, b) = (&quanta[35]["eater-a"], &quanta[35]["eater-b"]);
    assert!(a.target < 2000 && b.target < 2000, "both cannot have 2 GiB: {a:?} {b:?}");
    assert!(a.target.abs_diff(b.target) * 20 <= a.target, "shared: {a:?} {b:?}");
    assert!(!quanta[45].contains_key("eater-a"), "eater-a stopped");
    let late: Vec<usize> = (45..60).filter(|&q| quanta[q]["eater-b"].pressure).collect();
    assert!(late.is_empty(), "eater-b short of memory 5 quanta after eater-a stopped, at {late:?}");
    let b = &quanta[59]["eater-b"];
    assert!(b.used == 2000 && b.target >= 2000 + 32, "eater-b got what eater-a left: {b:?}");
}
