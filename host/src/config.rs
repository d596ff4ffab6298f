//! The daemon's configuration file (TOML). Every table refuses unknown keys,
//! so a typo is an error that names the key instead of a silent default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vm_balancer_sdk::Param;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid config TOML.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of its range.
    #[error("config value {key} = {value} is invalid: {why}")]
    Invalid {
        /// The key, dotted.
        key: &'static str,
        /// The value given.
        value: String,
        /// What would be valid.
        why: &'static str,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Length of a quantum, milliseconds.
    pub quantum_ms: u32,
    /// Sandbox limits for every policy call.
    pub limits: Limits,
    /// Host-side safety guard.
    pub guard: GuardConfig,
    /// Domains the daemon never touches.
    pub exclude: Exclude,
    /// Free-form policy parameters, passed to policies in the snapshot.
    pub params: BTreeMap<String, toml::Value>,
    /// The drop-in policy directory: every `*.wasm` in it is a policy slot,
    /// in file-name order. Empty or missing: the embedded defaults.
    pub policy_dir: PathBuf,
    /// Where the daemon keeps state (the compile cache).
    pub state_dir: PathBuf,
    /// Size bound of the compile cache, MiB.
    pub compile_cache_max_mib: u64,
    /// Quiet time after the last filesystem event before a rescan, ms.
    pub reload_debounce_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            quantum_ms: 1000,
            limits: Limits::default(),
            guard: GuardConfig::default(),
            exclude: Exclude::default(),
            params: BTreeMap::new(),
            policy_dir: PathBuf::from("/etc/vm-balancer/policies"),
            state_dir: PathBuf::from("/var/lib/vm-balancer"),
            compile_cache_max_mib: 512,
            reload_debounce_ms: 200,
        }
    }
}

/// Sandbox limits (wasmtime epoch deadline and memory limiter).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock budget of one `decide` call, milliseconds.
    pub decide_timeout_ms: u64,
    /// Linear memory a policy instance may grow to, MiB.
    pub max_memory_mib: u64,
    /// Largest `decide` answer accepted, KiB.
    pub max_output_kib: u64,
    /// Consecutive failures after which a policy is disabled (then retried with backoff).
    pub max_consecutive_failures: u32,
    /// First backoff after disabling, quanta; doubles on each further failure.
    pub retry_backoff_quanta: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            decide_timeout_ms: 100,
            max_memory_mib: 256,
            max_output_kib: 4096,
            max_consecutive_failures: 3,
            retry_backoff_quanta: 10,
        }
    }
}

/// The guard's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Host CPUs reserved for the host: never a pin target.
    pub reserved_cpus: Vec<u32>,
    /// Host memory that growing guests may never take, MiB.
    pub host_reserve_mib: u64,
    /// Absolute lowest balloon target, MiB.
    pub guest_floor_mib: u64,
    /// Margin kept above the guest's used memory, MiB.
    pub guest_margin_mib: u64,
    /// Largest shrink per quantum, percent of the guest's max memory.
    pub max_shrink_pct: f64,
    /// Largest growth per quantum, percent of the guest's max memory.
    pub max_grow_pct: f64,
    /// Most pin changes applied per quantum (0 = no limit).
    pub max_pins_per_quantum: usize,
    /// Quanta a re-pinned vCPU must wait before it is re-pinned again.
    pub pin_cooldown_quanta: u64,
    /// Seconds a vCPU that somebody else re-pinned is left alone (the
    /// daemon does not fight an administrator's `virsh vcpupin`).
    pub external_pin_hold_s: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            reserved_cpus: Vec::new(),
            host_reserve_mib: 512,
            guest_floor_mib: 128,
            guest_margin_mib: 32,
            max_shrink_pct: 10.0,
            max_grow_pct: 50.0,
            max_pins_per_quantum: 256,
            pin_cooldown_quanta: 2,
            external_pin_hold_s: 300,
        }
    }
}

/// Domains never touched: by name or UUID glob (`*` and `?`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Exclude {
    /// Name patterns.
    pub names: Vec<String>,
    /// UUID patterns.
    pub uuids: Vec<String>,
}

impl Exclude {
    /// True when the domain is opted out.
    pub fn matches(&self, name: &str, uuid: &str) -> bool {
        self.names.iter().any(|p| glob(p, name)) || self.uuids.iter().any(|p| glob(p, uuid))
    }
}

/// Minimal glob: `*` any run, `?` one character.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that TOML types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        if !(10..=3_600_000).contains(&self.quantum_ms) {
            return bad("quantum_ms", self.quantum_ms.to_string(), "must be between 10 and 3600000");
        }
        if self.limits.decide_timeout_ms == 0 || self.limits.decide_timeout_ms > 60_000 {
            return bad("limits.decide_timeout_ms", self.limits.decide_timeout_ms.to_string(), "must be 1..=60000");
        }
        if self.limits.max_memory_mib < 1 || self.limits.max_memory_mib > 4096 {
            return bad("limits.max_memory_mib", self.limits.max_memory_mib.to_string(), "must be 1..=4096");
        }
        if self.limits.max_consecutive_failures == 0 {
            return bad("limits.max_consecutive_failures", "0".into(), "must be at least 1");
        }
        for (key, pct) in [("guard.max_shrink_pct", self.guard.max_shrink_pct), ("guard.max_grow_pct", self.guard.max_grow_pct)] {
            if !(0.0..=100.0).contains(&pct) {
                return bad(key, pct.to_string(), "must be a percentage, 0..=100");
            }
        }
        Ok(())
    }

    /// The `[params]` table as policy parameters.
    pub fn policy_params(&self) -> BTreeMap<String, Param> {
        self.params.iter().map(|(k, v)| (k.clone(), to_param(v))).collect()
    }
}

fn to_param(value: &toml::Value) -> Param {
    match value {
        toml::Value::String(s) => Param::Str(s.clone()),
        toml::Value::Integer(i) => Param::Int(*i),
        toml::Value::Float(f) => Param::Float(*f),
        toml::Value::Boolean(b) => Param::Bool(*b),
        toml::Value::Datetime(d) => Param::Str(d.to_string()),
        toml::Value::Array(items) => Param::List(items.iter().map(to_param).collect()),
        toml::Value::Table(t) => Param::Map(t.iter().map(|(k, v)| (k.clone(), to_param(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches() {
        assert!(glob("db-*", "db-1"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(!glob("db-*", "web-1"));
        assert!(glob("*-prod-*", "x-prod-y"));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = toml::from_str::<Config>("quantum_ms = 100\n[guard]\nhost_reserv_mib = 5\n").unwrap_err();
        assert!(err.to_string().contains("host_reserv_mib"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let c = Config { quantum_ms: 1, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("quantum_ms = 1"));
    }
}
