//! End-to-end tests of `vm-balancer run` on real QEMU guests (issue 3).
//!
//! Why it is built this way:
//! - **Real state, read back from libvirt.** Every assertion reads pins
//!   (`virsh vcpupin`) and balloons (`virsh domstats --balloon`) from
//!   libvirt, or the daemon's own log; nothing trusts the daemon's view.
//! - **The real binary** (`CARGO_BIN_EXE_vm-balancer`), started as an
//!   operator would, stopped by `--quanta` or by SIGTERM.
//! - **One `#[test]`, scenarios in sequence.** The integration binary runs
//!   tests in parallel threads, and two daemons on one host would fight; one
//!   test also lets scenarios share guest boots (TCG boots take seconds).
//! - **Never skipped.** No libvirt or no guest image is a loud failure that
//!   names the command to run (`bash .ci/setup-libvirt.sh`,
//!   `bash tests/guest/build.sh`).
//! - **Cleaned up.** Guests are transient (`virsh create`), named
//!   `vmbtest-<pid>-<what>`; a guard destroys them on drop (also when an
//!   assertion panics), and leftovers of earlier runs (`vmbtest-*`) are
//!   destroyed at start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::wait_until;

const URI: &str = "qemu:///system";
const GUEST_DIR: &str = "/var/lib/vm-balancer/guest";
const MIB: u64 = 1024;

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run virsh (install libvirt-clients; run `bash .ci/setup-libvirt.sh`): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("virsh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn virsh_ok(args: &[&str]) -> String {
    virsh(args).unwrap_or_else(|e| panic!("{e}"))
}

fn preflight() {
    if let Err(e) = virsh(&["version"]) {
        panic!("libvirt is not reachable at {URI}: {e}\nRun `bash .ci/setup-libvirt.sh` as root first (the e2e test never skips).");
    }
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        let path = PathBuf::from(GUEST_DIR).join(file);
        assert!(path.exists(), "missing guest image {}: run `bash tests/guest/build.sh` first", path.display());
    }
    destroy_matching("vmbtest-");
}

fn destroy_matching(prefix: &str) {
    if let Ok(list) = virsh(&["list", "--name"]) {
        for name in list.lines().map(str::trim).filter(|n| n.starts_with(prefix)) {
            let _ = virsh(&["destroy", name]);
        }
    }
}

/// The guests of this run; destroyed on drop.
struct Guests {
    prefix: String,
}

impl Guests {
    fn new() -> Self {
        Guests { prefix: format!("vmbtest-{}-", std::process::id()) }
    }

    fn name(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    fn console(&self, what: &str) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}-console.log", self.name(what)))
    }

    /// Creates a transient 256/384 MiB guest running `workload` (vmb.* args).
    /// A transient guest; `host_mechanisms` turns on the balloon's
    /// autodeflate and free page reporting.
    fn create(&self, what: &str, vcpus: u32, workload: &str, host_mechanisms: bool) -> String {
        let name = self.name(what);
        let console = self.console(what);
        let _ = std::fs::remove_file(&console);
        let xml = format!(
            "<domain type='qemu'><name>{name}</name>
              <memory unit='MiB'>384</memory><currentMemory unit='MiB'>256</currentMemory>
              <vcpu>{vcpus}</vcpu>
              <os><type arch='x86_64' machine='pc'>hvm</type>
                <kernel>{GUEST_DIR}/vmlinuz</kernel><initrd>{GUEST_DIR}/initramfs.cpio.gz</initrd>
                <cmdline>console=ttyS0 quiet {workload}</cmdline></os>
              <features><acpi/><apic/></features>
              <devices>
                <memballoon model='virtio' autodeflate='{on}' freePageReporting='{on}'><stats period='1'/></memballoon>
                <serial type='file'><source path='{}'/></serial>
              </devices></domain>",
            console.display(),
            on = if host_mechanisms { "on" } else { "off" },
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        virsh_ok(&["create", file.to_str().unwrap()]);
        name
    }

    fn wait_console(&self, what: &str, marker: &str, timeout: Duration) {
        let path = self.console(what);
        let start = Instant::now();
        loop {
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(marker)) {
                return;
            }
            assert!(start.elapsed() < timeout, "guest {what} did not print {marker:?} within {timeout:?} (console {})", path.display());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn console_text(&self, what: &str) -> String {
        std::fs::read_to_string(self.console(what)).unwrap_or_default()
    }

    fn destroy(&self, what: &str) {
        let _ = virsh(&["destroy", &self.name(what)]);
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        destroy_matching(&self.prefix);
    }
}

/// Live affinity of each vCPU, as virsh prints it ("0", "0-1", ...).
fn pins(name: &str) -> Vec<String> {
    virsh_ok(&["vcpupin", name])
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let vcpu = parts.next()?;
            vcpu.parse::<u32>().ok()?;
            parts.next().map(String::from)
        })
        .collect()
}

/// `balloon.*` of one domain, KiB.
fn balloon(name: &str) -> BTreeMap<String, u64> {
    virsh_ok(&["domstats", "--balloon", name])
        .lines()
        .filter_map(|l| l.trim().strip_prefix("balloon.")?.split_once('=').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

fn current_kib(name: &str) -> u64 {
    balloon(name).get("current").copied().unwrap_or(0)
}

/// `vm-balancer run --connect qemu:///system ARGS`, with apply-level logs.
struct Daemon;

impl Daemon {
    fn start(tag: &str, args: &[&str], config: Option<&str>) -> crate::util::Daemon {
        let mut run = vec!["--connect", URI];
        run.extend_from_slice(args);
        crate::util::Daemon::start(tag, "info,vm_balancer::apply=debug,vm_balancer::daemon=debug", config, &run)
    }
}

/// A `key=value` field of a log line; a `[...]` value is taken whole.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if rest.starts_with('[') {
        return rest.find(']').map(|e| &rest[..=e]);
    }
    rest.split_whitespace().next()
}

/// The scenarios, in order. `VMB_E2E_ONLY=hung,crash` runs only those (for
/// working on one; CI runs them all).
type Scenario = (&'static str, fn(&Guests));

const SCENARIOS: [Scenario; 8] = [
    ("cpu", scenario_cpu_dry_run_and_restore),
    ("memory", scenario_memory),
    ("churn", scenario_churn_and_fault),
    ("admin", scenario_admin_pin_and_libvirtd_restart),
    ("hung", scenario_hung_guest),
    ("crash", scenario_crash_and_restore),
    ("fast", scenario_fast_path_agrees_with_libvirt),
    ("record", scenario_record_and_replay),
];

#[test]
fn real_guests_end_to_end() {
    let _busy = crate::util::busy_cpu();
    preflight();
    let started = Instant::now();
    let guests = Guests::new();
    let only = std::env::var("VMB_E2E_ONLY").unwrap_or_default();
    for (name, scenario) in SCENARIOS {
        if only.is_empty() || only.split(',').any(|o| o.trim() == name) {
            scenario(&guests);
            eprintln!("e2e: {name} done at {:.0?}", started.elapsed());
        }
    }
}

/// The pid of a guest's QEMU process (libvirt's pid file).
fn qemu_pid(name: &str) -> libc::pid_t {
    let path = format!("/run/libvirt/qemu/{name}.pid");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().parse().unwrap()
}

/// Sends `signal` to a guest's QEMU process.
fn signal_qemu(name: &str, signal: i32) {
    // SAFETY: kill(2) with a pid read from libvirt's pid file; no memory is involved.
    let rc = unsafe { libc::kill(qemu_pid(name), signal) };
    assert_eq!(rc, 0, "cannot signal {name}'s QEMU");
}

/// Resumes a SIGSTOPped guest even when an assertion fails, so that the
/// guests' guard can destroy it and libvirt's stuck calls end.
struct Stopped(String);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal_qemu(&self.0, libc::SIGCONT);
    }
}

/// The original affinity of every vCPU of a guest created by this test:
/// every host CPU, as libvirt prints it.
fn original_pins(name: &str, all: &str) -> bool {
    pins(name).iter().all(|p| p == all)
}

/// Issue 11: a SIGSTOPped guest (its QEMU monitor never answers) does not
/// stop the balancing of the others, is named in the log, gets no action,
/// and SIGTERM still exits at once and restores the others; once it
/// answers, `vm-balancer restore` puts it back too.
fn scenario_hung_guest(guests: &Guests) {
    let names: Vec<String> = (0..3).map(|i| guests.create(&format!("hung{i}"), 1, "", false)).collect();
    for i in 0..3 {
        guests.wait_console(&format!("hung{i}"), "vmb: ready", Duration::from_secs(60));
    }
    let all = pins(&names[0])[0].clone();
    assert!(names.iter().all(|n| original_pins(n, &all)), "guests do not start on every CPU");
    let single = |name: &str| pins(name).iter().all(|p| !p.contains('-') && !p.contains(','));

    // 1. Stopped before the daemon starts (the reported reproduction).
    signal_qemu(&names[0], libc::SIGSTOP);
    let stopped = Stopped(names[0].clone());
    let mut daemon = Daemon::start("hung", &["--quantum", "1s"], None);
    let quiet = format!("domain is not answering (its monitor is busy with a call that has not returned): its memory figures are stale and no action is sent to it domain={}", names[0]);
    wait_until("the hung guest named in the log", Duration::from_secs(30), || daemon.log().contains(&quiet));
    wait_until("the other guests pinned", Duration::from_secs(30), || single(&names[1]) && single(&names[2]));
    let seen = daemon.summaries().len();
    wait_until("five more quanta", Duration::from_secs(60), || daemon.summaries().len() >= seen + 5);
    let log = daemon.log();
    assert!(!log.contains("quantum skipped"), "a quantum went without data:\n{log}");
    assert!(daemon.summaries().iter().all(|l| field(l, "domains") == Some("2")), "every quantum balances the two others:\n{log}");
    assert!(original_pins(&names[0], &all), "the hung guest was touched: {:?}", pins(&names[0]));
    let asked = Instant::now();
    daemon.signal(libc::SIGTERM);
    // One quantum (1 s) plus the deadline (0.5 s) is what it may take; 20 s
    // is the margin for a slow, loaded machine.
    daemon.assert_clean_exit(Duration::from_secs(20));
    eprintln!("e2e: hung guest: SIGTERM to exit {:.1?}", asked.elapsed());
    assert!(
        original_pins(&names[1], &all) && original_pins(&names[2], &all),
        "others not restored: {:?}",
        names.iter().map(|n| pins(n)).collect::<Vec<_>>()
    );
    drop(stopped);
    wait_until("libvirt's stuck call to end", Duration::from_secs(30), || {
        virsh(&["domcontrol", &names[0]]).is_ok_and(|t| t.trim() == "ok")
    });

    // 2. Hung while managed: the daemon pinned it, then it stops.
    let mut daemon = Daemon::start("hung-later", &["--quantum", "1s"], None);
    wait_until("all three pinned", Duration::from_secs(30), || names.iter().all(|n| single(n)));
    signal_qemu(&names[0], libc::SIGSTOP);
    let stopped = Stopped(names[0].clone());
    wait_until("the guest that hung named in the log", Duration::from_secs(30), || daemon.log().contains(&quiet));
    let seen = daemon.summaries().len();
    wait_until("three more quanta", Duration::from_secs(60), || daemon.summaries().len() >= seen + 3);
    assert!(!daemon.log().contains("quantum skipped"), "{}", daemon.log());
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(Duration::from_secs(20));
    let log = daemon.log();
    assert!(
        log.contains(&format!("not restored: the domain is not answering (run `vm-balancer restore` once it answers) domain={}", names[0])),
        "{log}"
    );
    assert!(original_pins(&names[1], &all) && original_pins(&names[2], &all), "others not restored");
    assert!(single(&names[0]), "the hung guest cannot have been restored: {:?}", pins(&names[0]));
    drop(stopped);
    wait_until("libvirt's stuck call to end", Duration::from_secs(30), || {
        virsh(&["domcontrol", &names[0]]).is_ok_and(|t| t.trim() == "ok")
    });
    let run = crate::util::vm_balancer(&["--log", "info", "restore", "--connect", URI]);
    assert_eq!(run.code, 0, "{}", run.context(&["restore"]));
    assert!(original_pins(&names[0], &all), "vm-balancer restore did not put the guest back: {:?}\n{}", pins(&names[0]), run.stderr);
    for i in 0..3 {
        guests.destroy(&format!("hung{i}"));
    }
}

/// Issue 11: the originals survive the daemon. Pinned, then SIGKILL: a new
/// daemon restores to the first run's originals on SIGTERM, not to its own
/// pins; after another SIGKILL, `vm-balancer restore` does it. A second
/// daemon for the same URI is refused, naming the first one's pid.
fn scenario_crash_and_restore(guests: &Guests) {
    let names: Vec<String> = (0..2).map(|i| guests.create(&format!("crash{i}"), 1, "", false)).collect();
    for i in 0..2 {
        guests.wait_console(&format!("crash{i}"), "vmb: ready", Duration::from_secs(60));
    }
    let all = pins(&names[0])[0].clone();
    // The balloon reaches its <currentMemory> only after the guest's driver loaded.
    wait_until("balloons at 256 MiB", Duration::from_secs(60), || names.iter().all(|n| current_kib(n) == 256 * MIB));
    let targets = vec![256 * MIB; names.len()];
    let changed = || names.iter().all(|n| !original_pins(n, &all)) && names.iter().zip(&targets).any(|(n, t)| current_kib(n) < *t);
    let mut first = Daemon::start("crash1", &["--quantum", "1s"], None);
    wait_until("pins and a lowered balloon", Duration::from_secs(60), changed);

    let second = crate::util::vm_balancer(&["run", "--connect", URI, "--quanta", "1"]);
    assert_eq!(second.code, 2, "a second daemon must be refused: {}", second.context(&["run"]));
    assert!(
        second.stderr.contains(&format!("another vm-balancer (pid {}) is already running for {URI}", first.child.id())),
        "{}",
        second.stderr
    );

    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(changed(), "state changed between the kill and the check");
    let mut again = Daemon::start("crash2", &["--quantum", "1s"], None);
    wait_until("the originals of the first run adopted", Duration::from_secs(30), || {
        again.log().matches("restores to the originals an earlier run stored").count() >= 2
    });
    let seen = again.summaries().len();
    wait_until("two quanta", Duration::from_secs(30), || again.summaries().len() >= seen + 2);
    again.signal(libc::SIGTERM);
    again.assert_clean_exit(Duration::from_secs(20));
    assert!(
        names.iter().all(|n| original_pins(n, &all)),
        "not back to the first run's originals: {:?}",
        names.iter().map(|n| pins(n)).collect::<Vec<_>>()
    );
    wait_until("balloon targets back", Duration::from_secs(30), || {
        names.iter().zip(&targets).all(|(n, t)| current_kib(n).abs_diff(*t) <= MIB)
    });

    let mut third = Daemon::start("crash3", &["--quantum", "1s"], None);
    wait_until("pins and a lowered balloon", Duration::from_secs(60), changed);
    third.child.kill().unwrap();
    third.child.wait().unwrap();
    let run = crate::util::vm_balancer(&["restore", "--connect", URI]);
    assert_eq!(run.code, 0, "{}", run.context(&["restore"]));
    assert!(names.iter().all(|n| original_pins(n, &all)), "vm-balancer restore: {:?}", names.iter().map(|n| pins(n)).collect::<Vec<_>>());
    wait_until("balloon targets back after restore", Duration::from_secs(30), || {
        names.iter().zip(&targets).all(|(n, t)| current_kib(n).abs_diff(*t) <= MIB)
    });
    for i in 0..2 {
        guests.destroy(&format!("crash{i}"));
    }
}

/// An administrator's `virsh vcpupin` is left alone (not fought), and the
/// daemon survives libvirtd being killed and restarted: it logs the outage
/// once, reconnects, and manages the guests again.
fn scenario_admin_pin_and_libvirtd_restart(guests: &Guests) {
    let names: Vec<String> = (0..2).map(|i| guests.create(&format!("adm{i}"), 1, "", true)).collect();
    for i in 0..2 {
        guests.wait_console(&format!("adm{i}"), "vmb: ready", Duration::from_secs(60));
    }
    let config = "[guard]\nexternal_pin_hold_s = 600\n";
    let mut daemon = Daemon::start("admin", &["--quantum", "1s"], Some(config));
    wait_until("the daemon to pin the new guests", Duration::from_secs(30), || {
        daemon.summaries().len() >= 2 && names.iter().all(|n| pins(n).len() == 1)
    });
    // The administrator moves adm0's vCPU to the other pCPU by hand.
    let theirs = if pins(&names[0]) == ["0"] { "1" } else { "0" };
    virsh_ok(&["vcpupin", &names[0], "0", theirs, "--live"]);
    wait_until("the daemon to notice the hand-made pin", Duration::from_secs(20), || daemon.log().contains("re-pinned by someone else"));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(pins(&names[0]), [theirs], "the daemon fought the administrator's pin; log:\n{}", daemon.log());

    // libvirtd goes away and comes back.
    let libvirtd = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "libvirtd"))
            .collect()
    };
    let pids = libvirtd();
    assert!(!pids.is_empty(), "no libvirtd to kill");
    for pid in pids {
        // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    wait_until("the daemon to notice the outage", Duration::from_secs(30), || {
        daemon.log().contains("lost the libvirt connection") || daemon.log().contains("cannot connect to libvirt")
    });
    wait_until("libvirtd to exit", Duration::from_secs(30), || libvirtd().is_empty());
    let setup = crate::util::root().join(".ci/setup-libvirt.sh");
    let restarted = Command::new("bash").arg(&setup).stdout(Stdio::null()).status().expect("setup-libvirt runs");
    assert!(restarted.success(), "libvirtd did not come back");
    wait_until("the daemon to reconnect and see the guests again", Duration::from_secs(60), || {
        let log = daemon.log();
        log.contains("reconnected to libvirt")
            && log
                .lines()
                .rev()
                .find(|l| l.contains("quantum summary"))
                .and_then(|l| field(l, "domains"))
                .is_some_and(|d| d.parse::<usize>().is_ok_and(|d| d >= 2))
    });
    assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon died with libvirtd; log:\n{}", daemon.log());
    let log = daemon.log();
    assert!(log.matches("lost the libvirt connection").count() <= 1, "outage logged more than once:\n{log}");
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(Duration::from_secs(20));
    assert_eq!(pins(&names[0]), [theirs], "restore undid the administrator's pin");
    for i in 0..2 {
        guests.destroy(&format!("adm{i}"));
    }
}

/// Scenarios 4 (dry run), 1 (CPU) and 5 (restore) on four burning guests.
fn scenario_cpu_dry_run_and_restore(guests: &Guests) {
    let names: Vec<String> = (0..4).map(|i| guests.create(&format!("cpu{i}"), 1, "vmb.burn=1", true)).collect();
    for name in &names {
        virsh_ok(&["vcpupin", name, "0", "0", "--live"]);
    }
    for i in 0..4 {
        guests.wait_console(&format!("cpu{i}"), "vmb: burn started", Duration::from_secs(60));
    }
    // Guests boot at their max memory; wait until the balloon reached 256 MiB.
    wait_until("balloons inflated to 256 MiB after boot", Duration::from_secs(60), || names.iter().all(|n| current_kib(n) == 256 * MIB));
    let all_on_zero = || names.iter().all(|n| pins(n) == ["0"]);
    assert!(all_on_zero(), "setup: every vCPU pinned to pCPU 0");
    let targets: Vec<u64> = names.iter().map(|n| current_kib(n)).collect();

    // 4. Dry run: decides and logs, changes nothing.
    let mut dry = Daemon::start("dry", &["--dry-run", "--quanta", "4", "--quantum", "1s"], None);
    dry.assert_clean_exit(Duration::from_secs(60));
    assert!(all_on_zero(), "dry run changed a pin: {:?}", names.iter().map(|n| pins(n)).collect::<Vec<_>>());
    assert_eq!(names.iter().map(|n| current_kib(n)).collect::<Vec<_>>(), targets, "dry run changed a balloon");
    assert_eq!(dry.summaries().len(), 4, "{}", dry.log());
    assert!(dry.log().contains("dry run: would apply"), "dry run proposed nothing:\n{}", dry.log());

    // 1. CPU: 4 on pCPU 0 become 2/2 within a few quanta and stay.
    let daemon = Daemon::start("cpu", &["--quantum", "1s"], None);
    let split = || {
        let p: Vec<Vec<String>> = names.iter().map(|n| pins(n)).collect();
        let on = |cpu: &str| p.iter().filter(|v| v.as_slice() == [cpu]).count();
        (on("0"), on("1"), p)
    };
    let t0 = Instant::now();
    wait_until("4 burning vCPUs split 2/2 over pCPUs 0 and 1", Duration::from_secs(60), || {
        let (a, b, _) = split();
        a == 2 && b == 2
    });
    let balanced_after = t0.elapsed();
    // Then it stays balanced without churn. 2/2 is the optimum only on a
    // quiet host: the default policy counts host background load (other
    // processes) per pCPU, so with CPU burners next door (`.ci/stress`) 3/1
    // can be the better split, and the background moves as the burners do.
    // What must hold whatever the neighbours do: never all four back on one
    // pCPU, and no vCPU re-pinned within the guard's cooldown (2 quanta),
    // read from the daemon's own log. That it holds 2/2 without a move on a
    // quiet host is shown deterministically by the simulator tests
    // (`defaults_fix_all_on_one_in_one_quantum_and_never_flap`).
    let (_, _, mut layout) = split();
    let (mut moves, mut at_2_2) = (0, 0);
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(500));
        let (a, b, now) = split();
        assert!(a < 4 && b < 4, "all four vCPUs back on one pCPU after balancing ({balanced_after:?}): {now:?}; log:\n{}", daemon.log());
        at_2_2 += usize::from(a == 2 && b == 2);
        moves += now.iter().zip(&layout).filter(|(x, y)| x != y).count();
        layout = now;
    }
    let log = daemon.log();
    let mut quantum = 0usize;
    let mut last_pin: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        if line.contains("quantum summary") {
            quantum += 1;
        } else if let Some(rest) = line.split("applied action=pin ").nth(1) {
            let key: String = rest.split(" -> ").next().unwrap_or_default().to_string();
            if let Some(before) = last_pin.insert(key.clone(), quantum) {
                assert!(
                    quantum - before >= 2,
                    "{key} re-pinned {} quantum(s) after its last pin (cooldown 2); log:\n{log}",
                    quantum - before
                );
            }
        }
    }
    eprintln!("e2e: cpu balanced 2/2 after {balanced_after:.1?}; then 2/2 in {at_2_2} of 16 samples over 8 s, {moves} vCPU moves");
    // 5. Restore on SIGTERM: original pins (all on 0) and balloon targets.
    let mut daemon = daemon;
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(Duration::from_secs(20));
    let log = daemon.log();
    assert!(log.contains("restored the original pins and balloon targets"), "{log}");
    if !all_on_zero() && log.contains("not restored: the domain is not answering") {
        // A TCG guest's monitor can be busy on a loaded machine: the daemon
        // does not block its exit on it and says so; the documented remedy.
        let run = crate::util::vm_balancer(&["restore", "--connect", URI]);
        assert_eq!(run.code, 0, "{}", run.context(&["restore"]));
    }
    assert!(all_on_zero(), "pins not restored: {:?}; log:\n{log}", names.iter().map(|n| pins(n)).collect::<Vec<_>>());
    wait_until("balloon targets restored", Duration::from_secs(20), || {
        names.iter().zip(&targets).all(|(n, t)| current_kib(n).abs_diff(*t) <= MIB)
    });
    for i in 0..4 {
        guests.destroy(&format!("cpu{i}"));
    }
}

/// Scenario 2: idle guests shrink but keep used + margin, a filling guest is
/// given memory, and with the reserve above host available nothing is given.
fn scenario_memory(guests: &Guests) {
    let idle = guests.create("idle", 1, "", false);
    let fill = guests.create("fill", 1, "vmb.delay_s=8 vmb.fill_mib=200 vmb.fill_step_mib=20 vmb.fill_step_s=1", false);
    guests.wait_console("idle", "vmb: ready", Duration::from_secs(60));
    guests.wait_console("fill", "vmb: ready", Duration::from_secs(60));
    wait_until("balloons at 256 MiB", Duration::from_secs(60), || current_kib(&idle) == 256 * MIB && current_kib(&fill) == 256 * MIB);
    let mut daemon = Daemon::start("mem", &["--quantum", "1s", "--quanta", "24"], None);
    let margin_kib = 32 * MIB; // GuardConfig::default().guest_margin_mib
    let floor_kib = 128 * MIB; // GuardConfig::default().guest_floor_mib
    let (mut idle_min, mut fill_max) = (u64::MAX, 0u64);
    let start = Instant::now();
    while daemon.child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60) {
        for (name, is_idle) in [(&idle, true), (&fill, false)] {
            let b = balloon(name);
            let current = b.get("current").copied().unwrap_or(0);
            if is_idle {
                idle_min = idle_min.min(current);
                let free = b.get("usable").or(b.get("unused")).copied().unwrap_or(u64::MAX);
                // used + margin <= target  <=>  free >= margin (slack: stats lag the balloon by up to 1 s).
                assert!(free + 8 * MIB >= margin_kib, "idle guest squeezed below used + margin: {b:?}");
                assert!(current + MIB >= floor_kib, "idle guest below the floor: {b:?}");
            } else {
                fill_max = fill_max.max(current);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    daemon.assert_clean_exit(Duration::from_secs(30));
    let log = daemon.log();
    assert!(idle_min < 256 * MIB - 16 * MIB, "idle guest's balloon was not lowered (min {idle_min} KiB); log:\n{log}");
    assert!(fill_max > 256 * MIB + 16 * MIB, "filling guest was never given memory (max {fill_max} KiB); log:\n{log}");
    let console = guests.console_text("fill");
    assert!(console.contains("vmb: fill done 200 MiB"), "the filling guest ran out of memory:\n{console}");
    eprintln!("e2e: memory: idle lowered to {} MiB, filling guest grown to {} MiB", idle_min / MIB, fill_max / MIB);
    guests.destroy("fill");

    // Host reserve above host available: a policy asking for everything
    // (the hostile fixture) is refused by the guard; nothing is given.
    let greedy = guests.create("greedy", 1, "", false);
    guests.wait_console("greedy", "vmb: ready", Duration::from_secs(60));
    wait_until("greedy's balloon at 256 MiB", Duration::from_secs(60), || current_kib(&greedy) == 256 * MIB);
    let before = current_kib(&greedy);
    // Just below host memory (a reserve at or above it is refused at start),
    // so far above what the host has available.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap();
    let config = format!("[guard]\nhost_reserve_mib = {}\n", total_kib / MIB - 64);
    let config = config.as_str();
    let mut daemon =
        Daemon::start("reserve", &["--quantum", "1s", "--quanta", "6", "--policy", vm_balancer::components::FIXTURE_HOSTILE], Some(config));
    let start = Instant::now();
    while daemon.child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(40) {
        for name in [&greedy, &idle] {
            let b = balloon(name);
            assert!(
                b.get("current").copied().unwrap_or(0) <= before.max(256 * MIB) + MIB,
                "memory was given despite the reserve: {name} {b:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    daemon.assert_clean_exit(Duration::from_secs(30));
    let log = daemon.log();
    let rejected_growth = log
        .lines()
        .filter(|l| {
            l.contains("rejected by the guard") && l.contains(&format!("set-memory {greedy} -> {}", u64::MAX))
                || l.contains("rejected by the guard") && l.contains("reserve")
        })
        .count();
    assert!(rejected_growth > 0, "no growth rejection in the log:\n{log}");
    let fed_back = daemon.summaries().iter().filter_map(|l| field(l, "verdicts_in_snapshot")?.parse::<usize>().ok()).max().unwrap_or(0);
    assert!(fed_back > 0, "rejections were not fed back to the next snapshot:\n{log}");
    guests.destroy("greedy");
    guests.destroy("idle");
}

/// Scenarios 3 (churn) and 6 (fault).
fn scenario_churn_and_fault(guests: &Guests) {
    // Runs until told to stop, and each wait is 30 s (a new guest is pinned
    // within 1-2 quanta on the development VM): a machine 3x slower, with
    // guests burning both cores, still has a 5x margin.
    let mut daemon = Daemon::start("churn", &["--quantum", "1s"], None);
    wait_until("the daemon's first quantum", Duration::from_secs(30), || !daemon.summaries().is_empty());
    let a = guests.create("churn-a", 1, "", true);
    let single = |name: &str| pins(name).iter().all(|p| !p.contains('-') && !p.contains(','));
    wait_until("new guest churn-a pinned within the next quanta", Duration::from_secs(30), || single(&a));
    let b = guests.create("churn-b", 2, "vmb.burn=1", true);
    wait_until("new guest churn-b pinned within the next quanta", Duration::from_secs(30), || single(&b));
    guests.destroy("churn-a");
    let seen = daemon.summaries().len();
    wait_until("a quantum after churn-a is gone", Duration::from_secs(30), || daemon.summaries().len() > seen + 1);
    let c = guests.create("churn-c", 1, "", true);
    guests.destroy("churn-c");
    let d = guests.create("churn-d", 1, "", true);
    wait_until("new guest churn-d pinned within the next quanta", Duration::from_secs(30), || single(&d));
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(Duration::from_secs(40));
    let log = daemon.log();
    assert!(daemon.summaries().len() >= 4, "{log}");
    assert!(log.contains(&format!("domain gone domain={a}")), "churn-a not seen gone:\n{log}");
    let noisy = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).count();
    assert!(noisy <= 3, "error storm during churn ({noisy} warnings):\n{log}");
    let _ = c;

    // 6. A hostile policy (infinite loop) and a missing file: the loop runs
    // on the fallback.
    let mut daemon = Daemon::start(
        "fault",
        &["--quantum", "1s", "--quanta", "5", "--policy", vm_balancer::components::FIXTURE_SPIN, "--policy", "/nonexistent/policy.wasm"],
        None,
    );
    daemon.assert_clean_exit(Duration::from_secs(60));
    let log = daemon.log();
    let summaries = daemon.summaries();
    assert_eq!(summaries.len(), 5, "{log}");
    // `fallback_slots` lists the slots the fallback decided that quantum.
    assert!(
        summaries.iter().any(|l| field(l, "fallback_slots").is_some_and(|s| s.contains("spin.wasm"))),
        "no quantum decided by the fallback:\n{log}"
    );
    let spin_failures = log.lines().filter(|l| l.contains("policy failed") && l.contains("spin.wasm")).count();
    assert!(spin_failures >= 1, "the spinning policy never timed out:\n{log}");
    assert!(log.contains("policy cannot be loaded") && log.contains("policy.wasm"), "{log}");
    guests.destroy("churn-b");
    guests.destroy("churn-d");
}

/// `vcpu.N.time` and `vcpu.N.delay` of every vCPU of a guest, from libvirt, ns.
fn libvirt_vcpu_times(name: &str) -> BTreeMap<u32, (u64, u64)> {
    let mut out: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for line in virsh_ok(&["domstats", "--vcpu", name]).lines() {
        let Some(rest) = line.trim().strip_prefix("vcpu.") else { continue };
        let Some((key, value)) = rest.split_once('=') else { continue };
        let Some((n, what)) = key.split_once('.') else { continue };
        let (Ok(n), Ok(value)) = (n.parse::<u32>(), value.parse::<u64>()) else { continue };
        let entry = out.entry(n).or_default();
        match what {
            "time" => entry.0 = value,
            "delay" => entry.1 = value,
            _ => {}
        }
    }
    out
}

/// Issue 15: the fast path's CPU figures (procfs `schedstat` of each vCPU
/// thread) are libvirt's own counters: read one right after the other, run
/// time within 20 ms plus the time between the two reads (libvirt's has
/// 10 ms tick resolution), and wait (steal) likewise, in at least one of 10
/// pairs of reads three times over (a wait is credited when it ends); and
/// the two paths' usage of a burning and an idle guest agree.
fn scenario_fast_path_agrees_with_libvirt(guests: &Guests) {
    use vm_balancer::backend::libvirt::procfs::ProcRoots;
    use vm_balancer::backend::libvirt::{CollectMode, LibvirtBackend, LibvirtOptions};
    use vm_balancer::backend::Backend;
    let burn = guests.create("fast-burn", 2, "vmb.burn=1", false);
    let idle = guests.create("fast-idle", 1, "", true);
    guests.wait_console("fast-burn", "vmb: ready", Duration::from_secs(60));
    guests.wait_console("fast-idle", "vmb: ready", Duration::from_secs(60));
    let roots = ProcRoots::default();
    for name in [&burn, &idle] {
        let threads = roots.map_vcpus(roots.qemu_pid(name).expect("pid file")).expect("vCPU threads");
        let want = if name == &burn { 2 } else { 1 };
        assert_eq!(threads.tids.len(), want, "{name}: vCPU threads {threads:?}");
        // Three pairs of reads must agree. The kernel credits a wait to
        // `run_delay` when the thread gets a CPU, so a wait that began
        // before the first read can land whole between the two reads (seen
        // on a loaded CI machine: 191 ms against libvirt's 295 ms, read
        // within a few ms of each other). A pair that disagrees is read
        // again, up to 10 times; the same field read wrong never agrees.
        for _ in 0..3 {
            let mut disagreements = Vec::new();
            let agreed = (0..10).any(|_| {
                let t = Instant::now();
                let ours = roots.read(&threads).expect("schedstat");
                let theirs = libvirt_vcpu_times(name);
                let slack = 20_000_000 + t.elapsed().as_nanos() as u64 * 2;
                let before = disagreements.len();
                for (vcpu, s) in &ours {
                    let (time, delay) = theirs[vcpu];
                    if s.run_ns.abs_diff(time) > slack || s.wait_ns.abs_diff(delay) > slack {
                        disagreements.push(format!(
                            "vCPU {vcpu}: schedstat run {} / wait {} ns, libvirt time {time} / delay {delay} ns (slack {slack})",
                            s.run_ns, s.wait_ns
                        ));
                    }
                }
                disagreements.len() == before
            });
            assert!(agreed, "{name}: 10 reads in a row disagree:\n{}", disagreements.join("\n"));
        }
    }
    let backend = |mode| {
        let mut options = LibvirtOptions::new(URI);
        options.collect = mode;
        options.read_only = true;
        LibvirtBackend::connect(options).unwrap()
    };
    let (mut fast, mut bulk) = (backend(CollectMode::Auto), backend(CollectMode::Bulk));
    let usage = |b: &mut LibvirtBackend, name: &str| -> f32 {
        let obs = b.collect().unwrap();
        let d = obs.domains.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} not observed"));
        d.vcpus.iter().map(|v| v.usage).sum()
    };
    usage(&mut fast, &burn);
    usage(&mut bulk, &burn);
    std::thread::sleep(Duration::from_secs(2));
    let (burn_fast, burn_bulk) = (usage(&mut fast, &burn), usage(&mut bulk, &burn));
    let (f, b) = (burn_fast, burn_bulk);
    // Two vCPUs burning on a 2-core host under TCG: each gets what the host
    // gives it; both paths see the same process, a moment apart.
    assert!(f > 0.3 && b > 0.3 && (f - b).abs() < 0.35, "burning guest: fast {f}, bulk {b}");
    std::thread::sleep(Duration::from_secs(1));
    let (f, b) = (usage(&mut fast, &idle), usage(&mut bulk, &idle));
    assert!(f < 0.2 && b < 0.2, "idle guest: fast {f}, bulk {b}");
    let obs = fast.collect().unwrap();
    let d = obs.domains.iter().find(|d| d.name == idle).unwrap();
    assert!(d.memory.target_kib > 0 && d.memory.max_kib > 0, "balloon figures on the fast path: {:?}", d.memory);
    // The host's own mechanisms are reported as the domain's XML sets them.
    assert!(d.memory.autodeflate && d.memory.free_page_reporting, "{idle}: {:?}", d.memory);
    let b = obs.domains.iter().find(|d| d.name == burn).unwrap();
    assert!(!b.memory.autodeflate && !b.memory.free_page_reporting, "{burn}: {:?}", b.memory);
    // Balloons off the critical path: a balloon changed by somebody else is
    // seen through the background refresh (nothing is urgent for a
    // read-only backend), within a few quanta, with guest figures that are
    // not stale.
    let lowered_kib = d.memory.target_kib - 32 * 1024;
    virsh_ok(&["setmem", &idle, &format!("{lowered_kib}K"), "--live"]);
    let mut background = 0;
    let mut seen = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(1));
        let obs = fast.collect().unwrap();
        let t = fast.last_timing();
        background += t.balloons_in_background;
        let d = obs.domains.iter().find(|d| d.name == idle).unwrap();
        if d.memory.target_kib.abs_diff(lowered_kib) <= 1024 && d.memory.unused_kib.is_some() {
            seen = Some(d.memory.clone());
            break;
        }
    }
    let memory = seen.unwrap_or_else(|| panic!("the fast path never saw {idle}'s balloon at {lowered_kib} KiB"));
    assert!(background > 0, "no background balloon refresh started");
    assert!(memory.age_ms < 10_000, "guest figures {} ms old on the fast path", memory.age_ms);
    eprintln!(
        "e2e: fast path: burning guest's usage fast {burn_fast:.2} / bulk {burn_bulk:.2}; setmem seen, figures {} ms old",
        memory.age_ms
    );
    guests.destroy("fast-burn");
    guests.destroy("fast-idle");
}

/// Issue 14: record a real host (`run --record`, with a shadow beside the
/// active policies), then replay the record: the recording policies
/// reproduce every recorded action exactly; the classic port differs, and
/// each difference it reports is really in the record.
fn scenario_record_and_replay(guests: &Guests) {
    use vm_balancer::record::{RecordItem, RecordReader};
    let names: Vec<String> = (0..3).map(|i| guests.create(&format!("rec{i}"), 1, "vmb.burn=1", true)).collect();
    for name in &names {
        virsh_ok(&["vcpupin", name, "0", "0", "--live"]);
    }
    for i in 0..3 {
        guests.wait_console(&format!("rec{i}"), "vmb: burn started", Duration::from_secs(60));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("record");
    let dir_s = dir.to_str().unwrap();
    let mut daemon =
        Daemon::start("record", &["--quantum", "1s", "--quanta", "12", "--record", dir_s, "--shadow", "builtin:classic"], None);
    daemon.assert_clean_exit(Duration::from_secs(90));
    let log = daemon.log();
    assert!(log.contains("shadow summary"), "{log}");
    let frames: Vec<_> = RecordReader::open(&dir)
        .unwrap()
        .filter_map(|p| match p.unwrap().item {
            RecordItem::Quantum(f) => Some(*f),
            RecordItem::Header(_) => None,
        })
        .collect();
    assert!(frames.len() >= 10, "{} frames of 12 quanta; log:\n{log}", frames.len());
    let applied: usize = frames.iter().map(|f| f.applied.len()).sum();
    assert!(applied > 0, "the recorded run applied nothing; log:\n{log}");
    let (_cfg_dir, config) = crate::util::relaxed_config_file();
    let replay = |policies: &[&str]| -> serde_json::Value {
        let mut args = vec!["--config", config.to_str().unwrap(), "replay", dir_s, "--json"];
        for p in policies {
            args.extend(["--policy", p]);
        }
        let run = crate::util::vm_balancer(&args);
        assert_eq!(run.code, 0, "{}", run.context(&args));
        serde_json::from_str(&run.stdout).unwrap()
    };
    let same = replay(&["builtin:cpu", "builtin:mem"]);
    assert_eq!(same["quanta"], frames.len() as u64, "{same}");
    assert_eq!(same["identical_quanta"], frames.len() as u64, "replaying the recording policies differs: {same}");
    let other = replay(&["builtin:classic"]);
    let found = other["only_candidate"].as_u64().unwrap() + other["only_recorded"].as_u64().unwrap();
    assert!(found > 0, "the classic port should act differently on this host: {other}");
    for d in other["differences"].as_array().unwrap() {
        let q = d["quantum"].as_u64().unwrap();
        let frame = frames.iter().find(|f| f.quantum == q).unwrap();
        let recorded: Vec<String> = frame.applied.iter().map(|a| a.to_string()).collect();
        for a in d["only_recorded"].as_array().unwrap() {
            assert!(recorded.contains(&a.as_str().unwrap().to_string()), "quantum {q}: {a} not in the record {recorded:?}");
        }
        for a in d["only_candidate"].as_array().unwrap() {
            assert!(!recorded.contains(&a.as_str().unwrap().to_string()), "quantum {q}: {a} was in the record");
        }
    }
    eprintln!("e2e: recorded {} quanta ({applied} actions); classic differs by {found} actions", frames.len());
    for i in 0..3 {
        guests.destroy(&format!("rec{i}"));
    }
}
