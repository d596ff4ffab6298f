//! Collection and a whole quantum at 1,000 domains, without 1,000 guests (a
//! plain program: `cargo bench --bench collect`):
//! - **CPU figures**: a fake procfs tree of 1,000 QEMU processes with 4 vCPU
//!   threads each (and 2 other threads), read through the fast path's own
//!   code (`procfs::ProcRoots`: map once, then every vCPU's `schedstat`
//!   each quantum). The median quantum.
//! - **The rest of a quantum**: the simulator's pipeline on
//!   `examples/scenarios/large.toml` (1,000 domains × 4 vCPUs on 256 pCPUs):
//!   snapshot → decide (the default policies, in wasm) → guard → apply. The
//!   median step.
//! - **The daemon's own cost**: `vm-balancer run --connect sim:large.toml
//!   --quantum 1s` for `VMB_BENCH_RUN_S` seconds (default 30): CPU time and
//!   peak RSS, with the simulator's model included (a real host has the
//!   listing and the balloon subset instead: see `cargo bench --bench
//!   libvirt` for their per-domain cost).

#[path = "common/usage.rs"]
mod usage;

use std::process::Command;
use std::time::Instant;

use vm_balancer::backend::libvirt::procfs::{fake_tree, ProcRoots};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn cpu_figures(domains: u32, vcpus: u32) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let roots: ProcRoots = fake_tree(dir.path(), domains, vcpus).unwrap();
    let started = Instant::now();
    let maps: Vec<_> = (0..domains).map(|i| roots.map_vcpus(roots.qemu_pid(&format!("vm-{i}")).unwrap()).unwrap()).collect();
    let map_ms = started.elapsed().as_secs_f64() * 1e3;
    let times = (0..20)
        .map(|_| {
            let t = Instant::now();
            let read: usize = maps.iter().map(|m| roots.read(m).unwrap().len()).sum();
            assert_eq!(read, (domains * vcpus) as usize);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    (map_ms, median(times))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for (domains, vcpus) in [(100, 4), (1000, 4)] {
        let (map_ms, read_ms) = cpu_figures(domains, vcpus);
        println!("CPU figures, {domains} domains x {vcpus} vCPUs (fake procfs): {read_ms:.1} ms per quantum (mapping all threads once: {map_ms:.1} ms)");
    }

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let scenario = vm_balancer::backend::sim::Scenario::load(&root.join("examples/scenarios/large.toml")).unwrap();
    let config = vm_balancer::simulate::scenario_config(&scenario, &vm_balancer::config::Config::default());
    let mut pipeline = vm_balancer::simulate::pipeline(&scenario, &[], &config, None).unwrap();
    pipeline.step().unwrap(); // first decisions (every vCPU placed)
    let steps: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            pipeline.step().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    println!("pipeline step (snapshot, decide in wasm, guard, apply), 1,000 domains x 4 vCPUs: median {:.1} ms", median(steps));

    let run_s: u64 = std::env::var("VMB_BENCH_RUN_S").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let exe = env!("CARGO_BIN_EXE_vm-balancer");
    let sim = format!("sim:{}", root.join("examples/scenarios/large.toml").display());
    // Reaped by `usage::wait_for_usage`, which also returns its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(exe)
        .args([
            "run",
            "--connect",
            &sim,
            "--quantum",
            "1s",
            "--quanta",
            &run_s.to_string(),
            "--policy",
            "builtin:cpu",
            "--policy",
            "builtin:mem",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("daemon starts");
    usage::report(child, run_s, "daemon on the simulator, 1,000 domains at a 1 s quantum (simulator model included)");
}
