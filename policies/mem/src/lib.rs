//! The default memory policy: keep every guest's free memory inside a band
//! sized to the guest, grow fast, shrink slowly, and never spend the host's
//! reserve.
//!
//! Why it beats the original fixed 256/128 MiB rule:
//! - **Relative thresholds with absolute floors.** A guest wants
//!   `max(mem.free_min_mib, mem.free_pct % of its max)` free. A 512 MiB guest
//!   and a 64 GiB guest are treated in proportion.
//! - **Grow fast, to the need, with prediction.** A guest whose free memory
//!   (after the growth seen last quantum, extrapolated `mem.growth_factor`
//!   quanta ahead) falls below half its band, or that swaps or faults, is
//!   given everything it needs in one step, from the host pool, most starved
//!   first. The original gave +128 MiB per quantum and lost guests that
//!   filled faster than that.
//! - **Shrink slowly, with a dead band.** Only free memory above 1.5 times the
//!   band is reclaimed, at most `mem.max_shrink_pct` % of the guest's max per
//!   quantum (MOM's 5 %), and steps under 1 % are skipped, so nothing flaps.
//! - **Host short?** When host available memory is below its reserve, or
//!   starving guests need more than the host can give above its reserve,
//!   guests with more than half their band free are squeezed toward half
//!   the band (MOM's "squeeze harder"), at twice the normal step.
//! - **Old figures are not trusted to shrink.** The daemon refreshes balloon
//!   stats for a rolling subset of domains (`DomainMemory::age_ms` says how
//!   old each domain's are). A guest whose figures are older than
//!   `mem.stale_ms` is never a donor: it may have filled since. Its growth
//!   is extrapolated over the figures' age too, so an aged guest that was
//!   growing is provisioned for where it is now, not where it was. A domain
//!   whose monitor is not answering (`Domain::not_answering_ms`) is left
//!   alone: the guard would reject any action on it, and a grant would
//!   strand host memory the others could use.
#![deny(missing_docs)]

use rustc_hash::FxHashMap;

use vm_balancer_sdk::{export_policy, Action, Info, Policy, Reads, Snapshot};

const MIB: u64 = 1024;

/// Tunables, read from `[params.mem]` each quantum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemParams {
    /// Free memory a guest should have, as a percentage of its max.
    pub free_pct: f64,
    /// Absolute floor of that free memory, MiB.
    pub free_min_mib: u64,
    /// Largest reclaim per quantum, percent of the guest's max.
    pub max_shrink_pct: f64,
    /// How many quanta of observed growth to provision ahead.
    pub growth_factor: f64,
    /// Figures older than this (ms) never justify a shrink (the guard's
    /// `guard.stale_after_ms` default).
    pub stale_ms: u64,
}

impl MemParams {
    /// Reads the parameters, with defaults.
    pub fn from_snapshot(s: &Snapshot) -> Self {
        MemParams {
            free_pct: s.param_f64("mem.free_pct", 20.0),
            free_min_mib: s.param_f64("mem.free_min_mib", 64.0).max(0.0) as u64,
            max_shrink_pct: s.param_f64("mem.max_shrink_pct", 5.0),
            growth_factor: s.param_f64("mem.growth_factor", 2.0).max(0.0),
            stale_ms: s.param_f64("mem.stale_ms", 10_000.0).max(0.0) as u64,
        }
    }
}

/// The default memory policy. State: each guest's used memory last quantum.
#[derive(Default, Debug)]
pub struct MemPolicy {
    /// Domain → what was last seen of it. Updated in place, so a steady
    /// domain costs no allocation per quantum. (FxHash: the keys are the
    /// daemon's domain names, and SipHash showed in wasm profiles.)
    last_used_kib: FxHashMap<String, Seen>,
}

/// A domain's used memory as last seen, and the growth it showed.
#[derive(Clone, Copy, Debug)]
struct Seen {
    used_kib: u64,
    /// Quantum of the last snapshot that listed the domain.
    quantum: u64,
    /// Growth per quantum of the last fresh figures.
    growth_kib: u64,
}

struct Donor {
    domain: usize,
    used: u64,
    free: u64,
    band: u64,
    want: u64,
}

struct Grow {
    domain: usize,
    need_kib: u64,
    free_ratio: f64,
}

impl Policy for MemPolicy {
    const READS: Reads = Reads { vcpus: false, domain_memory: true };

    fn info() -> Info {
        Info { name: "mem-default", version: env!("CARGO_PKG_VERSION"), cpu: false, memory: true }
    }

    fn decide(&mut self, snap: &Snapshot) -> Result<Vec<Action>, String> {
        let p = MemParams::from_snapshot(snap);
        let host = &snap.host.memory;
        let mut pool_kib = host.available_kib.saturating_sub(host.reserve_kib);
        let mut grows = Vec::new();
        let mut donors = Vec::new();

        for (di, d) in snap.domains.iter().enumerate() {
            let m = &d.memory;
            let (Some(used), Some(free)) = (m.used_kib(), m.free_kib()) else {
                continue; // No balloon stats: nothing safe to decide.
            };
            if d.not_answering_ms > 0 {
                // Remember it, so its growth is not lost, but leave it alone.
                self.last_used_kib.entry(d.name.clone()).or_insert(Seen { used_kib: used, quantum: snap.quantum, growth_kib: 0 }).quantum =
                    snap.quantum;
                continue;
            }
            // Figures refreshed this quantum, or unchanged since they were
            // last refreshed (rolling balloon subset)?
            let fresh = m.age_ms == 0;
            let growth = match self.last_used_kib.get_mut(d.name.as_str()) {
                Some(seen) => {
                    if fresh || used != seen.used_kib {
                        seen.growth_kib = used.saturating_sub(seen.used_kib);
                    }
                    seen.used_kib = used;
                    seen.quantum = snap.quantum;
                    seen.growth_kib
                }
                None => {
                    self.last_used_kib.insert(d.name.clone(), Seen { used_kib: used, quantum: snap.quantum, growth_kib: 0 });
                    0
                }
            };
            let band = ((m.max_kib as f64 * p.free_pct / 100.0) as u64).max(p.free_min_mib * MIB);
            // Aged figures: the guest has kept growing since they were taken.
            let age_quanta = m.age_ms as f64 / f64::from(snap.quantum_ms.max(1));
            let predicted_used = used + (growth as f64 * (p.growth_factor + age_quanta)) as u64;
            let want = (predicted_used + band).min(m.max_kib);
            let predicted_free = m.target_kib.saturating_sub(predicted_used);
            if (predicted_free < band / 2 || m.under_pressure_signals()) && want > m.target_kib {
                grows.push(Grow { domain: di, need_kib: want - m.target_kib, free_ratio: free as f64 / band.max(1) as f64 });
            } else if free > band / 2 && m.age_ms <= p.stale_ms {
                donors.push(Donor { domain: di, used, free, band, want });
            }
        }
        self.last_used_kib.retain(|_, seen| seen.quantum == snap.quantum);

        // Squeeze when the host is below its reserve, or when starving guests
        // need more than the host pool holds: then the donors' spare band is
        // worth more to the starving guests than to them.
        let need_kib: u64 = grows.iter().map(|g| g.need_kib).sum();
        let squeeze = host.available_kib < host.reserve_kib || need_kib > pool_kib;
        let mut actions = Vec::new();
        for donor in donors {
            let d = &snap.domains[donor.domain];
            let m = &d.memory;
            let step = (m.max_kib as f64 * p.max_shrink_pct / 100.0) as u64;
            let (floor, step, why) = if squeeze {
                (donor.used + donor.band / 2, step * 2, "host short: squeeze")
            } else if donor.free > donor.band + donor.band / 2 {
                (donor.want, step, "reclaim excess free")
            } else {
                continue; // Inside the dead band.
            };
            let target = floor.max(m.target_kib.saturating_sub(step));
            if m.target_kib.saturating_sub(target) >= m.max_kib / 100 {
                actions.push(Action::set_memory(
                    &d.name,
                    target,
                    Reason::new(why).text(" (free ").mib(donor.free).text(" MiB, band ").mib(donor.band).text(" MiB)").0,
                ));
            }
        }

        // Most starved first; the host pool (available minus reserve) is the budget.
        grows.sort_by(|a, b| a.free_ratio.total_cmp(&b.free_ratio));
        for g in grows {
            let grant = g.need_kib.min(pool_kib);
            if grant < MIB {
                continue;
            }
            pool_kib -= grant;
            let d = &snap.domains[g.domain];
            actions.push(Action::set_memory(&d.name, d.memory.target_kib + grant, Reason::new("starved: +").mib(grant).text(" MiB").0));
        }
        Ok(actions)
    }
}

/// A reason, built without `format!`: the formatting machinery was a
/// visible share of a quantum in wasm when hundreds of targets are set.
struct Reason(String);

impl Reason {
    fn new(text: &str) -> Self {
        let mut s = String::with_capacity(48);
        s.push_str(text);
        Reason(s)
    }

    fn text(mut self, text: &str) -> Self {
        self.0.push_str(text);
        self
    }

    /// KiB, written as whole MiB.
    fn mib(mut self, kib: u64) -> Self {
        self.0.push_str(itoa::Buffer::new().format(kib / MIB));
        self
    }
}

export_policy!(MemPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use vm_balancer_sdk::builder::{DomainBuilder, SnapshotBuilder};

    fn target_of(actions: &[Action], name: &str) -> Option<u64> {
        actions.iter().find_map(|a| match a {
            Action::SetMemory { domain, target_kib, .. } if domain == name => Some(*target_kib / MIB),
            _ => None,
        })
    }

    #[test]
    fn reasons_read_as_format_would_write_them() {
        let reason = Reason::new("reclaim excess free").text(" (free ").mib(1348 * MIB + 1023).text(" MiB, band ").mib(0).text(" MiB)").0;
        assert_eq!(reason, format!("reclaim excess free (free {} MiB, band {} MiB)", 1348, 0));
        assert_eq!(Reason::new("starved: +").mib(u64::MAX).text(" MiB").0, format!("starved: +{} MiB", u64::MAX / MIB));
    }

    #[test]
    fn idle_guest_shrinks_by_bounded_step_never_below_used_plus_band() {
        let mut policy = MemPolicy::default();
        // 1 GiB guest using 100 MiB: band = max(64, 204) = 204 MiB.
        let mut target = 1024;
        for q in 0..100 {
            let snap = SnapshotBuilder::new(2, 8 << 20)
                .quantum(q)
                .domain(DomainBuilder::new("idle").memory_mib(1024, target, Some(target - 100)))
                .build();
            if let Some(t) = target_of(&policy.decide(&snap).unwrap(), "idle") {
                assert!(target - t <= 52, "step bounded to 5% of max: {target} -> {t}");
                target = t;
            }
        }
        assert!((100 + 204..=100 + 204 + 110).contains(&target), "settled in the band: {target}");
    }

    #[test]
    fn starved_guest_gets_its_whole_need_at_once() {
        let snap = SnapshotBuilder::new(2, 8 << 20).domain(DomainBuilder::new("full").memory_mib(2048, 512, Some(10))).build();
        let t = target_of(&MemPolicy::default().decide(&snap).unwrap(), "full").unwrap();
        // used 502 + band 409 = 911 MiB.
        assert_eq!(t, 502 + 409);
    }

    #[test]
    fn growth_is_provisioned_ahead() {
        let mut policy = MemPolicy::default();
        let s1 = SnapshotBuilder::new(2, 8 << 20).domain(DomainBuilder::new("g").memory_mib(2048, 1024, Some(600))).build();
        assert!(policy.decide(&s1).unwrap().is_empty());
        // Used grew by 200 MiB: predicted used = 624 + 400.
        let s2 = SnapshotBuilder::new(2, 8 << 20).domain(DomainBuilder::new("g").memory_mib(2048, 1024, Some(400))).build();
        let t = target_of(&policy.decide(&s2).unwrap(), "g").unwrap();
        assert_eq!(t, 624 + 400 + 409);
    }

    #[test]
    fn never_spends_the_host_reserve() {
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .host_memory(300 * MIB, 200 * MIB)
            .domain(DomainBuilder::new("a").memory_mib(4096, 512, Some(0)))
            .domain(DomainBuilder::new("b").memory_mib(4096, 512, Some(5)))
            .build();
        let actions = MemPolicy::default().decide(&snap).unwrap();
        let given: u64 = ["a", "b"].iter().filter_map(|n| target_of(&actions, n)).map(|t| t - 512).sum();
        assert_eq!(given, 100, "only available - reserve is handed out: {actions:?}");
        assert_eq!(target_of(&actions, "a"), Some(612), "most starved first");
    }

    #[test]
    fn host_short_squeezes_guests_with_spare_memory() {
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .host_memory(100 * MIB, 200 * MIB)
            .domain(DomainBuilder::new("roomy").memory_mib(1024, 1024, Some(250)))
            .build();
        let t = target_of(&MemPolicy::default().decide(&snap).unwrap(), "roomy").unwrap();
        assert_eq!(t, 921, "double step (10 % of max) when host is short");
    }

    #[test]
    fn stale_figures_never_shrink_a_guest_and_fresh_ones_do() {
        let roomy = |age_ms| {
            SnapshotBuilder::new(2, 8 << 20)
                .host_memory(100 * MIB, 200 * MIB)
                .domain(DomainBuilder::new("roomy").memory_mib(1024, 1024, Some(250)).memory_age(age_ms))
                .build()
        };
        assert!(MemPolicy::default().decide(&roomy(10_001)).unwrap().is_empty(), "stale: no shrink");
        assert!(target_of(&MemPolicy::default().decide(&roomy(10_000)).unwrap(), "roomy").is_some(), "at the bound: still trusted");
        assert!(target_of(&MemPolicy::default().decide(&roomy(0)).unwrap(), "roomy").is_some());
    }

    #[test]
    fn aged_figures_of_a_growing_guest_are_extrapolated_over_their_age() {
        let mut policy = MemPolicy::default();
        // 4 GiB max: band 819 MiB; a 1600 MiB balloon.
        let at = |q, usable, age_ms| {
            SnapshotBuilder::new(2, 8 << 20)
                .quantum(q)
                .domain(DomainBuilder::new("g").memory_mib(4096, 1600, Some(usable)).memory_age(age_ms))
                .build()
        };
        assert!(policy.decide(&at(0, 1000, 0)).unwrap().is_empty(), "used 600, free inside the dead band");
        // Fresh: used 700, growth 100 per quantum, predicted used 900, free 700 > band / 2.
        assert!(policy.decide(&at(1, 900, 0)).unwrap().is_empty());
        // The same figures 2 quanta later, not refreshed: the growth is kept
        // and extrapolated over 2 + 2 quanta: used 1100, free 500 > 409.
        assert!(policy.decide(&at(2, 900, 2000)).unwrap().is_empty());
        // 10 quanta old: used 700 + 12 x 100 = 1900 > the balloon: grow.
        let t = target_of(&policy.decide(&at(3, 900, 10_000)).unwrap(), "g").unwrap();
        assert_eq!(t, 1900 + 819, "grown to the extrapolated need");
    }

    #[test]
    fn a_domain_that_does_not_answer_is_left_alone() {
        let snap =
            SnapshotBuilder::new(2, 8 << 20).domain(DomainBuilder::new("hung").memory_mib(2048, 512, Some(10)).not_answering(5000)).build();
        assert!(MemPolicy::default().decide(&snap).unwrap().is_empty());
    }

    #[test]
    fn guests_without_stats_are_left_alone() {
        let snap = SnapshotBuilder::new(2, 8 << 20).domain(DomainBuilder::new("nostats").memory_mib(1024, 1024, None)).build();
        assert!(MemPolicy::default().decide(&snap).unwrap().is_empty());
    }

    #[test]
    fn reads_only_what_it_declares() {
        // The wasm glue decodes only `READS`; the daemon's native fallback
        // gets everything. Both must decide the same.
        let snap = SnapshotBuilder::new(4, 8 << 20)
            .domain(DomainBuilder::new("idle").vcpu(0, 0.5).memory_mib(1024, 1024, Some(900)))
            .domain(DomainBuilder::new("full").vcpu(1, 1.0).memory_mib(2048, 512, Some(10)).pressure(100, 3))
            .build();
        let partial = vm_balancer_sdk::builder::as_read_by::<MemPolicy>(&snap);
        assert_ne!(partial, snap, "something was skipped");
        let full = MemPolicy::default().decide(&snap).unwrap();
        assert!(!full.is_empty());
        assert_eq!(MemPolicy::default().decide(&partial).unwrap(), full);
    }
}
