//! Host CPU and memory figures.
//!
//! On a local `qemu:///` connection they come from `/proc` (no libvirt call,
//! and `MemAvailable` is what the guard's reserve means); on a remote one,
//! from `virNodeGetCPUStats` per CPU and `virNodeGetMemoryStats`, with node
//! info and free memory as the last resort of drivers that have neither
//! (libvirt's test driver). CPU usage is a delta of cumulative times, like a
//! domain's, so the first quantum after a (re)connect reports 0.

use std::collections::HashMap;

use crate::backend::{ObservedCpu, ObservedHost, ObservedMemory};
use virt::connect::Connect;

use crate::ffi;

/// Cumulative host CPU times of one CPU (busy, total), in the source's unit
/// (USER_HZ ticks from `/proc/stat`, ns from libvirt): only ratios are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CpuTimes {
    busy: u64,
    total: u64,
}

/// The host as the backend knows it between quanta.
#[derive(Debug, Default)]
pub(super) struct HostState {
    /// Host CPUs: (id, online), read at connect; cpumap length derives from
    /// the count.
    cpus: Vec<(u32, bool)>,
    /// CPU times of the last quantum, for usage deltas.
    prev_times: Option<Vec<CpuTimes>>,
}

impl HostState {
    /// Reads the host CPUs of a new connection and forgets the previous
    /// times (deltas across connections are meaningless).
    pub(super) fn connected(&mut self, conn: &Connect, calls: &mut u64) {
        self.cpus = read_host_cpus(conn, calls);
        self.prev_times = None;
    }

    /// Bytes of a cpumap covering every host CPU (at least one).
    pub(super) fn maplen(&self) -> usize {
        self.cpus.len().max(1).div_ceil(8)
    }

    /// Host CPUs (with usage since the last call) and memory. `local` reads
    /// `/proc`; otherwise `conn` (none: zero figures).
    pub(super) fn observe(&mut self, conn: Option<&Connect>, local: bool, calls: &mut u64) -> ObservedHost {
        let times = self.cpu_times(conn, local, calls);
        let usage: Vec<f32> = match (&self.prev_times, &times) {
            (Some(prev), Some(now)) if prev.len() == now.len() => cpu_usage(prev, now),
            _ => vec![0.0; self.cpus.len()],
        };
        self.prev_times = times;
        let cpus = self
            .cpus
            .iter()
            .enumerate()
            .map(|(i, (id, online))| ObservedCpu { id: *id, online: *online, usage: usage.get(i).copied().unwrap_or(0.0), node: 0 })
            .collect();
        ObservedHost { cpus, memory: memory(conn, local, calls) }
    }

    fn cpu_times(&self, conn: Option<&Connect>, local: bool, calls: &mut u64) -> Option<Vec<CpuTimes>> {
        if local {
            let text = std::fs::read_to_string("/proc/stat").ok()?;
            return Some(parse_proc_stat(&text, self.cpus.len()));
        }
        let conn = conn?;
        let mut out = Vec::with_capacity(self.cpus.len());
        for &(id, online) in &self.cpus {
            if !online {
                out.push(CpuTimes::default());
                continue;
            }
            *calls += 1;
            let stats = ffi::node_cpu_stats(conn, id)?;
            out.push(times_of_node_stats(&stats));
        }
        Some(out)
    }
}

/// Online CPUs from the node CPU map, plus any that node info counts beyond
/// it; without a map, node info's count, all online.
fn read_host_cpus(conn: &Connect, calls: &mut u64) -> Vec<(u32, bool)> {
    *calls += 1;
    if let Some(map) = ffi::node_cpu_map(conn) {
        let n = map.len();
        let mut cpus: Vec<(u32, bool)> = map.into_iter().enumerate().map(|(i, online)| (i as u32, online)).collect();
        // Some drivers count more CPUs in node info than in the map.
        *calls += 1;
        let info = conn.get_node_info().map(|i| i.cpus as usize).unwrap_or(0);
        cpus.extend((n..info).map(|i| (i as u32, true)));
        return cpus;
    }
    *calls += 1;
    let count = conn.get_node_info().map(|i| i.cpus).unwrap_or(1).max(1);
    (0..count).map(|i| (i, true)).collect()
}

/// Busy share of each CPU between two readings, 0..=1 (0 when no time
/// passed or a counter went backwards).
fn cpu_usage(prev: &[CpuTimes], now: &[CpuTimes]) -> Vec<f32> {
    prev.iter()
        .zip(now)
        .map(|(p, n)| {
            let total = n.total.saturating_sub(p.total);
            let busy = n.busy.saturating_sub(p.busy);
            if total == 0 {
                0.0
            } else {
                (busy as f64 / total as f64).clamp(0.0, 1.0) as f32
            }
        })
        .collect()
}

/// Per-CPU times of `/proc/stat` for CPUs `0..ncpus`: busy is everything
/// but idle and iowait, over user nice system idle iowait irq softirq steal.
fn parse_proc_stat(text: &str, ncpus: usize) -> Vec<CpuTimes> {
    let mut out = vec![CpuTimes::default(); ncpus];
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else { continue };
        // `cpuN ...`: the id follows "cpu" directly. The aggregate line is
        // `cpu  ...`: its first figure is a tick count, never an id.
        let Some((id, fields)) = rest.split_once(char::is_whitespace) else { continue };
        let Ok(id) = id.parse::<usize>() else { continue };
        let parts = fields.split_whitespace();
        // user nice system idle iowait irq softirq steal (USER_HZ ticks).
        let v: Vec<u64> = parts.take(8).filter_map(|p| p.parse().ok()).collect();
        if v.len() < 5 || id >= out.len() {
            continue;
        }
        let idle = v[3] + v[4];
        let total: u64 = v.iter().sum();
        out[id] = CpuTimes { busy: total - idle, total };
    }
    out
}

/// One CPU's times from `virNodeGetCPUStats`: kernel and user are busy,
/// idle and iowait only count in the total, other fields are ignored.
fn times_of_node_stats(stats: &[(String, u64)]) -> CpuTimes {
    let mut t = CpuTimes::default();
    for (field, value) in stats {
        match field.as_str() {
            "kernel" | "user" => t.busy += value,
            "idle" | "iowait" => {}
            _ => continue,
        }
        t.total += value;
    }
    t
}

/// Host memory: `/proc/meminfo` when local (falling back to libvirt if it
/// cannot be read), else node memory stats, else node info and free memory.
fn memory(conn: Option<&Connect>, local: bool, calls: &mut u64) -> ObservedMemory {
    if local {
        if let Some(memory) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| parse_meminfo(&text)) {
            return memory;
        }
    }
    let Some(conn) = conn else { return ObservedMemory::default() };
    *calls += 1;
    if let Some(stats) = ffi::node_memory_stats(conn) {
        let m: HashMap<String, u64> = stats.into_iter().collect();
        let total = m.get("total").copied().unwrap_or(0);
        let avail = ["free", "buffers", "cached"].iter().filter_map(|k| m.get(*k)).sum();
        return ObservedMemory { total_kib: total, available_kib: avail };
    }
    // Drivers without node memory stats (the test driver).
    *calls += 2;
    let total = conn.get_node_info().map(|i| i.memory).unwrap_or(0);
    let free = conn.get_free_memory().map(|b| b / 1024).unwrap_or(0);
    ObservedMemory { total_kib: total, available_kib: free }
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, KiB.
fn parse_meminfo(text: &str) -> Option<ObservedMemory> {
    let field =
        |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    Some(ObservedMemory { total_kib: field("MemTotal:")?, available_kib: field("MemAvailable:")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_gives_busy_and_total_per_cpu() {
        let text = "cpu  123456 0 10 80 0 0 0 0 0 0\ncpu0 5 1 4 40 10 0 0 0 0 0\ncpu1 1 2 3 4\ncpu7 1 1 1 1 1\nintr 1 2\n";
        // cpu1 has too few fields, cpu7 is beyond the host's CPUs.
        assert_eq!(parse_proc_stat(text, 2), [CpuTimes { busy: 10, total: 60 }, CpuTimes::default()]);
        // Just after boot the aggregate line's first tick count can be a
        // valid CPU number: it is still not CPU 1.
        let booting = "cpu  1 0 10 80 0 0 0 0 0 0\ncpu0 5 1 4 40 10 0 0 0 0 0\n";
        assert_eq!(parse_proc_stat(booting, 2), [CpuTimes { busy: 10, total: 60 }, CpuTimes::default()]);
    }

    #[test]
    fn usage_is_a_clamped_delta() {
        let prev = [CpuTimes { busy: 10, total: 100 }, CpuTimes { busy: 50, total: 100 }];
        let now = [CpuTimes { busy: 60, total: 200 }, CpuTimes { busy: 40, total: 100 }];
        assert_eq!(cpu_usage(&prev, &now), [0.5, 0.0]);
    }

    #[test]
    fn node_stats_count_kernel_and_user_as_busy() {
        let stats: Vec<(String, u64)> =
            [("kernel", 2), ("user", 3), ("idle", 10), ("iowait", 5), ("intr", 99)].iter().map(|(f, v)| (f.to_string(), *v)).collect();
        assert_eq!(times_of_node_stats(&stats), CpuTimes { busy: 5, total: 20 });
    }

    #[test]
    fn meminfo_needs_total_and_available() {
        let text = "MemTotal:       16318480 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_meminfo(text), Some(ObservedMemory { total_kib: 16318480, available_kib: 8000000 }));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }
}
