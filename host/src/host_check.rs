//! Config settings checked against the host they run on: what
//! [`Config::validate`](crate::config::Config::validate) cannot know
//! alone. A setting that cannot work is refused ([`HostCheckError`]: exit 2
//! before anything runs, where the host is known up front: a `sim:`
//! scenario, a local `qemu:///` host); one that works but not as meant is
//! a [`HostWarning`]. The pipeline runs the same check on its first
//! observation, whatever the backend, and logs the outcome once: for a
//! remote host that is the first moment the host is known.

use crate::config::Config;
use crate::KIB_PER_MIB;

/// What the checks need to know of a host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Every CPU: (kernel id, online).
    pub cpus: Vec<(u32, bool)>,
    /// Physical memory, MiB.
    pub memory_mib: u64,
}

/// A setting that cannot work on this host.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostCheckError {
    /// Every online CPU is reserved: no pin could ever pass the guard.
    #[error(
        "config value guard.reserved_cpus = {reserved:?} reserves every online CPU of this host ({online:?}): no vCPU could ever be pinned"
    )]
    AllCpusReserved {
        /// The reserved CPUs.
        reserved: Vec<u32>,
        /// The host's online CPUs.
        online: Vec<u32>,
    },
    /// The memory reserve is at or above the host's memory: no guest
    /// could ever be given memory.
    #[error(
        "config value guard.host_reserve_mib = {reserve_mib} is not below this host's memory ({memory_mib} MiB): no guest could ever grow"
    )]
    ReserveAboveMemory {
        /// The reserve.
        reserve_mib: u64,
        /// The host's memory.
        memory_mib: u64,
    },
}

/// A setting that works, but not as its author meant, on this host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostWarning {
    /// Reserved CPUs the host does not have reserve nothing (a config
    /// copied from a bigger host, or an off-by-one).
    #[error("config value guard.reserved_cpus names CPUs this host does not have: {missing:?} (the host has CPUs 0..={last}); they reserve nothing")]
    ReservedCpusMissing {
        /// The reserved ids the host lacks.
        missing: Vec<u32>,
        /// The host's highest CPU id.
        last: u32,
    },
}

/// Checks `config` against `host`: the warnings, or why it cannot work.
/// A host that reports no CPUs (or no memory) is not judged on them.
pub fn check(config: &Config, host: &HostFacts) -> Result<Vec<HostWarning>, HostCheckError> {
    let guard = &config.guard;
    let mut warnings = Vec::new();
    if let Some(last) = host.cpus.iter().map(|(id, _)| *id).max() {
        let mut missing: Vec<u32> = guard.reserved_cpus.iter().copied().filter(|r| !host.cpus.iter().any(|(id, _)| id == r)).collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            warnings.push(HostWarning::ReservedCpusMissing { missing, last });
        }
        let online: Vec<u32> = host.cpus.iter().filter(|(_, on)| *on).map(|(id, _)| *id).collect();
        if !online.is_empty() && online.iter().all(|c| guard.reserved_cpus.contains(c)) {
            let mut reserved = guard.reserved_cpus.clone();
            reserved.sort_unstable();
            reserved.dedup();
            return Err(HostCheckError::AllCpusReserved { reserved, online });
        }
    }
    if host.memory_mib > 0 && guard.host_reserve_mib >= host.memory_mib {
        return Err(HostCheckError::ReserveAboveMemory { reserve_mib: guard.host_reserve_mib, memory_mib: host.memory_mib });
    }
    Ok(warnings)
}

/// The facts of an observation (the pipeline's first quantum).
pub fn from_observation(host: &crate::backend::ObservedHost) -> HostFacts {
    HostFacts { cpus: host.cpus.iter().map(|c| (c.id, c.online)).collect(), memory_mib: host.memory.total_kib / KIB_PER_MIB }
}

/// The facts of this machine, from sysfs and procfs (a local `qemu:///`
/// connection manages this machine). `None` where they cannot be read:
/// the pipeline's first observation checks then.
pub fn local() -> Option<HostFacts> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let present = parse_cpu_list(read("/sys/devices/system/cpu/present")?.trim())?;
    let online = parse_cpu_list(read("/sys/devices/system/cpu/online")?.trim())?;
    let memory_kib =
        read("/proc/meminfo")?.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())?;
    let memory_kib: u64 = memory_kib;
    Some(HostFacts { cpus: present.into_iter().map(|c| (c, online.contains(&c))).collect(), memory_mib: memory_kib / KIB_PER_MIB })
}

/// A kernel CPU list (`0-3,5,7-8`); `None` if it is not one.
fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuardConfig;

    fn host(n: u32) -> HostFacts {
        HostFacts { cpus: (0..n).map(|c| (c, true)).collect(), memory_mib: 8192 }
    }

    fn with_guard(guard: GuardConfig) -> Config {
        Config { guard, ..Config::default() }
    }

    #[test]
    fn every_online_cpu_reserved_is_refused_naming_them() {
        let config = with_guard(GuardConfig { reserved_cpus: vec![1, 0], ..GuardConfig::default() });
        let e = check(&config, &host(2)).unwrap_err().to_string();
        assert!(e.contains("guard.reserved_cpus = [0, 1]") && e.contains("every online CPU"), "{e}");
        // An offline CPU left unreserved does not help: nothing can run there.
        let mut h = host(3);
        h.cpus[2].1 = false;
        assert!(check(&config, &h).is_err());
        assert_eq!(check(&config, &host(3)), Ok(vec![]), "one CPU left is a working config");
    }

    #[test]
    fn reserved_cpus_the_host_lacks_are_a_warning_naming_them() {
        let config = with_guard(GuardConfig { reserved_cpus: vec![0, 9, 7, 9], ..GuardConfig::default() });
        let w = check(&config, &host(4)).unwrap();
        assert_eq!(w, vec![HostWarning::ReservedCpusMissing { missing: vec![7, 9], last: 3 }]);
        assert!(w[0].to_string().contains("guard.reserved_cpus names CPUs this host does not have: [7, 9]"), "{}", w[0]);
    }

    #[test]
    fn a_reserve_at_or_above_host_memory_is_refused() {
        let config = with_guard(GuardConfig { host_reserve_mib: 8192, ..GuardConfig::default() });
        let e = check(&config, &host(2)).unwrap_err().to_string();
        assert!(e.contains("guard.host_reserve_mib = 8192") && e.contains("8192 MiB"), "{e}");
        let config = with_guard(GuardConfig { host_reserve_mib: 8191, ..GuardConfig::default() });
        assert_eq!(check(&config, &host(2)), Ok(vec![]));
    }

    #[test]
    fn an_unknown_host_is_not_judged() {
        let config = with_guard(GuardConfig { reserved_cpus: vec![0], host_reserve_mib: u64::MAX >> 30, ..GuardConfig::default() });
        assert_eq!(check(&config, &HostFacts::default()), Ok(vec![]));
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(vec![0, 1, 2, 3, 5, 7, 8]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        let here = local().expect("this machine has sysfs and procfs");
        assert!(!here.cpus.is_empty() && here.memory_mib > 0, "{here:?}");
    }
}
