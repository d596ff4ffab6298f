//! Collection cost on real libvirt (a plain program: `cargo bench --bench
//! libvirt`; needs `bash .ci/setup.sh --libvirt` first):
//! - boots 20 idle TCG guests (transient, named `vmbbench-N`, destroyed at
//!   the end and at start);
//! - collection wall time and libvirt calls per steady quantum, against one
//!   `virsh domstats` of all domains;
//! - the daemon's CPU time and peak RSS over `VMB_BENCH_RUN_S` seconds
//!   (default 300) at a 1 s quantum, dry run.

use std::process::Command;
use std::time::{Duration, Instant};

use vm_balancer::backend::libvirt::{LibvirtBackend, LibvirtOptions};
use vm_balancer::backend::Backend;

const GUESTS: usize = 20;
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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(std::path::Path::new(GUEST_DIR).join("vmlinuz").exists(), "run `bash .ci/setup.sh --libvirt` first");
    cleanup();
    for i in 0..GUESTS {
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
    std::thread::sleep(Duration::from_secs(20)); // boots, then idle

    let mut backend = LibvirtBackend::connect(LibvirtOptions::new("qemu:///system")).expect("libvirt reachable");
    backend.collect().unwrap(); // first sight: pins, stats periods
    std::thread::sleep(Duration::from_secs(1));
    backend.collect().unwrap();
    let (mut times, mut calls) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let before = backend.calls();
        let obs = backend.collect().unwrap();
        assert!(obs.domains.len() >= GUESTS);
        calls.push((backend.calls() - before) as f64);
        times.push(backend.last_collect().as_secs_f64() * 1e3);
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
    println!(
        "collect  {GUESTS} idle guests: median {:.1} ms, {} libvirt calls per quantum (virsh domstats of all: {:.1} ms)",
        median(times),
        median(calls),
        virsh_ms
    );

    let run_s: u64 = std::env::var("VMB_BENCH_RUN_S").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let exe = env!("CARGO_BIN_EXE_vm-balancer");
    // Reaped by wait4 below, which also returns its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(exe)
        .args(["run", "--dry-run", "--quantum", "1s", "--quanta", &run_s.to_string(), "--policy", "builtin:cpu", "--policy", "builtin:mem"])
        .spawn()
        .expect("daemon starts");
    let (mut status, mut usage) = (0i32, std::mem::MaybeUninit::<libc::rusage>::zeroed());
    // SAFETY: `child.id()` is our own child, not yet reaped; `usage` is a
    // properly sized, zeroed rusage that wait4 fills.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, usage.as_mut_ptr()) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    // SAFETY: wait4 succeeded, so it wrote the rusage.
    let usage = unsafe { usage.assume_init() };
    let cpu_s = usage.ru_utime.tv_sec as f64
        + usage.ru_utime.tv_usec as f64 / 1e6
        + usage.ru_stime.tv_sec as f64
        + usage.ru_stime.tv_usec as f64 / 1e6;
    println!(
        "daemon   {run_s} s at 1 s quantum, {GUESTS} guests: CPU {cpu_s:.2} s ({:.2} % of one core), peak RSS {:.1} MiB",
        100.0 * cpu_s / run_s as f64,
        usage.ru_maxrss as f64 / 1024.0
    );
    cleanup();
}
