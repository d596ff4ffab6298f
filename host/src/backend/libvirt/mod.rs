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

mod fast;
mod host;
pub mod procfs;
mod state;
mod xml;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirDomain;
use virt::error::{Error as VirError, ErrorNumber};

use self::fast::FastPath;
use self::host::HostState;
use self::procfs::ProcRoots;
use self::state::{AuditEvent, DomainSample, Domains, KnownDomain, Placement};
pub use self::xml::{parse_domain_xml, DomainXml, METADATA_URI};
use super::{Backend, BackendError, Observation};
use crate::config::Exclude;
use crate::ffi;
use crate::persist::Originals;

/// Longest reconnect backoff: attempts (each logged) come at 1, 2, 4, 8,
/// 16, 32 s, then every minute.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Stats calls left running past their deadline (each holds a libvirtd
/// worker thread and one request slot of its connection) beyond which no
/// new call is made: a host where that many guests hang at once gets
/// quanta without data, logged, rather than piling up threads.
const MAX_STUCK_CALLS: usize = 8;

/// One domain of a stats call: its handle and its counters.
type Record = (VirDomain, DomainSample);

/// A domain whose monitor is busy.
#[derive(Debug)]
struct Quiet {
    name: String,
    /// Busy long enough to have been named in a WARN line.
    warned: bool,
}

/// Which stats call a thread makes.
#[derive(Clone, Debug)]
enum StatsCall {
    /// Every active domain, every group (the bulk path).
    All,
    /// These domains' balloon and vcpu groups (the fast path's subset).
    Subset(Vec<VirDomain>),
}

/// How CPU figures are collected (`--collect`, config `collect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectMode {
    /// procfs `schedstat` on a local `qemu:///system` connection, with a
    /// rolling balloon refresh; the bulk call otherwise.
    #[default]
    Auto,
    /// One bulk call with every group, every quantum, on any connection.
    Bulk,
}

/// What one stats call's thread sends back, and how long the call took.
type StatsAnswer = (Result<Vec<Record>, VirError>, Duration);

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
    /// Deadline of one collection (config `collect_deadline_ms`, by default
    /// half the quantum). A stats call that has not returned by half of it
    /// is left running on its thread and retried once, on a fresh
    /// connection (see the module docs).
    pub collect_deadline: Duration,
    /// Where each domain's originals are kept across daemon processes (the
    /// state dir); `None`: in memory only.
    pub originals: Option<crate::persist::OriginalsFile>,
    /// `vm-balancer restore`: discovery changes nothing (no pins, no stats
    /// period), and `restore` puts back what the originals file holds.
    pub restore_only: bool,
    /// Fast local path or bulk calls.
    pub collect: CollectMode,
    /// On the fast path, every domain's balloon is refreshed at least every
    /// this many quanta (config `balloon_refresh_quanta`).
    pub balloon_refresh_quanta: u64,
    /// On the fast path, vCPU thread maps are rebuilt every this many
    /// quanta (a hot-plugged vCPU is found within them).
    pub remap_quanta: u64,
    /// Where procfs and libvirt's QEMU run directory are.
    pub proc_roots: ProcRoots,
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
            collect_deadline: Duration::from_millis(500),
            originals: None,
            restore_only: false,
            collect: CollectMode::Auto,
            balloon_refresh_quanta: 4,
            remap_quanta: 10,
            proc_roots: ProcRoots::default(),
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
    /// Stats calls still running past their deadline (on their threads).
    stuck_calls: Arc<AtomicUsize>,
    /// Domains whose monitor was busy at the last collection, by UUID (a
    /// WARN line names one busy for a whole deadline, and again when it
    /// answers).
    not_answering: HashMap<String, Quiet>,
    /// Connection attempts that failed since the last success.
    failed_connects: u32,
    /// Originals stored by an earlier daemon, not yet matched to a domain
    /// seen by this one (by UUID); emptied after the first collection.
    stored: Originals,
    /// What the originals file holds now.
    saved: Originals,
    /// Known domains changed in a way the originals file must reflect.
    store_dirty: bool,
    /// The fast path's thread maps and balloon figures.
    fast: FastPath,
    /// Where the last fast-path collection spent its time.
    timing: CollectTiming,
    /// Lifecycle events seen (domains started, stopped, destroyed...).
    lifecycle: Arc<AtomicU64>,
    /// The registration on the current connection, if events work.
    watch: Option<ffi::LifecycleWatch>,
    /// The fast path's last listing, reused while no lifecycle event came.
    listing: Option<Listing>,
    /// The balloon refresh running on a background thread, if any.
    background: Option<BackgroundRefresh>,
}

/// A background balloon refresh: its answer, and when it started.
#[derive(Debug)]
struct BackgroundRefresh {
    answers: mpsc::Receiver<StatsAnswer>,
    quantum: u64,
    since: Instant,
    domains: usize,
}

/// A state-only listing, and the event count and quantum it was made at.
#[derive(Debug)]
struct Listing {
    domains: Vec<(VirDomain, Option<i64>)>,
    events: u64,
    quantum: u64,
}

/// Where one fast-path collection spent its time (the benchmark's columns).
#[derive(Clone, Copy, Debug, Default)]
pub struct CollectTiming {
    /// The state-only listing.
    pub listing: Duration,
    /// CPU figures from procfs.
    pub cpu: Duration,
    /// The balloon subset call within the collection (urgent domains).
    pub balloon: Duration,
    /// Domains whose balloon was refreshed within the collection.
    pub balloons_refreshed: usize,
    /// Domains whose balloon refresh started on the background thread.
    pub balloons_in_background: usize,
    /// The background refresh taken this quantum, if one was: its call's
    /// own duration (on its thread, off the collection) and the domains it
    /// brought.
    pub background_taken: Option<(Duration, usize)>,
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
        if options.collect == CollectMode::Auto && options.uri.starts_with("qemu:///system") {
            // Before the first connection, which then delivers events.
            ffi::start_event_loop();
        }
        let roots = options.proc_roots.clone();
        let stored = match &options.originals {
            Some(file) if !options.read_only => file.load().unwrap_or_else(|error| {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "ignoring the stored originals; they are learned again from the live domains"
                );
                Originals::new()
            }),
            _ => Originals::new(),
        };
        if !stored.is_empty() {
            tracing::info!(domains = stored.len(), "originals of an earlier run found; those domains restore to them");
        }
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
            stuck_calls: Arc::new(AtomicUsize::new(0)),
            not_answering: HashMap::new(),
            failed_connects: 0,
            stored,
            saved: Originals::new(),
            store_dirty: false,
            fast: FastPath::new(roots),
            timing: CollectTiming::default(),
            lifecycle: Arc::new(AtomicU64::new(0)),
            watch: None,
            listing: None,
            background: None,
        }
    }

    /// Every active domain with its run state: the last listing while no
    /// lifecycle event came (and for at most `remap_quanta`, a safety net
    /// against a lost event), else a state-only bulk call (no monitor, no
    /// job lock).
    fn listing(&mut self) -> Result<Vec<Record>, BackendError> {
        let events = self.lifecycle.load(Ordering::SeqCst);
        let quantum = self.quantum;
        let fresh = self.watch.is_some()
            && self.conn.is_some()
            && self
                .listing
                .as_ref()
                .is_some_and(|l| l.events == events && quantum.saturating_sub(l.quantum) < self.options.remap_quanta.max(1));
        if !fresh {
            let uri = self.options.uri.clone();
            let conn = self.ensure_connected()?;
            let listing = ffi::all_domain_stats(conn, ffi::Groups::State);
            self.calls += 1;
            let listing = listing.map_err(|error| {
                self.check_alive();
                hypervisor(&uri, "domain listing", error)
            })?;
            let domains = listing.records().map(|r| (r.domain(), DomainSample::from_numbers(r.numbers()).run_state)).collect();
            drop(listing);
            self.listing = Some(Listing { domains, events, quantum });
        }
        let listing = self.listing.as_ref().expect("listed above");
        Ok(listing
            .domains
            .iter()
            .map(|(dom, run_state)| (dom.clone(), DomainSample { run_state: *run_state, ..DomainSample::default() }))
            .collect())
    }

    /// Watches lifecycle events on the current connection (fast path only).
    fn watch_events(&mut self) {
        self.watch = None;
        self.listing = None;
        if !self.fast_path() || !ffi::start_event_loop() {
            return;
        }
        if let Some(conn) = self.conn.as_ref() {
            self.calls += 1;
            match ffi::watch_lifecycle(conn, &self.lifecycle) {
                Ok(watch) => self.watch = Some(watch),
                Err(error) => tracing::debug!(%error, "no lifecycle events; domains are listed every quantum"),
            }
        }
    }

    /// The fast path applies: a local system connection, not forced to bulk.
    fn fast_path(&self) -> bool {
        self.options.collect == CollectMode::Auto && self.options.uri.starts_with("qemu:///system")
    }

    /// The fast path's records: a state-only listing (no monitor, no job),
    /// CPU figures from procfs, and the balloon (and, where procfs could not
    /// say, vcpu) groups of the urgent domains, under the collection
    /// deadline; the others' balloons from the background refresh (see
    /// [`fast`](self::fast)).
    fn fast_records(&mut self) -> Result<Vec<Record>, BackendError> {
        let started = Instant::now();
        let mut records = self.listing()?;
        let listed = Instant::now();
        let quantum = self.quantum;
        let mut candidates = Vec::new();
        let mut needs_libvirt_vcpus = HashSet::new();
        for (i, (dom, sample)) in records.iter_mut().enumerate() {
            if !sample.is_active() {
                continue;
            }
            let (Ok(uuid), Ok(name)) = (dom.get_uuid_string(), dom.get_name()) else { continue };
            if self.domains.get(&uuid).is_some_and(|d| d.excluded) {
                continue;
            }
            if !self.fast.cpu_figures(&uuid, &name, quantum, self.options.remap_quanta, sample) {
                needs_libvirt_vcpus.insert(i);
            }
            let urgent = self.domains.get(&uuid).is_none_or(KnownDomain::is_settling) || needs_libvirt_vcpus.contains(&i);
            candidates.push((i, uuid, urgent));
        }
        let background_taken = self.take_background_refresh();
        let keyed: Vec<(String, bool)> = candidates.iter().map(|(_, u, urgent)| (u.clone(), *urgent)).collect();
        let plan = self.fast.plan_refresh(&keyed, quantum, self.options.balloon_refresh_quanta, self.background.is_some());
        if !plan.background.is_empty() {
            let doms = plan.background.iter().map(|&k| records[candidates[k].0].0.clone()).collect();
            self.start_background_refresh(doms);
        }
        let chosen: HashSet<usize> = plan.now.iter().map(|&k| candidates[k].0).collect();
        let doms: Vec<VirDomain> = chosen.iter().map(|&i| records[i].0.clone()).collect();
        let read_procfs = Instant::now();
        let refreshed = if doms.is_empty() { Ok(Vec::new()) } else { self.records(StatsCall::Subset(doms)) };
        let refreshed = match refreshed {
            Ok(got) => got,
            Err(error @ (BackendError::CollectTimeout { .. } | BackendError::CollectStuck { .. } | BackendError::Hypervisor { .. })) => {
                // The listing and CPU figures stand; the memory figures of
                // the subset age this quantum. (A domain destroyed since the
                // listing fails the whole call: the next quantum lists anew.)
                tracing::debug!(error = &error as &dyn std::error::Error, "balloon refresh did not come back");
                self.listing = None;
                if self.conn.is_none() {
                    return Err(error);
                }
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        let mut by_uuid: HashMap<String, DomainSample> = HashMap::new();
        for (dom, sample) in refreshed {
            if let Ok(uuid) = dom.get_uuid_string() {
                by_uuid.insert(uuid, sample);
            }
        }
        self.timing = CollectTiming {
            listing: listed - started,
            cpu: read_procfs - listed,
            balloon: read_procfs.elapsed(),
            balloons_refreshed: chosen.len(),
            balloons_in_background: plan.background.len(),
            background_taken,
        };
        for (i, uuid, _) in &candidates {
            let sample = &mut records[*i].1;
            if let Some(fresh) = by_uuid.remove(uuid).filter(|_| chosen.contains(i)) {
                self.fast.remember_balloon(uuid, &fresh.balloon, quantum);
                sample.balloon = fresh.balloon;
                if needs_libvirt_vcpus.contains(i) {
                    sample.vcpu_current = fresh.vcpu_current;
                    sample.vcpus = fresh.vcpus;
                }
            }
            self.fast.fill_balloon(uuid, sample);
        }
        Ok(records)
    }

    /// Starts the background balloon refresh of `doms` (see
    /// [`fast`](self::fast)); its answer is taken at a later quantum.
    fn start_background_refresh(&mut self, doms: Vec<VirDomain>) {
        let (tx, answers) = mpsc::channel();
        let domains = doms.len();
        match self.spawn_stats_call(&StatsCall::Subset(doms), &tx) {
            Ok(()) => self.background = Some(BackgroundRefresh { answers, quantum: self.quantum, since: Instant::now(), domains }),
            Err(error) => tracing::debug!(error = &error as &dyn std::error::Error, "no background balloon refresh this quantum"),
        }
    }

    /// Takes the background refresh's answer if it came, into the fast
    /// path's figures (as of the quantum it started at). One not back
    /// within a whole refresh window (`balloon_refresh_quanta` deadlines,
    /// twice over) is given up: its thread finishes or hangs on its own,
    /// counted among the stuck calls, and the domains' figures age.
    /// Returns the taken call's duration and the domains it brought.
    fn take_background_refresh(&mut self) -> Option<(Duration, usize)> {
        let refresh = self.background.take()?;
        match refresh.answers.try_recv() {
            Ok((Ok(records), took)) => {
                let brought = records.len();
                for (dom, sample) in records {
                    if let Ok(uuid) = dom.get_uuid_string() {
                        self.fast.remember_balloon(&uuid, &sample.balloon, refresh.quantum);
                    }
                }
                return Some((took, brought));
            }
            Ok((Err(error), _)) => {
                // Most likely a domain gone since the listing: list anew.
                tracing::debug!(%error, domains = refresh.domains, "background balloon refresh failed");
                self.listing = None;
            }
            Err(mpsc::TryRecvError::Empty) => {
                let window = self.options.collect_deadline * 2 * self.options.balloon_refresh_quanta.clamp(1, 1000) as u32;
                if refresh.since.elapsed() < window {
                    self.background = Some(refresh);
                } else {
                    tracing::debug!(
                        domains = refresh.domains,
                        waited_ms = refresh.since.elapsed().as_millis() as u64,
                        "background balloon refresh given up; its domains' figures age"
                    );
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => {}
        }
        None
    }

    /// Changes nothing on the hypervisor at discovery (`--dry-run`,
    /// `snapshot`, `restore`).
    fn hands_off(&self) -> bool {
        self.options.read_only || self.options.restore_only
    }

    /// Writes the originals of every known domain if they changed. A
    /// domain that did not answer keeps its stored entry (it is not known
    /// yet, or it is, unchanged).
    fn save_originals(&mut self) {
        let Some(file) = self.options.originals.clone() else { return };
        if self.options.read_only || !self.store_dirty {
            return;
        }
        self.store_dirty = false;
        let mut now: Originals = self.stored.clone();
        for uuid in self.domains.uuids() {
            let Some(d) = self.domains.get(&uuid) else { continue };
            if d.excluded {
                continue;
            }
            let entry = d.stored();
            if !entry.vcpus.is_empty() || entry.target_kib.is_some() {
                now.insert(uuid, entry);
            }
        }
        if now != self.saved {
            match file.save(&now) {
                Ok(()) => self.saved = now,
                Err(error) => tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot save the originals; a restart after a crash may not restore them"
                ),
            }
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

    /// The parts of the last fast-path collection.
    pub fn last_timing(&self) -> CollectTiming {
        self.timing
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
                        tracing::warn!(uri = %self.options.uri, failed_attempts = self.failed_connects, "reconnected to libvirt");
                    } else {
                        tracing::info!(uri = %self.options.uri, "connected to libvirt");
                    }
                    self.outage_logged = false;
                    self.failed_connects = 0;
                    self.backoff = Duration::from_secs(1);
                    self.host.connected(&conn, &mut self.calls);
                    self.domains.forget_samples();
                    self.conn = Some(conn);
                    self.watch_events();
                }
                Err(error) => {
                    // Every attempt is logged: they come at a falling rate
                    // (the backoff), so an outage is never silent and never
                    // floods the log.
                    self.failed_connects += 1;
                    let level_error = !self.outage_logged;
                    self.outage_logged = true;
                    let (uri, attempt, next_s) = (&self.options.uri, self.failed_connects, self.backoff.as_secs());
                    if level_error {
                        tracing::error!(%uri, attempt, next_attempt_in_s = next_s, %error, "cannot connect to libvirt; retrying with backoff");
                    } else {
                        tracing::warn!(%uri, attempt, next_attempt_in_s = next_s, %error, "reconnect to libvirt failed");
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
            self.watch = None;
            self.listing = None;
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
            if first_sight && !self.hands_off() && self.options.stats_period_s > 0 {
                self.calls += 1;
                if let Err(error) = dom.set_memory_stats_period(self.options.stats_period_s, ffi::AFFECT_LIVE) {
                    tracing::debug!(domain = name, %error, "cannot set the balloon stats period");
                }
            }
            match self.read_vcpus(dom, nvcpus) {
                Ok(live) => {
                    state.vcpus.retain(|n, _| live.contains_key(n));
                    let hands_off = self.hands_off();
                    let earlier = if first_sight { self.stored.remove(uuid) } else { None };
                    for (n, Placement { cpu, affinity }) in &live {
                        let v = state.vcpus.entry(*n).or_default();
                        v.cpu = *cpu;
                        v.affinity = affinity.clone();
                    }
                    match earlier {
                        Some(stored) if stored.id == id => {
                            tracing::info!(domain = name, vcpus = stored.vcpus.len(), "restores to the originals an earlier run stored");
                            state.adopt(&stored);
                        }
                        Some(_) => tracing::debug!(domain = name, "stored originals are of an earlier incarnation (it restarted); dropped"),
                        None => {}
                    }
                    self.store_dirty = true;
                    for (n, Placement { cpu, .. }) in live {
                        let v = state.vcpus.get_mut(&n).expect("inserted above");
                        if v.last_set.is_some() || hands_off {
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
            self.store_dirty = true;
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

    /// Starts one NOWAIT stats call on a thread of its own; its answer comes
    /// on `answers`. A call nobody waits for any more is left to finish (or
    /// hang) on its thread, which holds its own reference to the connection
    /// and frees what it gets back.
    fn spawn_stats_call(&mut self, what: &StatsCall, answers: &mpsc::Sender<StatsAnswer>) -> Result<(), BackendError> {
        let uri = self.options.uri.clone();
        let stuck = self.stuck_calls.load(Ordering::SeqCst);
        if stuck >= MAX_STUCK_CALLS {
            return Err(BackendError::CollectStuck { uri, stuck });
        }
        let conn = self.ensure_connected()?.clone();
        let tx = answers.clone();
        let what = what.clone();
        let in_flight = Arc::clone(&self.stuck_calls);
        in_flight.fetch_add(1, Ordering::SeqCst);
        self.calls += 1;
        let spawned = std::thread::Builder::new().name("vmb-stats".into()).spawn(move || {
            let mut conn = conn;
            let started = Instant::now();
            let list = match &what {
                StatsCall::All => ffi::all_domain_stats(&conn, ffi::Groups::All),
                StatsCall::Subset(doms) => ffi::domain_list_stats(doms, ffi::Groups::BalloonVcpu),
            };
            let result =
                list.map(|list| list.records().map(|r| (r.domain(), DomainSample::from_numbers(r.numbers()))).collect::<Vec<Record>>());
            drop(what);
            in_flight.fetch_sub(1, Ordering::SeqCst);
            // The receiver is gone when the answer came too late: the
            // records are dropped (freed) here.
            let _ = tx.send((result, started.elapsed()));
            let _ = conn.close();
        });
        if let Err(error) = spawned {
            self.stuck_calls.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::CollectThread { uri, message: error.to_string() });
        }
        Ok(())
    }

    /// The first answer on `answers` before `until`; `Ok(None)` if none came.
    fn wait_answer(&mut self, answers: &mpsc::Receiver<StatsAnswer>, until: Instant) -> Result<Option<Vec<Record>>, BackendError> {
        let uri = self.options.uri.clone();
        match answers.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok((Ok(records), _)) => Ok(Some(records)),
            Ok((Err(error), _)) => {
                self.check_alive();
                Err(hypervisor(&uri, "bulk domain stats", error))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(BackendError::CollectThread { uri, message: "the stats thread ended without an answer".into() })
            }
        }
    }

    /// Every active domain's record, within the collection deadline. The
    /// first call gets half of it. If it has not returned by then, either a
    /// domain's monitor hangs (holding its job lock, so a second NOWAIT call
    /// skips that monitor and returns), or the host is just slow: a second
    /// call starts, on a fresh connection (a stuck call keeps the old one,
    /// and its libvirtd request slot), and whichever of the two answers
    /// first before the deadline is taken.
    fn records(&mut self, what: StatsCall) -> Result<Vec<Record>, BackendError> {
        let started = Instant::now();
        let deadline = self.options.collect_deadline;
        let (tx, answers) = mpsc::channel();
        self.spawn_stats_call(&what, &tx)?;
        if let Some(records) = self.wait_answer(&answers, started + deadline / 2)? {
            return Ok(records);
        }
        tracing::debug!(uri = %self.options.uri, waited_ms = (deadline / 2).as_millis() as u64, "stats call past half the deadline; a second one on a fresh connection");
        self.fresh_connection();
        self.spawn_stats_call(&what, &tx)?;
        match self.wait_answer(&answers, started + deadline)? {
            Some(records) => Ok(records),
            None => Err(BackendError::CollectTimeout { uri: self.options.uri.clone(), deadline }),
        }
    }

    /// Replaces the connection by a new one (the old one stays open for as
    /// long as a stuck call holds it). Kept as it is if none can be opened.
    fn fresh_connection(&mut self) {
        self.calls += 1;
        match Connect::open(Some(&self.options.uri)) {
            Ok(conn) => {
                let old_watch = self.watch.take();
                if let Some(mut old) = self.conn.replace(conn) {
                    drop(old_watch);
                    let _ = old.close();
                }
                self.watch_events();
            }
            Err(error) => tracing::debug!(uri = %self.options.uri, %error, "cannot open a fresh connection; keeping the old one"),
        }
    }

    /// Finds, among `records`, the domains whose monitor is busy: a record
    /// without `balloon.last-update` (NOWAIT left the monitor out) is asked
    /// `virDomainGetControlInfo`, which answers without the monitor. Only
    /// such records are asked (and, of domains without a balloon driver,
    /// only new ones or while a call is stuck), so a healthy quantum makes
    /// no extra call. Logs each domain busy for a whole deadline (hung), and
    /// again when it answers.
    fn find_not_answering(&mut self, records: &[Record]) -> HashMap<String, Duration> {
        let mut busy = HashMap::new();
        for (dom, sample) in records {
            if sample.balloon.contains_key("last-update") || !sample.is_active() {
                continue;
            }
            let Ok(uuid) = dom.get_uuid_string() else { continue };
            // A known domain that never reported guest figures has no balloon
            // driver: its records always lack them. Asked only while a call
            // of ours is stuck, or if it was already quiet.
            let never_reported = self.domains.get(&uuid).is_some_and(|d| !d.has_guest_figures());
            let stuck = self.stuck_calls.load(Ordering::SeqCst).saturating_sub(usize::from(self.background.is_some()));
            if never_reported && stuck == 0 && !self.not_answering.contains_key(&uuid) {
                continue;
            }
            self.calls += 1;
            if let Ok(Some(for_how_long)) = ffi::monitor_busy_for(dom) {
                busy.insert(uuid, for_how_long);
            }
        }
        // Any busy monitor gets no action this quantum (its job lock is
        // held: a change would wait for it), but only one busy for a whole
        // deadline is a hung guest worth a WARN line: on a loaded host a
        // healthy monitor is often busy for some milliseconds.
        let hung_after = self.options.collect_deadline;
        for (uuid, for_how_long) in &busy {
            let name =
                || records.iter().find(|(d, _)| d.get_uuid_string().ok().as_ref() == Some(uuid)).and_then(|(d, _)| d.get_name().ok());
            let quiet = self
                .not_answering
                .entry(uuid.clone())
                .or_insert_with(|| Quiet { name: name().unwrap_or_else(|| uuid.clone()), warned: false });
            if !quiet.warned && *for_how_long >= hung_after {
                quiet.warned = true;
                tracing::warn!(
                    domain = %quiet.name, uuid = %uuid, busy_ms = for_how_long.as_millis() as u64,
                    "domain is not answering (its monitor is busy with a call that has not returned): its memory figures are stale and no action is sent to it"
                );
            }
        }
        let answering: Vec<String> = self.not_answering.keys().filter(|u| !busy.contains_key(*u)).cloned().collect();
        for uuid in answering {
            let Some(quiet) = self.not_answering.remove(&uuid) else { continue };
            if quiet.warned {
                tracing::warn!(domain = %quiet.name, uuid = %uuid, "domain answers again");
            } else {
                tracing::debug!(domain = %quiet.name, uuid = %uuid, "monitor free again");
            }
        }
        busy
    }

    /// Refuses an action on a domain whose monitor does not answer: libvirt
    /// would block on its job lock for 30 s, and the daemon with it.
    fn check_answering(&self, domain: &str) -> Result<(), BackendError> {
        match self.domains.uuid_of(domain) {
            Some(uuid) if self.not_answering.contains_key(uuid) => Err(BackendError::NotAnswering { domain: domain.to_string() }),
            _ => Ok(()),
        }
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
    fn connection(&self) -> crate::backend::Connection {
        let backoff_s = match self.conn {
            Some(_) => 0.0,
            None => self.next_connect.saturating_duration_since(Instant::now()).as_secs_f64(),
        };
        crate::backend::Connection { failed_connects: self.failed_connects, backoff_s }
    }
    fn collect(&mut self) -> Result<Observation, BackendError> {
        let started = Instant::now();
        let samples = if self.fast_path() { self.fast_records()? } else { self.records(StatsCall::All)? };
        let now = Instant::now();
        let busy = self.find_not_answering(&samples);
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
            let busy_for = busy.get(&uuid).copied();
            if busy_for.is_some() && self.domains.get(&uuid).is_none_or(|d| d.id != dom.get_id()) {
                // Discovery pins and sets the stats period: both would block.
                // It waits until the domain answers.
                continue;
            }
            let needs_discovery = busy_for.is_none()
                && match self.domains.get(&uuid) {
                    None => true,
                    Some(d) => d.id != dom.get_id() || (!d.excluded && sample.vcpu_current.is_some_and(|n| n != d.nvcpus)),
                };
            if needs_discovery {
                self.discover(&uuid, &name, &dom, &sample);
            } else if busy_for.is_none() && self.domains.get(&uuid).is_some_and(|d| d.audit_due(self.quantum, self.options.audit_every)) {
                self.audit(&uuid, &dom);
            }
            let Some(known) = self.domains.get_mut(&uuid) else { continue };
            known.not_answering = busy_for;
            if let Some(d) = known.observe(&uuid, &sample, now) {
                domains.push(d);
            }
        }
        self.fast.forget_gone(&seen);
        for state in self.domains.remove_gone(&seen) {
            tracing::info!(domain = %state.name, "domain gone");
            self.store_dirty = true;
        }
        // Stored originals of domains that are gone are forgotten; those of a
        // domain present but not answering wait for its discovery.
        let before = self.stored.len();
        self.stored.retain(|uuid, _| seen.contains(uuid));
        self.store_dirty |= self.stored.len() != before;
        self.save_originals();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        self.quantum += 1;
        self.last_collect = started.elapsed();
        Ok(Observation { host, domains })
    }

    fn pin_vcpu(&mut self, domain: &str, vcpu: u32, cpus: &[u32]) -> Result<(), BackendError> {
        if self.options.read_only {
            return Ok(());
        }
        self.check_answering(domain)?;
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
                let had_original = v.original.is_some();
                v.pinned(cpus);
                self.store_dirty |= !had_original;
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
        self.check_answering(domain)?;
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
        let result = self.restore_known();
        // What was restored is no longer an original to keep; a domain that
        // did not answer (or was not seen yet) keeps its entry, for
        // `vm-balancer restore` once it answers. A failed restore leaves
        // the file as it was.
        if let (Some(file), true) = (self.options.originals.clone(), result.is_ok()) {
            let mut keep = std::mem::take(&mut self.stored);
            for uuid in self.not_answering.keys() {
                if let Some(d) = self.domains.get(uuid) {
                    keep.insert(uuid.clone(), d.stored());
                }
            }
            if let Err(error) = file.save(&keep) {
                tracing::warn!(error = &error as &dyn std::error::Error, "cannot update the originals file after restore");
            }
        }
        result
    }
}

impl LibvirtBackend {
    /// Puts back the originals of every known domain that answers.
    fn restore_known(&mut self) -> Result<usize, BackendError> {
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
            // Asked again now (a monitor busy at the last collection may be
            // free): a change to a hung domain would block for 30 s.
            if self.not_answering.contains_key(&uuid) {
                self.calls += 1;
                if !matches!(ffi::monitor_busy_for(&dom), Ok(None)) {
                    tracing::warn!(domain = %name, "not restored: the domain is not answering (run `vm-balancer restore` once it answers)");
                    continue;
                }
                self.not_answering.remove(&uuid);
            }
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
