//! The fast local path for CPU figures: each vCPU thread's run time and
//! run-queue wait, read from procfs `schedstat`, without libvirt.
//!
//! Why: libvirt's vcpu group reads the same files, but through a daemon
//! round trip per domain (2-3 ms each with the balloon group; 20 ms for the
//! vcpu group of 20 guests); 1,000 domains cost seconds. Reading
//! `/proc/PID/task/TID/schedstat` directly costs microseconds per vCPU.
//!
//! How a domain's vCPUs are found: QEMU's pid is in libvirt's run directory
//! (`/run/libvirt/qemu/NAME.pid`), and its vCPU threads are named
//! `CPU N/KVM` (or `CPU N/TCG` under emulation). The map is built once per
//! domain (and again when its vCPU count changes, or a thread vanished),
//! never every quantum.
//!
//! What cannot give wrong figures:
//! - **a recycled pid** (a domain destroyed, another process given its pid):
//!   the map keeps the process's start time (`/proc/PID/stat` field 22) and
//!   is dropped when it differs;
//! - **a thread that vanished** (a vCPU unplugged, the domain destroyed
//!   mid-read): its read fails, and the domain has no CPU figures this
//!   quantum (the caller falls back to libvirt's), and is mapped again;
//! - **a vCPU hot-plugged**: the vCPU count the periodic full collection
//!   reports differs from the map's, which is then rebuilt.
//!
//! `schedstat`'s first two fields are ns on a CPU and ns runnable but
//! waiting (the same counters as libvirt's `vcpu.N.time`, at ns rather than
//! tick resolution, and `vcpu.N.delay`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where procfs and libvirt's QEMU run directory are (a fake tree in the
/// benchmark and the tests).
#[derive(Clone, Debug)]
pub struct ProcRoots {
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// libvirt's QEMU run directory, normally `/run/libvirt/qemu`.
    pub run: PathBuf,
}

impl Default for ProcRoots {
    fn default() -> Self {
        ProcRoots { proc: PathBuf::from("/proc"), run: PathBuf::from("/run/libvirt/qemu") }
    }
}

/// A domain's vCPU threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuThreads {
    /// QEMU's pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot): a recycled pid has another.
    pub start_time: u64,
    /// Thread id of each vCPU, by vCPU number.
    pub tids: BTreeMap<u32, u32>,
}

/// One vCPU's cumulative counters from `schedstat`, ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    /// Time on a CPU.
    pub run_ns: u64,
    /// Time runnable, waiting for a CPU.
    pub wait_ns: u64,
}

impl ProcRoots {
    /// QEMU's pid for domain `name`, from libvirt's pid file.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        // A domain name with a slash would leave the directory: libvirt
        // refuses such names, and so does this.
        if name.contains('/') || name.starts_with('.') {
            return None;
        }
        std::fs::read_to_string(self.run.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
    }

    /// The start time of process `pid` (field 22 of `/proc/PID/stat`; the
    /// command name before it is in parentheses and may hold spaces).
    pub fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(self.proc.join(pid.to_string()).join("stat")).ok()?;
        let after_comm = &stat[stat.rfind(')')? + 1..];
        // Fields from 3 on; field 22 is the 20th of them.
        after_comm.split_whitespace().nth(19)?.parse().ok()
    }

    /// Maps the vCPU threads of QEMU process `pid`.
    pub fn map_vcpus(&self, pid: u32) -> Option<VcpuThreads> {
        let start_time = self.start_time(pid)?;
        let task = self.proc.join(pid.to_string()).join("task");
        let mut tids = BTreeMap::new();
        for entry in std::fs::read_dir(task).ok()?.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
            if let Some(vcpu) = vcpu_of_thread_name(comm.trim()) {
                tids.insert(vcpu, tid);
            }
        }
        Some(VcpuThreads { pid, start_time, tids })
    }

    /// Reads every vCPU's counters; `None` if any thread is gone or the
    /// process is not the one mapped (its start time changed).
    pub fn read(&self, threads: &VcpuThreads) -> Option<BTreeMap<u32, SchedStat>> {
        let base = self.proc.join(threads.pid.to_string());
        let mut out = BTreeMap::new();
        let mut buf = String::with_capacity(64);
        for (vcpu, tid) in &threads.tids {
            buf.clear();
            let path = base.join("task").join(tid.to_string()).join("schedstat");
            std::io::Read::read_to_string(&mut std::fs::File::open(&path).ok()?, &mut buf).ok()?;
            out.insert(*vcpu, parse_schedstat(&buf)?);
        }
        // Checked after the reads: a pid recycled during them is caught too.
        (self.start_time(threads.pid)? == threads.start_time).then_some(out)
    }
}

/// `N` of a QEMU vCPU thread's name, `CPU N/KVM` or `CPU N/TCG` (any
/// accelerator after the slash).
pub fn vcpu_of_thread_name(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    let (n, accel) = rest.split_once('/')?;
    (!accel.is_empty()).then_some(())?;
    n.parse().ok()
}

/// `run_ns wait_ns timeslices`.
pub fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut fields = text.split_whitespace();
    let run_ns = fields.next()?.parse().ok()?;
    let wait_ns = fields.next()?.parse().ok()?;
    Some(SchedStat { run_ns, wait_ns })
}

/// Builds a fake procfs and run directory of `domains` QEMU processes with
/// `vcpus` vCPU threads each (and two other threads), for the benchmark and
/// the tests. Pids start at 1000; domain `i` is named `vm-i`.
pub fn fake_tree(root: &Path, domains: u32, vcpus: u32) -> std::io::Result<ProcRoots> {
    let roots = ProcRoots { proc: root.join("proc"), run: root.join("run") };
    std::fs::create_dir_all(&roots.run)?;
    for i in 0..domains {
        let pid = 1000 + i * 100;
        let dir = roots.proc.join(pid.to_string());
        std::fs::create_dir_all(dir.join("task"))?;
        std::fs::write(
            dir.join("stat"),
            format!("{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 5 6 0 0 20 0 {} 0 {} 0\n", vcpus + 2, 500 + i),
        )?;
        std::fs::write(roots.run.join(format!("vm-{i}.pid")), format!("{pid}\n"))?;
        let mut threads = vec![(pid, "qemu-system-x86".to_string()), (pid + 1, "IO mon_iothread".to_string())];
        threads.extend((0..vcpus).map(|v| (pid + 2 + v, format!("CPU {v}/KVM"))));
        for (tid, comm) in threads {
            let t = dir.join("task").join(tid.to_string());
            std::fs::create_dir_all(&t)?;
            std::fs::write(t.join("comm"), format!("{comm}\n"))?;
            std::fs::write(t.join("schedstat"), format!("{} {} 10\n", u64::from(tid) * 1_000_000, u64::from(tid) * 1_000))?;
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names_and_schedstat_parse() {
        assert_eq!(vcpu_of_thread_name("CPU 0/KVM"), Some(0));
        assert_eq!(vcpu_of_thread_name("CPU 12/TCG"), Some(12));
        for other in ["CPU 1/", "CPU x/KVM", "IO mon_iothread", "qemu-system-x86", "CPU 1"] {
            assert_eq!(vcpu_of_thread_name(other), None, "{other}");
        }
        assert_eq!(parse_schedstat("2022883155 2680246 187\n"), Some(SchedStat { run_ns: 2022883155, wait_ns: 2680246 }));
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat("a b c"), None);
    }

    #[test]
    fn a_fake_tree_maps_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let roots = fake_tree(dir.path(), 3, 4).unwrap();
        let pid = roots.qemu_pid("vm-1").unwrap();
        assert_eq!(pid, 1100);
        assert_eq!(roots.qemu_pid("../etc/passwd"), None);
        let threads = roots.map_vcpus(pid).unwrap();
        assert_eq!(threads.tids, BTreeMap::from([(0, 1102), (1, 1103), (2, 1104), (3, 1105)]));
        let stats = roots.read(&threads).unwrap();
        assert_eq!(stats[&2], SchedStat { run_ns: 1104 * 1_000_000, wait_ns: 1104 * 1_000 });
    }

    /// A vanished thread and a recycled pid give no figures, never another
    /// process's.
    #[test]
    fn a_vanished_thread_or_a_recycled_pid_gives_no_figures() {
        let dir = tempfile::tempdir().unwrap();
        let roots = fake_tree(dir.path(), 2, 2).unwrap();
        let threads = roots.map_vcpus(1000).unwrap();
        std::fs::remove_dir_all(roots.proc.join("1000/task/1003")).unwrap();
        assert_eq!(roots.read(&threads), None, "thread gone");
        let threads = roots.map_vcpus(1100).unwrap();
        assert!(roots.read(&threads).is_some());
        let stat = roots.proc.join("1100/stat");
        let text = std::fs::read_to_string(&stat).unwrap().replace(" 501 0\n", " 999 0\n");
        std::fs::write(&stat, text).unwrap();
        assert_eq!(roots.read(&threads), None, "pid recycled: another start time");
        // A command name with spaces and parentheses does not shift the fields.
        std::fs::write(&stat, "1100 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 4 0 777 0\n").unwrap();
        assert_eq!(roots.start_time(1100), Some(777));
    }
}
