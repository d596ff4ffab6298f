//! Stage 2, **snapshot**: the observation plus what the config and the guard
//! add, in the exact shape every policy receives.

use std::collections::BTreeMap;

use vm_balancer_sdk::{Host, HostCpu, HostMemory, Param, Snapshot, Verdict, SCHEMA_VERSION};

use crate::backend::Observation;
use crate::config::Config;
use crate::KIB_PER_MIB;

/// Builds the snapshot for quantum `quantum`. `verdicts` are the guard's
/// non-accepted verdicts from the previous quantum; `params` is the config's
/// `[params]` table, converted once by the caller.
pub fn assemble(
    observation: Observation,
    quantum: u64,
    config: &Config,
    params: &BTreeMap<String, Param>,
    verdicts: Vec<Verdict>,
) -> Snapshot {
    let Observation { host, domains } = observation;
    let host = Host {
        cpus: host
            .cpus
            .into_iter()
            .map(|c| HostCpu {
                id: c.id,
                online: c.online,
                reserved: config.guard.reserved_cpus.contains(&c.id),
                usage: c.usage,
                node: c.node,
            })
            .collect(),
        memory: HostMemory {
            total_kib: host.memory.total_kib,
            available_kib: host.memory.available_kib,
            reserve_kib: config.guard.host_reserve_mib * KIB_PER_MIB,
        },
    };
    Snapshot { schema_version: SCHEMA_VERSION, quantum, quantum_ms: config.quantum_ms, host, domains, verdicts, params: params.clone() }
}
