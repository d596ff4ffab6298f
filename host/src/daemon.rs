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
//! - **Policies come from a [`PolicySource`]**: the drop-in directory unless
//!   `--policy` is given; plans made off the quantum thread are applied at
//!   the boundary, through the same path as SIGHUP's.
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

use crate::backend::libvirt::LibvirtOptions;
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::persist::StateDir;
use crate::pipeline::Pipeline;
use crate::policy::source::{PolicySource, SourceError};
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
    /// Record every quantum here (`--record`).
    pub record: Option<crate::record::RecordOptions>,
    /// A shadow policy (`--shadow`): decides every quantum, never applied.
    pub shadow: Option<String>,
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
    /// The policies could not be set up (defaults broken, unsafe directory).
    #[error(transparent)]
    Policies(#[from] SourceError),
    /// The backend failed (snapshot command only).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The config does not fit the quantum given on the command line.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The backend could not be opened (a `sim:` scenario that does not load).
    #[error(transparent)]
    Open(#[from] crate::backend::OpenError),
    /// The state dir is unsafe, or another daemon holds its lock.
    #[error(transparent)]
    State(#[from] crate::persist::StateError),
    /// The record directory cannot be used.
    #[error(transparent)]
    Record(#[from] crate::record::RecordError),
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
    config.validate_collect_deadline()?;
    let mut backend_options = LibvirtOptions::new(&options.connect);
    backend_options.exclude = config.exclude.clone();
    backend_options.external_pin_hold = Duration::from_secs(config.guard.external_pin_hold_s);
    backend_options.read_only = options.dry_run;
    backend_options.collect_deadline = config.collect_deadline();
    // A real hypervisor gets one daemon, and its originals survive a crash
    // (a dry run changes nothing, and the simulator has nothing to keep).
    let _lock = match options.connect.starts_with("sim:") || options.dry_run {
        true => None,
        false => {
            let state = StateDir::open(&config.state_dir)?;
            let lock = state.lock(&options.connect)?;
            backend_options.originals = Some(state.originals(&options.connect));
            Some(lock)
        }
    };
    let backend = crate::backend::open(backend_options)?;
    // The drop-in directory's files compile through the daemon's own cache.
    let cache = options
        .policies
        .is_empty()
        .then(|| crate::policy::cache::CompileCache::open_or_warn(&config.state_dir.join("compile-cache"), config.compile_cache_max_mib))
        .flatten();
    let (source, policies) = PolicySource::start(&config, &options.policies, &options.policy_dir, cache)?;
    let mut pipeline = Pipeline::new(backend, policies, config.clone(), options.dry_run);
    source.wait_first(pipeline.policies_mut(), Duration::from_secs(2));
    let mut observers =
        crate::observe::Observers::start(options.record.clone(), options.shadow.as_deref(), &options.connect, options.dry_run, &config)?;
    let mut next_tick = Instant::now();
    let mut done = 0u64;
    let mut fed_back = 0usize;
    let mut failing = false;
    while !signals.stop.load(Ordering::SeqCst) && options.quanta.is_none_or(|n| done < n) {
        if signals.hup.swap(false, Ordering::SeqCst) {
            tracing::info!("SIGHUP: re-reading policies");
            source.reload(pipeline.policies_mut());
        }
        source.poll(pipeline.policies_mut());
        let started = Instant::now();
        match pipeline.step_traced() {
            Ok((outcome, trace)) => {
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
                observers.quantum(&trace, || pipeline.policies().slots().iter().map(|s| s.name().to_string()).collect());
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
    observers.finish();
    let why = if signals.stop.load(Ordering::SeqCst) { "signal" } else { "quanta reached" };
    if options.restore && !options.dry_run {
        match pipeline.backend_mut().restore() {
            Ok(n) => tracing::info!(restored = n, "restored the original pins and balloon targets"),
            Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "restore failed"),
        }
    }
    let stats = pipeline.applier().stats();
    tracing::info!(
        why,
        quanta = done,
        pins = stats.pins,
        memory = stats.memory,
        gone = stats.gone,
        failed = stats.failed,
        "vm-balancer stopped"
    );
    Ok(())
}

/// `vm-balancer snapshot`: collects twice, one quantum apart (usage is a
/// delta), read-only, and returns exactly what a policy would receive.
pub fn snapshot(config: &Config, uri: &str) -> Result<Snapshot, DaemonError> {
    let mut options = LibvirtOptions::new(uri);
    options.exclude = config.exclude.clone();
    options.read_only = true;
    options.collect_deadline = config.collect_deadline();
    let mut backend = crate::backend::libvirt::LibvirtBackend::connect(options)?;
    backend.collect()?;
    std::thread::sleep(Duration::from_millis(u64::from(config.quantum_ms)));
    let observation = backend.collect()?;
    Ok(snapshot::assemble(observation, 0, config, &config.policy_params(), Vec::new()))
}

/// `vm-balancer restore`: puts every domain an earlier daemon changed back
/// to the originals it stored, without running (after a crash, or after a
/// hung guest kept a SIGTERM's restore from reaching it). Refused while a
/// daemon runs for `uri`: its own SIGTERM restores.
pub fn restore(config: &Config, uri: &str) -> Result<usize, DaemonError> {
    let state = StateDir::open(&config.state_dir)?;
    let _lock = state.lock(uri)?;
    let mut options = LibvirtOptions::new(uri);
    options.exclude = config.exclude.clone();
    options.collect_deadline = config.collect_deadline();
    options.originals = Some(state.originals(uri));
    options.restore_only = true;
    let mut backend = crate::backend::libvirt::LibvirtBackend::connect(options)?;
    backend.collect()?;
    Ok(backend.restore()?)
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
        let specs = ["/nonexistent/policy.wasm".to_string(), "builtin:mem".to_string()];
        let (_, set) = PolicySource::start(&Config::default(), &specs, std::path::Path::new("/nonexistent"), None).unwrap();
        assert_eq!(set.slots().len(), 2);
        assert!(set.slots()[0].policy().is_none());
        assert!(set.slots()[1].policy().is_some());
    }
}
