//! Benchmark: snapshot encode + `decide` + action decode for the default
//! policies, in wasm (through the sandbox, as the daemon runs them) and
//! natively (the same Rust code linked in), at 10 to 10,000 domains of 4
//! vCPUs on 256 pCPUs. Targets: ≤ 1 ms median at 1,000 domains; wasm ≤ 1.5×
//! native. Run: `cargo bench --bench decide`.
//!
//! `cargo bench --bench decide -- count [DOMAINS] [cpu|mem]` makes 10 calls
//! of each kind for an instruction count under callgrind (see [`counted`]).
//!
//! `cargo bench --bench decide -- ratio [DOMAINS] [cpu|mem]` measures the wasm/native ratio
//! interleaved instead (at 10 to 10,000 domains, or only at DOMAINS): rounds of wasm calls and native calls alternate, so
//! a neighbour's load on a shared VM hits both sides alike (criterion
//! measures one side for seconds, then the other).
//!
//! The worst case, every call: the same unbalanced host is decided again
//! and again with its quantum number advancing, as the daemon's would, and
//! nothing the policies propose is ever applied. Its domains alternate
//! between two sets of names (`a-vm-N`, `b-vm-N`), so each call sees every
//! domain for the first time: no cooldown holds a move back, and the memory
//! policy, which otherwise waits for a balloon to reach the target it set
//! (and stops proposing when it never does), acts on every domain whose
//! figures call for it, and pays for forgetting and learning 1,000 domains.
//! The CPU policy plans its full budget of moves each call (64 at 256
//! pCPUs). A converged host costs less: the CPU policy stops at its first
//! check, the memory policy proposes nothing.

use criterion::{BenchmarkId, Criterion};
use vm_balancer::config::Limits;
use vm_balancer::policy::answer::{self, Encoding};
use vm_balancer::policy::builtin::Builtin;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};
use vm_balancer::sdk::{encode_snapshot, Policy, Runner, Snapshot};

/// The benchmark's host, its domains named `{prefix}vm-N`.
fn snapshot_named(domains: u32, prefix: &str) -> Snapshot {
    let mut b = SnapshotBuilder::new(256, 4 << 30).host_memory(2 << 30, 8 << 20);
    for i in 0..domains {
        let mut d = DomainBuilder::new(&format!("{prefix}vm-{i}"));
        for v in 0..4 {
            let cpu = (i * 7 + v * 13) % 256;
            d = d.vcpu_with_steal(cpu, ((i * 31 + v * 17) % 100) as f32 / 200.0, ((i + v) % 10) as f32 / 100.0);
        }
        b = b.domain(d.memory_mib(4096, 2048, Some(((i * 37) % 1800) as u64)));
    }
    b.build()
}

/// The benchmark's host (for the codec groups).
fn snapshot(domains: u32) -> Snapshot {
    snapshot_named(domains, "")
}

/// The same host under two sets of names, taken in turn with the quantum
/// advancing (see the module docs).
struct Alternating {
    snaps: [Snapshot; 2],
    quantum: u64,
}

impl Alternating {
    fn new(domains: u32) -> Self {
        Alternating { snaps: [snapshot_named(domains, "a-"), snapshot_named(domains, "b-")], quantum: 0 }
    }

    /// The next quantum's snapshot.
    fn next(&mut self) -> &Snapshot {
        self.quantum += 1;
        let snap = &mut self.snaps[(self.quantum % 2) as usize];
        snap.quantum = self.quantum;
        snap
    }
}

/// Limits no benchmark call comes near, so the figures are the calls' own.
fn roomy_limits() -> Limits {
    Limits { decide_timeout_ms: 10_000, max_memory_mib: 2048, max_output_kib: 65536, ..Limits::default() }
}

/// Where the time goes: the host's encode and a native decode of the snapshot,
/// each beside rmp_serde's (`*-rmp-serde`, the same bytes through serde),
/// so the case for the hand-written codec can be re-checked.
fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.sample_size(20).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(2));
    for n in [100u32, 1000] {
        let snap = snapshot(n);
        let bytes = encode_snapshot(&snap);
        group.bench_with_input(BenchmarkId::new("encode", n), &snap, |b, snap| b.iter(|| encode_snapshot(snap).len()));
        group.bench_with_input(BenchmarkId::new("encode-rmp-serde", n), &snap, |b, snap| {
            b.iter(|| rmp_serde::to_vec_named(snap).unwrap().len())
        });
        group.bench_with_input(BenchmarkId::new("decode", n), &bytes, |b, bytes| {
            b.iter(|| vm_balancer::sdk::decode_snapshot(bytes).unwrap().domains.len())
        });
        group.bench_with_input(BenchmarkId::new("decode-rmp-serde", n), &bytes, |b, bytes| {
            b.iter(|| rmp_serde::from_slice::<Snapshot>(bytes).unwrap().domains.len())
        });
        let mut reused = Snapshot::default();
        group.bench_with_input(BenchmarkId::new("decode-into", n), &bytes, |b, bytes| {
            b.iter(|| vm_balancer::sdk::decode_snapshot_into(bytes, &mut reused, vm_balancer::sdk::Reads::ALL).unwrap())
        });
        let limits = roomy_limits();
        let mut counter = PolicySet::new(&limits).load_spec(vm_balancer::components::FIXTURE_COUNTER).unwrap();
        group.bench_with_input(BenchmarkId::new("wasm-decode-only", n), &snap, |b, snap| {
            b.iter(|| counter.decide(&encode_snapshot(snap)).unwrap().len())
        });
        // The sandbox's share: encode, copy in, call a policy that reads nothing.
        let mut garbage = PolicySet::new(&limits).load_spec(vm_balancer::components::FIXTURE_GARBAGE).unwrap();
        group.bench_with_input(BenchmarkId::new("wasm-call-only", n), &snap, |b, snap| {
            b.iter(|| garbage.decide(&encode_snapshot(snap)).is_err())
        });
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    decide::<vmb_policy_cpu::CpuPolicy>(c, Builtin::Cpu);
    decide::<vmb_policy_mem::MemPolicy>(c, Builtin::Mem);
}

/// One policy, wasm through the sandbox and native through the SDK's
/// `Runner`: the very code the wasm export runs (decode only what the policy
/// reads, into last call's snapshot; decide; encode), compiled natively.
fn decide<P: Policy>(c: &mut Criterion, builtin: Builtin) {
    let limits = roomy_limits();
    let set = PolicySet::new(&limits);
    let mut group = c.benchmark_group(format!("decide-{}", builtin.name()));
    group.sample_size(20).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    for n in [10u32, 100, 1000, 10_000] {
        let mut host = Alternating::new(n);
        let mut wasm = set.load_spec(&format!("builtin:{}", builtin.name())).unwrap();
        group.bench_function(BenchmarkId::new("wasm", n), |b| b.iter(|| wasm.decide(&encode_snapshot(host.next())).unwrap().len()));
        let mut native = Runner::<P>::default();
        let count = std::env::var_os("VMB_BENCH_COUNT").is_some();
        group.bench_function(BenchmarkId::new("native", n), |b| {
            b.iter(|| {
                let snap = host.next();
                let actions = native_decide(&mut native, snap);
                if count && snap.quantum.is_multiple_of(1000) {
                    eprintln!("{n} domains, quantum {}: {} actions", snap.quantum, actions);
                }
                actions
            })
        });
        eprintln!("snapshot bytes at {n} domains: {}", encode_snapshot(host.next()).len());
    }
    group.finish();
}

/// The native side of one call: encode, decide, decode the answer (as the
/// daemon decodes a wasm policy's answer).
fn native_decide<P: Policy>(native: &mut Runner<P>, snap: &Snapshot) -> usize {
    let out = native.decide(&encode_snapshot(snap)).unwrap();
    answer::decode(Encoding::MessagePack, &out).unwrap().len()
}

/// For instruction counts, which a busy or shared machine does not skew:
/// `valgrind --tool=callgrind --smc-check=all-non-file BENCH count 1000`,
/// then `callgrind_annotate --inclusive=yes` gives `counted_wasm_calls` and
/// `counted_native_calls` (10 calls each, after 3 unmeasured ones).
fn counted<P: Policy>(builtin: Builtin, domains: u32) {
    let limits = roomy_limits();
    let mut wasm = PolicySet::new(&limits).load_spec(&format!("builtin:{}", builtin.name())).unwrap();
    let mut native = Runner::<P>::default();
    let mut host = Alternating::new(domains);
    for _ in 0..3 {
        wasm.decide(&encode_snapshot(host.next())).unwrap();
        native_decide(&mut native, host.next());
    }
    // The names differ in the code too, or the linker folds the two into one.
    #[inline(never)]
    fn counted_wasm_calls(call: &mut dyn FnMut() -> usize) -> usize {
        std::hint::black_box("wasm");
        (0..10).map(|_| call()).sum()
    }
    #[inline(never)]
    fn counted_native_calls(call: &mut dyn FnMut() -> usize) -> usize {
        std::hint::black_box("native");
        (0..10).map(|_| call()).sum()
    }
    let w = counted_wasm_calls(&mut || wasm.decide(&encode_snapshot(host.next())).unwrap().len());
    let n = counted_native_calls(&mut || native_decide(&mut native, host.next()));
    println!("{} {domains} domains: {w} wasm actions, {n} native actions in 10 calls each", builtin.name());
}

/// Interleaved wasm/native measurement: `ROUNDS` rounds of `calls` wasm
/// calls (tens of milliseconds' worth) then as many native calls; prints the medians
/// of the per-call times and of the per-round ratios, with the ratios' range.
fn interleaved<P: Policy>(builtin: Builtin, domains: u32) {
    const ROUNDS: usize = 60;
    let calls: u32 = (40_000 / domains).clamp(4, 1_000);
    let limits = roomy_limits();
    let mut wasm = PolicySet::new(&limits).load_spec(&format!("builtin:{}", builtin.name())).unwrap();
    let mut native = Runner::<P>::default();
    let mut host = Alternating::new(domains);
    let mut time = |call: &mut dyn FnMut(&Snapshot) -> usize| {
        let start = std::time::Instant::now();
        for _ in 0..calls {
            std::hint::black_box(call(host.next()));
        }
        start.elapsed().as_secs_f64() * 1e6 / f64::from(calls)
    };
    let mut wasm_call = |s: &Snapshot| wasm.decide(&encode_snapshot(s)).unwrap().len();
    let mut native_call = |s: &Snapshot| native_decide(&mut native, s);
    for _ in 0..5 {
        time(&mut wasm_call);
        time(&mut native_call);
    }
    let (mut w, mut n, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        w.push(time(&mut wasm_call));
        n.push(time(&mut native_call));
        ratio.push(w[w.len() - 1] / n[n.len() - 1]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (w, n, r) = (median(&mut w), median(&mut n), median(&mut ratio));
    println!(
        "{:<4} {domains:>6} domains, {ROUNDS} rounds of {calls:>4} calls: wasm {w:>7.1} µs, native {n:>7.1} µs, ratio {r:.2} (rounds {:.2} to {:.2})",
        builtin.name(),
        ratio[0],
        ratio[ratio.len() - 1]
    );
}

/// `criterion_group!` makes an undocumented public function; it is ours.
#[allow(missing_docs)]
mod groups {
    use super::{bench, codec};
    criterion::criterion_group!(benches, codec, bench);
}
use groups::benches;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |word: &str| args.iter().any(|a| a == word);
    // `cpu` or `mem` after `count` or `ratio` measures that policy only.
    let (cpu, mem) = (!has("mem"), !has("cpu"));
    if has("count") {
        let domains = args.iter().find_map(|a| a.parse().ok()).unwrap_or(1000);
        if cpu {
            counted::<vmb_policy_cpu::CpuPolicy>(Builtin::Cpu, domains);
        }
        if mem {
            counted::<vmb_policy_mem::MemPolicy>(Builtin::Mem, domains);
        }
        return;
    }
    if has("ratio") {
        // `-- ratio 1000` measures only that many domains.
        let only: Vec<u32> = args.iter().filter_map(|a| a.parse().ok()).collect();
        for domains in [10, 100, 1000, 10_000].into_iter().filter(|n| only.is_empty() || only.contains(n)) {
            if cpu {
                interleaved::<vmb_policy_cpu::CpuPolicy>(Builtin::Cpu, domains);
            }
            if mem {
                interleaved::<vmb_policy_mem::MemPolicy>(Builtin::Mem, domains);
            }
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
