//! Every `unsafe` of the daemon, behind safe functions: the raw libvirt
//! calls of the backend, and three libc/wasmtime calls (the effective uid,
//! SIGPIPE's disposition, loading a compiled component from the cache).
//! `grep unsafe host/src` finds this file only.
//!
//! The `virt` crate covers most of what the backend needs, but not the bulk
//! stats call (it does not free the records), nor the node CPU map, node CPU
//! and memory stats, or `virDomainGetVcpus` with caller-sized buffers. Those
//! go through `virt::sys` here and nowhere else, the way Firecracker keeps
//! its ioctls in `kvm-ioctls`: the rest of the backend holds owned Rust
//! values and cannot get a pointer's lifetime or a buffer's length wrong.
//!
//! Rules kept in this file:
//! - one unsafe operation per `unsafe` block, each with its `// SAFETY:`
//!   argument;
//! - libvirt's error is read (`virGetLastError`) right after the call that
//!   failed, before any other libvirt call can replace it;
//! - memory libvirt hands over is owned by a Rust value at once and freed
//!   exactly once ([`StatsList`]'s drop, or `free` before returning).

use virt::connect::Connect;
use virt::domain::Domain as VirDomain;
use virt::error::Error as VirError;
use virt::sys;

/// Flags of a live-only change (`virDomainPinVcpuFlags`,
/// `virDomainSetMemoryStatsPeriod`).
pub(crate) const AFFECT_LIVE: sys::virDomainModificationImpact = sys::VIR_DOMAIN_AFFECT_LIVE;

/// Flags of a live-only balloon target (`virDomainSetMemoryFlags`).
pub(crate) const MEM_LIVE: sys::virDomainMemoryModFlags = sys::VIR_DOMAIN_MEM_LIVE;

/// Owns the record list of one `virConnectGetAllDomainStats` call and frees
/// it on drop (`virt` would leak it), even when parsing bails out early.
pub(crate) struct StatsList {
    ptr: *mut sys::virDomainStatsRecordPtr,
    len: usize,
}

/// Stats groups a call asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Groups {
    /// Run state, total CPU, per-vCPU counters and the balloon (which
    /// carries the guest's memory figures): the bulk path.
    All,
    /// Run state only: no monitor, no job, a fraction of a millisecond for
    /// dozens of domains (the fast path's listing).
    State,
    /// Balloon and per-vCPU counters (the fast path's rolling subset).
    BalloonVcpu,
}

impl Groups {
    fn bits(self) -> sys::virDomainStatsTypes {
        match self {
            Groups::All => {
                sys::VIR_DOMAIN_STATS_STATE | sys::VIR_DOMAIN_STATS_CPU_TOTAL | sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_BALLOON
            }
            Groups::State => sys::VIR_DOMAIN_STATS_STATE,
            Groups::BalloonVcpu => sys::VIR_DOMAIN_STATS_STATE | sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_BALLOON,
        }
    }
}

/// Active domains only, and NOWAIT (libvirt ≥ 4.5): a domain whose job lock
/// is held (its monitor busy with a call that has not returned) reports what
/// needs no monitor (state, vCPU times, balloon size) instead of blocking
/// the whole call, and every other domain with it, for up to 30 s.
const STATS_FLAGS: sys::virConnectGetAllDomainStatsFlags =
    sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT;

/// Every active domain's stats in one round trip. A domain whose monitor
/// hangs while its job lock is free still blocks this call (NOWAIT only
/// skips a held lock), so the backend makes it on a thread of its own, with
/// a deadline.
pub(crate) fn all_domain_stats(conn: &Connect, groups: Groups) -> Result<StatsList, VirError> {
    let mut ptr: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: `conn` is an open connection, borrowed for the call; on success
    // libvirt stores a NULL-terminated array of `n` records in `ptr`, which
    // the returned StatsList owns.
    let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), groups.bits(), &mut ptr, STATS_FLAGS) };
    if n < 0 {
        return Err(VirError::last_error());
    }
    Ok(StatsList { ptr, len: n as usize })
}

/// The stats of the domains `doms` only (NOWAIT), in one round trip.
pub(crate) fn domain_list_stats(doms: &[VirDomain], groups: Groups) -> Result<StatsList, VirError> {
    if doms.is_empty() {
        return Ok(StatsList { ptr: std::ptr::null_mut(), len: 0 });
    }
    // libvirt wants a NULL-terminated array of handles; the handles stay
    // owned by `doms`, which outlives the call.
    let mut list: Vec<sys::virDomainPtr> = doms.iter().map(VirDomain::as_ptr).chain(std::iter::once(std::ptr::null_mut())).collect();
    let mut ptr: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: `list` is a NULL-terminated array of valid domain handles of
    // one connection, alive for the call; on success libvirt stores a
    // NULL-terminated array of `n` records in `ptr`, which the returned
    // StatsList owns.
    let n =
        unsafe { sys::virDomainListGetStats(list.as_mut_ptr(), groups.bits(), &mut ptr, sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT) };
    if n < 0 {
        return Err(VirError::last_error());
    }
    Ok(StatsList { ptr, len: n as usize })
}

impl StatsList {
    /// The records, in libvirt's order, borrowed from the list.
    pub(crate) fn records(&self) -> impl ExactSizeIterator<Item = StatsRecord<'_>> {
        let records: &[sys::virDomainStatsRecordPtr] = if self.ptr.is_null() || self.len == 0 {
            &[]
        } else {
            // SAFETY: libvirt returned `len` valid record pointers in an array
            // at `ptr` (NULL-terminated, so `len` entries are in bounds); the
            // array lives until `drop` frees it, which the borrow of `self`
            // outlives.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        };
        records.iter().map(|&ptr| {
            // SAFETY: each pointer of the array is a valid record, alive (and
            // not written by libvirt) while the list is, which the returned
            // borrow cannot outlive.
            StatsRecord { record: unsafe { &*ptr } }
        })
    }
}

impl Drop for StatsList {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from virConnectGetAllDomainStats and is freed
            // exactly once, here; the domain handles taken from its records
            // hold references of their own (virDomainRef).
            unsafe { sys::virDomainStatsRecordListFree(self.ptr) };
        }
    }
}

/// One domain's record, valid while its [`StatsList`] is.
pub(crate) struct StatsRecord<'a> {
    record: &'a sys::virDomainStatsRecord,
}

impl<'a> StatsRecord<'a> {
    /// An owned handle of the record's domain, usable after the list is
    /// freed: it holds one more reference, dropped with the handle.
    pub(crate) fn domain(&self) -> VirDomain {
        let dom = self.record.dom;
        // SAFETY: `dom` is the record's valid domain pointer; the reference
        // taken here is the one the returned handle releases on drop.
        unsafe { sys::virDomainRef(dom) };
        // SAFETY: `dom` is valid and referenced once for this handle (above).
        unsafe { VirDomain::from_ptr(dom) }
    }

    /// The record's numeric typed parameters as (field, value); other types
    /// (strings, doubles, booleans) are skipped, the backend reads none.
    pub(crate) fn numbers(&self) -> impl Iterator<Item = (String, i128)> + 'a {
        let (params, nparams) = (self.record.params, self.record.nparams);
        let params: &'a [sys::virTypedParameter] = if params.is_null() || nparams <= 0 {
            &[]
        } else {
            // SAFETY: the record holds `nparams` initialised typed parameters
            // at `params`, freed only with the list, which `'a` outlives.
            unsafe { std::slice::from_raw_parts(params, nparams as usize) }
        };
        params.iter().filter_map(typed_number)
    }
}

/// A numeric typed parameter's (field, value), widened to `i128` so that
/// every libvirt integer type fits.
fn typed_number(p: &sys::virTypedParameter) -> Option<(String, i128)> {
    let value = match p.type_ as u32 {
        // SAFETY: `type_` says the union holds `i`.
        sys::VIR_TYPED_PARAM_INT => i128::from(unsafe { p.value.i }),
        // SAFETY: `type_` says the union holds `ui`.
        sys::VIR_TYPED_PARAM_UINT => i128::from(unsafe { p.value.ui }),
        // SAFETY: `type_` says the union holds `l`.
        sys::VIR_TYPED_PARAM_LLONG => i128::from(unsafe { p.value.l }),
        // SAFETY: `type_` says the union holds `ul`.
        sys::VIR_TYPED_PARAM_ULLONG => i128::from(unsafe { p.value.ul }),
        _ => return None,
    };
    Some((field_name(&p.field), value))
}

/// A fixed-size C field name up to its NUL (or the whole array if libvirt
/// left none), read without trusting the terminator.
fn field_name(field: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = field.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The host's CPUs as libvirt's node CPU map (`true` = online), or `None`
/// when the driver has no map (the caller falls back to node info).
pub(crate) fn node_cpu_map(conn: &Connect) -> Option<Vec<bool>> {
    let mut map: *mut libc::c_uchar = std::ptr::null_mut();
    let mut online: libc::c_uint = 0;
    // SAFETY: `conn` is an open connection, borrowed for the call; on success
    // libvirt stores a malloc'd bitmap of `(n + 7) / 8` bytes in `map`.
    let n = unsafe { sys::virNodeGetCPUMap(conn.as_ptr(), &mut map, &mut online, 0) };
    if map.is_null() {
        return None;
    }
    let cpus = (n > 0).then(|| {
        let n = n as usize;
        // SAFETY: the bitmap has (n + 7) / 8 bytes (see above) and is freed
        // only below, after this copy.
        let bytes = unsafe { std::slice::from_raw_parts(map, n.div_ceil(8)) };
        (0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect()
    });
    // SAFETY: `map` was allocated by libvirt with malloc, and is freed once.
    unsafe { libc::free(map.cast()) };
    cpus
}

/// One host CPU's cumulative times as (field, ns): `kernel`, `user`,
/// `idle`, `iowait` and whatever else the driver reports.
pub(crate) fn node_cpu_stats(conn: &Connect, cpu: u32) -> Option<Vec<(String, u64)>> {
    let mut params = [sys::virNodeCPUStats { field: [0; 80], value: 0 }; 8];
    let mut n: libc::c_int = params.len() as libc::c_int;
    // SAFETY: `conn` is an open connection, borrowed for the call; `params`
    // has room for `n` entries, as the call is told.
    let rc = unsafe { sys::virNodeGetCPUStats(conn.as_ptr(), cpu as libc::c_int, params.as_mut_ptr(), &mut n, 0) };
    if rc < 0 {
        return None;
    }
    Some(params.iter().take(n.max(0) as usize).map(|p| (field_name(&p.field), p.value)).collect())
}

/// The host's memory over all NUMA cells as (field, KiB): `total`, `free`,
/// `buffers`, `cached`; `None` on drivers without node memory stats.
pub(crate) fn node_memory_stats(conn: &Connect) -> Option<Vec<(String, u64)>> {
    let mut params = [sys::virNodeMemoryStats { field: [0; 80], value: 0 }; 8];
    let mut n: libc::c_int = params.len() as libc::c_int;
    // SAFETY: `conn` is an open connection, borrowed for the call; `params`
    // has room for `n` entries, as the call is told.
    let rc = unsafe { sys::virNodeGetMemoryStats(conn.as_ptr(), sys::VIR_NODE_MEMORY_STATS_ALL_CELLS, params.as_mut_ptr(), &mut n, 0) };
    if rc != 0 {
        return None;
    }
    Some(params.iter().take(n.max(0) as usize).map(|p| (field_name(&p.field), p.value)).collect())
}

/// Where one vCPU runs, from `virDomainGetVcpus`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VcpuInfo {
    /// vCPU number.
    pub number: u32,
    /// The pCPU it runs on, if the driver knows.
    pub cpu: Option<u32>,
    /// Its live affinity.
    pub affinity: Vec<u32>,
}

/// Placement of up to `nvcpus` vCPUs, with affinity maps of `maplen` bytes
/// (the host's CPU count rounded up to bytes).
pub(crate) fn domain_vcpus(dom: &VirDomain, nvcpus: usize, maplen: usize) -> Result<Vec<VcpuInfo>, VirError> {
    let mut info = vec![sys::virVcpuInfo { number: 0, state: 0, cpuTime: 0, cpu: -1 }; nvcpus];
    let mut maps = vec![0u8; nvcpus * maplen];
    // SAFETY: `info` has room for `nvcpus` entries and `maps` for `nvcpus`
    // maps of `maplen` bytes, as the call is told; `dom` is a valid handle,
    // borrowed for the call.
    let got =
        unsafe { sys::virDomainGetVcpus(dom.as_ptr(), info.as_mut_ptr(), nvcpus as libc::c_int, maps.as_mut_ptr(), maplen as libc::c_int) };
    if got < 0 {
        return Err(VirError::last_error());
    }
    Ok(info
        .iter()
        .take(got as usize)
        .enumerate()
        .map(|(i, v)| VcpuInfo {
            number: v.number,
            cpu: u32::try_from(v.cpu).ok(),
            affinity: cpus_of_map(&maps[i * maplen..(i + 1) * maplen]),
        })
        .collect())
}

/// How long a domain's monitor has been busy with one call, from
/// `virDomainGetControlInfo`, which needs neither the job lock nor the
/// monitor, so it answers at once for a hung QEMU. `None`: the monitor is
/// free (or in the middle of a background job, which answers queries).
pub(crate) fn monitor_busy_for(dom: &VirDomain) -> Result<Option<std::time::Duration>, VirError> {
    let mut info = sys::virDomainControlInfo { state: 0, details: 0, stateTime: 0 };
    // SAFETY: `dom` is a valid handle, borrowed for the call; `info` is a
    // plain struct the call fills.
    let rc = unsafe { sys::virDomainGetControlInfo(dom.as_ptr(), &mut info, 0) };
    if rc < 0 {
        return Err(VirError::last_error());
    }
    Ok(match info.state {
        sys::VIR_DOMAIN_CONTROL_OCCUPIED | sys::VIR_DOMAIN_CONTROL_ERROR => Some(std::time::Duration::from_millis(info.stateTime)),
        _ => None,
    })
}

/// libvirt's cpumap of `cpus`: bit `c % 8` of byte `c / 8`, at least
/// `maplen` bytes (longer if a CPU lies beyond them).
pub(crate) fn cpumap(cpus: &[u32], maplen: usize) -> Vec<u8> {
    let mut map = vec![0u8; maplen.max(cpus.iter().map(|c| *c as usize / 8 + 1).max().unwrap_or(1))];
    for cpu in cpus {
        map[*cpu as usize / 8] |= 1 << (cpu % 8);
    }
    map
}

/// The CPUs set in a libvirt cpumap, ascending.
fn cpus_of_map(map: &[u8]) -> Vec<u32> {
    (0..map.len() * 8).filter(|c| map[c / 8] & (1 << (c % 8)) != 0).map(|c| c as u32).collect()
}

/// libvirt's default event loop, started once per process on a thread of
/// its own (`virEventRegisterDefaultImpl`, then `virEventRunDefaultImpl`
/// forever). Lifecycle events need it; it also runs the connections'
/// keepalive. `false` if it could not be started (the backend then lists
/// domains every quantum). Must run before the first connection is opened.
pub(crate) fn start_event_loop() -> bool {
    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        // SAFETY: registers libvirt's own default event loop; no argument,
        // called once per process (the OnceLock), before any connection.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            return false;
        }
        std::thread::Builder::new()
            .name("vmb-libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: runs one iteration of the loop registered above;
                // this thread is the only one that runs it.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .is_ok()
    })
}

/// A lifecycle-event registration on one connection: every domain started,
/// stopped, destroyed, defined... adds one to `counter`. Deregistered on drop.
pub(crate) struct LifecycleWatch {
    conn: Connect,
    id: libc::c_int,
}

unsafe extern "C" fn lifecycle_event(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    _event: libc::c_int,
    _detail: libc::c_int,
    opaque: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `opaque` is the `Arc<AtomicU64>` given at registration, alive
    // until `lifecycle_free` runs (after the last call of this function).
    let counter = unsafe { &*(opaque as *const std::sync::atomic::AtomicU64) };
    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    0
}

unsafe extern "C" fn lifecycle_free(opaque: *mut libc::c_void) {
    // SAFETY: `opaque` came from `Arc::into_raw` at registration, and libvirt
    // calls this once, when the callback is gone.
    drop(unsafe { std::sync::Arc::from_raw(opaque as *const std::sync::atomic::AtomicU64) });
}

/// Watches every domain's lifecycle events on `conn` (the event loop must
/// run: [`start_event_loop`]).
pub(crate) fn watch_lifecycle(conn: &Connect, counter: &std::sync::Arc<std::sync::atomic::AtomicU64>) -> Result<LifecycleWatch, VirError> {
    type Lifecycle =
        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, libc::c_int, libc::c_int, *mut libc::c_void) -> libc::c_int;
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut libc::c_void);
    let opaque = std::sync::Arc::into_raw(std::sync::Arc::clone(counter)) as *mut libc::c_void;
    // SAFETY: libvirt's API takes every event callback as the generic type
    // and calls it with the signature of its event id (VIR_DOMAIN_EVENT_CALLBACK
    // in C); for VIR_DOMAIN_EVENT_ID_LIFECYCLE that is `Lifecycle`, the type
    // of `lifecycle_event`. Both are `extern "C"` function pointers.
    let callback = unsafe { std::mem::transmute::<Lifecycle, Generic>(lifecycle_event) };
    // SAFETY: `conn` is open and borrowed for the call; `opaque` stays valid
    // until libvirt calls `lifecycle_free` with it.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as libc::c_int,
            Some(callback),
            opaque,
            Some(lifecycle_free),
        )
    };
    if id < 0 {
        let error = VirError::last_error();
        // SAFETY: registration failed, so libvirt will not call the free
        // callback: the reference is dropped here, once.
        drop(unsafe { std::sync::Arc::from_raw(opaque as *const std::sync::atomic::AtomicU64) });
        return Err(error);
    }
    Ok(LifecycleWatch { conn: conn.clone(), id })
}

impl Drop for LifecycleWatch {
    fn drop(&mut self) {
        // SAFETY: `id` was returned by the registration on this connection,
        // which `self.conn` keeps open; deregistered once, here.
        unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.id) };
        let _ = self.conn.close();
    }
}

/// The effective uid of this process (the compile cache refuses a
/// directory owned by anyone else).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Puts SIGPIPE back to its default (die quietly), as Unix tools do when
/// their reader goes away (`vm-balancer simulate ... | head`). For the
/// report commands only: the daemon keeps Rust's default (ignored), so a
/// closed log pipe cannot kill it mid-quantum.
pub fn restore_default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL only changes this process's disposition
    // of SIGPIPE; it has no memory effects and no other precondition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Caps glibc's malloc at two arenas. By default every thread that
/// allocates gets an arena of its own (up to 8 per core) and keeps what it
/// freed: the policy compiler's worker threads and the stats-call threads
/// left the daemon ~10 MiB above its working set at 1,000 domains
/// (`cargo bench --bench collect`). The hot path is one thread, so two
/// arenas cost no contention worth measuring.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt(3) only tunes the allocator's parameters; it is called
    // once at start, before the daemon starts any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// A compiled component from the bytes of a compile-cache entry.
///
/// `Component::deserialize` is unsafe because it maps the bytes' native
/// code and runs it as is. Its only caller is
/// [`crate::policy::cache::CompileCache`], which passes bytes that it read
/// with one `open(O_NOFOLLOW)` from a directory owned by this uid and not
/// writable by group or others, from a regular file owned by this uid with
/// no group or other permission bits (checked with `fstat` on that same
/// descriptor), and whose SHA-256 matches the digest stored beside it when
/// it was written from `Component::serialize`. The bytes are in memory, so
/// nothing can change between those checks and this call. wasmtime also
/// checks the version and settings in the header and errors (never UB) on
/// a mismatch. The cache is as trusted as the binary: whoever can write as
/// this uid can replace both.
pub(crate) fn deserialize_cached_component(engine: &wasmtime::Engine, bytes: &[u8]) -> wasmtime::Result<wasmtime::component::Component> {
    // SAFETY: see above: the bytes are the cache's own entry, checked for
    // owner, mode and digest, and held in memory since.
    unsafe { wasmtime::component::Component::deserialize(engine, bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpumaps_round_trip_and_grow_for_far_cpus() {
        assert_eq!(cpumap(&[0, 3, 9], 1), [0b1001, 0b10]);
        assert_eq!(cpumap(&[1], 2), [0b10, 0]);
        assert_eq!(cpumap(&[], 0), [0]);
        assert_eq!(cpus_of_map(&cpumap(&[0, 3, 9], 4)), [0, 3, 9]);
    }

    #[test]
    fn field_names_stop_at_nul_or_the_array_end() {
        let mut field = [0 as libc::c_char; 8];
        for (f, b) in field.iter_mut().zip(b"user") {
            *f = *b as libc::c_char;
        }
        assert_eq!(field_name(&field), "user");
        assert_eq!(field_name(&[b'a' as libc::c_char; 3]), "aaa");
    }
}
