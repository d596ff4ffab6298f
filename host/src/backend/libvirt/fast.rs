//! The fast path's memory between quanta: each domain's vCPU thread map,
//! and its last balloon figures with when they were refreshed.
//!
//! Why a rolling balloon refresh: the balloon group costs a QEMU monitor
//! round trip per domain (about 1.3 ms each here, more for a busy guest),
//! and memory moves more slowly than CPU load. Each quantum refreshes the
//! domains that are due (not refreshed for `refresh_quanta`), urgent (a
//! balloon moving to a new target, or swapping / faulting at its last
//! refresh) or new, and at least [`MIN_REFRESH_PER_QUANTUM`] of the oldest
//! others, so a small host is refreshed whole every quantum as before. A
//! domain not refreshed is reported with its last figures; its guest
//! figures age by `balloon.last-update`, which the guard reads.

use std::collections::{HashMap, HashSet};

use super::procfs::{ProcRoots, VcpuThreads};
use super::state::{DomainSample, VcpuCounters};

/// Domains refreshed per quantum at the least (all of them on a host with
/// fewer): the whole balloon group for 32 domains costs about 40 ms.
pub(super) const MIN_REFRESH_PER_QUANTUM: usize = 32;

/// Balloon fields that only the guest (through the monitor) reports: left
/// out when a refresh did not come back, so that the figures age.
const GUEST_KEYS: [&str; 4] = ["unused", "available", "usable", "last-update"];

#[derive(Debug)]
struct Mapped {
    threads: VcpuThreads,
    at: u64,
}

#[derive(Debug, Default)]
struct Cached {
    balloon: HashMap<String, u64>,
    at: Option<u64>,
    pressure: bool,
}

/// What the fast path remembers, by domain UUID.
#[derive(Debug, Default)]
pub(super) struct FastPath {
    roots: ProcRoots,
    threads: HashMap<String, Mapped>,
    balloons: HashMap<String, Cached>,
}

impl FastPath {
    /// A fast path reading `roots`.
    pub fn new(roots: ProcRoots) -> Self {
        FastPath { roots, threads: HashMap::new(), balloons: HashMap::new() }
    }

    /// Fills `sample`'s vCPU counters and count from procfs; `false` when
    /// it cannot (no pid file, a thread gone, a recycled pid): the caller
    /// asks libvirt for this domain's vcpu group instead. The thread map is
    /// rebuilt every `remap_quanta` (a hot-plugged vCPU is a new thread) and
    /// whenever a read fails.
    pub fn cpu_figures(&mut self, uuid: &str, name: &str, quantum: u64, remap_quanta: u64, sample: &mut DomainSample) -> bool {
        let fresh = |roots: &ProcRoots| Some(Mapped { threads: roots.map_vcpus(roots.qemu_pid(name)?)?, at: quantum });
        let due = self.threads.get(uuid).is_none_or(|m| quantum.saturating_sub(m.at) >= remap_quanta.max(1));
        if due {
            match fresh(&self.roots) {
                Some(m) => self.threads.insert(uuid.to_string(), m),
                None => self.threads.remove(uuid),
            };
        }
        let read = |fp: &FastPath| fp.threads.get(uuid).and_then(|m| Some((m.threads.tids.len(), fp.roots.read(&m.threads)?)));
        let mut got = read(self);
        if got.is_none() && !due {
            // A thread vanished or the pid was recycled since the map: map
            // again once, now.
            match fresh(&self.roots) {
                Some(m) => self.threads.insert(uuid.to_string(), m),
                None => self.threads.remove(uuid),
            };
            got = read(self);
        }
        let Some((n, stats)) = got.filter(|(n, _)| *n > 0) else { return false };
        sample.vcpu_current = Some(n as u32);
        sample.vcpus = stats.into_iter().map(|(v, s)| (v, VcpuCounters { time: Some(s.run_ns), delay: Some(s.wait_ns) })).collect();
        true
    }

    /// The domains (indices into `candidates`: (uuid, urgent)) whose
    /// balloon is refreshed this quantum.
    pub fn balloon_subset(&self, candidates: &[(String, bool)], quantum: u64, refresh_quanta: u64) -> Vec<usize> {
        let mut chosen = Vec::new();
        let mut others: Vec<(u64, usize)> = Vec::new();
        for (i, (uuid, urgent)) in candidates.iter().enumerate() {
            let cached = self.balloons.get(uuid);
            match cached.and_then(|c| c.at) {
                None => chosen.push(i),
                Some(at) if *urgent || cached.is_some_and(|c| c.pressure) || quantum.saturating_sub(at) >= refresh_quanta.max(1) => {
                    chosen.push(i)
                }
                Some(at) => others.push((at, i)),
            }
        }
        others.sort_unstable();
        let room = MIN_REFRESH_PER_QUANTUM.saturating_sub(chosen.len());
        chosen.extend(others.into_iter().take(room).map(|(_, i)| i));
        chosen.sort_unstable();
        chosen
    }

    /// Keeps the balloon fields of a refresh (a partial one, without the
    /// guest's figures, keeps the guest figures of the last full one).
    pub fn remember_balloon(&mut self, uuid: &str, balloon: &HashMap<String, u64>, quantum: u64) {
        let cached = self.balloons.entry(uuid.to_string()).or_default();
        let grew = |key: &str| balloon.get(key).zip(cached.balloon.get(key)).is_some_and(|(new, old)| new > old);
        cached.pressure = grew("swap_in") || grew("major_fault");
        for (k, v) in balloon {
            cached.balloon.insert(k.clone(), *v);
        }
        cached.at = Some(quantum);
    }

    /// Fills the balloon fields `sample` lacks from the last refresh: all of
    /// them for a domain not refreshed this quantum (`whole`), all but the
    /// guest's own figures for one whose refresh did not bring them (they
    /// then age in the domain's state).
    pub fn fill_balloon(&self, uuid: &str, sample: &mut DomainSample, whole: bool) {
        let Some(cached) = self.balloons.get(uuid) else { return };
        for (k, v) in &cached.balloon {
            if whole || !GUEST_KEYS.contains(&k.as_str()) {
                sample.balloon.entry(k.clone()).or_insert(*v);
            }
        }
    }

    /// Forgets the domains not in `seen`.
    pub fn forget_gone(&mut self, seen: &HashSet<String>) {
        self.threads.retain(|u, _| seen.contains(u));
        self.balloons.retain(|u, _| seen.contains(u));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_hosts_refresh_every_balloon_and_big_ones_roll() {
        let mut fp = FastPath::default();
        let few: Vec<(String, bool)> = (0..10).map(|i| (format!("u{i}"), false)).collect();
        assert_eq!(fp.balloon_subset(&few, 0, 4).len(), 10, "new domains are all due");
        for (u, _) in &few {
            fp.remember_balloon(u, &HashMap::new(), 0);
        }
        assert_eq!(fp.balloon_subset(&few, 1, 4).len(), 10, "fewer than the minimum: all of them");

        let many: Vec<(String, bool)> = (0..200).map(|i| (format!("m{i}"), i == 150)).collect();
        let mut refreshed: HashMap<String, u64> = HashMap::new();
        for quantum in 0..12 {
            let subset = fp.balloon_subset(&many, quantum, 4);
            for &i in &subset {
                fp.remember_balloon(&many[i].0, &HashMap::new(), quantum);
                refreshed.insert(many[i].0.clone(), quantum);
            }
            if quantum > 0 {
                assert!(subset.contains(&150), "an urgent domain is refreshed every quantum");
                assert!(subset.len() < 200, "quantum {quantum}: {} refreshed", subset.len());
            }
            if quantum >= 4 {
                let oldest = many.iter().map(|(u, _)| quantum - refreshed[u]).max().unwrap();
                assert!(oldest < 4 + 1, "quantum {quantum}: a domain not refreshed for {oldest} quanta");
            }
        }
    }

    #[test]
    fn pressure_makes_a_domain_urgent_and_partial_refreshes_keep_the_guest_figures() {
        let mut fp = FastPath::default();
        let full = HashMap::from([
            ("current".to_string(), 100),
            ("unused".to_string(), 40),
            ("last-update".to_string(), 7),
            ("swap_in".to_string(), 0),
        ]);
        fp.remember_balloon("u", &full, 0);
        let swapped = HashMap::from([("current".to_string(), 100), ("swap_in".to_string(), 5)]);
        fp.remember_balloon("u", &swapped, 1);
        let others: Vec<(String, bool)> = (0..40).map(|i| (format!("o{i}"), false)).collect();
        for (u, _) in &others {
            fp.remember_balloon(u, &HashMap::new(), 1);
        }
        let mut all = others.clone();
        all.push(("u".to_string(), false));
        assert!(fp.balloon_subset(&all, 2, 10).contains(&40), "swapping at its last refresh");
        let mut sample = DomainSample::default();
        fp.fill_balloon("u", &mut sample, false);
        assert_eq!(
            (sample.balloon.get("current"), sample.balloon.get("unused"), sample.balloon.get("last-update")),
            (Some(&100), None, None)
        );
        let mut sample = DomainSample::default();
        fp.fill_balloon("u", &mut sample, true);
        assert_eq!((sample.balloon.get("unused"), sample.balloon.get("last-update")), (Some(&40), Some(&7)));
    }

    #[test]
    fn cpu_figures_come_from_procfs_and_fall_back_when_they_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let roots = super::super::procfs::fake_tree(dir.path(), 2, 3).unwrap();
        let mut fp = FastPath::new(roots.clone());
        let mut sample = DomainSample::default();
        assert!(fp.cpu_figures("u0", "vm-0", 0, 10, &mut sample));
        assert_eq!(sample.vcpu_current, Some(3));
        assert_eq!(sample.vcpus[&1], VcpuCounters { time: Some(1003 * 1_000_000), delay: Some(1003 * 1_000) });
        assert!(!fp.cpu_figures("x", "no-such-vm", 0, 10, &mut DomainSample::default()), "no pid file");
        // A vCPU unplugged (its thread gone): mapped again at once.
        std::fs::remove_dir_all(roots.proc.join("1000/task/1004")).unwrap();
        let mut sample = DomainSample::default();
        assert!(fp.cpu_figures("u0", "vm-0", 1, 10, &mut sample));
        assert_eq!(sample.vcpu_current, Some(2));
        fp.forget_gone(&HashSet::new());
        assert!(fp.threads.is_empty() && fp.balloons.is_empty());
    }
}
