//! Snapshot builders, so a policy's logic is unit-tested natively with
//! `cargo test` and no daemon:
//!
//! ```
//! use vm_balancer_sdk::builder::{SnapshotBuilder, DomainBuilder};
//! let snap = SnapshotBuilder::new(4, 8 << 20)
//!     .domain(DomainBuilder::new("web").vcpu(0, 1.0).vcpu(0, 0.5).memory_mib(1024, 1024, Some(600)))
//!     .build();
//! assert_eq!(snap.domains[0].vcpus.len(), 2);
//! ```

use crate::{Domain, DomainMemory, Host, HostCpu, HostMemory, Param, Policy, Snapshot, Vcpu, SCHEMA_VERSION};

/// `snapshot` as the wasm glue hands it to `P`: encoded, then decoded with
/// only the parts in `P::READS`. A policy's tests use it to show that what it
/// declares it reads is all it needs (the native fallback gets everything).
pub fn as_read_by<P: Policy>(snapshot: &Snapshot) -> Snapshot {
    let mut seen = Snapshot::default();
    crate::decode_snapshot_into(&crate::encode_snapshot(snapshot), &mut seen, P::READS).expect("an encoded snapshot decodes");
    seen
}

const MIB: u64 = 1024;

/// Builds a [`Snapshot`]. Host CPU usage is derived from the vCPUs placed on
/// each CPU unless set explicitly.
#[derive(Debug, Clone)]
pub struct SnapshotBuilder {
    snapshot: Snapshot,
    explicit_cpu_usage: bool,
}

impl SnapshotBuilder {
    /// A host with `cpus` online CPUs and `total_kib` of memory, all of it available.
    pub fn new(cpus: u32, total_kib: u64) -> Self {
        let snapshot = Snapshot {
            schema_version: SCHEMA_VERSION,
            quantum: 0,
            quantum_ms: 1000,
            host: Host {
                cpus: (0..cpus).map(|id| HostCpu { id, online: true, reserved: false, usage: 0.0, node: 0 }).collect(),
                memory: HostMemory { total_kib, available_kib: total_kib, reserve_kib: 0 },
            },
            ..Snapshot::default()
        };
        SnapshotBuilder { snapshot, explicit_cpu_usage: false }
    }

    /// Sets host available memory and the reserve, KiB.
    pub fn host_memory(mut self, available_kib: u64, reserve_kib: u64) -> Self {
        self.snapshot.host.memory.available_kib = available_kib;
        self.snapshot.host.memory.reserve_kib = reserve_kib;
        self
    }

    /// Sets each host CPU's usage explicitly (else derived from vCPUs).
    pub fn cpu_usage(mut self, usage: &[f32]) -> Self {
        for (cpu, u) in self.snapshot.host.cpus.iter_mut().zip(usage) {
            cpu.usage = *u;
        }
        self.explicit_cpu_usage = true;
        self
    }

    /// Marks a CPU reserved for the host.
    pub fn reserve_cpu(mut self, id: u32) -> Self {
        if let Some(cpu) = self.snapshot.host.cpus.iter_mut().find(|c| c.id == id) {
            cpu.reserved = true;
        }
        self
    }

    /// Sets the quantum sequence number.
    pub fn quantum(mut self, quantum: u64) -> Self {
        self.snapshot.quantum = quantum;
        self
    }

    /// Sets a top-level parameter.
    pub fn param(mut self, key: &str, value: Param) -> Self {
        self.snapshot.params.insert(key.to_string(), value);
        self
    }

    /// Adds a domain.
    pub fn domain(mut self, domain: DomainBuilder) -> Self {
        self.snapshot.domains.push(domain.domain);
        self
    }

    /// The snapshot.
    pub fn build(mut self) -> Snapshot {
        if !self.explicit_cpu_usage {
            for cpu in &mut self.snapshot.host.cpus {
                let used: f32 = self.snapshot.domains.iter().flat_map(|d| &d.vcpus).filter(|v| v.cpu == cpu.id).map(|v| v.usage).sum();
                cpu.usage = used.min(1.0);
            }
        }
        self.snapshot
    }
}

/// Builds a [`Domain`].
#[derive(Debug, Clone)]
pub struct DomainBuilder {
    domain: Domain,
}

impl DomainBuilder {
    /// A domain with no vCPUs and 1 GiB of memory without guest stats.
    pub fn new(name: &str) -> Self {
        DomainBuilder {
            domain: Domain {
                name: name.to_string(),
                uuid: format!("00000000-0000-0000-0000-{:012x}", fxhash(name)),
                tags: Vec::new(),
                vcpus: Vec::new(),
                memory: DomainMemory { max_kib: 1024 * MIB, target_kib: 1024 * MIB, ..DomainMemory::default() },
                not_answering_ms: 0,
            },
        }
    }

    /// Marks the domain as not answering for `ms` (a hung monitor).
    pub fn not_answering(mut self, ms: u64) -> Self {
        self.domain.not_answering_ms = ms;
        self
    }

    /// Ages the guest-reported memory figures by `ms`.
    pub fn memory_age(mut self, ms: u64) -> Self {
        self.domain.memory.age_ms = ms;
        self
    }

    /// Adds a vCPU pinned to `cpu` that used `usage` of it.
    pub fn vcpu(mut self, cpu: u32, usage: f32) -> Self {
        let id = self.domain.vcpus.len() as u32;
        self.domain.vcpus.push(Vcpu { id, cpu, affinity: crate::smallvec![cpu], usage, steal: None });
        self
    }

    /// Adds a vCPU pinned to `cpu` with usage and steal (waiting) fractions.
    pub fn vcpu_with_steal(mut self, cpu: u32, usage: f32, steal: f32) -> Self {
        let id = self.domain.vcpus.len() as u32;
        self.domain.vcpus.push(Vcpu { id, cpu, affinity: crate::smallvec![cpu], usage, steal: Some(steal) });
        self
    }

    /// Sets max memory, balloon target and (optionally) guest-usable memory, MiB.
    pub fn memory_mib(mut self, max_mib: u64, target_mib: u64, usable_mib: Option<u64>) -> Self {
        let m = &mut self.domain.memory;
        m.max_kib = max_mib * MIB;
        m.target_kib = target_mib * MIB;
        m.usable_kib = usable_mib.map(|u| u * MIB);
        m.unused_kib = m.usable_kib;
        m.available_kib = usable_mib.map(|_| target_mib * MIB);
        self
    }

    /// Sets swap-in and major-fault counters for this quantum.
    pub fn pressure(mut self, swap_in_kib: u64, major_faults: u64) -> Self {
        self.domain.memory.swap_in_kib = Some(swap_in_kib);
        self.domain.memory.major_faults = Some(major_faults);
        self
    }

    /// The domain, for adding to a snapshot by hand.
    pub fn into_domain(self) -> Domain {
        self.domain
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: &str) -> Self {
        self.domain.tags.push(tag.to_string());
        self
    }
}

/// A stable, dependency-free hash for made-up UUIDs.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)) & 0xffff_ffff_ffff
}
