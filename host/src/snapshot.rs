//! Stage 2, **snapshot**: the observation plus what the config and the guard
//! add, in the exact shape every policy receives.

use std::collections::BTreeMap;

use vm_balancer_sdk::{Param, Snapshot, Verdict, SCHEMA_VERSION};

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
    let Observation { mut host, domains } = observation;
    host.memory.reserve_kib = config.guard.host_reserve_mib * KIB_PER_MIB;
    for cpu in &mut host.cpus {
        cpu.reserved = config.guard.reserved_cpus.contains(&cpu.id);
    }
    Snapshot {
        schema_version: SCHEMA_VERSION,
        quantum,
        quantum_ms: config.quantum_ms,
        host,
        domains,
        verdicts,
        params: params.clone(),
    }
}
