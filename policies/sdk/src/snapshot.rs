//! What a policy sees each quantum. Field-by-field docs with units:
//! `wit/SCHEMA.md`. Optional figures are omitted from the encoding when
//! unknown, which keeps a 1,000-domain snapshot small.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Param, Verdict};

/// A vCPU's affinity: pCPU ids, stored inline up to four. Almost every
/// managed vCPU is pinned to one pCPU, and a heap list per vCPU was an
/// allocation (and a free) per vCPU per quantum on the decode path.
pub type CpuList = smallvec::SmallVec<[u32; 4]>;

/// Bumped only for incompatible changes; new optional fields do not bump it.
pub const SCHEMA_VERSION: u32 = 1;

/// One quantum's view of the host and its domains.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SCHEMA_VERSION`] of the daemon that wrote it.
    pub schema_version: u32,
    /// Sequence number of this quantum since the daemon started.
    pub quantum: u64,
    /// Length of a quantum, in milliseconds.
    pub quantum_ms: u32,
    /// Host CPUs and memory.
    pub host: Host,
    /// Managed domains (opted-out domains are not listed).
    pub domains: Vec<Domain>,
    /// The guard's verdicts on the previous quantum's actions that were not
    /// applied as asked (rejected or clamped).
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
    /// Policy parameters from the daemon's config (`[params]`).
    #[serde(default)]
    pub params: BTreeMap<String, Param>,
}

/// The host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Every host CPU, by id.
    pub cpus: Vec<HostCpu>,
    /// Host memory.
    pub memory: HostMemory,
}

/// One host CPU (pCPU).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostCpu {
    /// CPU number as the kernel numbers it.
    pub id: u32,
    /// Online CPUs only can be pinned to.
    pub online: bool,
    /// Reserved for the host by config: the guard refuses pins onto it.
    #[serde(default)]
    pub reserved: bool,
    /// Busy fraction over the last quantum, 0.0–1.0, all causes included
    /// (vCPUs, host processes, opted-out domains).
    pub usage: f32,
    /// NUMA node.
    #[serde(default)]
    pub node: u32,
}

/// Host memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostMemory {
    /// Physical memory, KiB.
    pub total_kib: u64,
    /// Memory the host could still hand out (MemAvailable), KiB.
    pub available_kib: u64,
    /// The guard never lets `available_kib` fall below this by growing guests.
    pub reserve_kib: u64,
}

/// A managed domain (VM).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Domain {
    /// libvirt name; actions address domains by it.
    pub name: String,
    /// libvirt UUID.
    pub uuid: String,
    /// Free-form tags (libvirt metadata or config), e.g. `"latency"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The domain's vCPUs, by id.
    pub vcpus: Vec<Vcpu>,
    /// Balloon and guest memory figures.
    pub memory: DomainMemory,
    /// 0 while the domain answers. Otherwise for how long, in milliseconds,
    /// its hypervisor monitor has been busy with a call that has not
    /// returned (a hung or SIGSTOPped QEMU): any change to it would block
    /// in libvirt, so the guard rejects every action on it. Its CPU figures
    /// are still fresh (they come from the host kernel); its guest memory
    /// figures are the last ones known (see [`DomainMemory::age_ms`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_answering_ms: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// One virtual CPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vcpu {
    /// vCPU number within the domain.
    pub id: u32,
    /// pCPU it last ran on.
    pub cpu: u32,
    /// pCPUs it may run on; empty means any online CPU.
    #[serde(default)]
    pub affinity: CpuList,
    /// Fraction of one pCPU it used over the last quantum, 0.0–1.0.
    pub usage: f32,
    /// Fraction of the quantum it was runnable but waiting for a pCPU
    /// (libvirt's `vcpu.N.delay`), where known. `usage + steal` estimates
    /// what it wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal: Option<f32>,
}

/// Memory of a domain. Guest-reported figures come from the balloon driver
/// and are absent when the guest has none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainMemory {
    /// Maximum memory the guest can be given, KiB.
    pub max_kib: u64,
    /// Current balloon target (memory the guest has), KiB.
    pub target_kib: u64,
    /// Guest free memory (MemFree), KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_kib: Option<u64>,
    /// Memory the guest sees in total (MemTotal), KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_kib: Option<u64>,
    /// Memory the guest could free without swapping (MemAvailable), KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usable_kib: Option<u64>,
    /// Host memory the guest's process holds, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_kib: Option<u64>,
    /// Swapped in since the last quantum, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_kib: Option<u64>,
    /// Swapped out since the last quantum, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_kib: Option<u64>,
    /// Major page faults since the last quantum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// The balloon deflates by itself when the guest is about to OOM
    /// (`<memballoon autodeflate='on'>`).
    #[serde(default)]
    pub autodeflate: bool,
    /// The guest reports freed pages to the host, which drops them from its
    /// process without the balloon (`<memballoon freePageReporting='on'>`):
    /// `rss_kib` then falls by itself, and less needs ballooning back.
    /// Optional on the wire (absent: false), so older snapshots decode.
    #[serde(default, skip_serializing_if = "is_false")]
    pub free_page_reporting: bool,
    /// How old the guest-reported figures (`unused_kib`, `available_kib`,
    /// `usable_kib`) are, in milliseconds: 0 when fresh this quantum. They
    /// age when the guest's balloon driver stops reporting
    /// (`balloon.last-update` stands still) or the domain does not answer.
    /// The guard never shrinks a guest whose figures are older than
    /// `guard.stale_after_ms`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub age_ms: u64,
}

impl DomainMemory {
    /// Memory the guest could still use without pressure, KiB: `usable_kib`,
    /// else `unused_kib`, else `None` (no balloon stats).
    #[inline]
    pub fn free_kib(&self) -> Option<u64> {
        self.usable_kib.or(self.unused_kib)
    }

    /// Memory the guest is using, KiB: the target minus [`free_kib`](Self::free_kib).
    /// The guard's guest floor and the default policies share this one definition.
    #[inline]
    pub fn used_kib(&self) -> Option<u64> {
        self.free_kib().map(|free| self.target_kib.saturating_sub(free))
    }

    /// True when the guest reports swapping or major faults this quantum.
    pub fn under_pressure_signals(&self) -> bool {
        self.swap_in_kib.unwrap_or(0) > 0 || self.major_faults.unwrap_or(0) > 0
    }
}

impl Vcpu {
    /// Estimated demand: what it used plus what it waited for, as a fraction of one pCPU.
    #[inline]
    pub fn demand(&self) -> f32 {
        self.usage + self.steal.unwrap_or(0.0)
    }

    /// The single pCPU it is pinned to, if its affinity is exactly one CPU.
    #[inline]
    pub fn pinned_to(&self) -> Option<u32> {
        match self.affinity.as_slice() {
            [cpu] => Some(*cpu),
            _ => None,
        }
    }
}

impl Snapshot {
    /// Looks a parameter up by dotted path, e.g. `"mem.free_pct"`.
    pub fn param(&self, path: &str) -> Option<&Param> {
        let mut parts = path.split('.');
        let mut current = self.params.get(parts.next()?)?;
        for part in parts {
            current = match current {
                Param::Map(map) => map.get(part)?,
                _ => return None,
            };
        }
        Some(current)
    }

    /// A numeric parameter, or `default` when absent or not a number.
    pub fn param_f64(&self, path: &str, default: f64) -> f64 {
        self.param(path).and_then(Param::as_f64).unwrap_or(default)
    }

    /// CPUs a policy may pin to: online and not reserved.
    pub fn usable_cpus(&self) -> impl Iterator<Item = &HostCpu> {
        self.host.cpus.iter().filter(|c| c.online && !c.reserved)
    }

    /// Finds a domain by name.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.iter().find(|d| d.name == name)
    }
}
