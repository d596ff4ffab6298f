//! The fast path's memory between quanta: each domain's vCPU thread map,
//! and its last balloon figures with when they were refreshed.
//!
//! Why a rolling balloon refresh, mostly off the critical path: the balloon
//! group costs a QEMU monitor round trip per domain (1.3–3.6 ms each here,
//! more for a busy guest), and memory moves more slowly than CPU load. At
//! 1,000 domains a refresh of a quarter of them costs most of a 1 s
//! quantum, so it cannot be waited for. Each quantum:
//! - the *urgent* domains (new, a balloon moving to a new target, swapping
//!   or faulting at its last refresh, or CPU figures procfs could not give)
//!   are refreshed in the collection itself, at most
//!   [`MIN_REFRESH_PER_QUANTUM`] of them (the rest wait for the background);
//! - the others that are due (not refreshed for `refresh_quanta`), and at
//!   least [`MIN_REFRESH_PER_QUANTUM`] of the oldest, are refreshed by one
//!   call on a background thread, whose answer the next quantum takes. While
//!   it is in flight no other starts, so a slow libvirtd stretches the
//!   refresh interval instead of piling up calls.
//!
//! A domain not refreshed is reported with its last figures; its guest
//! figures age by `balloon.last-update` (the snapshot's `age_ms`), which the
//! guard and the memory policy read. A refresh that came back without the
//! guest's figures (a busy monitor) leaves them out until a full one, so
//! they age and the domain is checked for a hung monitor.

use std::collections::{HashMap, HashSet};

use super::procfs::{ProcRoots, VcpuThreads};
use super::state::{DomainSample, VcpuCounters};

/// Domains refreshed per quantum at the least (all of them on a host with
/// fewer), and the most refreshed within the collection itself: the
/// balloon group for 32 domains costs 40–115 ms.
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
    /// The last refresh came back without the guest's own figures.
    partial: bool,
}

/// Which domains' balloons are refreshed this quantum, as indices into the
/// candidates.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct RefreshPlan {
    /// Within the collection (urgent ones).
    pub now: Vec<usize>,
    /// On the background thread, taken next quantum.
    pub background: Vec<usize>,
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

    /// Which of `candidates` ((uuid, urgent)) are refreshed this quantum,
    /// and how (see the module docs). `in_flight`: a background refresh has
    /// not come back yet, so none starts.
    pub fn plan_refresh(&self, candidates: &[(String, bool)], quantum: u64, refresh_quanta: u64, in_flight: bool) -> RefreshPlan {
        // Urgent: (0 = named urgent or under pressure, 1 = new, index).
        let mut urgent: Vec<(u8, usize)> = Vec::new();
        let mut due = Vec::new();
        let mut others: Vec<(u64, usize)> = Vec::new();
        for (i, (uuid, named_urgent)) in candidates.iter().enumerate() {
            let cached = self.balloons.get(uuid);
            match cached.and_then(|c| c.at) {
                None => urgent.push((1, i)),
                Some(_) if *named_urgent || cached.is_some_and(|c| c.pressure) => urgent.push((0, i)),
                Some(at) if quantum.saturating_sub(at) >= refresh_quanta.max(1) => due.push((at, i)),
                Some(at) => others.push((at, i)),
            }
        }
        urgent.sort_unstable();
        let overflow = urgent.split_off(urgent.len().min(MIN_REFRESH_PER_QUANTUM));
        let mut plan = RefreshPlan { now: urgent.into_iter().map(|(_, i)| i).collect(), background: Vec::new() };
        if !in_flight {
            due.sort_unstable();
            others.sort_unstable();
            plan.background.extend(overflow.into_iter().map(|(_, i)| i));
            plan.background.extend(due.into_iter().map(|(_, i)| i));
            let room = MIN_REFRESH_PER_QUANTUM.saturating_sub(plan.background.len() + plan.now.len());
            plan.background.extend(others.into_iter().take(room).map(|(_, i)| i));
        }
        plan.now.sort_unstable();
        plan.background.sort_unstable();
        plan
    }

    /// Keeps the balloon fields of a refresh made at `quantum` (a partial
    /// one, without the guest's figures, marks those as missing). A
    /// background answer older than what is kept is dropped.
    pub fn remember_balloon(&mut self, uuid: &str, balloon: &HashMap<String, u64>, quantum: u64) {
        let cached = self.balloons.entry(uuid.to_string()).or_default();
        if cached.at.is_some_and(|at| at > quantum) {
            return;
        }
        cached.partial = !balloon.contains_key("last-update");
        let grew = |key: &str| balloon.get(key).zip(cached.balloon.get(key)).is_some_and(|(new, old)| new > old);
        cached.pressure = grew("swap_in") || grew("major_fault");
        for (k, v) in balloon {
            cached.balloon.insert(k.clone(), *v);
        }
        cached.at = Some(quantum);
    }

    /// Fills the balloon fields `sample` lacks from the last refresh, but
    /// the guest's own figures only if that refresh brought them (else they
    /// age in the domain's state).
    pub fn fill_balloon(&self, uuid: &str, sample: &mut DomainSample) {
        let Some(cached) = self.balloons.get(uuid) else { return };
        for (k, v) in &cached.balloon {
            if !cached.partial || !GUEST_KEYS.contains(&k.as_str()) {
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

    /// Runs `plan_refresh` for `quanta`, with background answers taken one
    /// quantum later; returns the largest age (in quanta) of any domain's
    /// figures after the first `refresh_quanta + 1` quanta.
    fn roll(fp: &mut FastPath, domains: &[(String, bool)], quanta: u64, refresh_quanta: u64) -> u64 {
        let mut in_flight: Vec<usize> = Vec::new();
        let mut refreshed: HashMap<String, u64> = HashMap::new();
        let mut worst = 0;
        for quantum in 0..quanta {
            let launched = quantum.saturating_sub(1);
            for i in in_flight.drain(..) {
                fp.remember_balloon(&domains[i].0, &HashMap::new(), launched);
                refreshed.insert(domains[i].0.clone(), launched);
            }
            let plan = fp.plan_refresh(domains, quantum, refresh_quanta, false);
            assert!(plan.now.len() <= MIN_REFRESH_PER_QUANTUM, "quantum {quantum}: {} waited for", plan.now.len());
            assert!(plan.now.iter().all(|i| !plan.background.contains(i)), "quantum {quantum}: a domain in both");
            for &i in &plan.now {
                fp.remember_balloon(&domains[i].0, &HashMap::new(), quantum);
                refreshed.insert(domains[i].0.clone(), quantum);
            }
            for (i, (uuid, urgent)) in domains.iter().enumerate() {
                if *urgent && quantum > 0 {
                    assert!(plan.now.contains(&i), "quantum {quantum}: urgent {uuid} not refreshed at once");
                }
            }
            in_flight = plan.background;
            if quantum > refresh_quanta {
                worst = worst.max(domains.iter().map(|(u, _)| refreshed.get(u).map_or(u64::MAX, |at| quantum - at)).max().unwrap());
            }
        }
        worst
    }

    #[test]
    fn small_hosts_refresh_every_balloon_and_big_ones_roll() {
        let mut fp = FastPath::default();
        let few: Vec<(String, bool)> = (0..10).map(|i| (format!("u{i}"), false)).collect();
        let first = fp.plan_refresh(&few, 0, 4, false);
        assert_eq!((first.now.len(), first.background.len()), (10, 0), "new domains are urgent");
        for (u, _) in &few {
            fp.remember_balloon(u, &HashMap::new(), 0);
        }
        let next = fp.plan_refresh(&few, 1, 4, false);
        assert_eq!((next.now.len(), next.background.len()), (0, 10), "fewer than the minimum: all of them, in the background");
        assert_eq!(fp.plan_refresh(&few, 1, 4, true), RefreshPlan::default(), "none starts while one is in flight");
        assert!(roll(&mut FastPath::default(), &few, 12, 4) <= 1, "a small host is refreshed every quantum, one late");

        let many: Vec<(String, bool)> = (0..200).map(|i| (format!("m{i}"), i == 150)).collect();
        let worst = roll(&mut FastPath::default(), &many, 16, 4);
        assert!(worst <= 4 + 1, "a domain not refreshed for {worst} quanta (refresh_quanta 4, answers one late)");
    }

    #[test]
    fn a_thousand_new_domains_wait_for_at_most_the_minimum_and_the_rest_go_to_the_background() {
        let fp = FastPath::default();
        let new: Vec<(String, bool)> = (0..1000).map(|i| (format!("n{i}"), false)).collect();
        let plan = fp.plan_refresh(&new, 0, 4, false);
        assert_eq!(plan.now.len(), MIN_REFRESH_PER_QUANTUM);
        assert_eq!(plan.background.len(), 1000 - MIN_REFRESH_PER_QUANTUM);
        // Every one of them has figures within two quanta at most.
        assert!(roll(&mut FastPath::default(), &new, 8, 4) <= 5);
    }

    #[test]
    fn a_late_background_answer_never_replaces_newer_figures() {
        let mut fp = FastPath::default();
        let fresh = HashMap::from([("current".to_string(), 200), ("last-update".to_string(), 9)]);
        let old = HashMap::from([("current".to_string(), 100), ("last-update".to_string(), 5)]);
        fp.remember_balloon("u", &fresh, 3);
        fp.remember_balloon("u", &old, 2);
        let mut sample = DomainSample::default();
        fp.fill_balloon("u", &mut sample);
        assert_eq!(sample.balloon.get("current"), Some(&200));
    }

    #[test]
    fn pressure_makes_a_domain_urgent_and_partial_refreshes_age_the_guest_figures() {
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
        assert!(fp.plan_refresh(&all, 2, 10, true).now.contains(&40), "swapping at its last refresh: urgent");
        let mut sample = DomainSample::default();
        fp.fill_balloon("u", &mut sample);
        assert_eq!(
            (sample.balloon.get("current"), sample.balloon.get("unused"), sample.balloon.get("last-update")),
            (Some(&100), None, None),
            "a partial refresh leaves the guest's figures out, so they age"
        );
        fp.remember_balloon("u", &full, 2);
        let mut sample = DomainSample::default();
        fp.fill_balloon("u", &mut sample);
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
