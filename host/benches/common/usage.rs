//! What a benchmark's daemon child cost: shared by the `libvirt` and
//! `collect` benches (included with `#[path]`).

/// CPU seconds (user + system) and peak RSS (MiB) of `child`, waited for
/// and reaped here.
pub fn wait_for_usage(child: std::process::Child) -> (f64, f64) {
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
    (cpu_s, usage.ru_maxrss as f64 / 1024.0)
}

/// CPU seconds (user + system) and current RSS (MiB) of a running process,
/// from `/proc/PID/stat` and `/proc/PID/statm`: two samples give the steady
/// state's cost without start-up (policy compilation, first placements).
pub fn sample(pid: u32) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process alive");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
    let cpu_s = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("process alive");
    let rss_pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    (cpu_s, rss_pages * page / (1024.0 * 1024.0))
}

/// Runs `child` (a daemon started for `run_s` seconds) to its end and
/// prints its cost: the whole run (CPU, peak RSS) and the steady state
/// (CPU from second 10 to two seconds before the end, RSS then).
pub fn report(child: std::process::Child, run_s: u64, what: &str) {
    assert!(run_s >= 20, "VMB_BENCH_RUN_S must be at least 20 for a steady-state window");
    let pid = child.id();
    std::thread::sleep(std::time::Duration::from_secs(10));
    let (cpu0, _) = sample(pid);
    let started = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(run_s - 12));
    let (cpu1, rss_mib) = sample(pid);
    let window_s = started.elapsed().as_secs_f64();
    let (cpu_s, peak_mib) = wait_for_usage(child);
    println!(
        "{what}: whole run {run_s} s: CPU {cpu_s:.2} s ({:.1} % of one core), peak RSS {peak_mib:.1} MiB; \
         steady state ({window_s:.0} s from second 10): CPU {:.2} % of one core, RSS {rss_mib:.1} MiB",
        100.0 * cpu_s / run_s as f64,
        100.0 * (cpu1 - cpu0) / window_s,
    );
}
