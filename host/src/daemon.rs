//! `vm-balancer run`: the daemon loop over a real hypervisor, and
//! `vm-balancer snapshot`.
//!
//! Why it is built this way:
//! - **One thread, a fixed cadence.** Each quantum runs the whole
//!   [`Pipeline`] then sleeps until the next tick; a slow quantum is not
//!   followed by a burst of catch-up quanta (missed ticks are skipped).
//! - **Signals are flags** (`signal-hook`), checked between quanta and while
//!   sleeping: SIGINT/SIGTERM let the quantum in flight finish, then the
//!   backend restores every pin and balloon target the daemon changed (unless
//!   `--no-restore`) and `run` returns Ok, so the process exits 0. SIGHUP
//!   re-reads the policies: the drop-in directory (through the same
//!   validated, off-thread path as a file change) or the `--policy` files.
//! - **Policies come from the drop-in directory** unless `--policy` is
//!   given; plans made off the quantum thread are applied at the boundary.
//! - **A policy never stops the daemon.** A file that cannot be loaded at
//!   start becomes a fallback-only slot (the built-in defaults decide for
//!   it); on SIGHUP, if any file fails, the previous slots are all kept.
//! - **A backend failure is a quantum without data**, logged, and the loop
//!   carries on (the libvirt backend reconnects with backoff by itself).
//! - **One info line per quantum** (`quantum summary`) with the counts tests
//!   and operators grep for; the guard logs each rejection itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_balancer_sdk::{Outcome, Snapshot};

use crate::backend::libvirt::{LibvirtBackend, LibvirtOptions};
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::pipeline::Pipeline;
use crate::policy::slots::{slot_name, SlotError};
use crate::policy::{PolicySet, Slot};
use crate::snapshot;

/// Options of `vm-balancer run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// libvirt URI.
    pub connect: String,
    /// Length of a quantum.
    pub quantum: Duration,
    /// Decide and log, apply nothing.
    pub dry_run: bool,
    /// Stop after this many quanta.
    pub quanta: Option<u64>,
    /// Policy specs (files or `builtin:NAME`); empty means the defaults.
    pub policies: Vec<String>,
    /// Restore pins and balloon targets on exit.
    pub restore: bool,
    /// The drop-in policy directory, watched when `policies` is empty.
    pub policy_dir: std::path::PathBuf,
}

/// Errors that stop the daemon before it starts.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A signal handler could not be installed.
    #[error("cannot install the handler of signal {signal}")]
    Signal {
        /// The signal number.
        signal: i32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The built-in default policies could not be loaded.
    #[error("cannot load the built-in default policies")]
    Defaults(#[source] SlotError),
    /// The backend failed (snapshot command only).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The policy directory is unsafe or unreadable.
    #[error(transparent)]
    PolicyDir(#[from] crate::policy::dir::DirError),
    /// The config does not fit the quantum given on the command line.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A `sim:` scenario could not be loaded.
    #[error(transparent)]
    Scenario(#[from] crate::sim::ScenarioError),
}

/// Parses a quantum length: `500ms`, `1s`, `1.5s`, `2m`, or bare seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = t.find(|c: char| c.is_ascii_alphabetic()).map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 1s)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    if !(0.01..=3600.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range (10ms ..= 1h)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Loads each spec into a slot, in order; a spec that fails becomes a
/// fallback-only slot and is returned with its error.
fn load_each(config: &Config, specs: &[String]) -> (PolicySet, Vec<(String, String)>) {
    let mut set = PolicySet::new(&config.limits);
    let mut failures = Vec::new();
    for spec in specs {
        let name = slot_name(spec);
        match set.load_spec(spec) {
            Ok(policy) => set.push(Slot::new(&name, policy)),
            Err(error) => {
                failures.push((spec.clone(), error_chain(&error)));
                set.push(Slot::fallback_only(&name));
            }
        }
    }
    (set, failures)
}

/// The policy slots for `specs`; a spec that fails becomes a fallback-only
/// slot (logged), so the daemon always starts.
pub fn build_policies(config: &Config, specs: &[String]) -> Result<PolicySet, DaemonError> {
    if specs.is_empty() {
        return PolicySet::defaults(&config.limits).map_err(DaemonError::Defaults);
    }
    let (set, failures) = load_each(config, specs);
    for (spec, error) in failures {
        tracing::error!(slot = %slot_name(&spec), spec, error, "policy cannot be loaded; the built-in defaults decide for this slot");
    }
    Ok(set)
}

/// SIGHUP: rebuild every slot from its spec. If any spec fails, the whole
/// old set is kept (slots are ordered and settle conflicts, so a partial
/// reload would silently change which policy wins), and the failure is
/// logged naming the spec.
fn reload_policies(config: &Config, specs: &[String], old: PolicySet) -> PolicySet {
    if specs.is_empty() {
        tracing::info!("SIGHUP: running the built-in defaults; nothing to re-read");
        return old;
    }
    let (fresh, failures) = load_each(config, specs);
    if let Some((spec, error)) = failures.into_iter().next() {
        tracing::error!(slot = %slot_name(&spec), spec, error, "SIGHUP: policy cannot be reloaded; keeping the previous policies");
        return old;
    }
    tracing::info!(slots = fresh.slots().len(), "SIGHUP: policies reloaded");
    fresh
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

struct Signals {
    stop: Arc<AtomicBool>,
    hup: Arc<AtomicBool>,
}

fn install_signals() -> Result<Signals, DaemonError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|source| DaemonError::Signal { signal, source })?;
    }
    signal_hook::flag::register(SIGHUP, Arc::clone(&hup)).map_err(|source| DaemonError::Signal { signal: SIGHUP, source })?;
    Ok(Signals { stop, hup })
}

/// Runs the daemon until `--quanta` is reached or SIGINT/SIGTERM.
pub fn run(mut config: Config, options: RunOptions) -> Result<(), DaemonError> {
    let signals = install_signals()?;
    config.quantum_ms = options.quantum.as_millis().clamp(1, u32::MAX as u128) as u32;
    // A per-policy deadline is bounded by the quantum, which --quantum may
    // just have shortened.
    config.validate_policy_limits()?;
    let mut backend_options = LibvirtOptions::new(&options.connect);
    backend_options.exclude = config.exclude.clone();
    backend_options.external_pin_hold = Duration::from_secs(config.guard.external_pin_hold_s);
    backend_options.read_only = options.dry_run;
    let backend: Box<dyn Backend> = match options.connect.strip_prefix("sim:") {
        // The simulator in real time: the daemon loop without a hypervisor.
        Some(path) => Box::new(crate::sim::SimBackend::new(crate::sim::Scenario::load(std::path::Path::new(path))?)),
        None => Box::new(LibvirtBackend::new(backend_options)),
    };
    let policies = build_policies(&config, &options.policies)?;
    // With no --policy, the drop-in directory decides (hot-swapped); the
    // embedded defaults run until its first plan is ready, and whenever it
    // is empty or missing.
    let reloader = if options.policies.is_empty() {
        crate::policy::dir::scan(&options.policy_dir)?;
        let cache_dir = config.state_dir.join("compile-cache");
        let cache = match crate::policy::cache::CompileCache::new(&cache_dir, config.compile_cache_max_mib * 1024 * 1024) {
            Ok(cache) => Some(Arc::new(cache)),
            Err(error) => {
                tracing::warn!(dir = %cache_dir.display(), %error, "no compile cache: policies are compiled at every load");
                None
            }
        };
        let reloader = crate::policy::reload::Reloader::spawn(
            &options.policy_dir,
            &config.limits,
            cache,
            policies.last_snapshot(),
            Duration::from_millis(config.reload_debounce_ms),
        );
        tracing::info!(dir = %options.policy_dir.display(), "watching the policy directory");
        Some(reloader)
    } else {
        None
    };
    let mut pipeline = Pipeline::new(backend, policies, config.clone(), options.dry_run);
    if let Some(reloader) = &reloader {
        // Give a warm-cache start its policies from the first quantum; a
        // cold compile (seconds for Python or JS) does not hold the loop.
        reloader.wait_and_apply(&mut pipeline.policies, Duration::from_secs(2));
    }
    let mut next_tick = Instant::now();
    let mut done = 0u64;
    let mut fed_back = 0usize;
    let mut failing = false;
    while !signals.stop.load(Ordering::SeqCst) && options.quanta.is_none_or(|n| done < n) {
        if signals.hup.swap(false, Ordering::SeqCst) {
            tracing::info!("SIGHUP: re-reading policies");
            match &reloader {
                Some(reloader) => reloader.request(),
                None => {
                    let placeholder = PolicySet::new(&config.limits);
                    let old = std::mem::replace(&mut pipeline.policies, placeholder);
                    pipeline.policies = reload_policies(&config, &options.policies, old);
                }
            }
        }
        if let Some(reloader) = &reloader {
            reloader.poll(&mut pipeline.policies);
        }
        let started = Instant::now();
        match pipeline.step() {
            Ok(outcome) => {
                failing = false;
                let count = |o: Outcome| outcome.verdicts.iter().filter(|v| v.outcome == o).count();
                let (accepted, clamped, rejected) = (count(Outcome::Accepted), count(Outcome::Clamped), count(Outcome::Rejected));
                tracing::info!(
                    quantum = outcome.quantum,
                    domains = outcome.domains,
                    proposals = outcome.proposed,
                    accepted,
                    clamped,
                    rejected,
                    verdicts_in_snapshot = fed_back,
                    fallback_slots = ?outcome.fallback_slots,
                    took_ms = started.elapsed().as_millis() as u64,
                    "quantum summary"
                );
                fed_back = clamped + rejected;
            }
            Err(error) => {
                // Recorded as an error, not its Display: the log then shows
                // its sources too (libvirt's own message).
                if failing {
                    tracing::debug!(error = &error as &dyn std::error::Error, "quantum skipped: no observation");
                } else {
                    tracing::warn!(error = &error as &dyn std::error::Error, "quantum skipped: no observation (the loop carries on)");
                }
                failing = true;
            }
        }
        done += 1;
        if options.quanta.is_some_and(|n| done >= n) {
            break;
        }
        next_tick += options.quantum;
        let now = Instant::now();
        if next_tick < now {
            // Overran: skip the missed ticks instead of bursting.
            next_tick = now + options.quantum;
        }
        while !signals.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next_tick {
                break;
            }
            std::thread::sleep((next_tick - now).min(Duration::from_millis(50)));
        }
    }
    let why = if signals.stop.load(Ordering::SeqCst) { "signal" } else { "quanta reached" };
    if options.restore && !options.dry_run {
        match pipeline.backend.restore() {
            Ok(n) => tracing::info!(restored = n, "restored the original pins and balloon targets"),
            Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "restore failed"),
        }
    }
    let stats = pipeline.applier.stats();
    tracing::info!(why, quanta = done, pins = stats.pins, memory = stats.memory, gone = stats.gone, failed = stats.failed, "vm-balancer stopped");
    Ok(())
}

/// `vm-balancer snapshot`: collects twice, one quantum apart (usage is a
/// delta), read-only, and returns exactly what a policy would receive.
pub fn snapshot(config: &Config, uri: &str) -> Result<Snapshot, DaemonError> {
    let mut options = LibvirtOptions::new(uri);
    options.exclude = config.exclude.clone();
    options.read_only = true;
    let mut backend = LibvirtBackend::connect(options)?;
    backend.collect()?;
    std::thread::sleep(Duration::from_millis(u64::from(config.quantum_ms)));
    let observation = backend.collect()?;
    Ok(snapshot::assemble(observation, 0, config, &config.policy_params(), Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn a_bad_policy_file_becomes_a_fallback_slot() {
        let set = build_policies(&Config::default(), &["/nonexistent/policy.wasm".into(), "builtin:mem".into()]).unwrap();
        assert_eq!(set.slots().len(), 2);
        assert!(set.slots()[0].policy().is_none());
        assert!(set.slots()[1].policy().is_some());
    }
}
