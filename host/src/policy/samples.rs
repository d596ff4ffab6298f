//! Sample snapshots: what `vm-balancer policy check` runs a policy on, and
//! what a new policy's trial `decide` sees before the daemon has taken its
//! first snapshot.

use vm_balancer_sdk::builder::{DomainBuilder, SnapshotBuilder};
use vm_balancer_sdk::Snapshot;

/// Labelled samples: empty host, CPU imbalance, memory pressure and excess,
/// a guest without balloon stats.
pub fn samples() -> Vec<(&'static str, Snapshot)> {
    let mut imbalance = SnapshotBuilder::new(4, 16 << 20);
    for i in 0..6 {
        imbalance = imbalance.domain(DomainBuilder::new(&format!("busy-{i}")).vcpu_with_steal(0, 0.16, 0.84));
    }
    vec![
        ("empty host", SnapshotBuilder::new(2, 4 << 20).build()),
        ("6 busy vCPUs on pCPU 0 of 4", imbalance.build()),
        ("idle, starved and stat-less guests", trial_snapshot()),
        ("tagged guests (latency, web) on 4 pCPUs", tagged()),
    ]
}

/// Guests with tags, so a policy that acts on tagged VMs acts (and a
/// malformed action of it is caught by `policy check`).
fn tagged() -> Snapshot {
    SnapshotBuilder::new(4, 16 << 20)
        .host_memory(8 << 20, 512 << 10)
        .domain(DomainBuilder::new("rt-0").vcpu(0, 0.7).vcpu(0, 0.6).tag("latency").memory_mib(2048, 2048, Some(1500)))
        .domain(DomainBuilder::new("web-0").vcpu(0, 0.5).tag("web").memory_mib(2048, 1024, Some(20)))
        .domain(DomainBuilder::new("batch-0").vcpu(1, 0.9).vcpu(1, 0.9).memory_mib(4096, 4096, Some(3800)))
        .build()
}

/// A small snapshot with every kind of guest, for trial runs.
pub fn trial_snapshot() -> Snapshot {
    SnapshotBuilder::new(2, 8 << 20)
        .host_memory(4 << 20, 512 << 10)
        .domain(DomainBuilder::new("idle").vcpu(0, 0.01).memory_mib(2048, 2048, Some(1900)))
        .domain(DomainBuilder::new("starved").vcpu(1, 0.3).memory_mib(2048, 512, Some(8)).pressure(4096, 900))
        .domain(DomainBuilder::new("nostats").vcpu(1, 0.1).memory_mib(1024, 1024, None))
        .build()
}
