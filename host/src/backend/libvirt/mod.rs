//! The libvirt backend: observes and acts on a real hypervisor through the
//! `virt` crate (0.4.3, whose libc requirement resolves with wasmtime 48).
//!
//! Why it is built this way:
//! - **One bulk stats call per quantum.** `virConnectGetAllDomainStats` with
//!   the state, cpu-total, vcpu and balloon groups returns every running
//!   domain in one round trip (the original asked each domain separately).
//!   `virt` does not free those records, so they are read through `virt::sys`
//!   and released with `virDomainStatsRecordListFree` by an RAII guard
//!   (`ffi::StatsList`), even when parsing bails out early.
//! - **Usage is a delta.** libvirt reports cumulative counters (ns of vCPU
//!   time and run-queue delay, KiB swapped, faults). The backend keeps the
//!   previous sample of each domain, keyed by UUID *and* domain id, so a
//!   restarted domain, a changed vCPU count or a counter that went backwards
//!   gives "no data this quantum" (usage 0, no steal) instead of garbage.
//! - **Per-domain calls only when something is new.** The first time a
//!   domain is seen (or its vCPU count changes) the backend reads its XML
//!   (opt-out metadata, tags, balloon autodeflate), sets the balloon stats
//!   period, reads where each vCPU runs and pins it there (so the kernel
//!   does not move vCPUs behind the policy's back), and remembers the
//!   original affinity and balloon target for [`Backend::restore`]. Every
//!   `audit_every` quanta it re-reads live vCPU affinity (one call per
//!   managed domain) to notice administrators' pin changes; in between, the
//!   affinity reported is the one the daemon set. Amortised, collection costs
//!   1 bulk call + host stats + `domains / audit_every` calls.
//! - **A moving balloon has no guest figures.** After a balloon target is
//!   set, `balloon.current` (the actual size) and the guest's free figures
//!   lag it by different amounts; until the balloon has arrived and the guest
//!   reported once more (at most 5 s), the domain is reported at its new
//!   target without free figures, so `used = target - free` is never computed
//!   from two different moments (that made the policy undo its own growth).
//! - **External pins win.** If the live affinity differs from the last pin
//!   the daemon set, that vCPU is *held* for `external_pin_hold`: it is
//!   reported with its real affinity, pins of it are skipped (logged once),
//!   and restore leaves it as the administrator set it.
//! - **Opt-out.** A domain whose name or UUID matches `[exclude]`, or whose
//!   XML carries `<vmb:balancer xmlns:vmb="https://vm-balancer.invalid/1"
//!   exclude="yes"/>` in `<metadata>` ([`METADATA_URI`]), is never touched
//!   and left out of the observation; host CPU usage (from the host's own
//!   counters) still includes its load. The same element's `tags="a,b"`
//!   attribute becomes the domain's tags.
//! - **libvirtd may go away.** A failed bulk call on a dead connection drops
//!   it; `collect` then reconnects with exponential backoff (1 s .. 30 s),
//!   logging the outage once, and returns a typed error meanwhile so the
//!   daemon loop carries on.
//! - **Host figures.** On a local `qemu:///` connection host CPU usage and
//!   `MemAvailable` come from `/proc` (no libvirt call, and `MemAvailable` is
//!   what the guard's reserve means); on a remote one, from
//!   `virNodeGetCPUStats` per CPU and `virNodeGetMemoryStats`.
//!
//! Layout, one concern per file:
//! - `mod.rs` (this file): [`LibvirtBackend`], the connection and its
//!   reconnect backoff, and the [`Backend`] impl — the libvirt calls and
//!   their order;
//! - `crate::ffi` (`host/src/ffi.rs`, the daemon's one home of `unsafe`):
//!   every call into `virt::sys`, behind safe functions (the bulk stats list
//!   that frees itself, typed parameters, the node CPU map, node CPU and
//!   memory stats, `virDomainGetVcpus`), so that nothing else handles a raw
//!   pointer;
//! - `state.rs`: what is remembered of each domain between quanta (previous
//!   samples, originals for restore, external-pin holds, a balloon in
//!   flight) and the delta maths, as pure methods tested without libvirt;
//! - `host.rs`: host CPU and memory figures, from `/proc` or libvirt;
//! - `xml.rs`: the scan of a domain's XML (opt-out, tags, autodeflate).

mod host;
mod state;
mod xml;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirDomain;
use virt::error::{Error as VirError, ErrorNumber};

use self::host::HostState;
use self::state::{AuditEvent, DomainSample, Domains, KnownDomain, Placement};
pub use self::xml::{parse_domain_xml, DomainXml, METADATA_URI};
use super::{Backend, BackendError, Observation};
use crate::config::Exclude;
use crate::ffi::{self, StatsList};

/// Longest reconnect backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How the backend connects and behaves.
#[derive(Clone, Debug)]
pub struct LibvirtOptions {
    /// libvirt URI, e.g. `qemu:///system` or `qemu+ssh://host/system`.
    pub uri: String,
    /// Domains never touched (config `[exclude]`).
    pub exclude: Exclude,
    /// Re-read live vCPU affinity every this many quanta (≥ 1).
    pub audit_every: u64,
    /// How long a vCPU re-pinned by someone else is left alone.
    pub external_pin_hold: Duration,
    /// Balloon stats period set on new domains, seconds (0 = leave alone).
    pub stats_period_s: i32,
    /// Observe only: no first-sight pins, no stats period, no actions
    /// (`--dry-run` and `vm-balancer snapshot`).
    pub read_only: bool,
}

impl LibvirtOptions {
    /// Defaults for `uri`.
    pub fn new(uri: &str) -> Self {
        LibvirtOptions {
            uri: uri.to_string(),
            exclude: Exclude::default(),
            audit_every: 5,
            external_pin_hold: Duration::from_secs(300),
            stats_period_s: 1,
            read_only: false,
        }
    }
}

/// The libvirt backend.
pub struct LibvirtBackend {
    options: LibvirtOptions,
    conn: Option<Connect>,
    next_connect: Instant,
    backoff: Duration,
    outage_logged: bool,
    /// Host CPUs and their last times.
    host: HostState,
    domains: Domains,
    quantum: u64,
    calls: u64,
    last_collect: Duration,
    /// The driver refuses AFFECT_LIVE (test driver): use AFFECT_CURRENT.
    flags_unsupported: bool,
}

fn hypervisor(uri: &str, operation: &'static str, error: VirError) -> BackendError {
    BackendError::Hypervisor { uri: uri.to_string(), operation, source: error }
}

fn unsupported_flags(error: &VirError) -> bool {
    error.message().contains("unsupported flags")
}

fn is_gone(error: &VirError) -> bool {
    matches!(error.code(), ErrorNumber::NoDomain | ErrorNumber::OperationInvalid)
}

impl LibvirtBackend {
    /// A backend for `options`; connects now, or on the first `collect`.
    pub fn new(options: LibvirtOptions) -> Self {
        let mut backend = LibvirtBackend::unconnected(options);
        let _ = backend.ensure_connected();
        backend
    }

    /// Connects, or fails with libvirt's reason, naming the URI (the first
    /// attempt is this one, so its error is the real cause, not "next
    /// attempt in 1 s").
    pub fn connect(options: LibvirtOptions) -> Result<Self, BackendError> {
        let mut backend = LibvirtBackend::unconnected(options);
        backend.ensure_connected()?;
        Ok(backend)
    }

    fn unconnected(options: LibvirtOptions) -> Self {
        virt::error::clear_error_callback();
        LibvirtBackend {
            options,
            conn: None,
            next_connect: Instant::now(),
            backoff: Duration::from_secs(1),
            outage_logged: false,
            host: HostState::default(),
            domains: Domains::default(),
            quantum: 0,
            calls: 0,
            last_collect: Duration::ZERO,
            flags_unsupported: false,
        }
    }

    /// libvirt calls made so far (the benchmark's figure).
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Wall time of the last `collect`.
    pub fn last_collect(&self) -> Duration {
        self.last_collect
    }

    fn local_procfs(&self) -> bool {
        self.options.uri.starts_with("qemu:///")
    }

    fn ensure_connected(&mut self) -> Result<&Connect, BackendError> {
        if self.conn.is_none() {
            let now = Instant::now();
            if now < self.next_connect {
                return Err(BackendError::NotConnected { uri: self.options.uri.clone(), retry_in: self.next_connect - now });
            }
            self.calls += 1;
            match Connect::open(Some(&self.options.uri)) {
                Ok(conn) => {
                    if self.outage_logged {
                        tracing::warn!(uri = %self.options.uri, "reconnected to libvirt");
                    } else {
                        tracing::info!(uri = %self.options.uri, "connected to libvirt");
                    }
                    self.outage_logged = false;
                    self.backoff = Duration::from_secs(1);
                    self.host.connected(&conn, &mut self.calls);
                    self.domains.forget_samples();
                    self.conn = Some(conn);
                }
                Err(error) => {
                    if !self.outage_logged {
                        tracing::error!(uri = %self.options.uri, %error, "cannot connect to libvirt; retrying with backoff");
                        self.outage_logged = true;
                    } else {
                        tracing::debug!(uri = %self.options.uri, %error, "reconnect failed");
                    }
                    self.next_connect = now + self.backoff;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return Err(hypervisor(&self.options.uri, "connect", error));
                }
            }
        }
        Ok(self.conn.as_ref().expect("connected above"))
    }

    /// Drops a connection that failed, if it is dead.
    fn check_alive(&mut self) {
        let alive = self.conn.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false));
        if !alive {
            if let Some(mut conn) = self.conn.take() {
                let _ = conn.close();
            }
            if !self.outage_logged {
                tracing::error!(uri = %self.options.uri, "lost the libvirt connection; reconnecting with backoff");
                self.outage_logged = true;
            }
            self.next_connect = Instant::now();
        }
    }

    /// Live pin. Drivers that take no flags (libvirt's test driver) get
    /// AFFECT_CURRENT, which is the live definition for a running domain.
    fn pin_live(&mut self, dom: &VirDomain, vcpu: u32, map: &[u8]) -> Result<(), VirError> {
        self.calls += 1;
        if !self.flags_unsupported {
            match dom.pin_vcpu_flags(vcpu, map, ffi::AFFECT_LIVE) {
                Err(e) if unsupported_flags(&e) => self.flags_unsupported = true,
                other => return other.map(drop),
            }
            self.calls += 1;
        }
        dom.pin_vcpu_flags(vcpu, map, 0).map(drop)
    }

    /// Live balloon target (same fallback as [`Self::pin_live`]).
    fn set_memory_live(&mut self, dom: &VirDomain, target_kib: u64) -> Result<(), VirError> {
        self.calls += 1;
        if !self.flags_unsupported {
            match dom.set_memory_flags(target_kib, ffi::MEM_LIVE) {
                Err(e) if unsupported_flags(&e) => self.flags_unsupported = true,
                other => return other.map(drop),
            }
            self.calls += 1;
        }
        dom.set_memory_flags(target_kib, 0).map(drop)
    }

    /// A cpumap of `cpus` covering every host CPU.
    fn cpumap(&self, cpus: &[u32]) -> Vec<u8> {
        ffi::cpumap(cpus, self.host.maplen())
    }

    /// Live placement of each vCPU: one virDomainGetVcpus call.
    fn read_vcpus(&mut self, dom: &VirDomain, nvcpus: u32) -> Result<BTreeMap<u32, Placement>, VirError> {
        let maplen = self.host.maplen();
        self.calls += 1;
        let vcpus = ffi::domain_vcpus(dom, nvcpus.max(1) as usize, maplen)?;
        Ok(vcpus
            .into_iter()
            .map(|v| {
                let cpu = v.cpu.unwrap_or_else(|| v.affinity.first().copied().unwrap_or(0));
                (v.number, Placement { cpu, affinity: v.affinity })
            })
            .collect())
    }

    /// Reads the opt-out element, tags and autodeflate from the live XML.
    fn read_xml(&mut self, dom: &VirDomain) -> DomainXml {
        self.calls += 1;
        let Ok(xml) = dom.get_xml_desc(0) else { return DomainXml::default() };
        parse_domain_xml(&xml)
    }

    /// First sight of a domain (or of a changed vCPU count): read XML, set
    /// the stats period, pin every vCPU where it runs.
    fn discover(&mut self, uuid: &str, name: &str, dom: &VirDomain, sample: &DomainSample) {
        let id = dom.get_id();
        let nvcpus = match sample.vcpu_current {
            Some(n) => n,
            None => {
                self.calls += 1;
                dom.get_info().map(|i| i.nr_virt_cpu).unwrap_or(sample.vcpus.len() as u32)
            }
        };
        let known = self.domains.get(uuid).filter(|d| d.id == id).map(KnownDomain::xml);
        let xml = match known {
            Some(xml) => xml,
            None => {
                let mut xml = self.read_xml(dom);
                xml.excluded = xml.excluded || self.options.exclude.matches(name, uuid);
                xml
            }
        };
        let excluded = xml.excluded;
        let previous = self.domains.take(uuid).filter(|d| d.id == id);
        let first_sight = previous.is_none();
        let mut state = previous
            .unwrap_or_else(|| KnownDomain::first_sight(name, id, xml, nvcpus, sample.balloon.get("current").copied(), self.quantum));
        state.name = name.to_string();
        state.nvcpus = nvcpus;
        state.forget_sample();
        if first_sight {
            if excluded {
                tracing::info!(domain = name, uuid, "domain excluded (config or metadata); never touched");
            } else {
                tracing::info!(domain = name, uuid, vcpus = nvcpus, "new domain");
            }
        }
        if !excluded {
            if first_sight && !self.options.read_only && self.options.stats_period_s > 0 {
                self.calls += 1;
                if let Err(error) = dom.set_memory_stats_period(self.options.stats_period_s, ffi::AFFECT_LIVE) {
                    tracing::debug!(domain = name, %error, "cannot set the balloon stats period");
                }
            }
            match self.read_vcpus(dom, nvcpus) {
                Ok(live) => {
                    state.vcpus.retain(|n, _| live.contains_key(n));
                    for (n, Placement { cpu, affinity }) in live {
                        let known = state.vcpus.contains_key(&n);
                        let v = state.vcpus.entry(n).or_default();
                        v.cpu = cpu;
                        v.affinity = affinity;
                        if known || self.options.read_only {
                            continue;
                        }
                        // Pin a newly seen vCPU where it runs now.
                        let map = self.cpumap(&[cpu]);
                        match self.pin_live(dom, n, &map) {
                            Ok(()) => v.pinned(&[cpu]),
                            Err(error) => tracing::warn!(domain = name, vcpu = n, cpu, %error, "initial pin failed"),
                        }
                    }
                }
                Err(error) => tracing::warn!(domain = name, %error, "cannot read vCPU placement"),
            }
        }
        state.audited = self.quantum;
        self.domains.insert(uuid, state);
    }

    /// Re-reads live affinity; a vCPU whose affinity differs from the
    /// daemon's last pin is held.
    fn audit(&mut self, uuid: &str, dom: &VirDomain) {
        let Some(nvcpus) = self.domains.get(uuid).map(|d| d.nvcpus) else { return };
        let live = match self.read_vcpus(dom, nvcpus) {
            Ok(live) => live,
            Err(error) => {
                tracing::debug!(uuid, %error, "affinity audit failed");
                return;
            }
        };
        let hold = self.options.external_pin_hold;
        let state = self.domains.get_mut(uuid).expect("checked above");
        for (n, event) in state.audit(live, Instant::now(), hold, self.quantum) {
            match event {
                AuditEvent::HoldExpired => {
                    tracing::info!(domain = %state.name, vcpu = n, "external pin hold expired; the daemon manages this vCPU again");
                }
                AuditEvent::RepinnedExternally { ours, live } => tracing::info!(
                    domain = %state.name, vcpu = n, ours = ?ours, live = ?live, hold_s = hold.as_secs(),
                    "vCPU re-pinned by someone else; leaving it alone"
                ),
            }
        }
    }

    fn bulk_stats(&mut self) -> Result<StatsList, BackendError> {
        let conn = self.ensure_connected()?;
        let stats = ffi::all_domain_stats(conn);
        self.calls += 1;
        stats.map_err(|error| {
            let uri = self.options.uri.clone();
            self.check_alive();
            hypervisor(&uri, "bulk domain stats", error)
        })
    }

    /// Looks a managed domain up by name for an action.
    fn lookup(&mut self, domain: &str) -> Result<(VirDomain, String), BackendError> {
        let uuid = self.domains.uuid_of(domain).cloned();
        if let Some(state) = uuid.as_ref().and_then(|u| self.domains.get(u)) {
            if state.excluded {
                return Err(BackendError::Excluded { domain: domain.to_string() });
            }
        }
        let uri = self.options.uri.clone();
        let conn = self.ensure_connected()?;
        let found = VirDomain::lookup_by_name(conn, domain);
        self.calls += 1;
        match (found, uuid) {
            (Ok(dom), Some(uuid)) if dom.is_active().unwrap_or(false) => Ok((dom, uuid)),
            (Ok(_), _) | (Err(_), None) => Err(BackendError::DomainGone { domain: domain.to_string() }),
            (Err(error), Some(_)) if is_gone(&error) => Err(BackendError::DomainGone { domain: domain.to_string() }),
            (Err(error), Some(_)) => {
                self.check_alive();
                Err(hypervisor(&uri, "domain lookup", error))
            }
        }
    }
}

impl Backend for LibvirtBackend {
    fn collect(&mut self) -> Result<Observation, BackendError> {
        let started = Instant::now();
        let list = self.bulk_stats()?;
        let now = Instant::now();
        let samples: Vec<(VirDomain, DomainSample)> =
            list.records().map(|r| (r.domain(), DomainSample::from_numbers(r.numbers()))).collect();
        drop(list);
        let local = self.local_procfs();
        let host = self.host.observe(self.conn.as_ref(), local, &mut self.calls);
        let mut seen = HashSet::new();
        let mut domains = Vec::new();
        for (dom, sample) in samples {
            if !sample.is_active() {
                continue;
            }
            let (Ok(name), Ok(uuid)) = (dom.get_name(), dom.get_uuid_string()) else { continue };
            seen.insert(uuid.clone());
            let needs_discovery = match self.domains.get(&uuid) {
                None => true,
                Some(d) => d.id != dom.get_id() || (!d.excluded && sample.vcpu_current.is_some_and(|n| n != d.nvcpus)),
            };
            if needs_discovery {
                self.discover(&uuid, &name, &dom, &sample);
            } else if self.domains.get(&uuid).is_some_and(|d| d.audit_due(self.quantum, self.options.audit_every)) {
                self.audit(&uuid, &dom);
            }
            if let Some(d) = self.domains.get_mut(&uuid).and_then(|d| d.observe(&uuid, &sample, now)) {
                domains.push(d);
            }
        }
        for state in self.domains.remove_gone(&seen) {
            tracing::info!(domain = %state.name, "domain gone");
        }
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        self.quantum += 1;
        self.last_collect = started.elapsed();
        Ok(Observation { host, domains })
    }

    fn pin_vcpu(&mut self, domain: &str, vcpu: u32, cpus: &[u32]) -> Result<(), BackendError> {
        if self.options.read_only {
            return Ok(());
        }
        let (dom, uuid) = self.lookup(domain)?;
        let map = self.cpumap(cpus);
        {
            let state = self.domains.get_mut(&uuid).ok_or_else(|| BackendError::DomainGone { domain: domain.into() })?;
            let v = state.vcpus.get_mut(&vcpu).ok_or_else(|| BackendError::NoSuchVcpu { domain: domain.into(), vcpu })?;
            if v.held(Instant::now()) {
                if !v.hold_logged {
                    tracing::info!(domain, vcpu, ?cpus, "pin skipped: vCPU was re-pinned by someone else and is on hold");
                    v.hold_logged = true;
                }
                return Ok(());
            }
        }
        match self.pin_live(&dom, vcpu, &map) {
            Ok(()) => {
                let v = self.domains.get_mut(&uuid).and_then(|s| s.vcpus.get_mut(&vcpu)).expect("checked above");
                v.pinned(cpus);
                Ok(())
            }
            Err(error) if is_gone(&error) => Err(BackendError::DomainGone { domain: domain.into() }),
            Err(error) => Err(BackendError::Pin { domain: domain.into(), vcpu, cpus: cpus.to_vec(), message: error.message().to_string() }),
        }
    }

    fn set_memory(&mut self, domain: &str, target_kib: u64) -> Result<(), BackendError> {
        if self.options.read_only {
            return Ok(());
        }
        let (dom, uuid) = self.lookup(domain)?;
        match self.set_memory_live(&dom, target_kib) {
            Ok(()) => {
                if let Some(state) = self.domains.get_mut(&uuid) {
                    state.ballooning(target_kib, Instant::now());
                }
                Ok(())
            }
            Err(error) if is_gone(&error) => Err(BackendError::DomainGone { domain: domain.into() }),
            Err(error) => Err(BackendError::SetMemory { domain: domain.into(), target_kib, message: error.message().to_string() }),
        }
    }

    fn restore(&mut self) -> Result<usize, BackendError> {
        if self.options.read_only {
            return Ok(0);
        }
        let mut restored = 0;
        for uuid in self.domains.uuids() {
            let Some(state) = self.domains.get(&uuid) else { continue };
            if state.excluded {
                continue;
            }
            let name = state.name.clone();
            let plan = state.restore_plan();
            let dom = match self.lookup(&name) {
                Ok((dom, _)) => dom,
                Err(BackendError::DomainGone { .. }) => continue,
                Err(error) => return Err(error),
            };
            for (vcpu, original) in plan.pins {
                let map = self.cpumap(&original);
                match self.pin_live(&dom, vcpu, &map) {
                    Ok(()) => restored += 1,
                    Err(error) => tracing::warn!(domain = %name, vcpu, cpus = ?original, %error, "cannot restore the original pin"),
                }
            }
            if let Some(target) = plan.target_kib {
                match self.set_memory_live(&dom, target) {
                    Ok(()) => restored += 1,
                    Err(error) => tracing::warn!(domain = %name, target_kib = target, %error, "cannot restore the original balloon target"),
                }
            }
        }
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_backend() -> LibvirtBackend {
        LibvirtBackend::connect(LibvirtOptions::new("test:///default")).expect("libvirt's test driver must be available (libvirt-daemon)")
    }

    #[test]
    fn collects_from_the_test_driver_with_one_bulk_call() {
        let mut b = test_backend();
        let first = b.collect().unwrap();
        assert!(!first.host.cpus.is_empty());
        assert!(first.domains.iter().any(|d| d.name == "test"), "{first:?}");
        let before = b.calls();
        let second = b.collect().unwrap();
        let per_quantum = b.calls() - before;
        // Bulk stats + per-CPU host stats (remote path) + host memory
        // fallback (3) at most; no per-domain call.
        let cpus = second.host.cpus.len() as u64;
        assert!(per_quantum <= 1 + cpus + 3, "{per_quantum} libvirt calls in a steady quantum ({cpus} host CPUs)");
        let d = second.domains.iter().find(|d| d.name == "test").unwrap();
        assert!(!d.vcpus.is_empty());
        // First sight pinned each vCPU to a single CPU.
        assert!(d.vcpus.iter().all(|v| v.affinity.len() == 1), "{d:?}");
    }

    #[test]
    fn pins_and_restores_on_the_test_driver() {
        let mut b = test_backend();
        b.collect().unwrap();
        b.pin_vcpu("test", 0, &[1]).unwrap();
        assert!(matches!(b.pin_vcpu("test", 99, &[1]), Err(BackendError::NoSuchVcpu { vcpu: 99, .. })));
        assert!(matches!(b.pin_vcpu("no-such-domain", 0, &[1]), Err(BackendError::DomainGone { .. })));
        assert!(matches!(b.set_memory("no-such-domain", 1024), Err(BackendError::DomainGone { .. })));
        let obs = b.collect().unwrap();
        let d = obs.domains.iter().find(|d| d.name == "test").unwrap();
        assert_eq!(d.vcpus[0].affinity[..], [1]);
        assert!(b.restore().unwrap() >= 1);
    }

    #[test]
    fn config_exclusion_leaves_the_domain_out() {
        let mut options = LibvirtOptions::new("test:///default");
        options.exclude.names = vec!["te*".into()];
        let mut b = LibvirtBackend::connect(options).unwrap();
        let obs = b.collect().unwrap();
        assert!(obs.domains.is_empty(), "{obs:?}");
        assert!(matches!(b.pin_vcpu("test", 0, &[0]), Err(BackendError::Excluded { .. })));
    }

    #[test]
    fn unreachable_uri_is_a_typed_error_then_backoff() {
        let mut b = LibvirtBackend::new(LibvirtOptions::new("test:///nonexistent/path.xml"));
        let e = b.collect().unwrap_err();
        assert!(e.to_string().contains("test:///nonexistent"), "{e}");
        // `new` tried once already, so this is the backoff; the attempt after
        // it fails with libvirt's error as the source.
        let BackendError::NotConnected { retry_in, .. } = e else { panic!("{e:?}") };
        std::thread::sleep(retry_in);
        let e = b.collect().unwrap_err();
        assert!(e.to_string().contains("test:///nonexistent"), "{e}");
        let BackendError::Hypervisor { operation: "connect", source, .. } = &e else { panic!("{e:?}") };
        assert!(!source.message().is_empty(), "{e:?}");
        let e = b.collect().unwrap_err();
        assert!(e.to_string().contains("next attempt"), "{e}");
    }
}
