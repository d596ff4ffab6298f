//! Stage 1, **collect**: the one boundary between the daemon and a hypervisor.
//!
//! The trait is deliberately small and synchronous: one call to observe, two
//! to act. The libvirt backend and the simulator implement it; [`open`]
//! picks one from a URI, and nothing else in the daemon names either.

pub mod libvirt;
pub mod sim;

use vm_balancer_sdk::Domain;

/// What a backend saw over the quantum that just ended. The reserve,
/// reserved CPUs and params are the config's, added by the snapshot stage:
/// a backend has no field for them, so it cannot fill them wrongly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Host CPUs and memory.
    pub host: ObservedHost,
    /// Managed domains (the backend leaves out the ones excluded by config).
    pub domains: Vec<Domain>,
}

/// The host as a backend sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedHost {
    /// Every host CPU.
    pub cpus: Vec<ObservedCpu>,
    /// Physical memory.
    pub memory: ObservedMemory,
}

/// One host CPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedCpu {
    /// Kernel CPU number.
    pub id: u32,
    /// Online.
    pub online: bool,
    /// Busy fraction over the last quantum, all causes, 0.0-1.0.
    pub usage: f32,
    /// NUMA node.
    pub node: u32,
}

/// Host memory, KiB.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedMemory {
    /// Physical memory.
    pub total_kib: u64,
    /// What the host can still hand out (MemAvailable).
    pub available_kib: u64,
}

/// Errors from a backend; each names the domain, vCPU or value involved.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The domain disappeared (destroyed between collect and apply).
    #[error("domain {domain:?} no longer exists")]
    DomainGone {
        /// Domain name.
        domain: String,
    },
    /// The domain is opted out (config `[exclude]` or libvirt metadata).
    #[error("domain {domain:?} is excluded from balancing; it is never touched")]
    Excluded {
        /// Domain name.
        domain: String,
    },
    /// The domain has no such vCPU.
    #[error("domain {domain:?} has no vCPU {vcpu}")]
    NoSuchVcpu {
        /// Domain name.
        domain: String,
        /// vCPU number.
        vcpu: u32,
    },
    /// Pinning failed.
    #[error("pinning domain {domain:?} vCPU {vcpu} to CPUs {cpus:?} failed: {message}")]
    Pin {
        /// Domain name.
        domain: String,
        /// vCPU number.
        vcpu: u32,
        /// Requested CPUs.
        cpus: Vec<u32>,
        /// The hypervisor's message.
        message: String,
    },
    /// Setting a balloon target failed.
    #[error("setting domain {domain:?} balloon target to {target_kib} KiB failed: {message}")]
    SetMemory {
        /// Domain name.
        domain: String,
        /// Requested target.
        target_kib: u64,
        /// The hypervisor's message.
        message: String,
    },
    /// Talking to the hypervisor failed (connection lost, call refused).
    /// libvirt's message and code are the source, not repeated here.
    #[error("hypervisor at {uri} failed during {operation}")]
    Hypervisor {
        /// Connection URI.
        uri: String,
        /// What was being done.
        operation: &'static str,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// The domain's monitor is busy with a call that has not returned (a
    /// hung or stopped QEMU): an action would block on its job lock.
    #[error("domain {domain:?} is not answering (its monitor is busy); no action is sent to it until it answers")]
    NotAnswering {
        /// Domain name.
        domain: String,
    },
    /// Neither stats call of a collection returned within the deadline.
    #[error("collecting from {uri} took longer than the deadline of {deadline:?} (collect_deadline_ms): no figures this quantum")]
    CollectTimeout {
        /// Connection URI.
        uri: String,
        /// The deadline.
        deadline: std::time::Duration,
    },
    /// Too many stats calls are still stuck in libvirt to start another.
    #[error("{stuck} stats calls to {uri} have not returned (hung guests?); no new call until one does")]
    CollectStuck {
        /// Connection URI.
        uri: String,
        /// Calls still running.
        stuck: usize,
    },
    /// The thread of a stats call could not be started, or died.
    #[error("stats thread for {uri} failed: {message}")]
    CollectThread {
        /// Connection URI.
        uri: String,
        /// What happened.
        message: String,
    },
    /// The connection is down and the reconnect backoff has not run out:
    /// no call was made, so there is no libvirt error to carry.
    #[error("hypervisor at {uri} failed during reconnect: not connected; next attempt in {retry_in:.1?}")]
    NotConnected {
        /// Connection URI.
        uri: String,
        /// Time left until the next connection attempt.
        retry_in: std::time::Duration,
    },
}

/// A hypervisor, real or simulated.
pub trait Backend {
    /// Observes the host and the managed domains over the last quantum.
    fn collect(&mut self) -> Result<Observation, BackendError>;
    /// Pins a vCPU to a set of host CPUs (live).
    fn pin_vcpu(&mut self, domain: &str, vcpu: u32, cpus: &[u32]) -> Result<(), BackendError>;
    /// Sets a domain's balloon target (live), KiB.
    fn set_memory(&mut self, domain: &str, target_kib: u64) -> Result<(), BackendError>;
    /// Puts back every pin and balloon target this daemon changed. Default:
    /// nothing to restore (the simulator).
    fn restore(&mut self) -> Result<usize, BackendError> {
        Ok(0)
    }
    /// The state of the connection to the hypervisor, for metrics.
    /// Default: always connected (the simulator).
    fn connection(&self) -> Connection {
        Connection::default()
    }
}

/// What the daemon knows of its hypervisor connection.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Connection {
    /// Failed connection attempts since the last success.
    pub failed_connects: u32,
    /// Wait before the next attempt, seconds (0 when connected).
    pub backoff_s: f64,
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A `sim:` scenario could not be loaded.
    #[error(transparent)]
    Scenario(#[from] sim::ScenarioError),
}

/// The backend for `options.uri`: `sim:SCENARIO.toml` is the simulator (in
/// real time under `run`: the daemon loop without a hypervisor), anything
/// else a libvirt URI, connected on first use (and reconnected after an
/// outage) by the backend itself.
pub fn open(options: libvirt::LibvirtOptions) -> Result<Box<dyn Backend>, OpenError> {
    Ok(match options.uri.strip_prefix("sim:") {
        Some(path) => Box::new(sim::SimBackend::new(sim::Scenario::load(std::path::Path::new(path))?)),
        None => Box::new(libvirt::LibvirtBackend::new(options)),
    })
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn collect(&mut self) -> Result<Observation, BackendError> {
        (**self).collect()
    }
    fn pin_vcpu(&mut self, domain: &str, vcpu: u32, cpus: &[u32]) -> Result<(), BackendError> {
        (**self).pin_vcpu(domain, vcpu, cpus)
    }
    fn set_memory(&mut self, domain: &str, target_kib: u64) -> Result<(), BackendError> {
        (**self).set_memory(domain, target_kib)
    }
    fn restore(&mut self) -> Result<usize, BackendError> {
        (**self).restore()
    }
    fn connection(&self) -> Connection {
        (**self).connection()
    }
}
