//! Integration tests on the simulator: the defaults converge, beat the
//! classic port, the guard holds against a hostile policy, and runs are
//! deterministic.

use vm_balancer::components as c;
use vm_balancer::config::{Config, GuardConfig};
use vm_balancer::simulate::{simulate, Report};

use crate::util::{relaxed_config, scenario, sim_pipeline};

const SCENARIOS: [&str; 8] = ["all-on-one", "uneven", "phases", "idle-reclaim", "filling", "host-short", "churn", "large"];

fn run(name: &str, specs: &[&str]) -> Report {
    let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    simulate(&scenario(name), &specs, &relaxed_config(), None).expect("simulation runs")
}

#[test]
fn defaults_fix_all_on_one_in_one_quantum_and_never_flap() {
    let r = run("all-on-one", &[]);
    assert!(r.cpu.steady_load_ratio < 1.001, "{r}");
    assert!(r.cpu.converged_at <= 1, "{r}");
    assert_eq!(r.cpu.pin_changes, 2, "exactly two moves: {r}");
    assert_eq!(r.cpu.steady_pin_changes, 0, "{r}");
}

#[test]
fn classic_stalls_at_three_to_one_like_the_original() {
    let r = run("all-on-one", &["builtin:classic"]);
    assert!((r.cpu.steady_load_ratio - 1.5).abs() < 0.01, "{r}");
}

#[test]
fn defaults_beat_or_match_classic_on_every_scenario() {
    for name in SCENARIOS {
        let ours = run(name, &[]);
        let classic = run(name, &["builtin:classic"]);
        for r in [&ours, &classic] {
            let failures: u64 = r.slots.values().flat_map(|s| s.failures.values()).sum();
            assert_eq!(failures, 0, "{name}: no policy failures expected\n{r}");
        }
        assert!(ours.cpu.mean_load_ratio <= classic.cpu.mean_load_ratio + 0.005, "{name}: cpu balance\n{ours}\n{classic}");
        assert!(ours.cpu.unserved_cpu_s <= classic.cpu.unserved_cpu_s * 1.2 + 1.0, "{name}: unserved\n{ours}\n{classic}");
        assert!(ours.memory.oom_events <= classic.memory.oom_events, "{name}: guest OOMs\n{ours}\n{classic}");
        assert_eq!(ours.memory.host_oom_events, 0, "{name}: host OOM\n{ours}");
    }
}

#[test]
fn host_reserve_holds_when_guests_want_more_than_the_host_has() {
    let r = run("host-short", &[]);
    assert!(r.memory.lowest_host_available_mib >= 512, "reserve is 512 MiB\n{r}");
    assert_eq!(r.memory.host_oom_events, 0, "{r}");
}

/// Guests that start on a host whose pool a grown guest had spent push it
/// below its reserve; the memory policy wins the reserve back within a few
/// quanta, from the grown guest too (the squeeze to the growth trigger
/// alone left it 128 MiB short until the guest's use fell, 7 quanta).
#[test]
fn the_reserve_is_won_back_after_guests_start_on_a_spent_host() {
    let text = r#"
name = "late-arrivals"
seed = 2
quanta = 20
[host]
cpus = 2
memory_mib = 4096
reserve_mib = 512
[[vm]]
name = "big"
max_mib = 2048
initial_mib = 512
mem_mib = { kind = "constant", value = 1735 }
[[vm]]
name = "steady"
max_mib = 1024
mem_mib = { kind = "constant", value = 730 }
[[vm]]
name = "late"
count = 2
max_mib = 1024
initial_mib = 512
start = 7
mem_mib = { kind = "constant", value = 664 }
"#;
    let sc = vm_balancer::backend::sim::Scenario::parse(text, std::path::Path::new("late-arrivals.toml")).unwrap();
    let r = simulate(&sc, &[], &relaxed_config(), None).expect("simulation runs");
    // Quantum 7 (the arrivals) and the two quanta the balloons take.
    assert!(r.memory.below_reserve_quanta <= 3, "{r}");
    assert_eq!(r.memory.host_oom_events, 0, "{r}");
}

#[test]
fn idle_guests_are_reclaimed_without_pressure() {
    let r = run("idle-reclaim", &[]);
    assert!(r.memory.reclaimed_mib > 3000, "{r}");
    assert_eq!(r.memory.pressure_events, 0, "{r}");
}

#[test]
fn large_host_converges() {
    let r = run("large", &[]);
    assert!(r.cpu.steady_load_ratio < 1.15, "{r}");
    // Measured 0.5 % (0.4 % with the previous greedy default; classic
    // leaves 6.7 % unserved): the guard lets 256 pins through a quantum, and
    // the random start takes three quanta to spread.
    assert!(r.cpu.unserved_pct < 2.0, "{r}");
    // Measured 1,771 pins (previous default 947). 2,874 before the repair
    // made room for large vCPUs down a chain: a repair that missed its
    // level let a plan from scratch win, hundreds of moves a quantum.
    assert!(r.cpu.pin_changes < 2_200, "{r}");
}

/// Everything but `timing` (decide times, which differ run to run).
#[test]
fn same_scenario_same_report() {
    let figures = |r: Report| {
        let mut v = serde_json::to_value(&r).unwrap();
        let timing = v.as_object_mut().unwrap().remove("timing").expect("the report has decide times");
        assert!(timing["cpu"]["calls"].as_u64().unwrap() > 0, "{timing}");
        v
    };
    assert_eq!(figures(run("churn", &[])), figures(run("churn", &[])));
}

#[test]
fn guard_holds_against_a_hostile_policy() {
    let sc = scenario("idle-reclaim");
    let config =
        Config { guard: GuardConfig { reserved_cpus: vec![0], host_reserve_mib: 4096, ..GuardConfig::default() }, ..relaxed_config() };
    let mut p = sim_pipeline(&sc, &[c::FIXTURE_HOSTILE], config);
    for _ in 0..40 {
        p.step().unwrap();
    }
    let m = p.backend().metrics();
    assert_eq!(m.pressure_events, 0, "the guest floor held against 'shrink to 0'");
    assert!(m.lowest_host_available_kib >= 4096 * 1024, "the host reserve held: {} KiB", m.lowest_host_available_kib);
    assert_eq!(p.applier().stats().pins, 0, "every hostile pin was refused");
    let g = p.guard().stats();
    assert!(g.rejected > 100 && g.clamped > 0, "{g:?}");
    assert_eq!(p.policies().slots()[0].stats().fallbacks, 0, "a hostile but well-formed policy is not a failure");
}

#[test]
fn verdicts_reach_the_next_snapshot() {
    // The counter fixture proposes set-memory on a domain that does not exist;
    // its rejection must be in the verdicts of the next quantum's outcome.
    let mut p = sim_pipeline(&scenario("all-on-one"), &[c::FIXTURE_COUNTER], relaxed_config());
    let first = p.step().unwrap();
    assert!(first.verdicts.iter().any(|v| v.reason.contains("not managed")), "{:?}", first.verdicts);
}
