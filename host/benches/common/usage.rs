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
