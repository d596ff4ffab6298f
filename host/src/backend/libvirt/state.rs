//! What the backend remembers of each domain between quanta, and the delta
//! maths that turn libvirt's cumulative counters into per-quantum figures.
//!
//! Everything here is plain data and pure methods (no connection), so the
//! maths is tested with made-up samples: the previous sample of a domain,
//! the affinity and balloon target to restore, external-pin holds, and a
//! balloon on its way to a new target.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use vm_balancer_sdk::{Domain, DomainMemory, Vcpu};

use super::xml::DomainXml;

/// Longest wait for a balloon to settle; after it, the actual size is taken.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One vCPU's cumulative counters, ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct VcpuCounters {
    /// vCPU time (`vcpu.N.time`).
    pub time: Option<u64>,
    /// Time runnable but waiting for a host CPU (`vcpu.N.delay`): steal.
    pub delay: Option<u64>,
}

/// One domain's counters as one bulk stats call reported them (cumulative;
/// [`KnownDomain::observe`] turns two of them into a quantum's figures).
#[derive(Debug, Default)]
pub(super) struct DomainSample {
    /// `state.state` (virDomainState).
    pub run_state: Option<i64>,
    /// `vcpu.current`: vCPUs the domain has now.
    pub vcpu_current: Option<u32>,
    /// Per-vCPU counters, by vCPU number.
    pub vcpus: BTreeMap<u32, VcpuCounters>,
    /// `balloon.*` fields (KiB, or counts for faults), by name without the
    /// prefix.
    pub balloon: HashMap<String, u64>,
}

impl DomainSample {
    /// A sample from a record's numeric (field, value) parameters.
    pub fn from_numbers(numbers: impl IntoIterator<Item = (String, i128)>) -> Self {
        let mut sample = DomainSample::default();
        for (field, value) in numbers {
            sample.absorb(&field, value);
        }
        sample
    }

    /// Takes one typed parameter; unknown fields are ignored, and negative
    /// values of unsigned counters dropped.
    pub fn absorb(&mut self, field: &str, value: i128) {
        let unsigned = u64::try_from(value).ok();
        if field == "state.state" {
            self.run_state = Some(value as i64);
        } else if field == "vcpu.current" {
            self.vcpu_current = unsigned.map(|v| v as u32);
        } else if let Some(rest) = field.strip_prefix("vcpu.") {
            if let Some((n, what)) = rest.split_once('.') {
                if let Ok(n) = n.parse::<u32>() {
                    let entry = self.vcpus.entry(n).or_default();
                    match what {
                        "time" => entry.time = unsigned,
                        "delay" => entry.delay = unsigned,
                        _ => {}
                    }
                }
            }
        } else if let Some(rest) = field.strip_prefix("balloon.") {
            if let Some(v) = unsigned {
                self.balloon.insert(rest.to_string(), v);
            }
        }
    }

    /// Active domains only: running (1), blocked (2), paused (3).
    pub fn is_active(&self) -> bool {
        matches!(self.run_state, Some(1..=3))
    }

    fn balloon(&self, key: &str) -> Option<u64> {
        self.balloon.get(key).copied()
    }
}

/// Where a vCPU runs, as read live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Placement {
    /// pCPU it runs on.
    pub cpu: u32,
    /// Its affinity.
    pub affinity: Vec<u32>,
}

/// What the backend knows of one vCPU.
#[derive(Clone, Debug, Default)]
pub(super) struct KnownVcpu {
    /// pCPU it last ran on (as of the last affinity read).
    pub cpu: u32,
    /// Live affinity as of the last read or pin.
    pub affinity: Vec<u32>,
    /// The last pin this daemon applied.
    pub last_set: Option<Vec<u32>>,
    /// Somebody else re-pinned it: left alone until then.
    pub hold_until: Option<Instant>,
    /// A skipped pin during the hold was already logged.
    pub hold_logged: bool,
    /// Affinity before the daemon first pinned it (for restore).
    pub original: Option<Vec<u32>>,
}

/// What an affinity audit found on one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AuditEvent {
    /// The external-pin hold ran out: the daemon manages the vCPU again,
    /// starting from the affinity it has now.
    HoldExpired,
    /// The live affinity is not the daemon's last pin: somebody else
    /// re-pinned it, and it is held.
    RepinnedExternally {
        /// The daemon's last pin.
        ours: Vec<u32>,
        /// The live affinity.
        live: Vec<u32>,
    },
}

impl KnownVcpu {
    /// Held for an external pin at `now`: the daemon's pins are skipped.
    pub fn held(&self, now: Instant) -> bool {
        self.hold_until.is_some_and(|until| now < until)
    }

    /// The daemon pinned it to `cpus`. The affinity before the daemon's
    /// first pin is kept for restore.
    pub fn pinned(&mut self, cpus: &[u32]) {
        if self.original.is_none() && self.last_set.is_none() {
            self.original = Some(self.affinity.clone());
        }
        self.affinity = cpus.to_vec();
        self.last_set = Some(cpus.to_vec());
        self.cpu = cpus.first().copied().unwrap_or(self.cpu);
    }

    /// Takes a live placement read by an audit; a live affinity that is not
    /// the daemon's last pin starts a hold of `hold`, and the
    /// administrator's pin is what stays, even on restore.
    fn audit(&mut self, live: Placement, now: Instant, hold: Duration) -> Option<AuditEvent> {
        let Placement { cpu, affinity } = live;
        self.cpu = cpu;
        let mut event = None;
        if self.hold_until.is_some_and(|until| now >= until) {
            self.hold_until = None;
            self.hold_logged = false;
            self.last_set = Some(affinity.clone());
            event = Some(AuditEvent::HoldExpired);
        }
        if let Some(last) = &self.last_set {
            if *last != affinity && self.hold_until.is_none() {
                event = Some(AuditEvent::RepinnedExternally { ours: last.clone(), live: affinity.clone() });
                self.hold_until = Some(now + hold);
                self.original = None;
            }
        }
        self.affinity = affinity;
        event
    }
}

/// Previous sample of a domain: what the next quantum's deltas subtract.
#[derive(Clone, Debug)]
struct Baseline {
    at: Instant,
    vcpus: BTreeMap<u32, VcpuCounters>,
    swap_in: Option<u64>,
    swap_out: Option<u64>,
    major: Option<u64>,
}

/// A balloon on its way to a new target. Until it got there (and the guest
/// reported stats once more), `balloon.current` and the guest's free figures
/// describe different moments; mixing them made `used` wrong by the whole
/// step, and the memory policy undo a growth the next quantum.
#[derive(Clone, Copy, Debug)]
struct Settling {
    target_kib: u64,
    since: Instant,
    arrived: Option<Instant>,
}

/// The guest's own memory figures (balloon driver), and how old they were
/// when last seen: carried over quanta in which the domain did not report
/// them (its monitor busy), ageing, so the guard can tell.
#[derive(Clone, Copy, Debug)]
struct GuestFigures {
    unused_kib: Option<u64>,
    available_kib: Option<u64>,
    usable_kib: Option<u64>,
    /// Age at `seen` (from `balloon.last-update`), ms.
    age_ms: u64,
    seen: Instant,
}

/// What restore puts back for one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct RestorePlan {
    /// (vCPU, original affinity) of every vCPU the daemon pinned and nobody
    /// else re-pinned.
    pub pins: Vec<(u32, Vec<u32>)>,
    /// The balloon target at first sight, if the daemon changed it.
    pub target_kib: Option<u64>,
}

/// What the backend knows of one domain.
#[derive(Debug)]
pub(super) struct KnownDomain {
    /// Its name (may change across a restart; the UUID does not).
    pub name: String,
    /// Domain id: a new one means the domain restarted.
    pub id: Option<u32>,
    /// Opted out (config or metadata): never touched, not observed.
    pub excluded: bool,
    /// Tags from its metadata.
    pub tags: Vec<String>,
    /// Balloon autodeflate is on.
    pub autodeflate: bool,
    /// The balloon's free page reporting is on.
    pub free_page_reporting: bool,
    /// vCPU count at discovery; a change triggers a new discovery.
    pub nvcpus: u32,
    /// Its vCPUs, by number.
    pub vcpus: BTreeMap<u32, KnownVcpu>,
    /// The last sample, for deltas.
    prev: Option<Baseline>,
    /// Balloon target at first sight (restored if the daemon changed it).
    original_target_kib: Option<u64>,
    /// The daemon changed the balloon target.
    memory_changed: bool,
    /// Quantum of the last affinity read.
    pub audited: u64,
    /// A balloon target set by the daemon that the balloon has not settled on.
    settling: Option<Settling>,
    /// The guest's last reported memory figures.
    figures: Option<GuestFigures>,
    /// Its monitor has been busy this long (set by the backend each
    /// quantum): no action is sent to it.
    pub not_answering: Option<Duration>,
}

impl KnownDomain {
    /// A domain at first sight: no sample yet, vCPUs to be read, the
    /// current balloon size remembered for restore.
    pub fn first_sight(name: &str, id: Option<u32>, xml: DomainXml, nvcpus: u32, target_kib: Option<u64>, quantum: u64) -> Self {
        let DomainXml { excluded, tags, autodeflate, free_page_reporting } = xml;
        KnownDomain {
            name: name.to_string(),
            id,
            excluded,
            tags,
            autodeflate,
            free_page_reporting,
            nvcpus,
            vcpus: BTreeMap::new(),
            prev: None,
            original_target_kib: target_kib,
            memory_changed: false,
            audited: quantum,
            settling: None,
            figures: None,
            not_answering: None,
        }
    }

    /// What a restart must restore, for the state dir: the original of each
    /// vCPU the daemon pinned, and the balloon target at first sight.
    pub fn stored(&self) -> crate::persist::StoredDomain {
        crate::persist::StoredDomain {
            name: self.name.clone(),
            id: self.id,
            vcpus: self
                .vcpus
                .iter()
                .filter(|(_, v)| v.last_set.is_some() && v.hold_until.is_none())
                .filter_map(|(n, v)| v.original.clone().map(|o| (*n, o)))
                .collect(),
            target_kib: self.original_target_kib,
        }
    }

    /// Takes the originals an earlier daemon stored for this incarnation of
    /// the domain: its vCPUs' live affinity is that daemon's pin (so it is
    /// "ours", not an administrator's), and its balloon target is restored.
    pub fn adopt(&mut self, stored: &crate::persist::StoredDomain) {
        for (n, original) in &stored.vcpus {
            if let Some(v) = self.vcpus.get_mut(n) {
                v.original = Some(original.clone());
                v.last_set = Some(v.affinity.clone());
            }
        }
        if stored.target_kib.is_some() {
            self.original_target_kib = stored.target_kib;
            self.memory_changed = true;
        }
    }

    /// A balloon target set by the daemon is still on its way: its figures
    /// are refreshed every quantum until it has settled.
    pub fn is_settling(&self) -> bool {
        self.settling.is_some()
    }

    /// The guest has reported its memory figures at least once.
    pub fn has_guest_figures(&self) -> bool {
        self.figures.is_some()
    }

    /// What the XML said (kept across re-discoveries of the same run).
    pub fn xml(&self) -> DomainXml {
        DomainXml {
            excluded: self.excluded,
            tags: self.tags.clone(),
            autodeflate: self.autodeflate,
            free_page_reporting: self.free_page_reporting,
        }
    }

    /// Drops the last sample: the next quantum has no deltas (a new vCPU
    /// count, or a connection that was lost).
    pub fn forget_sample(&mut self) {
        self.prev = None;
    }

    /// An affinity audit is due at `quantum` (every `every` quanta, ≥ 1).
    pub fn audit_due(&self, quantum: u64, every: u64) -> bool {
        !self.excluded && quantum.saturating_sub(self.audited) >= every.max(1)
    }

    /// Takes the live placements of an audit at `quantum`; returns what
    /// changed, by vCPU, in vCPU order.
    pub fn audit(&mut self, live: BTreeMap<u32, Placement>, now: Instant, hold: Duration, quantum: u64) -> Vec<(u32, AuditEvent)> {
        self.audited = quantum;
        let mut events = Vec::new();
        for (n, placement) in live {
            let Some(v) = self.vcpus.get_mut(&n) else { continue };
            if let Some(event) = v.audit(placement, now, hold) {
                events.push((n, event));
            }
        }
        events
    }

    /// The daemon set the balloon target: until the balloon gets there the
    /// domain is reported at the target without guest free figures.
    pub fn ballooning(&mut self, target_kib: u64, now: Instant) {
        self.memory_changed = true;
        self.settling = Some(Settling { target_kib, since: now, arrived: None });
    }

    /// What restore puts back.
    pub fn restore_plan(&self) -> RestorePlan {
        let pins = self
            .vcpus
            .iter()
            .filter(|(_, v)| v.last_set.is_some() && v.hold_until.is_none())
            .filter_map(|(n, v)| v.original.clone().map(|o| (*n, o)))
            .collect();
        RestorePlan { pins, target_kib: self.original_target_kib.filter(|_| self.memory_changed) }
    }

    /// Builds the observed domain from `sample` taken at `now` (`epoch_s`
    /// on the wall clock, which `balloon.last-update` is on) and makes the
    /// sample the baseline of the next quantum. Usage and steal are deltas
    /// over wall time; without a baseline, or when a counter went
    /// backwards, there is no data this quantum (usage 0, no steal). An
    /// excluded domain only advances its baseline. Guest figures missing
    /// from the sample (a busy monitor) are the last ones seen, aged.
    pub fn observe(&mut self, uuid: &str, sample: &DomainSample, now: Instant) -> Option<Domain> {
        let epoch_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.observe_at(uuid, sample, now, epoch_s)
    }

    /// [`Self::observe`] with the wall clock given (tests).
    pub fn observe_at(&mut self, uuid: &str, sample: &DomainSample, now: Instant, epoch_s: u64) -> Option<Domain> {
        let balloon = |k: &str| sample.balloon(k);
        let baseline = Baseline {
            at: now,
            vcpus: sample.vcpus.clone(),
            swap_in: balloon("swap_in"),
            swap_out: balloon("swap_out"),
            major: balloon("major_fault"),
        };
        let prev = self.prev.replace(baseline);
        if self.excluded {
            return None;
        }
        let wall_ns = prev.as_ref().map(|p| now.duration_since(p.at).as_nanos() as f64).filter(|w| *w > 0.0);
        let delta = |new: Option<u64>, old: Option<u64>| match (new, old) {
            (Some(n), Some(o)) => n.checked_sub(o),
            _ => None,
        };
        let mut vcpus = Vec::new();
        for (n, v) in &self.vcpus {
            let counters = sample.vcpus.get(n).copied().unwrap_or_default();
            let old = prev.as_ref().and_then(|p| p.vcpus.get(n)).copied().unwrap_or_default();
            let (usage, steal) = match wall_ns {
                Some(wall) => {
                    let usage = delta(counters.time, old.time).map(|d| (d as f64 / wall).clamp(0.0, 1.0) as f32);
                    let steal = delta(counters.delay, old.delay).map(|d| (d as f64 / wall).clamp(0.0, 1.0) as f32);
                    // A counter that went backwards: no data this quantum.
                    (usage.unwrap_or(0.0), usage.and(steal))
                }
                None => (0.0, None),
            };
            vcpus.push(Vcpu { id: *n, cpu: v.cpu, affinity: v.affinity.as_slice().into(), usage, steal });
        }
        let actual = balloon("current").unwrap_or(0);
        // While a balloon moves, report the target it moves to and no guest
        // free figures (the guard then refuses to shrink it further).
        let mut moving = None;
        if let Some(mut settle) = self.settling.take() {
            let arrived_before = settle.arrived.is_some();
            if settle.arrived.is_none() && actual.abs_diff(settle.target_kib) <= 1024 {
                settle.arrived = Some(now);
            }
            if !arrived_before && now.duration_since(settle.since) < SETTLE_TIMEOUT {
                moving = Some(settle.target_kib);
                self.settling = Some(settle);
            }
        }
        let reported = ["unused", "available", "usable"].iter().any(|k| balloon(k).is_some());
        if reported {
            self.figures = Some(GuestFigures {
                unused_kib: balloon("unused"),
                available_kib: balloon("available"),
                usable_kib: balloon("usable"),
                age_ms: balloon("last-update").map_or(0, |at| epoch_s.saturating_sub(at).saturating_mul(1000)),
                seen: now,
            });
        }
        let figures = self.figures.filter(|_| moving.is_none());
        let age_ms = figures.map_or(0, |f| f.age_ms.saturating_add(now.duration_since(f.seen).as_millis() as u64));
        let memory = DomainMemory {
            max_kib: balloon("maximum").unwrap_or(0),
            target_kib: moving.unwrap_or(actual),
            unused_kib: figures.and_then(|f| f.unused_kib),
            available_kib: figures.and_then(|f| f.available_kib),
            usable_kib: figures.and_then(|f| f.usable_kib),
            rss_kib: balloon("rss"),
            swap_in_kib: delta(balloon("swap_in"), prev.as_ref().and_then(|p| p.swap_in)),
            swap_out_kib: delta(balloon("swap_out"), prev.as_ref().and_then(|p| p.swap_out)),
            major_faults: delta(balloon("major_fault"), prev.as_ref().and_then(|p| p.major)),
            autodeflate: self.autodeflate,
            free_page_reporting: self.free_page_reporting,
            age_ms,
        };
        let not_answering_ms = self.not_answering.map_or(0, |busy| (busy.as_millis() as u64).max(1));
        Some(Domain { name: self.name.clone(), uuid: uuid.to_string(), tags: self.tags.clone(), vcpus, memory, not_answering_ms })
    }
}

/// Every domain the backend knows, by UUID (stable across restarts, which
/// the domain id tells apart), and the name each action names it by.
#[derive(Debug, Default)]
pub(super) struct Domains {
    by_uuid: HashMap<String, KnownDomain>,
    by_name: HashMap<String, String>,
}

impl Domains {
    /// The domain with `uuid`.
    pub fn get(&self, uuid: &str) -> Option<&KnownDomain> {
        self.by_uuid.get(uuid)
    }

    /// The domain with `uuid`, to update.
    pub fn get_mut(&mut self, uuid: &str) -> Option<&mut KnownDomain> {
        self.by_uuid.get_mut(uuid)
    }

    /// The UUID of the domain last seen as `name`.
    pub fn uuid_of(&self, name: &str) -> Option<&String> {
        self.by_name.get(name)
    }

    /// Every known UUID.
    pub fn uuids(&self) -> Vec<String> {
        self.by_uuid.keys().cloned().collect()
    }

    /// Takes a domain out to rediscover it; [`Self::insert`] puts it back.
    pub fn take(&mut self, uuid: &str) -> Option<KnownDomain> {
        self.by_uuid.remove(uuid)
    }

    /// (Re)inserts a domain under its UUID and current name.
    pub fn insert(&mut self, uuid: &str, domain: KnownDomain) {
        self.by_name.insert(domain.name.clone(), uuid.to_string());
        self.by_uuid.insert(uuid.to_string(), domain);
    }

    /// Removes the domains not in `seen` (gone since the last quantum), and
    /// their names unless another domain took the name since.
    pub fn remove_gone(&mut self, seen: &HashSet<String>) -> Vec<KnownDomain> {
        let gone: Vec<String> = self.by_uuid.keys().filter(|u| !seen.contains(*u)).cloned().collect();
        let mut removed = Vec::new();
        for uuid in gone {
            if let Some(domain) = self.by_uuid.remove(&uuid) {
                if self.by_name.get(&domain.name) == Some(&uuid) {
                    self.by_name.remove(&domain.name);
                }
                removed.push(domain);
            }
        }
        removed
    }

    /// After a reconnect: deltas across an outage are meaningless, and ids
    /// are re-read so that every domain is rediscovered.
    pub fn forget_samples(&mut self) {
        for domain in self.by_uuid.values_mut() {
            domain.prev = None;
            domain.id = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_vcpu_domain() -> KnownDomain {
        let mut d = KnownDomain::first_sight("d", Some(1), DomainXml::default(), 1, Some(262144), 0);
        d.vcpus.insert(0, KnownVcpu::default());
        d
    }

    fn sample(fields: &[(&str, i128)]) -> DomainSample {
        DomainSample::from_numbers(fields.iter().map(|(f, v)| (f.to_string(), *v)))
    }

    #[test]
    fn samples_take_the_fields_they_know() {
        let s = sample(&[
            ("state.state", 1),
            ("vcpu.current", 1),
            ("vcpu.0.time", 5),
            ("vcpu.0.delay", 7),
            ("vcpu.0.wait", 9),
            ("balloon.current", 262144),
            ("balloon.swap_in", -1),
            ("cpu.time", 3),
        ]);
        assert!(s.is_active());
        assert_eq!(s.vcpu_current, Some(1));
        assert_eq!(s.vcpus[&0], VcpuCounters { time: Some(5), delay: Some(7) });
        assert_eq!(s.balloon["current"], 262144);
        assert_eq!(s.balloon.len(), 1, "negative counters are dropped: {:?}", s.balloon);
        assert!(!sample(&[("state.state", 5)]).is_active(), "shut off");
        assert!(!sample(&[]).is_active(), "no state");
    }

    #[test]
    fn counters_going_backwards_give_no_data() {
        let mut d = one_vcpu_domain();
        let t0 = Instant::now();
        let first = d
            .observe("u", &sample(&[("vcpu.current", 1), ("vcpu.0.time", 5), ("vcpu.0.delay", 7), ("balloon.current", 262144)]), t0)
            .unwrap();
        assert_eq!((first.vcpus[0].usage, first.vcpus[0].steal), (0.0, None), "no baseline yet");
        let d1 = d.observe("u", &sample(&[("vcpu.0.time", 1)]), t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((d1.vcpus[0].usage, d1.vcpus[0].steal), (0.0, None));
        let d2 =
            d.observe("u", &sample(&[("vcpu.0.time", 500_000_001), ("vcpu.0.delay", 250_000_000)]), t0 + Duration::from_secs(2)).unwrap();
        assert!((d2.vcpus[0].usage - 0.5).abs() < 1e-3, "{d2:?}");
        assert_eq!(d2.vcpus[0].steal, None, "no delay in the previous sample");
        let d3 =
            d.observe("u", &sample(&[("vcpu.0.time", 600_000_001), ("vcpu.0.delay", 500_000_000)]), t0 + Duration::from_secs(3)).unwrap();
        assert!((d3.vcpus[0].usage - 0.1).abs() < 1e-3 && d3.vcpus[0].steal.is_some_and(|s| (s - 0.25).abs() < 1e-3), "{d3:?}");
    }

    #[test]
    fn memory_counters_are_deltas_and_gauges_pass_through() {
        let mut d = one_vcpu_domain();
        let t0 = Instant::now();
        let fields = |swap_in, faults| {
            sample(&[
                ("balloon.current", 262144),
                ("balloon.maximum", 393216),
                ("balloon.unused", 1000),
                ("balloon.swap_in", swap_in),
                ("balloon.major_fault", faults),
            ])
        };
        let m0 = d.observe("u", &fields(10, 3), t0).unwrap().memory;
        assert_eq!((m0.target_kib, m0.max_kib, m0.unused_kib, m0.swap_in_kib, m0.major_faults), (262144, 393216, Some(1000), None, None));
        let m1 = d.observe("u", &fields(15, 2), t0 + Duration::from_secs(1)).unwrap().memory;
        assert_eq!((m1.swap_in_kib, m1.major_faults), (Some(5), None), "faults went backwards");
    }

    #[test]
    fn a_moving_balloon_is_reported_at_its_target_without_guest_figures() {
        let mut d = one_vcpu_domain();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let balloon = |current: i128| sample(&[("balloon.current", current), ("balloon.unused", 5000)]);
        d.ballooning(200_000, t0);
        let moving = d.observe("u", &balloon(262144), at(1)).unwrap().memory;
        assert_eq!((moving.target_kib, moving.unused_kib), (200_000, None));
        let arrived = d.observe("u", &balloon(200_500), at(2)).unwrap().memory;
        assert_eq!((arrived.target_kib, arrived.unused_kib), (200_000, None), "arrived this quantum: the guest has not reported since");
        let settled = d.observe("u", &balloon(200_500), at(3)).unwrap().memory;
        assert_eq!((settled.target_kib, settled.unused_kib), (200_500, Some(5000)));

        d.ballooning(100_000, at(3));
        let stuck = d.observe("u", &balloon(200_500), at(9)).unwrap().memory;
        assert_eq!((stuck.target_kib, stuck.unused_kib), (200_500, Some(5000)), "after the settle timeout the actual size is taken");
    }

    /// Issue 11: figures the guest stopped reporting (`balloon.last-update`
    /// standing still) or that a busy monitor did not send age, and are
    /// carried with their age rather than dropped or passed off as fresh.
    #[test]
    fn guest_figures_age_when_the_guest_or_its_monitor_goes_quiet() {
        let mut d = one_vcpu_domain();
        let t0 = Instant::now();
        let full =
            |last_update: i128| sample(&[("balloon.current", 262144), ("balloon.unused", 5000), ("balloon.last-update", last_update)]);
        let m = d.observe_at("u", &full(1000), t0, 1001).unwrap().memory;
        assert_eq!((m.unused_kib, m.age_ms), (Some(5000), 1000));
        let m = d.observe_at("u", &full(1000), t0 + Duration::from_secs(9), 1010).unwrap().memory;
        assert_eq!(m.age_ms, 10_000, "the guest stopped reporting: last-update stands still");
        let m = d.observe_at("u", &full(1011), t0 + Duration::from_secs(10), 1011).unwrap().memory;
        assert_eq!(m.age_ms, 0);
        // A busy monitor: the record has no guest figures; the last ones are
        // reported, aged by the time since they came.
        let m = d.observe_at("u", &sample(&[("balloon.current", 262144)]), t0 + Duration::from_secs(13), 1014).unwrap().memory;
        assert_eq!((m.unused_kib, m.age_ms), (Some(5000), 3000));
        d.not_answering = Some(Duration::from_secs(4));
        assert_eq!(d.observe_at("u", &sample(&[]), t0 + Duration::from_secs(14), 1015).unwrap().not_answering_ms, 4000);
    }

    #[test]
    fn an_external_pin_is_held_and_survives_restore() {
        let mut d = one_vcpu_domain();
        d.vcpus.insert(1, KnownVcpu::default());
        let t0 = Instant::now();
        let hold = Duration::from_secs(300);
        for (n, v) in d.vcpus.iter_mut() {
            v.affinity = vec![0, 1, 2, 3];
            v.pinned(&[*n]);
        }
        assert_eq!(d.vcpus[&0].original.as_deref(), Some(&[0, 1, 2, 3][..]));
        let live = |cpu1: Vec<u32>| {
            BTreeMap::from([(0, Placement { cpu: 0, affinity: vec![0] }), (1, Placement { cpu: cpu1[0], affinity: cpu1 })])
        };
        assert!(d.audit(live(vec![1]), t0, hold, 5).is_empty(), "both where the daemon put them");
        assert_eq!(d.audited, 5);
        let events = d.audit(live(vec![3]), t0, hold, 10);
        assert_eq!(events, [(1, AuditEvent::RepinnedExternally { ours: vec![1], live: vec![3] })]);
        assert!(d.vcpus[&1].held(t0) && !d.vcpus[&0].held(t0));
        assert_eq!(d.vcpus[&1].affinity, [3]);
        d.ballooning(100_000, t0);
        assert_eq!(
            d.restore_plan(),
            RestorePlan { pins: vec![(0, vec![0, 1, 2, 3])], target_kib: Some(262144) },
            "the administrator's pin stays, the daemon's balloon change is undone"
        );
        assert!(d.audit(live(vec![3]), t0 + hold / 2, hold, 15).is_empty(), "still held, no new event");
        let events = d.audit(live(vec![2]), t0 + hold, hold, 20);
        assert_eq!(events, [(1, AuditEvent::HoldExpired)]);
        assert!(!d.vcpus[&1].held(t0 + hold) && d.vcpus[&1].last_set.as_deref() == Some(&[2][..]));
    }

    #[test]
    fn an_excluded_domain_only_advances_its_baseline() {
        let mut d = KnownDomain::first_sight("x", Some(1), DomainXml { excluded: true, ..DomainXml::default() }, 1, None, 0);
        assert!(d.observe("u", &sample(&[("vcpu.0.time", 5)]), Instant::now()).is_none());
        assert!(d.prev.is_some());
        assert!(!d.audit_due(100, 1));
    }

    #[test]
    fn gone_domains_free_their_name_unless_it_was_reused() {
        let mut domains = Domains::default();
        domains.insert("u1", KnownDomain::first_sight("a", Some(1), DomainXml::default(), 1, None, 0));
        domains.insert("u2", KnownDomain::first_sight("b", Some(2), DomainXml::default(), 1, None, 0));
        // "a" restarted under a new UUID before the old one was seen gone.
        domains.insert("u3", KnownDomain::first_sight("a", Some(3), DomainXml::default(), 1, None, 0));
        let gone = domains.remove_gone(&HashSet::from(["u2".to_string(), "u3".to_string()]));
        assert_eq!(gone.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(domains.uuid_of("a").map(String::as_str), Some("u3"));
        let gone = domains.remove_gone(&HashSet::from(["u3".to_string()]));
        assert_eq!(gone.len(), 1);
        assert_eq!(domains.uuid_of("b"), None);
        domains.get_mut("u3").unwrap().observe("u3", &sample(&[]), Instant::now());
        domains.forget_samples();
        assert!(domains.get("u3").is_some_and(|d| d.prev.is_none() && d.id.is_none()));
    }
}
