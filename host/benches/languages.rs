//! Policy languages side by side (a plain program: `cargo bench --bench
//! languages`). For each example in `examples/policies/` (C, Rust,
//! JavaScript, Python) it prints:
//! - build time (its own `build.sh`, toolchain already installed) and
//!   component size;
//! - compile time, cold and from the compile cache;
//! - median and p90 `decide` time on 10, 100 and 1,000 domains, with the
//!   world it speaks (MessagePack or JSON);
//! - for the 100-domain snapshot, the host's share: encoding the snapshot
//!   for the policy's world, and decoding its answer.
//!
//! Figures, not asserts: machines of this kind differ by 3-4x. Limit the
//! languages with `VMB_BENCH_LANGS=python,javascript`; skip the builds (use
//! what `target/examples/` has) with `VMB_BENCH_NO_BUILD=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vm_balancer::config::Limits;
use vm_balancer::policy::cache::CompileCache;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};
use vm_balancer::sdk::Snapshot;

const LANGS: [&str; 4] = ["c", "rust", "javascript", "python"];
const SIZES: [u32; 3] = [10, 100, 1000];
/// Calls per size: enough for a stable median of a 100 ms call, few enough
/// that the slowest language finishes in a minute.
const CALLS: usize = 21;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The snapshot of the old `decide_cost` test: 32 pCPUs, two vCPUs a
/// domain, every tenth tagged "latency", a third of them short of memory.
fn snapshot(domains: u32) -> Snapshot {
    let mut b = SnapshotBuilder::new(32, 256 << 20).host_memory(128 << 20, 512 << 10);
    for i in 0..domains {
        let d = DomainBuilder::new(&format!("vm-{i}")).vcpu(i % 4, 0.9).vcpu(i % 32, 0.1).memory_mib(
            4096,
            2048,
            Some(if i % 3 == 0 { 100 } else { 1500 }),
        );
        b = b.domain(if i % 10 == 0 { d.tag("latency") } else { d });
    }
    b.build()
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn build(lang: &str, out: &Path) -> Duration {
    let script = root().join("examples/policies").join(lang).join("build.sh");
    let started = Instant::now();
    let run = Command::new("bash").arg(&script).arg(out).output().expect("bash runs");
    assert!(run.status.success(), "{} failed:\n{}", script.display(), String::from_utf8_lossy(&run.stderr));
    started.elapsed()
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is not used here.
    let wanted: Vec<String> = std::env::var("VMB_BENCH_LANGS")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|_| LANGS.iter().map(|s| s.to_string()).collect());
    let no_build = std::env::var_os("VMB_BENCH_NO_BUILD").is_some();
    let snapshots: Vec<(u32, Snapshot)> = SIZES.iter().map(|&n| (n, snapshot(n))).collect();
    println!("policy languages: build, size, compile, decide (median / p90 of {CALLS} calls)");
    for lang in LANGS.iter().filter(|l| wanted.iter().any(|w| w == *l)) {
        let out = root().join("target/examples").join(format!("{lang}.wasm"));
        let built = if no_build && out.exists() { None } else { Some(build(lang, &out)) };
        let bytes = std::fs::read(&out).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(dir.path(), 1 << 30).unwrap();
        let started = Instant::now();
        cache.component(lang, &bytes).expect("compiles");
        let cold = started.elapsed();
        let started = Instant::now();
        let component = cache.component(lang, &bytes).expect("cached");
        let cached = started.elapsed();
        let limits = Limits { decide_timeout_ms: 60_000, ..Limits::default() };
        let set = PolicySet::new(&limits);
        let mut policy = set.sandbox().load_compiled("bench", lang, component).expect("loads");
        println!(
            "{lang:<10} world {:<11} build {:>7}  size {:>6.1} MB  compile cold {:>7.2?}  cached {:>7.2?}",
            policy.encoding().world(),
            built.map_or("(skipped)".to_string(), |d| format!("{:.1?}", d)),
            bytes.len() as f64 / 1e6,
            cold,
            cached
        );
        for (n, snap) in &snapshots {
            let input = policy.encoding().encode(snap);
            policy.decide(&input).expect("first call decides");
            let mut times: Vec<Duration> = (0..CALLS)
                .map(|_| {
                    let t = Instant::now();
                    policy.decide(&input).expect("decides");
                    t.elapsed()
                })
                .collect();
            times.sort();
            println!(
                "{:<10} {n:>5} domains  decide median {:>9.2?}  p90 {:>9.2?}  (snapshot {} KB)",
                "",
                percentile(&times, 50),
                percentile(&times, 90),
                input.len() / 1000
            );
            if *n == 100 {
                let t = Instant::now();
                for _ in 0..CALLS {
                    std::hint::black_box(policy.encoding().encode(snap));
                }
                println!("{:<10} {n:>5} domains  host encode {:>9.2?} per call", "", t.elapsed() / CALLS as u32);
            }
        }
    }
}
