//! Collection cost on real libvirt (a plain program: `cargo bench --bench
//! libvirt`; needs `bash .ci/setup.sh --libvirt` first):
//! - boots idle TCG guests (transient, named `vmbbench-N`, destroyed at the
//!   end and at start), 20 then 50 (`VMB_BENCH_GUESTS=20,50`);
//! - at each count, the fast path (procfs CPU figures, state-only listing,
//!   the urgent domains' balloons, and a rolling balloon refresh on a
//!   background thread) and the bulk path (one call, every group), measured
//!   alternately in the same run: median collection time, its parts, the
//!   background refresh's own call time and domains (off the collection),
//!   and libvirt calls per steady quantum; and one `virsh domstats` of all
//!   domains;
//! - the daemon's CPU time and peak RSS over `VMB_BENCH_RUN_S` seconds
//!   (default 60) at a 1 s quantum, dry run.

#[path = "common/usage.rs"]
mod usage;

use std::process::Command;
use std::time::{Duration, Instant};

use vm_balancer::backend::libvirt::{CollectMode, LibvirtBackend, LibvirtOptions};
use vm_balancer::backend::Backend;

const GUEST_DIR: &str = "/var/lib/vm-balancer/guest";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().expect("virsh runs")
}

fn cleanup() {
    let list = virsh(&["list", "--name"]);
    for name in String::from_utf8_lossy(&list.stdout).lines().filter(|n| n.starts_with("vmbbench-")) {
        let _ = virsh(&["destroy", name]);
    }
}

/// One path's samples: name, collect ms, calls, (listing, CPU, balloon
/// waited for, background call) ms, (balloons waited for, background) domains.
type Row = (&'static str, Vec<f64>, Vec<f64>, Vec<[f64; 4]>, Vec<[f64; 2]>);

/// The median, NaN (printed "NaN") if there is none.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn boot(i: usize) {
    let xml = format!(
        "<domain type='qemu'><name>vmbbench-{i}</name>
          <memory unit='MiB'>384</memory><currentMemory unit='MiB'>256</currentMemory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type>
            <kernel>{GUEST_DIR}/vmlinuz</kernel><initrd>{GUEST_DIR}/initramfs.cpio.gz</initrd>
            <cmdline>console=ttyS0 quiet</cmdline></os>
          <features><acpi/><apic/></features>
          <devices><memballoon model='virtio'><stats period='1'/></memballoon></devices></domain>"
    );
    let file = std::env::temp_dir().join(format!("vmbbench-{i}.xml"));
    std::fs::write(&file, xml).unwrap();
    let out = virsh(&["create", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn backend(mode: CollectMode) -> LibvirtBackend {
    let mut options = LibvirtOptions::new("qemu:///system");
    options.collect = mode;
    options.read_only = true;
    options.collect_deadline = Duration::from_secs(5);
    LibvirtBackend::connect(options).expect("libvirt reachable")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(std::path::Path::new(GUEST_DIR).join("vmlinuz").exists(), "run `bash .ci/setup.sh --libvirt` first");
    cleanup();
    let counts: Vec<usize> =
        std::env::var("VMB_BENCH_GUESTS").unwrap_or_else(|_| "20,50".into()).split(',').filter_map(|n| n.trim().parse().ok()).collect();
    let mut booted = 0;
    let mut guests = 0;
    println!("| guests | path | collect (median) | listing | CPU figures | balloon, waited for (domains) | balloon, background call (domains) | libvirt calls |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &counts {
        while booted < n {
            boot(booted);
            booted += 1;
        }
        guests = n;
        std::thread::sleep(Duration::from_secs(20)); // boots, then idle
        let mut fast = backend(CollectMode::Auto);
        let mut bulk = backend(CollectMode::Bulk);
        for b in [&mut fast, &mut bulk] {
            b.collect().unwrap(); // first sight
        }
        let mut rows: Vec<Row> = vec![("fast", vec![], vec![], vec![], vec![]), ("bulk", vec![], vec![], vec![], vec![])];
        for _ in 0..10 {
            std::thread::sleep(Duration::from_secs(1));
            for (row, b) in rows.iter_mut().zip([&mut fast, &mut bulk]) {
                let before = b.calls();
                let obs = b.collect().unwrap();
                assert!(obs.domains.len() >= n);
                row.1.push(b.last_collect().as_secs_f64() * 1e3);
                row.2.push((b.calls() - before) as f64);
                let t = b.last_timing();
                let (bg, bg_domains) = t.background_taken.map_or((f64::NAN, f64::NAN), |(d, n)| (d.as_secs_f64() * 1e3, n as f64));
                row.3.push([t.listing.as_secs_f64() * 1e3, t.cpu.as_secs_f64() * 1e3, t.balloon.as_secs_f64() * 1e3, bg]);
                row.4.push([t.balloons_refreshed as f64, bg_domains]);
            }
        }
        for (name, times, calls, parts, refreshed) in rows {
            // Medians over the quanta that have the figure (a background
            // answer is taken on most quanta, not all).
            let part = |k: usize| median(parts.iter().map(|p| p[k]).filter(|x| !x.is_nan()).collect());
            let count = |k: usize| median(refreshed.iter().map(|r| r[k]).filter(|x| !x.is_nan()).collect());
            if name == "fast" {
                println!(
                    "| {n} | fast | {:.1} ms | {:.2} ms | {:.2} ms | {:.1} ms ({}) | {:.1} ms ({}) | {} |",
                    median(times),
                    part(0),
                    part(1),
                    part(2),
                    count(0),
                    part(3),
                    count(1),
                    median(calls)
                );
            } else {
                println!("| {n} | bulk | {:.1} ms | | | | | {} |", median(times), median(calls));
            }
        }
        let virsh_ms = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let out = virsh(&["domstats", "--state", "--cpu-total", "--vcpu", "--balloon"]);
                    assert!(out.status.success());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        println!("| {n} | virsh domstats, all groups | {virsh_ms:.1} ms | | | | | |");
    }
    let run_s: u64 = std::env::var("VMB_BENCH_RUN_S").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let exe = env!("CARGO_BIN_EXE_vm-balancer");
    // Reaped by `usage::wait_for_usage`, which also returns its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(exe)
        .args(["run", "--dry-run", "--quantum", "1s", "--quanta", &run_s.to_string(), "--policy", "builtin:cpu", "--policy", "builtin:mem"])
        .spawn()
        .expect("daemon starts");
    usage::report(child, run_s, &format!("daemon, {guests} real guests at a 1 s quantum (dry run)"));
    cleanup();
}
