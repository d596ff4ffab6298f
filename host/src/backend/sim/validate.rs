//! What a scenario's types cannot say, checked once at load so that the
//! model never meets a value it cannot simulate: `f64::clamp` panics when
//! min > max, `gen_range` when a range is empty or infinite, a NaN demand
//! poisons every figure of the report, and a huge count or size exhausts
//! memory or wraps a KiB product. Every rule names the VM group (as written
//! in the file) and the key, with plain values.

use super::scenario::{Profile, Scenario, VmSpec};

use crate::config::{MAX_MIB, QUANTUM_MS};

/// Most VMs one scenario may create (`large` has 1,000): the simulator
/// allocates them all at start.
pub const MAX_VMS: u64 = 100_000;

/// Most vCPUs over all VMs (`large` has 4,000).
pub const MAX_VCPUS: u64 = 1 << 20;

/// Latest quantum a scenario may name (start, stop, steps): about 300 years
/// of 1 s quanta, so `start + i * stagger` and `t + offset` cannot wrap.
pub const MAX_QUANTUM: u64 = 1 << 33;

/// A scenario value that cannot be simulated.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InvalidScenario {
    /// A top-level or `[host]` key.
    #[error("{key} = {value}: {why}")]
    Key {
        /// The key, dotted (`host.cpus`).
        key: String,
        /// The value given.
        value: String,
        /// What would be valid.
        why: String,
    },
    /// A key of one `[[vm]]` group.
    #[error("vm {vm:?}: {key} = {value}: {why}")]
    Vm {
        /// The group's `name`, as in the file.
        vm: String,
        /// The key, dotted (`cpu.min`).
        key: String,
        /// The value given.
        value: String,
        /// What would be valid.
        why: String,
    },
    /// Two VMs with one name (two groups, or a group member such as
    /// `web-1` and a group called `web-1`).
    #[error("vm {vm:?} is defined twice (in group {first:?} and in group {second:?})")]
    Duplicate {
        /// The VM's name.
        vm: String,
        /// The group that made it first.
        first: String,
        /// The group that made it again.
        second: String,
    },
}

fn key(key: &str, value: impl ToString, why: impl Into<String>) -> InvalidScenario {
    InvalidScenario::Key { key: key.to_string(), value: value.to_string(), why: why.into() }
}

impl Scenario {
    /// Checks what the types cannot (see the module doc).
    pub fn validate(&self) -> Result<(), InvalidScenario> {
        let host = &self.host;
        if !(1..=4096).contains(&host.cpus) {
            return Err(key("host.cpus", host.cpus, "must be 1..=4096"));
        }
        if self.quanta == 0 || self.quanta > MAX_QUANTUM {
            return Err(key("quanta", self.quanta, format!("must be 1..={MAX_QUANTUM}")));
        }
        if !QUANTUM_MS.contains(&self.quantum_ms) {
            return Err(key(
                "quantum_ms",
                self.quantum_ms,
                format!("must be {}..={}, like the config's quantum_ms", QUANTUM_MS.start(), QUANTUM_MS.end()),
            ));
        }
        if host.memory_mib == 0 || host.memory_mib > MAX_MIB {
            return Err(key("host.memory_mib", host.memory_mib, format!("must be 1..={MAX_MIB}")));
        }
        if host.base_used_mib > host.memory_mib {
            return Err(key("host.base_used_mib", host.base_used_mib, format!("is above host.memory_mib = {}", host.memory_mib)));
        }
        if let Some(reserve) = host.reserve_mib.filter(|r| *r >= host.memory_mib) {
            return Err(key(
                "host.reserve_mib",
                reserve,
                format!("must be below host.memory_mib = {}: no guest could ever grow", host.memory_mib),
            ));
        }
        if !(1..=host.cpus.max(1)).contains(&host.numa_nodes) {
            return Err(key("host.numa_nodes", host.numa_nodes, "must be 1..=host.cpus"));
        }
        if !host.background.is_empty() && host.background.len() != host.cpus as usize {
            return Err(key(
                "host.background",
                format!("a list of {}", host.background.len()),
                format!("needs one busy fraction per pCPU: {} (host.cpus), or none", host.cpus),
            ));
        }
        if let Some((cpu, busy)) = host.background.iter().enumerate().find(|(_, b)| !(0.0..=1.0).contains(*b)) {
            return Err(key(&format!("host.background[{cpu}]"), busy, "must be a busy fraction, 0..=1"));
        }
        let (mut vms, mut vcpus) = (0u64, 0u64);
        let mut names = std::collections::HashMap::<String, &str>::new();
        for vm in &self.vms {
            vm.validate()?;
            vms += u64::from(vm.count);
            vcpus += u64::from(vm.count) * u64::from(vm.vcpus);
            if vms > MAX_VMS {
                return Err(key("vm", format!("{vms} VMs (so far)"), format!("at most {MAX_VMS} VMs in one scenario")));
            }
            if vcpus > MAX_VCPUS {
                return Err(key("vm", format!("{vcpus} vCPUs (so far)"), format!("at most {MAX_VCPUS} vCPUs in one scenario")));
            }
            for i in 0..vm.count {
                let name = if vm.count == 1 { vm.name.clone() } else { format!("{}-{i}", vm.name) };
                if let Some(first) = names.insert(name.clone(), &vm.name) {
                    return Err(InvalidScenario::Duplicate { vm: name, first: first.to_string(), second: vm.name.clone() });
                }
            }
        }
        Ok(())
    }
}

impl VmSpec {
    fn validate(&self) -> Result<(), InvalidScenario> {
        let bad = |key: &str, value: &dyn ToString, why: String| InvalidScenario::Vm {
            vm: self.name.clone(),
            key: key.to_string(),
            value: value.to_string(),
            why,
        };
        if !(1..=512).contains(&self.vcpus) {
            return Err(bad("vcpus", &self.vcpus, "must be 1..=512".into()));
        }
        if self.count == 0 {
            return Err(bad("count", &self.count, "must be at least 1".into()));
        }
        if self.max_mib == 0 || self.max_mib > MAX_MIB {
            return Err(bad("max_mib", &self.max_mib, format!("must be 1..={MAX_MIB}")));
        }
        if let Some(initial) = self.initial_mib.filter(|i| *i > self.max_mib) {
            return Err(bad("initial_mib", &initial, format!("is above max_mib = {}", self.max_mib)));
        }
        if self.swap_mib > MAX_MIB {
            return Err(bad("swap_mib", &self.swap_mib, format!("must be at most {MAX_MIB}")));
        }
        // The last member's start and stop, which must not pass MAX_QUANTUM.
        let last = u64::from(self.count - 1);
        let last_start = self.stagger.checked_mul(last).and_then(|s| s.checked_add(self.start));
        if last_start.is_none_or(|s| s > MAX_QUANTUM) {
            return Err(bad(
                "start",
                &self.start,
                format!("with stagger = {} and count = {}, the last VM would start after quantum {MAX_QUANTUM}", self.stagger, self.count),
            ));
        }
        if let Some(stop) = self.stop {
            if stop <= self.start {
                return Err(bad("stop", &stop, format!("must be after start = {}", self.start)));
            }
            if stop > MAX_QUANTUM {
                return Err(bad("stop", &stop, format!("must be at most {MAX_QUANTUM}")));
            }
        }
        if !(0.0..1.0).contains(&self.spread) {
            return Err(bad("spread", &self.spread, "must be a fraction, 0 or more and below 1 (0.2 = ±20 %)".into()));
        }
        check_profile(&self.cpu, "cpu", 0.0, 1.0, "a fraction of a pCPU").map_err(|(k, v, why)| bad(&k, &v, why))?;
        check_profile(&self.mem_mib, "mem_mib", 0.0, self.max_mib as f64, &format!("MiB used, at most max_mib = {}", self.max_mib))
            .map_err(|(k, v, why)| bad(&k, &v, why))?;
        Ok(())
    }
}

/// Checks one profile whose values must lie in `lo..=hi` (`what` says why);
/// the error is (dotted key, value, why).
fn check_profile(profile: &Profile, name: &str, lo: f64, hi: f64, what: &str) -> Result<(), (String, String, String)> {
    let err = |field: &str, value: &dyn ToString, why: String| Err((format!("{name}.{field}"), value.to_string(), why));
    let in_range = |field: &str, v: f64| {
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(())
        } else {
            err(field, &v, format!("must be {lo}..={hi} ({what})"))
        }
    };
    let quantum = |field: &str, q: u64| if q > MAX_QUANTUM { err(field, &q, format!("must be at most {MAX_QUANTUM}")) } else { Ok(()) };
    match profile {
        Profile::Constant { value } => in_range("value", *value),
        Profile::Step { before, after, at } => {
            in_range("before", *before)?;
            in_range("after", *after)?;
            quantum("at", *at)
        }
        Profile::Ramp { from, to, start, end } => {
            in_range("from", *from)?;
            in_range("to", *to)?;
            quantum("end", *end)?;
            if end < start {
                return err("end", end, format!("must not be before {name}.start = {start}"));
            }
            Ok(())
        }
        Profile::Periodic { low, high, period, offset } => {
            in_range("low", *low)?;
            in_range("high", *high)?;
            if low > high {
                return err("low", low, format!("must not be above {name}.high = {high}"));
            }
            if *period == 0 || *period > MAX_QUANTUM {
                return err("period", period, format!("must be 1..={MAX_QUANTUM} quanta"));
            }
            quantum("offset", *offset)
        }
        Profile::RandomWalk { start, step, min, max } => {
            // min ≤ max first: it is the rule whose breach panicked.
            if !(min.is_finite() && max.is_finite()) || min > max {
                return err("min", min, format!("must be finite and not above {name}.max = {max}"));
            }
            in_range("min", *min)?;
            in_range("max", *max)?;
            if !(min..=max).contains(&start) {
                return err("start", start, format!("must be within {name}.min..={name}.max = {min}..={max}"));
            }
            if !step.is_finite() || *step < 0.0 {
                return err("step", step, "must be a finite move per quantum, 0 or more".into());
            }
            Ok(())
        }
        Profile::Phases { values, every } => {
            if values.is_empty() {
                return err("values", &"[]", "must list at least one value".into());
            }
            for (i, v) in values.iter().enumerate() {
                in_range(&format!("values[{i}]"), *v)?;
            }
            if *every == 0 || *every > MAX_QUANTUM {
                return err("every", every, format!("must be 1..={MAX_QUANTUM} quanta"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"t\"\nquanta = 5\n[host]\ncpus = 2\nmemory_mib = 4096\n";

    fn scenario(extra_host: &str, vm: &str) -> Scenario {
        let text = format!("{BASE}{extra_host}\n[[vm]]\nname = \"web\"\nmax_mib = 1024\n{vm}\n");
        toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The message of a scenario that must be refused.
    fn refused(extra_host: &str, vm: &str) -> String {
        match scenario(extra_host, vm).validate() {
            Ok(()) => panic!("accepted: host {extra_host:?}, vm {vm:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[track_caller]
    fn assert_refused(extra_host: &str, vm: &str, words: &[&str]) {
        let e = refused(extra_host, vm);
        for w in words {
            assert!(e.contains(w), "{e:?} lacks {w:?}");
        }
        assert!(!e.contains("Some("), "an Option leaked into {e:?}");
    }

    #[test]
    fn the_base_and_every_shipped_scenario_are_valid() {
        scenario("", "").validate().unwrap();
        for (name, text) in crate::fuzz::SHIPPED {
            let s: Scenario = toml::from_str(text).unwrap();
            s.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn random_walk_bounds_must_be_ordered_finite_and_hold_the_start() {
        let walk = |s: &str| format!("cpu = {{ kind = \"random-walk\", {s} }}");
        assert_refused("", &walk("start = 0.5, step = 0.1, min = 1.0, max = 0.0"), &["vm \"web\"", "cpu.min = 1", "cpu.max = 0"]);
        assert_refused("", &walk("start = 0.5, step = 0.1, min = nan, max = 1.0"), &["cpu.min = NaN"]);
        assert_refused("", &walk("start = 0.5, step = 0.1, min = 0.0, max = inf"), &["cpu.max = inf"]);
        assert_refused("", &walk("start = 0.9, step = 0.1, min = 0.0, max = 0.5"), &["cpu.start = 0.9", "0..=0.5"]);
        assert_refused("", &walk("start = 0.5, step = -1, min = 0.0, max = 1.0"), &["cpu.step = -1"]);
        assert_refused("", &walk("start = 0.5, step = 0.1, min = -1, max = 1.0"), &["cpu.min = -1"]);
    }

    #[test]
    fn cpu_demand_is_a_fraction_and_memory_use_fits_the_guest() {
        assert_refused("", "cpu = { kind = \"constant\", value = -0.5 }", &["cpu.value = -0.5", "0..=1"]);
        assert_refused("", "cpu = { kind = \"constant\", value = 1.5 }", &["cpu.value = 1.5"]);
        assert_refused("", "cpu = { kind = \"step\", before = 0.1, after = nan, at = 3 }", &["cpu.after = NaN"]);
        assert_refused("", "mem_mib = { kind = \"constant\", value = 2048 }", &["mem_mib.value = 2048", "max_mib = 1024"]);
        assert_refused("", "mem_mib = { kind = \"ramp\", from = -1, to = 10, start = 0, end = 1 }", &["mem_mib.from = -1"]);
    }

    #[test]
    fn periods_and_phase_lengths_are_positive_and_phases_not_empty() {
        assert_refused("", "cpu = { kind = \"periodic\", low = 0.1, high = 0.9, period = 0 }", &["cpu.period = 0"]);
        assert_refused("", "cpu = { kind = \"periodic\", low = 0.9, high = 0.1, period = 4 }", &["cpu.low = 0.9", "cpu.high = 0.1"]);
        assert_refused("", "cpu = { kind = \"phases\", values = [], every = 3 }", &["cpu.values = []"]);
        assert_refused("", "cpu = { kind = \"phases\", values = [0.5], every = 0 }", &["cpu.every = 0"]);
        assert_refused("", "cpu = { kind = \"phases\", values = [0.5, 7], every = 1 }", &["cpu.values[1] = 7"]);
        assert_refused("", "cpu = { kind = \"ramp\", from = 0, to = 1, start = 5, end = 2 }", &["cpu.end = 2", "cpu.start = 5"]);
        assert_refused("", "cpu = { kind = \"step\", before = 0, after = 1, at = 9223372036854775807 }", &["cpu.at = 9223372036854775807"]);
    }

    #[test]
    fn vm_sizes_counts_and_lifetimes_are_checked_with_plain_values() {
        let refuse = |change: &dyn Fn(&mut VmSpec), words: &[&str]| {
            let mut s = scenario("", "");
            change(&mut s.vms[0]);
            let e = s.validate().unwrap_err().to_string();
            assert!(words.iter().all(|w| e.contains(w)) && !e.contains("Some("), "{e:?} lacks {words:?}");
        };
        refuse(&|vm| vm.max_mib = 0, &["vm \"web\": max_mib = 0"]);
        refuse(&|vm| vm.initial_mib = Some(4096), &["initial_mib = 4096", "max_mib = 1024"]);
        refuse(&|vm| vm.vcpus = 0, &["vcpus = 0"]);
        refuse(&|vm| vm.count = 0, &["count = 0"]);
        refuse(&|vm| vm.count = 200_000, &["200000 VMs"]);
        refuse(&|vm| (vm.count, vm.vcpus) = (4000, 512), &["vCPUs"]);
        refuse(&|vm| (vm.start, vm.stop) = (5, Some(5)), &["stop = 5", "start = 5"]);
        refuse(&|vm| (vm.count, vm.stagger) = (3, u64::MAX), &["start = 0", "stagger = 18446744073709551615"]);
        refuse(&|vm| vm.spread = 1.0, &["spread = 1"]);
        refuse(&|vm| vm.spread = f64::NAN, &["spread = NaN"]);
        refuse(&|vm| vm.swap_mib = u64::MAX, &["swap_mib = 18446744073709551615"]);
        let mut s = scenario("", "count = 2");
        let mut other = s.vms[0].clone();
        other.name = "web-1".into();
        other.count = 1;
        s.vms.push(other);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("vm \"web-1\" is defined twice") && e.contains("\"web\""), "{e}");
    }

    #[test]
    fn host_keys_are_checked() {
        assert_refused("background = [0.5]", "", &["host.background = a list of 1", "2 (host.cpus)"]);
        assert_refused("background = [0.5, 1.5]", "", &["host.background[1] = 1.5", "0..=1"]);
        assert_refused("background = [nan, 0.0]", "", &["host.background[0] = NaN"]);
        assert_refused("reserve_mib = 4096", "", &["host.reserve_mib = 4096", "host.memory_mib = 4096"]);
        assert_refused("base_used_mib = 5000", "", &["host.base_used_mib = 5000"]);
        scenario("background = [0.5, 0.0]", "").validate().unwrap();
        assert_refused("numa_nodes = 0", "", &["host.numa_nodes = 0", "1..=host.cpus"]);
        assert_refused("numa_nodes = 3", "", &["host.numa_nodes = 3", "1..=host.cpus"]);
        scenario("numa_nodes = 2", "").validate().unwrap();
        let mut s = scenario("", "");
        s.quantum_ms = 5;
        assert!(s.validate().unwrap_err().to_string().contains("quantum_ms = 5"));
        s.quantum_ms = 3_600_001;
        assert!(s.validate().unwrap_err().to_string().contains("quantum_ms = 3600001"));
        let mut s = scenario("", "");
        s.host.memory_mib = u64::MAX;
        assert!(s.validate().unwrap_err().to_string().contains("host.memory_mib = 18446744073709551615"));
    }
}
