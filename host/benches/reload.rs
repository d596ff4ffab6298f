//! Hot-swap figures (a plain program: `cargo bench --bench reload`):
//! - compile time of a policy component, cold versus from the compile cache;
//! - time from the rename into the policy directory to the first quantum
//!   that the new policy decides (debounce included), with a 10 ms quantum.
//!
//! Extra components to measure (e.g. the Python or JavaScript examples) can
//! be named in `VMB_BENCH_COMPONENTS=path1:path2`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_balancer::config::Config;
use vm_balancer::policy::builtin::Builtin;
use vm_balancer::policy::cache::CompileCache;
use vm_balancer::policy::reload::Reloader;
use vm_balancer::policy::sandbox::compile;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn compile_figures(name: &str, bytes: &[u8]) {
    let state = tempfile::tempdir().unwrap();
    let cache = CompileCache::new(state.path(), 1 << 30).unwrap();
    let started = Instant::now();
    compile(name, bytes).unwrap();
    let cold = started.elapsed();
    cache.component(name, bytes).unwrap(); // fills the cache
    let warm = median(
        (0..10)
            .map(|_| {
                let t = Instant::now();
                cache.component(name, bytes).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    println!("compile  {name:<28} {:>8} KiB   cold {:>9.1} ms   cached {:>7.3} ms", bytes.len() / 1024, cold.as_secs_f64() * 1e3, warm);
}

fn swap_latency() {
    let config = Config::default();
    let mut samples = Vec::new();
    let snapshot = SnapshotBuilder::new(4, 8 << 20).domain(DomainBuilder::new("a").vcpu(0, 0.5)).build();
    for round in 0..5 {
        // Not under /tmp: the daemon refuses policies below a directory
        // others can write.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        std::fs::write(dir.path().join("10-p.wasm"), Builtin::Cpu.wasm()).unwrap();
        let mut set = PolicySet::new(&config.limits);
        let reloader = Reloader::spawn(dir.path(), &config, None, set.last_snapshot());
        assert!(reloader.wait_and_apply(&mut set, Duration::from_secs(30)));
        set.decide(&snapshot);
        let (tmp, target) = (dir.path().join(".tmp"), dir.path().join("10-p.wasm"));
        std::fs::write(&tmp, if round % 2 == 0 { Builtin::Classic.wasm() } else { Builtin::Mem.wasm() }).unwrap();
        let started = Instant::now();
        std::fs::rename(&tmp, &target).unwrap();
        loop {
            reloader.poll(&mut set);
            set.decide(&snapshot);
            let name = set.slots()[0].policy().map(|p| p.info().name.clone()).unwrap_or_default();
            if name != "cpu-default" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    println!("swap     rename -> first decided quantum: median {:.0} ms over 5 (debounce 200 ms, quantum 10 ms)", median(samples));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes harness-less benches
    }
    for b in Builtin::ALL {
        compile_figures(&format!("builtin:{}", b.name()), b.wasm());
    }
    for path in std::env::var("VMB_BENCH_COMPONENTS").unwrap_or_default().split(':').filter(|p| !p.is_empty()) {
        match std::fs::read(PathBuf::from(path)) {
            Ok(bytes) => compile_figures(path, &bytes),
            Err(e) => println!("compile  {path}: cannot read ({e})"),
        }
    }
    swap_latency();
}
