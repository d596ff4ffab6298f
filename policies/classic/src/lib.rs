//! `classic`: a faithful port of the original vm-balancer's two algorithms,
//! kept so the defaults can be compared against it (`vm-balancer simulate
//! --policy builtin:classic`). Known flaws are kept on purpose:
//! - CPU: acts only when the busiest pCPU is above 50 % and the freest below
//!   50 %, one swap or move per quantum, on observed usage. With four busy
//!   guests on two pCPUs it stops at 3/1.
//! - Memory: fixed thresholds. A guest with more than 256 MiB free gives back
//!   `(free - 256 MiB) / 2`; a guest under 128 MiB free gets 128 MiB per
//!   second of quantum plus a share of this quantum's reclaim, unless the host
//!   is below its reserve.
//!
//! One deliberate difference: the original stopped at 8 CPUs; this port takes
//! every CPU, so it can run on the large scenarios at all.
#![deny(missing_docs)]

use vm_balancer_sdk::{export_policy, Action, Info, Policy, Snapshot};

const MIB: u64 = 1024;
const CPU_THRESHOLD: f32 = 0.5;
const FREE_THRESHOLD_KIB: u64 = 256 * MIB;
const STARVE_THRESHOLD_KIB: u64 = 128 * MIB;

/// The original algorithms, stateless.
#[derive(Default, Debug)]
pub struct ClassicPolicy;

impl Policy for ClassicPolicy {
    fn info() -> Info {
        Info { name: "classic", version: env!("CARGO_PKG_VERSION"), cpu: true, memory: true }
    }

    fn decide(&mut self, snap: &Snapshot) -> Result<Vec<Action>, String> {
        let mut actions = cpu(snap);
        actions.extend(memory(snap));
        Ok(actions)
    }
}

fn cpu(snap: &Snapshot) -> Vec<Action> {
    let mut actions = Vec::new();
    // At start (and for any newcomer): pin every vCPU where it runs.
    for d in &snap.domains {
        for v in d.vcpus.iter().filter(|v| v.pinned_to().is_none()) {
            actions.push(Action::pin(&d.name, v.id, vec![v.cpu], "classic: pin where it runs"));
        }
    }
    let cpus: Vec<_> = snap.usable_cpus().collect();
    let (Some(busiest), Some(freest)) =
        (cpus.iter().max_by(|a, b| a.usage.total_cmp(&b.usage)), cpus.iter().min_by(|a, b| a.usage.total_cmp(&b.usage)))
    else {
        return actions;
    };
    if busiest.id == freest.id || busiest.usage <= CPU_THRESHOLD || freest.usage >= CPU_THRESHOLD {
        return actions;
    }
    let on = |cpu: u32| {
        snap.domains
            .iter()
            .flat_map(|d| d.vcpus.iter().map(move |v| (d, v)))
            .filter(move |(_, v)| v.cpu == cpu)
            .min_by(|a, b| a.1.usage.total_cmp(&b.1.usage))
    };
    let Some((bd, bv)) = on(busiest.id) else { return actions };
    actions.push(Action::pin(&bd.name, bv.id, vec![freest.id], "classic: freest vCPU of busiest pCPU"));
    if let Some((fd, fv)) = on(freest.id) {
        actions.push(Action::pin(&fd.name, fv.id, vec![busiest.id], "classic: swap with freest vCPU of freest pCPU"));
    }
    actions
}

fn memory(snap: &Snapshot) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut reclaimed_kib = 0;
    let mut starving = Vec::new();
    for d in &snap.domains {
        let Some(free) = d.memory.unused_kib.or(d.memory.usable_kib) else { continue };
        if free > FREE_THRESHOLD_KIB {
            let give_back = (free - FREE_THRESHOLD_KIB) / 2;
            reclaimed_kib += give_back;
            actions.push(Action::set_memory(&d.name, d.memory.target_kib - give_back, "classic: reclaim (free - 256 MiB) / 2"));
        } else if free < STARVE_THRESHOLD_KIB {
            starving.push(d);
        }
    }
    let host = &snap.host.memory;
    if starving.is_empty() || host.available_kib < host.reserve_kib {
        return actions;
    }
    let per_quantum = STARVE_THRESHOLD_KIB * u64::from(snap.quantum_ms.max(1)) / 1000;
    let share = reclaimed_kib / starving.len() as u64;
    for d in starving {
        let target = (d.memory.target_kib + per_quantum + share).min(d.memory.max_kib);
        if target > d.memory.target_kib {
            actions.push(Action::set_memory(&d.name, target, "classic: starving"));
        }
    }
    actions
}

export_policy!(ClassicPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use vm_balancer_sdk::builder::{DomainBuilder, SnapshotBuilder};

    #[test]
    fn stalls_at_three_one_like_the_original() {
        // 3 busy vCPUs on pCPU 0, one on pCPU 1: both pCPUs are 100 % busy.
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .domain(DomainBuilder::new("a").vcpu(0, 0.33))
            .domain(DomainBuilder::new("b").vcpu(0, 0.33))
            .domain(DomainBuilder::new("c").vcpu(0, 0.34))
            .domain(DomainBuilder::new("d").vcpu(1, 1.0))
            .build();
        assert!(ClassicPolicy.decide(&snap).unwrap().is_empty());
    }

    #[test]
    fn moves_to_an_empty_pcpu() {
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .domain(DomainBuilder::new("a").vcpu(0, 0.5))
            .domain(DomainBuilder::new("b").vcpu(0, 0.5))
            .build();
        let actions = ClassicPolicy.decide(&snap).unwrap();
        assert_eq!(actions.len(), 1);
    }

    #[test]
    fn reclaims_half_the_excess_over_256_mib() {
        let snap = SnapshotBuilder::new(2, 8 << 20).domain(DomainBuilder::new("idle").memory_mib(512, 512, Some(400))).build();
        let actions = ClassicPolicy.decide(&snap).unwrap();
        assert_eq!(actions, vec![Action::set_memory("idle", (512 - 72) * MIB, "classic: reclaim (free - 256 MiB) / 2")]);
    }
}
