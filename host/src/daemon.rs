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
//! - **Logs that explain, at info**: one start line (URI, quantum,
//!   policies), one line per applied action (old -> new, the policy's
//!   reason, from the apply stage), per guard rejection (the guard), per
//!   policy loaded, swapped, refused, disabled or recovered (the policy
//!   module), and an activity summary every `summary_every_s` (60 s). The
//!   per-quantum `quantum summary` line is at debug.
//! - **Telemetry off the quantum thread**: the status socket (`top`,
//!   `explain`) and the metrics endpoint serve copies from their own
//!   threads; the loop only updates them once per quantum.
//! - **systemd**: READY=1 after the first quantum, RELOADING=1/READY=1
//!   around SIGHUP, STOPPING=1, WATCHDOG=1 each quantum ([`crate::notify`]).

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
    /// `--collect`: overrides the config's `collect`.
    pub collect: Option<crate::backend::libvirt::CollectMode>,
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
    /// The metrics endpoint could not be started.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
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
    backend_options.collect = options.collect.unwrap_or(config.collect);
    backend_options.balloon_refresh_quanta = config.balloon_refresh_quanta;
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
    let mut reporter = Reporter::start(&config, &options)?;
    tracing::info!(
        uri = %options.connect,
        quantum_ms = config.quantum_ms,
        policies = ?slot_names(pipeline.policies()),
        dry_run = options.dry_run,
        "vm-balancer started"
    );
    let notifier = crate::notify::Notifier::from_env();
    let mut ready = false;
    let mut observers =
        crate::observe::Observers::start(options.record.clone(), options.shadow.as_deref(), &options.connect, options.dry_run, &config)?;
    let mut next_tick = Instant::now();
    let mut done = 0u64;
    let mut fed_back = 0usize;
    let mut failing = false;
    while !signals.stop.load(Ordering::SeqCst) && options.quanta.is_none_or(|n| done < n) {
        if signals.hup.swap(false, Ordering::SeqCst) {
            tracing::info!("SIGHUP: re-reading policies");
            notifier.reloading();
            source.reload(pipeline.policies_mut());
            notifier.ready("policies re-read");
        }
        source.poll(pipeline.policies_mut());
        if let Some(stats) = source.reload_stats() {
            reporter.reloads(stats.swaps, stats.refused);
        }
        let started = Instant::now();
        match pipeline.step_traced() {
            Ok((outcome, trace)) => {
                failing = false;
                let count = |o: Outcome| outcome.verdicts.iter().filter(|v| v.outcome == o).count();
                let (accepted, clamped, rejected) = (count(Outcome::Accepted), count(Outcome::Clamped), count(Outcome::Rejected));
                reporter.quantum(&pipeline, &outcome, started.elapsed(), options.quantum);
                tracing::debug!(
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
                reporter.skipped(pipeline.backend().connection());
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
        if !ready {
            ready = true;
            notifier.ready("balancing");
        }
        notifier.watchdog();
        reporter.maybe_summarize(pipeline.policies());
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
    notifier.stopping();
    reporter.summarize(pipeline.policies());
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

fn slot_names(set: &crate::policy::PolicySet) -> Vec<String> {
    set.slots()
        .iter()
        .map(|s| match s.policy() {
            Some(p) => format!("{} ({})", s.name(), p.info().name),
            None => format!("{} (fallback only)", s.name()),
        })
        .collect()
}

/// What the loop reports beyond its logs: the status socket, the metrics
/// endpoint, and the periodic activity summary.
struct Reporter {
    connect: String,
    status: Option<Arc<std::sync::Mutex<Arc<String>>>>,
    /// The last status published, kept to mark skipped quanta in it.
    last_status: crate::status::Status,
    /// The status socket this daemon created (removed when it stops, so
    /// `top` says "no daemon" rather than connection refused on a stale file).
    socket: Option<std::path::PathBuf>,
    recorder: crate::status::Recorder,
    metrics: Option<Arc<std::sync::Mutex<crate::metrics::Metrics>>>,
    every: Duration,
    since: Instant,
    window: Window,
}

/// Counts since the last activity summary.
#[derive(Default)]
struct Window {
    quanta: u64,
    skipped: u64,
    proposals: u64,
    applied: u64,
    clamped: u64,
    rejected: u64,
    fallback_quanta: u64,
    slowest: Duration,
}

impl Reporter {
    fn start(config: &Config, options: &RunOptions) -> Result<Reporter, DaemonError> {
        let first = crate::status::Status { connect: options.connect.clone(), quantum_ms: config.quantum_ms, ..Default::default() };
        let first = serde_json::to_string(&first).unwrap_or_else(|_| "{}".into());
        let status = config.status_socket.then(|| Arc::new(std::sync::Mutex::new(Arc::new(first))));
        let mut socket = None;
        if let Some(status) = &status {
            // The socket lives in the state dir, as private as the originals.
            match StateDir::open(&config.state_dir) {
                Ok(dir) => {
                    let path = crate::status::socket_path(dir.path(), &options.connect);
                    if crate::status::serve(&path, Arc::clone(status)).is_some() {
                        socket = Some(path);
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), "no status socket: `top` and `explain` will not reach this daemon")
                }
            }
        }
        let metrics = match config.metrics_addr {
            Some(addr) => {
                let fleet = config.fleet_metrics.then(|| config.fqdn.clone().unwrap_or_else(crate::metrics::host_name));
                let metrics = Arc::new(std::sync::Mutex::new(crate::metrics::Metrics::new(fleet)));
                let bound = crate::metrics::serve(addr, Arc::clone(&metrics))?;
                tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
                Some(metrics)
            }
            None => None,
        };
        Ok(Reporter {
            connect: options.connect.clone(),
            status,
            socket,
            last_status: crate::status::Status { connect: options.connect.clone(), quantum_ms: config.quantum_ms, ..Default::default() },
            recorder: crate::status::Recorder::default(),
            metrics,
            every: Duration::from_secs(config.summary_every_s),
            since: Instant::now(),
            window: Window::default(),
        })
    }

    fn quantum<B: Backend>(&mut self, pipeline: &Pipeline<B>, outcome: &crate::pipeline::QuantumOutcome, took: Duration, period: Duration) {
        let w = &mut self.window;
        w.quanta += 1;
        w.proposals += outcome.proposed as u64;
        for v in &outcome.verdicts {
            match v.outcome {
                Outcome::Accepted => w.applied += 1,
                Outcome::Clamped => w.clamped += 1,
                Outcome::Rejected => w.rejected += 1,
            }
        }
        w.fallback_quanta += u64::from(!outcome.fallback_slots.is_empty());
        w.slowest = w.slowest.max(took);
        if let Some(status) = &self.status {
            self.last_status = self.recorder.record(&self.connect, &outcome.snapshot, &outcome.verdicts, pipeline.policies(), took);
            if let Ok(text) = serde_json::to_string(&self.last_status) {
                *status.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(text);
            }
        }
        if let Some(metrics) = &self.metrics {
            let times = crate::metrics::QuantumTimes {
                quantum_s: took.as_secs_f64(),
                collect_s: outcome.collect_time.0.as_secs_f64(),
                period_s: period.as_secs_f64(),
            };
            metrics.lock().unwrap_or_else(|p| p.into_inner()).quantum(
                &outcome.snapshot,
                &outcome.verdicts,
                pipeline.policies(),
                times,
                pipeline.backend().connection(),
            );
        }
    }

    fn skipped(&mut self, connection: crate::backend::Connection) {
        self.window.skipped += 1;
        if let Some(status) = &self.status {
            self.last_status.skipped += 1;
            if let Ok(text) = serde_json::to_string(&self.last_status) {
                *status.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(text);
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.lock().unwrap_or_else(|p| p.into_inner()).skipped(connection);
        }
    }

    fn reloads(&mut self, swapped: u64, refused: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.lock().unwrap_or_else(|p| p.into_inner()).reloads(swapped, refused);
        }
    }

    fn maybe_summarize(&mut self, policies: &crate::policy::PolicySet) {
        if self.since.elapsed() >= self.every {
            self.summarize(policies);
        }
    }

    /// One info line: what the last `summary_every_s` did.
    fn summarize(&mut self, policies: &crate::policy::PolicySet) {
        let w = std::mem::take(&mut self.window);
        let seconds = self.since.elapsed().as_secs();
        self.since = Instant::now();
        if w.quanta + w.skipped == 0 {
            return;
        }
        let decide: Vec<String> = policies
            .slots()
            .iter()
            .map(|s| {
                let t = s.decide_times();
                format!("{} median {} us max {} us", s.name(), t.median_us, t.max_us)
            })
            .collect();
        tracing::info!(
            seconds,
            quanta = w.quanta,
            skipped = w.skipped,
            proposals = w.proposals,
            applied = w.applied,
            clamped = w.clamped,
            rejected = w.rejected,
            fallback_quanta = w.fallback_quanta,
            slowest_quantum_ms = w.slowest.as_millis() as u64,
            decide = ?decide,
            "activity summary"
        );
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `vm-balancer snapshot`: collects twice, one quantum apart (usage is a
/// delta), read-only, and returns exactly what a policy would receive.
pub fn snapshot(config: &Config, uri: &str) -> Result<Snapshot, DaemonError> {
    let mut options = LibvirtOptions::new(uri);
    options.exclude = config.exclude.clone();
    options.read_only = true;
    options.collect_deadline = config.collect_deadline();
    options.collect = config.collect;
    options.balloon_refresh_quanta = config.balloon_refresh_quanta;
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
