//! The libvirt backend: observes and acts on a real hypervisor through the
//! `virt` crate (0.4.3, whose libc requirement resolves with wasmtime 48).
//!
//! Why it is built this way:
//! - **One bulk stats call per quantum.** `virConnectGetAllDomainStats` with
//!   the state, cpu-total, vcpu and balloon groups returns every running
//!   domain in one round trip (the original asked each domain separately).
//!   `virt` does not free those records, so they are read through `virt::sys`
//!   and released with `virDomainStatsRecordListFree` by an RAII guard
//!   ([`StatsList`]), even when parsing bails out early.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CStr;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirDomain;
use virt::error::{Error as VirError, ErrorNumber};
use virt::sys;
use vm_balancer_sdk::{Domain, DomainMemory, Host, HostCpu, HostMemory, Vcpu};

use super::{Backend, BackendError, Observation};
use crate::config::Exclude;

/// XML namespace of the daemon's libvirt metadata element.
pub const METADATA_URI: &str = "https://vm-balancer.invalid/1";

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

/// Cumulative host CPU times of one CPU, ns (busy, total).
#[derive(Clone, Copy, Debug, Default)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

/// One vCPU's cumulative counters.
#[derive(Clone, Copy, Debug, Default)]
struct VcpuCounters {
    time: Option<u64>,
    delay: Option<u64>,
}

/// One domain's record from the bulk stats call.
#[derive(Debug, Default)]
struct DomStats {
    state: Option<i64>,
    vcpu_current: Option<u32>,
    vcpus: BTreeMap<u32, VcpuCounters>,
    balloon: HashMap<String, u64>,
}

/// What the backend knows of one vCPU.
#[derive(Clone, Debug, Default)]
struct VcpuState {
    /// pCPU it last ran on (as of the last affinity read).
    cpu: u32,
    /// Live affinity as of the last read or pin.
    affinity: Vec<u32>,
    /// The last pin this daemon applied.
    last_set: Option<Vec<u32>>,
    /// Somebody else re-pinned it: left alone until then.
    hold_until: Option<Instant>,
    /// A skipped pin during the hold was already logged.
    hold_logged: bool,
    /// Affinity before the daemon first pinned it (for restore).
    original: Option<Vec<u32>>,
}

/// Previous sample of a domain, for deltas.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    vcpus: BTreeMap<u32, VcpuCounters>,
    swap_in: Option<u64>,
    swap_out: Option<u64>,
    major: Option<u64>,
}

/// What the backend knows of one domain.
#[derive(Debug)]
struct DomState {
    name: String,
    id: Option<u32>,
    excluded: bool,
    tags: Vec<String>,
    autodeflate: bool,
    nvcpus: u32,
    vcpus: BTreeMap<u32, VcpuState>,
    prev: Option<Sample>,
    /// Balloon target at first sight (restored if the daemon changed it).
    original_target_kib: Option<u64>,
    /// The daemon changed the balloon target.
    memory_changed: bool,
    /// Quantum of the last affinity read.
    audited: u64,
    /// A balloon target set by the daemon that the balloon has not settled on.
    settling: Option<Settling>,
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

/// Longest wait for a balloon to settle; after it, the actual size is taken.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Owns the record list of one `virConnectGetAllDomainStats` call and frees
/// it on drop.
struct StatsList {
    ptr: *mut sys::virDomainStatsRecordPtr,
    len: usize,
}

impl StatsList {
    /// The records, in libvirt's order.
    fn records(&self) -> &[sys::virDomainStatsRecordPtr] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: libvirt returned `len` valid record pointers in an array at
        // `ptr` (NULL-terminated, so `len` entries are in bounds); the array
        // lives until `drop` frees it, which the borrow of `self` outlives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for StatsList {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from virConnectGetAllDomainStats and is
            // freed exactly once, here; the Domain handles we kept were
            // separately referenced with virDomainRef.
            unsafe { sys::virDomainStatsRecordListFree(self.ptr) };
        }
    }
}

/// Reads the typed parameters of one stats record into a [`DomStats`], and
/// returns an owned (referenced) domain handle.
///
/// # Safety
/// `record` must be a record of a live [`StatsList`].
unsafe fn parse_record(record: sys::virDomainStatsRecordPtr) -> (VirDomain, DomStats) {
    // SAFETY: the caller guarantees `record` points at a valid record; its
    // `dom` is a valid domain pointer which we reference once more so the
    // returned handle (freed on drop) outlives the list.
    let (dom, params, nparams) = unsafe {
        let r = &*record;
        sys::virDomainRef(r.dom);
        (VirDomain::from_ptr(r.dom), r.params, r.nparams.max(0) as usize)
    };
    let mut stats = DomStats::default();
    for i in 0..nparams {
        // SAFETY: `params` holds `nparams` initialised typed parameters whose
        // `field` is a NUL-terminated C string (libvirt guarantees both); the
        // union member read is the one `type_` names.
        let (field, value) = unsafe {
            let p = &*params.add(i);
            let field = CStr::from_ptr(p.field.as_ptr()).to_string_lossy().into_owned();
            let value: Option<i128> = match p.type_ as u32 {
                sys::VIR_TYPED_PARAM_INT => Some(p.value.i as i128),
                sys::VIR_TYPED_PARAM_UINT => Some(p.value.ui as i128),
                sys::VIR_TYPED_PARAM_LLONG => Some(p.value.l as i128),
                sys::VIR_TYPED_PARAM_ULLONG => Some(p.value.ul as i128),
                _ => None,
            };
            (field, value)
        };
        let Some(value) = value else { continue };
        stats.absorb(&field, value);
    }
    (dom, stats)
}

impl DomStats {
    fn absorb(&mut self, field: &str, value: i128) {
        let unsigned = u64::try_from(value).ok();
        if field == "state.state" {
            self.state = Some(value as i64);
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
}

/// The libvirt backend.
pub struct LibvirtBackend {
    options: LibvirtOptions,
    conn: Option<Connect>,
    next_connect: Instant,
    backoff: Duration,
    outage_logged: bool,
    /// Host CPUs: (id, online); cpumap length derives from the count.
    host_cpus: Vec<(u32, bool)>,
    prev_host_cpu: Option<Vec<CpuTimes>>,
    domains: HashMap<String, DomState>,
    by_name: HashMap<String, String>,
    quantum: u64,
    calls: u64,
    last_collect: Duration,
    /// The driver refuses AFFECT_LIVE (test driver): use AFFECT_CURRENT.
    flags_unsupported: bool,
}

fn hypervisor(uri: &str, operation: &'static str, error: &VirError) -> BackendError {
    BackendError::Hypervisor { uri: uri.to_string(), operation, message: error.message().to_string() }
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
        virt::error::clear_error_callback();
        let mut backend = LibvirtBackend {
            options,
            conn: None,
            next_connect: Instant::now(),
            backoff: Duration::from_secs(1),
            outage_logged: false,
            host_cpus: Vec::new(),
            prev_host_cpu: None,
            domains: HashMap::new(),
            by_name: HashMap::new(),
            quantum: 0,
            calls: 0,
            last_collect: Duration::ZERO,
            flags_unsupported: false,
        };
        let _ = backend.ensure_connected();
        backend
    }

    /// Connects, or fails naming the URI.
    pub fn connect(options: LibvirtOptions) -> Result<Self, BackendError> {
        let mut backend = LibvirtBackend::new(options);
        backend.ensure_connected()?;
        Ok(backend)
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
                return Err(BackendError::Hypervisor {
                    uri: self.options.uri.clone(),
                    operation: "reconnect",
                    message: format!("not connected; next attempt in {:.1?}", self.next_connect - now),
                });
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
                    self.host_cpus = Self::read_host_cpus(&conn, &mut self.calls);
                    self.prev_host_cpu = None;
                    // Deltas across an outage are meaningless.
                    for dom in self.domains.values_mut() {
                        dom.prev = None;
                        dom.id = None;
                    }
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
                    return Err(hypervisor(&self.options.uri, "connect", &error));
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

    fn read_host_cpus(conn: &Connect, calls: &mut u64) -> Vec<(u32, bool)> {
        let mut map: *mut libc::c_uchar = std::ptr::null_mut();
        let mut online: libc::c_uint = 0;
        *calls += 1;
        // SAFETY: `conn` is an open connection; on success libvirt stores a
        // malloc'd bitmap of `(n + 7) / 8` bytes in `map`, freed below.
        let n = unsafe { sys::virNodeGetCPUMap(conn.as_ptr(), &mut map, &mut online, 0) };
        if n > 0 && !map.is_null() {
            let n = n as usize;
            // SAFETY: the bitmap has (n + 7) / 8 bytes (see above).
            let bytes = unsafe { std::slice::from_raw_parts(map, n.div_ceil(8)) }.to_vec();
            // SAFETY: `map` was allocated by libvirt with malloc; freed once.
            unsafe { libc::free(map.cast()) };
            let mut cpus: Vec<(u32, bool)> = (0..n).map(|i| (i as u32, bytes[i / 8] & (1 << (i % 8)) != 0)).collect();
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

    /// Live pin. Drivers that take no flags (libvirt's test driver) get
    /// AFFECT_CURRENT, which is the live definition for a running domain.
    fn pin_live(&mut self, dom: &VirDomain, vcpu: u32, map: &[u8]) -> Result<(), VirError> {
        self.calls += 1;
        if !self.flags_unsupported {
            match dom.pin_vcpu_flags(vcpu, map, sys::VIR_DOMAIN_AFFECT_LIVE) {
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
            match dom.set_memory_flags(target_kib, sys::VIR_DOMAIN_MEM_LIVE) {
                Err(e) if unsupported_flags(&e) => self.flags_unsupported = true,
                other => return other.map(drop),
            }
            self.calls += 1;
        }
        dom.set_memory_flags(target_kib, 0).map(drop)
    }

    fn maplen(&self) -> usize {
        self.host_cpus.len().max(1).div_ceil(8)
    }

    fn cpumap(&self, cpus: &[u32]) -> Vec<u8> {
        let mut map = vec![0u8; self.maplen().max(cpus.iter().map(|c| *c as usize / 8 + 1).max().unwrap_or(1))];
        for cpu in cpus {
            map[*cpu as usize / 8] |= 1 << (cpu % 8);
        }
        map
    }

    /// Live (pCPU, affinity) of each vCPU: one virDomainGetVcpus call.
    fn read_vcpus(&mut self, dom: &VirDomain, nvcpus: u32) -> Result<BTreeMap<u32, (u32, Vec<u32>)>, VirError> {
        let n = nvcpus.max(1) as usize;
        let maplen = self.maplen();
        let mut info = vec![sys::virVcpuInfo { number: 0, state: 0, cpuTime: 0, cpu: -1 }; n];
        let mut maps = vec![0u8; n * maplen];
        self.calls += 1;
        // SAFETY: `info` has room for `n` entries and `maps` for `n` maps of
        // `maplen` bytes, as the call is told; `dom` is a valid handle.
        let got = unsafe {
            sys::virDomainGetVcpus(dom.as_ptr(), info.as_mut_ptr(), n as libc::c_int, maps.as_mut_ptr(), maplen as libc::c_int)
        };
        if got < 0 {
            return Err(VirError::last_error());
        }
        let mut out = BTreeMap::new();
        for (i, v) in info.iter().take(got as usize).enumerate() {
            let map = &maps[i * maplen..(i + 1) * maplen];
            let affinity: Vec<u32> =
                (0..maplen * 8).filter(|c| map[c / 8] & (1 << (c % 8)) != 0).map(|c| c as u32).collect();
            let cpu = if v.cpu >= 0 { v.cpu as u32 } else { affinity.first().copied().unwrap_or(0) };
            out.insert(v.number, (cpu, affinity));
        }
        Ok(out)
    }

    /// Reads the opt-out element, tags and autodeflate from the live XML.
    fn read_xml(&mut self, dom: &VirDomain) -> (bool, Vec<String>, bool) {
        self.calls += 1;
        let Ok(xml) = dom.get_xml_desc(0) else { return (false, Vec::new(), false) };
        parse_domain_xml(&xml)
    }

    /// First sight of a domain (or of a changed vCPU count): read XML, set
    /// the stats period, pin every vCPU where it runs.
    fn discover(&mut self, uuid: &str, name: &str, dom: &VirDomain, stats: &DomStats) {
        let id = dom.get_id();
        let nvcpus = match stats.vcpu_current {
            Some(n) => n,
            None => {
                self.calls += 1;
                dom.get_info().map(|i| i.nr_virt_cpu).unwrap_or(stats.vcpus.len() as u32)
            }
        };
        let known = self.domains.get(uuid).map(|d| (d.id == id, d.excluded, d.tags.clone(), d.autodeflate));
        let (excluded, tags, autodeflate) = match known {
            Some((true, excluded, tags, autodeflate)) => (excluded, tags, autodeflate),
            _ => {
                let (meta_excluded, tags, autodeflate) = self.read_xml(dom);
                (meta_excluded || self.options.exclude.matches(name, uuid), tags, autodeflate)
            }
        };
        let previous = self.domains.remove(uuid).filter(|d| d.id == id);
        let first_sight = previous.is_none();
        let mut state = previous.unwrap_or_else(|| DomState {
            name: name.to_string(),
            id,
            excluded,
            tags,
            autodeflate,
            nvcpus,
            vcpus: BTreeMap::new(),
            prev: None,
            original_target_kib: stats.balloon.get("current").copied(),
            memory_changed: false,
            audited: self.quantum,
            settling: None,
        });
        state.name = name.to_string();
        state.nvcpus = nvcpus;
        state.prev = None;
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
                if let Err(error) = dom.set_memory_stats_period(self.options.stats_period_s, sys::VIR_DOMAIN_AFFECT_LIVE) {
                    tracing::debug!(domain = name, %error, "cannot set the balloon stats period");
                }
            }
            match self.read_vcpus(dom, nvcpus) {
                Ok(live) => {
                    state.vcpus.retain(|n, _| live.contains_key(n));
                    for (n, (cpu, affinity)) in live {
                        let known = state.vcpus.contains_key(&n);
                        let v = state.vcpus.entry(n).or_default();
                        v.cpu = cpu;
                        v.affinity = affinity.clone();
                        if known || self.options.read_only {
                            continue;
                        }
                        // Pin a newly seen vCPU where it runs now.
                        let map = self.cpumap(&[cpu]);
                        match self.pin_live(dom, n, &map) {
                            Ok(()) => {
                                v.original = Some(affinity);
                                v.affinity = vec![cpu];
                                v.last_set = Some(vec![cpu]);
                            }
                            Err(error) => tracing::warn!(domain = name, vcpu = n, cpu, %error, "initial pin failed"),
                        }
                    }
                }
                Err(error) => tracing::warn!(domain = name, %error, "cannot read vCPU placement"),
            }
        }
        state.audited = self.quantum;
        self.by_name.insert(name.to_string(), uuid.to_string());
        self.domains.insert(uuid.to_string(), state);
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
        let now = Instant::now();
        let state = self.domains.get_mut(uuid).expect("checked above");
        state.audited = self.quantum;
        for (n, (cpu, affinity)) in live {
            let Some(v) = state.vcpus.get_mut(&n) else { continue };
            v.cpu = cpu;
            if v.hold_until.is_some_and(|until| now >= until) {
                tracing::info!(domain = %state.name, vcpu = n, "external pin hold expired; the daemon manages this vCPU again");
                v.hold_until = None;
                v.hold_logged = false;
                v.last_set = Some(affinity.clone());
            }
            if let Some(last) = &v.last_set {
                if *last != affinity && v.hold_until.is_none() {
                    tracing::info!(
                        domain = %state.name, vcpu = n, ours = ?last, live = ?affinity, hold_s = hold.as_secs(),
                        "vCPU re-pinned by someone else; leaving it alone"
                    );
                    v.hold_until = Some(now + hold);
                    // The administrator's pin is what stays, even on restore.
                    v.original = None;
                }
            }
            v.affinity = affinity;
        }
    }

    fn host_cpu_times(&mut self) -> Option<Vec<CpuTimes>> {
        if self.local_procfs() {
            let text = std::fs::read_to_string("/proc/stat").ok()?;
            let mut out = vec![CpuTimes::default(); self.host_cpus.len()];
            for line in text.lines() {
                let Some(rest) = line.strip_prefix("cpu") else { continue };
                let mut parts = rest.split_whitespace();
                let Some(Ok(id)) = parts.next().map(str::parse::<usize>) else { continue };
                // user nice system idle iowait irq softirq steal (USER_HZ ticks).
                let v: Vec<u64> = parts.take(8).filter_map(|p| p.parse().ok()).collect();
                if v.len() < 5 || id >= out.len() {
                    continue;
                }
                let idle = v[3] + v[4];
                let total: u64 = v.iter().sum();
                out[id] = CpuTimes { busy: total - idle, total };
            }
            return Some(out);
        }
        let conn = self.conn.as_ref()?.as_ptr();
        let mut out = Vec::with_capacity(self.host_cpus.len());
        for (id, online) in self.host_cpus.clone() {
            if !online {
                out.push(CpuTimes::default());
                continue;
            }
            let mut params = [sys::virNodeCPUStats { field: [0; 80], value: 0 }; 8];
            let mut n: libc::c_int = params.len() as libc::c_int;
            self.calls += 1;
            // SAFETY: `conn` is the open connection's pointer (self.conn is
            // not dropped meanwhile); `params` has room for `n` entries.
            let rc = unsafe { sys::virNodeGetCPUStats(conn, id as libc::c_int, params.as_mut_ptr(), &mut n, 0) };
            if rc < 0 {
                return None;
            }
            let mut t = CpuTimes::default();
            for p in params.iter().take(n.max(0) as usize) {
                // SAFETY: libvirt NUL-terminates `field`.
                let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_string_lossy();
                match field.as_ref() {
                    "kernel" | "user" => t.busy += p.value,
                    "idle" | "iowait" => {}
                    _ => continue,
                }
                t.total += p.value;
            }
            out.push(t);
        }
        Some(out)
    }

    fn host_memory(&mut self) -> HostMemory {
        if self.local_procfs() {
            if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
                let field = |key: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                };
                if let (Some(total), Some(avail)) = (field("MemTotal:"), field("MemAvailable:")) {
                    return HostMemory { total_kib: total, available_kib: avail, reserve_kib: 0 };
                }
            }
        }
        let Some(conn) = self.conn.as_ref().map(Connect::as_ptr) else { return HostMemory::default() };
        let mut params = [sys::virNodeMemoryStats { field: [0; 80], value: 0 }; 8];
        let mut n: libc::c_int = params.len() as libc::c_int;
        self.calls += 1;
        // SAFETY: `params` has room for `n` entries, as the call is told.
        let rc = unsafe {
            sys::virNodeGetMemoryStats(conn, sys::VIR_NODE_MEMORY_STATS_ALL_CELLS, params.as_mut_ptr(), &mut n, 0)
        };
        if rc == 0 {
            let mut m: HashMap<String, u64> = HashMap::new();
            for p in params.iter().take(n.max(0) as usize) {
                // SAFETY: libvirt NUL-terminates `field`.
                let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_string_lossy().into_owned();
                m.insert(field, p.value);
            }
            let total = m.get("total").copied().unwrap_or(0);
            let avail = ["free", "buffers", "cached"].iter().filter_map(|k| m.get(*k)).sum();
            return HostMemory { total_kib: total, available_kib: avail, reserve_kib: 0 };
        }
        // Drivers without node memory stats (the test driver).
        self.calls += 2;
        let Some(conn) = self.conn.as_ref() else { return HostMemory::default() };
        let total = conn.get_node_info().map(|i| i.memory).unwrap_or(0);
        let free = conn.get_free_memory().map(|b| b / 1024).unwrap_or(0);
        HostMemory { total_kib: total, available_kib: free, reserve_kib: 0 }
    }

    fn host(&mut self) -> Host {
        let times = self.host_cpu_times();
        let usage: Vec<f32> = match (&self.prev_host_cpu, &times) {
            (Some(prev), Some(now)) if prev.len() == now.len() => prev
                .iter()
                .zip(now)
                .map(|(p, n)| {
                    let total = n.total.saturating_sub(p.total);
                    let busy = n.busy.saturating_sub(p.busy);
                    if total == 0 { 0.0 } else { (busy as f64 / total as f64).clamp(0.0, 1.0) as f32 }
                })
                .collect(),
            _ => vec![0.0; self.host_cpus.len()],
        };
        self.prev_host_cpu = times;
        let cpus = self
            .host_cpus
            .iter()
            .enumerate()
            .map(|(i, (id, online))| HostCpu { id: *id, online: *online, reserved: false, usage: usage.get(i).copied().unwrap_or(0.0), node: 0 })
            .collect();
        Host { cpus, memory: self.host_memory() }
    }

    /// Builds the observed domain and advances its sample.
    fn observe(&mut self, uuid: &str, stats: &DomStats, now: Instant) -> Option<Domain> {
        let state = self.domains.get_mut(uuid)?;
        let balloon = |k: &str| stats.balloon.get(k).copied();
        let sample = Sample {
            at: now,
            vcpus: stats.vcpus.clone(),
            swap_in: balloon("swap_in"),
            swap_out: balloon("swap_out"),
            major: balloon("major_fault"),
        };
        let prev = state.prev.replace(sample);
        if state.excluded {
            return None;
        }
        let wall_ns = prev.as_ref().map(|p| now.duration_since(p.at).as_nanos() as f64).filter(|w| *w > 0.0);
        let delta = |new: Option<u64>, old: Option<u64>| match (new, old) {
            (Some(n), Some(o)) => n.checked_sub(o),
            _ => None,
        };
        let mut vcpus = Vec::new();
        for (n, v) in &state.vcpus {
            let counters = stats.vcpus.get(n).copied().unwrap_or_default();
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
        if let Some(mut settle) = state.settling.take() {
            let arrived_before = settle.arrived.is_some();
            if settle.arrived.is_none() && actual.abs_diff(settle.target_kib) <= 1024 {
                settle.arrived = Some(now);
            }
            if !arrived_before && now.duration_since(settle.since) < SETTLE_TIMEOUT {
                moving = Some(settle.target_kib);
                state.settling = Some(settle);
            }
        }
        let stat = |k: &str| if moving.is_some() { None } else { balloon(k) };
        let memory = DomainMemory {
            max_kib: balloon("maximum").unwrap_or(0),
            target_kib: moving.unwrap_or(actual),
            unused_kib: stat("unused"),
            available_kib: stat("available"),
            usable_kib: stat("usable"),
            rss_kib: balloon("rss"),
            swap_in_kib: delta(balloon("swap_in"), prev.as_ref().and_then(|p| p.swap_in)),
            swap_out_kib: delta(balloon("swap_out"), prev.as_ref().and_then(|p| p.swap_out)),
            major_faults: delta(balloon("major_fault"), prev.as_ref().and_then(|p| p.major)),
            autodeflate: state.autodeflate,
        };
        Some(Domain { name: state.name.clone(), uuid: uuid.to_string(), tags: state.tags.clone(), vcpus, memory })
    }

    fn bulk_stats(&mut self) -> Result<StatsList, BackendError> {
        let conn = self.ensure_connected()?;
        let mut ptr: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
        let groups = sys::VIR_DOMAIN_STATS_STATE | sys::VIR_DOMAIN_STATS_CPU_TOTAL | sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_BALLOON;
        // SAFETY: `conn` is open; on success libvirt stores a NULL-terminated
        // array of records in `ptr`, owned by the returned StatsList.
        let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), groups, &mut ptr, sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE) };
        self.calls += 1;
        if n < 0 {
            let error = VirError::last_error();
            let uri = self.options.uri.clone();
            self.check_alive();
            return Err(hypervisor(&uri, "bulk domain stats", &error));
        }
        Ok(StatsList { ptr, len: n as usize })
    }

    /// Looks a managed domain up by name for an action.
    fn lookup(&mut self, domain: &str) -> Result<(VirDomain, String), BackendError> {
        let uuid = self.by_name.get(domain).cloned();
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
                Err(hypervisor(&uri, "domain lookup", &error))
            }
        }
    }
}

/// (excluded by metadata, tags, balloon autodeflate) from a domain's XML.
/// Deliberately a tiny scanner: the element is ours and flat.
pub fn parse_domain_xml(xml: &str) -> (bool, Vec<String>, bool) {
    let autodeflate = tag_with(xml, "<memballoon").is_some_and(|t| attr(t, "autodeflate").as_deref() == Some("on"));
    let mut excluded = false;
    let mut tags = Vec::new();
    if let Some(meta) = xml.find(&format!("\"{METADATA_URI}\"")).or_else(|| xml.find(&format!("'{METADATA_URI}'"))) {
        let start = xml[..meta].rfind('<').unwrap_or(0);
        let end = xml[meta..].find('>').map_or(xml.len(), |e| meta + e + 1);
        let element = &xml[start..end];
        excluded = matches!(attr(element, "exclude").as_deref(), Some("yes" | "true" | "1"));
        if let Some(t) = attr(element, "tags") {
            tags = t.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
    }
    (excluded, tags, autodeflate)
}

fn tag_with<'a>(xml: &'a str, open: &str) -> Option<&'a str> {
    let start = xml.find(open)?;
    let end = xml[start..].find('>')? + start + 1;
    Some(&xml[start..end])
}

fn attr(element: &str, name: &str) -> Option<String> {
    for quote in ['\'', '"'] {
        let key = format!(" {name}={quote}");
        if let Some(i) = element.find(&key) {
            let rest = &element[i + key.len()..];
            return rest.find(quote).map(|e| rest[..e].to_string());
        }
    }
    None
}

impl Backend for LibvirtBackend {
    fn collect(&mut self) -> Result<Observation, BackendError> {
        let started = Instant::now();
        let list = self.bulk_stats()?;
        let now = Instant::now();
        let mut parsed = Vec::with_capacity(list.records().len());
        for record in list.records() {
            // SAFETY: `record` belongs to `list`, alive for this loop.
            parsed.push(unsafe { parse_record(*record) });
        }
        drop(list);
        let host = self.host();
        let mut seen = HashSet::new();
        let mut domains = Vec::new();
        for (dom, stats) in parsed {
            // Active domains only: running (1), blocked (2), paused (3).
            if !matches!(stats.state, Some(1..=3)) {
                continue;
            }
            let (Ok(name), Ok(uuid)) = (dom.get_name(), dom.get_uuid_string()) else { continue };
            seen.insert(uuid.clone());
            let needs_discovery = match self.domains.get(&uuid) {
                None => true,
                Some(d) => d.id != dom.get_id() || (!d.excluded && stats.vcpu_current.is_some_and(|n| n != d.nvcpus)),
            };
            if needs_discovery {
                self.discover(&uuid, &name, &dom, &stats);
            } else if self.domains.get(&uuid).is_some_and(|d| !d.excluded && self.quantum.saturating_sub(d.audited) >= self.options.audit_every.max(1)) {
                self.audit(&uuid, &dom);
            }
            if let Some(d) = self.observe(&uuid, &stats, now) {
                domains.push(d);
            }
        }
        let gone: Vec<String> = self.domains.keys().filter(|u| !seen.contains(*u)).cloned().collect();
        for uuid in gone {
            if let Some(state) = self.domains.remove(&uuid) {
                tracing::info!(domain = %state.name, "domain gone");
                if self.by_name.get(&state.name) == Some(&uuid) {
                    self.by_name.remove(&state.name);
                }
            }
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
            if v.hold_until.is_some_and(|until| Instant::now() < until) {
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
                if v.original.is_none() && v.last_set.is_none() {
                    v.original = Some(v.affinity.clone());
                }
                v.affinity = cpus.to_vec();
                v.last_set = Some(cpus.to_vec());
                v.cpu = cpus.first().copied().unwrap_or(v.cpu);
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
                    state.memory_changed = true;
                    state.settling = Some(Settling { target_kib, since: Instant::now(), arrived: None });
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
        let uuids: Vec<String> = self.domains.keys().cloned().collect();
        for uuid in uuids {
            let state = &self.domains[&uuid];
            if state.excluded {
                continue;
            }
            let name = state.name.clone();
            let pins: Vec<(u32, Vec<u32>)> = state
                .vcpus
                .iter()
                .filter(|(_, v)| v.last_set.is_some() && v.hold_until.is_none())
                .filter_map(|(n, v)| v.original.clone().map(|o| (*n, o)))
                .collect();
            let memory = state.original_target_kib.filter(|_| state.memory_changed);
            let dom = match self.lookup(&name) {
                Ok((dom, _)) => dom,
                Err(BackendError::DomainGone { .. }) => continue,
                Err(error) => return Err(error),
            };
            for (vcpu, original) in pins {
                let map = self.cpumap(&original);
                match self.pin_live(&dom, vcpu, &map) {
                    Ok(()) => restored += 1,
                    Err(error) => tracing::warn!(domain = %name, vcpu, cpus = ?original, %error, "cannot restore the original pin"),
                }
            }
            if let Some(target) = memory {
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

    #[test]
    fn xml_scan_finds_opt_out_tags_and_autodeflate() {
        let xml = r#"<domain><metadata><vmb:balancer xmlns:vmb="https://vm-balancer.invalid/1" exclude="yes" tags="db, latency"/></metadata>
            <devices><memballoon model='virtio' autodeflate='on'><stats period='1'/></memballoon></devices></domain>"#;
        assert_eq!(parse_domain_xml(xml), (true, vec!["db".to_string(), "latency".to_string()], true));
        assert_eq!(parse_domain_xml("<domain><memballoon model='virtio'/></domain>"), (false, vec![], false));
    }

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
        let e = b.collect().unwrap_err();
        assert!(e.to_string().contains("next attempt"), "{e}");
    }

    #[test]
    fn counters_going_backwards_give_no_data() {
        let mut s = DomStats::default();
        s.absorb("vcpu.current", 1);
        s.absorb("vcpu.0.time", 5);
        s.absorb("vcpu.0.delay", 7);
        s.absorb("balloon.current", 262144);
        assert_eq!(s.vcpu_current, Some(1));
        assert_eq!(s.vcpus[&0].time, Some(5));
        assert_eq!(s.balloon["current"], 262144);
        let mut b = LibvirtBackend::new(LibvirtOptions { read_only: true, ..LibvirtOptions::new("test:///nonexistent") });
        b.domains.insert(
            "u".into(),
            DomState {
                name: "d".into(),
                id: Some(1),
                excluded: false,
                tags: vec![],
                autodeflate: false,
                nvcpus: 1,
                vcpus: BTreeMap::from([(0, VcpuState::default())]),
                prev: None,
                original_target_kib: None,
                memory_changed: false,
                audited: 0,
                settling: None,
            },
        );
        let t0 = Instant::now();
        b.observe("u", &s, t0);
        let mut later = DomStats::default();
        later.absorb("vcpu.0.time", 1);
        let d = b.observe("u", &later, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((d.vcpus[0].usage, d.vcpus[0].steal), (0.0, None));
        let mut again = DomStats::default();
        again.absorb("vcpu.0.time", 500_000_001);
        again.absorb("vcpu.0.delay", 250_000_000);
        let d = b.observe("u", &again, t0 + Duration::from_secs(2)).unwrap();
        assert!((d.vcpus[0].usage - 0.5).abs() < 1e-3, "{d:?}");
        assert_eq!(d.vcpus[0].steal, None, "no delay in the previous sample");
    }
}
