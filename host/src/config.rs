//! The daemon's configuration file (TOML). Every table refuses unknown keys,
//! so a typo is an error that names the key instead of a silent default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
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
    /// A value in a file is invalid: where it is.
    #[error("config file {path}, line {line}")]
    At {
        /// The file.
        path: PathBuf,
        /// The line of the key (1-based).
        line: usize,
        /// What is wrong with it.
        #[source]
        source: Box<ConfigError>,
    },
    /// A per-policy limit is out of its range.
    #[error("config value limits.policy.{policy:?}.{key} = {value} is invalid: {why}")]
    InvalidPolicyLimit {
        /// The policy's slot name.
        policy: String,
        /// The key inside its table.
        key: &'static str,
        /// The value given.
        value: u64,
        /// What would be valid.
        why: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
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
    /// Deadline of one quantum's collection, ms; unset: half the quantum.
    /// Why: one hung guest (a stopped QEMU, a monitor stuck on a job) must
    /// not stop the balancing of every other guest. What has not come in by
    /// then is reported stale, and the guard never shrinks on stale figures.
    pub collect_deadline_ms: Option<u32>,
    /// How figures are collected: `auto` (procfs for CPU figures and a
    /// rolling balloon refresh on a local `qemu:///system`, the bulk call
    /// elsewhere) or `bulk` (one call with every group, every quantum).
    pub collect: crate::backend::libvirt::CollectMode,
    /// On the fast path, the most quanta between two balloon refreshes of
    /// one domain (guests under pressure or ballooning are refreshed every
    /// quantum, and at least 32 domains are each quantum).
    pub balloon_refresh_quanta: u64,
    /// Largest policy file accepted, MiB (the directory's and `--policy
    /// FILE`'s). Why a bound: a file is read into memory before it is
    /// compiled, and the biggest real component (Python, 18.5 MB) is far
    /// under the default.
    pub policy_max_file_mib: u64,
    /// Most policy slots (files in the directory, or `--policy` specs).
    /// Why: every slot costs its compiled code, an instance and a `decide`
    /// per quantum; 500 files once took 940 MB and 2.2 s quanta.
    pub policy_max_slots: usize,
    /// The libvirt URI `run`, `snapshot` and `restore` connect to
    /// (`--connect`), or `sim:SCENARIO.toml`.
    pub connect: String,
    /// Log filter (`--log`): a level such as `info`, or directives such as
    /// `info,vm_balancer::daemon=debug`. RUST_LOG is used when neither the
    /// command line nor the file sets it.
    pub log: Option<String>,
    /// Log line format (`--log-format`): `text` for people, `json` (one
    /// object per line, stable field names) for log shippers.
    pub log_format: LogFormat,
    /// Where `run` serves Prometheus metrics (`--metrics-addr`), e.g.
    /// `127.0.0.1:9109`; unset: no endpoint. Why off and loopback by
    /// default: the figures name every guest on the host.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Also expose instance series in OpenStack Watcher's shape
    /// (`ceilometer_cpu`, `ceilometer_memory_usage`, labelled `resource` =
    /// domain UUID and `fqdn`). Opt-in: their names are not ours.
    pub fleet_metrics: bool,
    /// The `fqdn` label of the fleet series; unset: this host's name.
    pub fqdn: Option<String>,
    /// Serve the read-only status socket (`STATE_DIR/*.status.sock`, mode
    /// 0600) that `vm-balancer top` and `explain` read.
    pub status_socket: bool,
    /// Seconds between the info-level activity summaries of `run` (quanta,
    /// actions, fallbacks, decide times). Per-quantum summaries are at
    /// debug (`--log info,vm_balancer::daemon=debug`).
    pub summary_every_s: u64,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable `key=value` lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (with `message`), `span`s.
    Json,
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
            collect_deadline_ms: None,
            collect: crate::backend::libvirt::CollectMode::Auto,
            balloon_refresh_quanta: 4,
            policy_max_file_mib: 64,
            policy_max_slots: 16,
            connect: DEFAULT_CONNECT.to_string(),
            log: None,
            log_format: LogFormat::Text,
            metrics_addr: None,
            fleet_metrics: false,
            fqdn: None,
            status_socket: true,
            summary_every_s: 60,
        }
    }
}

/// Sandbox limits (wasmtime epoch deadline and memory limiter).
#[derive(Clone, Debug, Deserialize, Serialize)]
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
    /// Per-policy overrides, by slot name (the policy's file name, e.g.
    /// `[limits.policy."30-web.wasm"]`, or `cpu` for a builtin). Why: a heavy
    /// policy (an interpreted language, a big host) needs a longer deadline
    /// or more memory, and raising them for every policy would let any
    /// policy take that much.
    pub policy: BTreeMap<String, PolicyLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            decide_timeout_ms: 100,
            max_memory_mib: 256,
            max_output_kib: 4096,
            max_consecutive_failures: 3,
            retry_backoff_quanta: 10,
            policy: BTreeMap::new(),
        }
    }
}

/// The connection when neither `--connect` nor the file gives one.
pub const DEFAULT_CONNECT: &str = "qemu:///system";

/// The config file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vm-balancer/config.toml";

/// Quantum lengths accepted, ms (a scenario's `quantum_ms` too).
pub const QUANTUM_MS: std::ops::RangeInclusive<u32> = 10..=3_600_000;

/// Largest memory size a config key (or a scenario) may give, MiB (1 EiB,
/// far above any host): every KiB or byte product of it fits a u64.
pub const MAX_MIB: u64 = 1 << 40;

/// Longest first backoff, quanta: the same bound as the doubling backoff
/// (README: "up to 3600 quanta"), so `quantum + backoff` cannot wrap.
pub const MAX_RETRY_BACKOFF_QUANTA: u64 = 3600;

/// Longest deadline a policy may be given, as a fraction of the quantum:
/// every slot runs in the same quantum, after collection and before apply,
/// so one policy may take at most half of it.
pub const MAX_POLICY_TIMEOUT_QUANTUM_FRACTION: f64 = 0.5;

/// The limits one policy runs under (every field optional: what is not set
/// comes from `[limits]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyLimits {
    /// Wall-clock budget of one `decide` call, milliseconds; at most half the quantum.
    pub decide_timeout_ms: Option<u64>,
    /// Linear memory, MiB.
    pub max_memory_mib: Option<u64>,
    /// Largest answer, KiB.
    pub max_output_kib: Option<u64>,
}

/// The limits one policy call runs under, resolved from `[limits]` and its
/// `[limits.policy."NAME"]` override.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLimits {
    /// Deadline of one call, milliseconds.
    pub timeout_ms: u64,
    /// Linear memory limit, bytes.
    pub max_memory_bytes: usize,
    /// Largest answer, bytes.
    pub max_output_bytes: usize,
}

impl Limits {
    /// What the policy in slot `slot` runs under.
    pub fn for_slot(&self, slot: &str) -> SlotLimits {
        let own = self.policy.get(slot).cloned().unwrap_or_default();
        SlotLimits {
            timeout_ms: own.decide_timeout_ms.unwrap_or(self.decide_timeout_ms),
            max_memory_bytes: (own.max_memory_mib.unwrap_or(self.max_memory_mib) * 1024 * 1024) as usize,
            max_output_bytes: (own.max_output_kib.unwrap_or(self.max_output_kib) * 1024) as usize,
        }
    }
}

/// The guard's settings. Serializable: `config check` prints them, and a
/// record file's header carries them, so that a replay runs the guard the
/// recording daemon ran.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
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
    /// Most pin changes applied per quantum; 0 means no limit (not "no
    /// pins": that is what an empty policy set is for).
    pub max_pins_per_quantum: usize,
    /// Quanta a re-pinned vCPU must wait before it is re-pinned again.
    pub pin_cooldown_quanta: u64,
    /// Seconds a vCPU that somebody else re-pinned is left alone (the
    /// daemon does not fight an administrator's `virsh vcpupin`).
    pub external_pin_hold_s: u64,
    /// Guest memory figures older than this (ms) are stale: the guard never
    /// shrinks a guest on them. The balloon driver reports every second
    /// (stats period 1 s, `balloon.last-update` has 1 s resolution), so a
    /// healthy guest's figures are 0-2 s old, plus a quantum on the fast
    /// path (its background refresh is taken a quantum later), plus up to
    /// `balloon_refresh_quanta` quanta on a host of more than 32 domains.
    pub stale_after_ms: u64,
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
            stale_after_ms: 10_000,
        }
    }
}

/// Domains never touched: by name or UUID glob (`*` and `?`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
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
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is for messages. A value
    /// out of range is reported with the file and the line of its key.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        config.validate().map_err(|error| match error.dotted_key().and_then(|key| line_of(text, &key)) {
            Some(line) => ConfigError::At { path: path.into(), line, source: Box::new(error) },
            None => error,
        })?;
        Ok(config)
    }

    /// The dotted keys a config text sets (`guard.host_reserve_mib`); the
    /// tables `params` and `limits.policy."NAME"` are listed as wholes. For
    /// `config check`'s "where does this value come from".
    pub fn keys_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        if let Ok(table) = text.parse::<toml::Table>() {
            flatten_keys("", &toml::Value::Table(table), &mut keys);
        }
        keys
    }

    /// Every setting with its effective value, as dotted `key = value`
    /// pairs in TOML syntax (unset optional keys as `(unset)`), in key order.
    pub fn settings(&self) -> Vec<(String, String)> {
        let value = serde_json::to_value(self).expect("a config serializes");
        let mut out = Vec::new();
        flatten_values("", &value, &mut out);
        out
    }

    /// Checks ranges that TOML types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        if !QUANTUM_MS.contains(&self.quantum_ms) {
            return bad("quantum_ms", self.quantum_ms.to_string(), "must be between 10 and 3600000");
        }
        if self.limits.decide_timeout_ms == 0 || self.limits.decide_timeout_ms > 60_000 {
            return bad("limits.decide_timeout_ms", self.limits.decide_timeout_ms.to_string(), "must be 1..=60000");
        }
        if self.limits.max_memory_mib < 1 || self.limits.max_memory_mib > 4096 {
            return bad("limits.max_memory_mib", self.limits.max_memory_mib.to_string(), "must be 1..=4096");
        }
        // 0 KiB would make every answer, even `{"actions": []}`, too large.
        if !(1..=65536).contains(&self.limits.max_output_kib) {
            return bad("limits.max_output_kib", self.limits.max_output_kib.to_string(), "must be 1..=65536");
        }
        if self.limits.retry_backoff_quanta > MAX_RETRY_BACKOFF_QUANTA {
            return bad("limits.retry_backoff_quanta", self.limits.retry_backoff_quanta.to_string(), "must be at most 3600");
        }
        for (key, mib) in [
            ("guard.host_reserve_mib", self.guard.host_reserve_mib),
            ("guard.guest_floor_mib", self.guard.guest_floor_mib),
            ("guard.guest_margin_mib", self.guard.guest_margin_mib),
            ("compile_cache_max_mib", self.compile_cache_max_mib),
        ] {
            if mib > MAX_MIB {
                return bad(key, mib.to_string(), "must be at most 1099511627776 (1 EiB)");
            }
        }
        if self.limits.max_consecutive_failures == 0 {
            return bad("limits.max_consecutive_failures", "0".into(), "must be at least 1");
        }
        if !(1..=4096).contains(&self.policy_max_file_mib) {
            return bad("policy_max_file_mib", self.policy_max_file_mib.to_string(), "must be 1..=4096");
        }
        if self.summary_every_s == 0 {
            return bad("summary_every_s", "0".into(), "must be at least 1");
        }
        if !(1..=1024).contains(&self.policy_max_slots) {
            return bad("policy_max_slots", self.policy_max_slots.to_string(), "must be 1..=1024");
        }
        self.validate_policy_limits()?;
        self.validate_collect_deadline()?;
        if !(1..=60).contains(&self.balloon_refresh_quanta) {
            return bad("balloon_refresh_quanta", self.balloon_refresh_quanta.to_string(), "must be 1..=60");
        }
        if self.guard.stale_after_ms < 2000 {
            return bad(
                "guard.stale_after_ms",
                self.guard.stale_after_ms.to_string(),
                "must be at least 2000: guest figures are reported once a second, with 1 s resolution",
            );
        }
        for (key, pct) in [("guard.max_shrink_pct", self.guard.max_shrink_pct), ("guard.max_grow_pct", self.guard.max_grow_pct)] {
            if !(0.0..=100.0).contains(&pct) {
                return bad(key, pct.to_string(), "must be a percentage, 0..=100");
            }
        }
        Ok(())
    }

    /// Checks every `[limits.policy."NAME"]` against the quantum. Called
    /// again by `run` after `--quantum` changed it.
    pub fn validate_policy_limits(&self) -> Result<(), ConfigError> {
        let max_timeout_ms = (f64::from(self.quantum_ms) * MAX_POLICY_TIMEOUT_QUANTUM_FRACTION) as u64;
        for (name, own) in &self.limits.policy {
            let bad =
                |key: &'static str, value: u64, why: String| Err(ConfigError::InvalidPolicyLimit { policy: name.clone(), key, value, why });
            if let Some(ms) = own.decide_timeout_ms {
                if ms == 0 || ms > max_timeout_ms {
                    return bad(
                        "decide_timeout_ms",
                        ms,
                        format!("must be 1..={max_timeout_ms}: at most half the quantum ({} ms)", self.quantum_ms),
                    );
                }
            }
            if let Some(mib) = own.max_memory_mib {
                if !(1..=4096).contains(&mib) {
                    return bad("max_memory_mib", mib, "must be 1..=4096".into());
                }
            }
            if let Some(kib) = own.max_output_kib {
                if !(1..=65536).contains(&kib) {
                    return bad("max_output_kib", kib, "must be 1..=65536".into());
                }
            }
        }
        Ok(())
    }

    /// Checks `collect_deadline_ms` against the quantum (again by `run`
    /// after `--quantum` changed it): collection, decisions and actions
    /// share one quantum.
    pub fn validate_collect_deadline(&self) -> Result<(), ConfigError> {
        match self.collect_deadline_ms {
            Some(ms) if ms == 0 || ms > self.quantum_ms => Err(ConfigError::Invalid {
                key: "collect_deadline_ms",
                value: ms.to_string(),
                why: "must be 1..=quantum_ms (unset: half the quantum)",
            }),
            _ => Ok(()),
        }
    }

    /// The deadline of one quantum's collection.
    pub fn collect_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.collect_deadline_ms.unwrap_or(self.quantum_ms / 2).max(1)))
    }

    /// The `[params]` table as policy parameters.
    pub fn policy_params(&self) -> BTreeMap<String, Param> {
        self.params.iter().map(|(k, v)| (k.clone(), to_param(v))).collect()
    }
}

impl ConfigError {
    /// The dotted key an invalid value is at, when the error names one.
    fn dotted_key(&self) -> Option<String> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key.to_string()),
            ConfigError::InvalidPolicyLimit { policy, key, .. } => Some(format!("limits.policy.{policy}.{key}")),
            _ => None,
        }
    }
}

/// Tables whose keys are names (free-form), listed as one setting each.
const NAMED_TABLES: [&str; 2] = ["params", "limits.policy"];

fn flatten_keys(prefix: &str, value: &toml::Value, keys: &mut std::collections::BTreeSet<String>) {
    match value {
        toml::Value::Table(table) if !NAMED_TABLES.contains(&prefix) => {
            for (k, v) in table {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_keys(&key, v, keys);
            }
        }
        _ => {
            keys.insert(prefix.to_string());
        }
    }
}

fn flatten_values(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) if !NAMED_TABLES.contains(&prefix) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_values(&key, v, out);
            }
        }
        serde_json::Value::Null => out.push((prefix.to_string(), "(unset)".to_string())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// The line (1-based) where a dotted key is set in config text: the key's
/// own line inside its table (`[guard]` then `host_reserve_mib = ...`).
fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let normalize = |s: &str| s.chars().filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'').collect::<String>();
    let (table, leaf) = dotted.rsplit_once('.').map_or(("", dotted), |(t, l)| (t, l));
    let table = normalize(table);
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(header) = trimmed.strip_prefix('[') {
            current = normalize(header.split(']').next().unwrap_or_default());
            continue;
        }
        let Some((key, _)) = trimmed.split_once('=') else { continue };
        let key = normalize(key);
        let full = if current.is_empty() { key.clone() } else { format!("{current}.{key}") };
        if (current == table && key == leaf) || full == normalize(dotted) {
            return Some(i + 1);
        }
    }
    None
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
    fn per_policy_limits_override_the_global_ones_for_that_slot_only() {
        let c: Config = toml::from_str(
            "[limits]\ndecide_timeout_ms = 50\n[limits.policy.\"30-web.wasm\"]\ndecide_timeout_ms = 400\nmax_memory_mib = 512\n",
        )
        .unwrap();
        c.validate().unwrap();
        let web = c.limits.for_slot("30-web.wasm");
        assert_eq!((web.timeout_ms, web.max_memory_bytes), (400, 512 << 20));
        assert_eq!(web.max_output_bytes, 4096 << 10, "unset keys come from [limits]");
        let other = c.limits.for_slot("10-cpu.wasm");
        assert_eq!((other.timeout_ms, other.max_memory_bytes), (50, 256 << 20));
    }

    #[test]
    fn per_policy_limits_are_bounded_by_the_quantum_and_name_the_policy() {
        let c: Config = toml::from_str("quantum_ms = 1000\n[limits.policy.\"30-web.wasm\"]\ndecide_timeout_ms = 501\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("30-web.wasm") && e.contains("decide_timeout_ms = 501") && e.contains("1..=500"), "{e}");
        let c: Config = toml::from_str("[limits.policy.x]\nmax_memory_mib = 0\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("max_memory_mib = 0"));
        let e = toml::from_str::<Config>("[limits.policy.x]\ntimeout = 1\n").unwrap_err().to_string();
        assert!(e.contains("timeout"), "unknown keys in a policy table are errors: {e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let c = Config { quantum_ms: 1, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("quantum_ms = 1"));
    }

    #[test]
    fn a_zero_output_limit_is_refused_every_answer_would_be_too_large() {
        let c: Config = toml::from_str("[limits]\nmax_output_kib = 0\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.max_output_kib = 0") && e.contains("1..=65536"), "{e}");
    }

    #[test]
    fn sizes_and_backoffs_that_would_wrap_are_refused() {
        for (text, words) in [
            ("[guard]\nhost_reserve_mib = 9223372036854775807\n", "guard.host_reserve_mib = 9223372036854775807"),
            ("[guard]\nguest_floor_mib = 1099511627777\n", "guard.guest_floor_mib = 1099511627777"),
            ("[guard]\nguest_margin_mib = 1099511627777\n", "guard.guest_margin_mib"),
            ("compile_cache_max_mib = 1099511627777\n", "compile_cache_max_mib"),
            ("[limits]\nretry_backoff_quanta = 3601\n", "limits.retry_backoff_quanta = 3601"),
            ("[guard]\nmax_shrink_pct = nan\n", "guard.max_shrink_pct = NaN"),
        ] {
            let c: Config = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(words), "{text}: {e}");
        }
        let c: Config = toml::from_str("[guard]\nmax_pins_per_quantum = 0\n").unwrap();
        c.validate().expect("0 pins per quantum means no limit");
    }

    #[test]
    fn errors_print_plain_values_never_an_option() {
        let c: Config = toml::from_str("[limits.policy.x]\nmax_output_kib = 0\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_output_kib = 0") && !e.contains("Some("), "{e}");
    }
}
