//! The `vm-balancer` command line. `anyhow` lives only here, at the edge;
//! the library's errors are typed, and the whole chain is printed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::sync::Arc;

use vm_balancer::backend::sim::Scenario;
use vm_balancer::config::Config;
use vm_balancer::policy::cache::CompileCache;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::Snapshot;
use vm_balancer::simulate::simulate_observed;

/// Exit statuses, the same for every subcommand (README: "Exit status").
const EXIT_STATUS_HELP: &str = "\
Exit status (every subcommand):
  0  success
  1  policy check: the policy failed on a snapshot or quantum (trap, timeout,
     memory limit, undecodable or oversized answer, err)
  2  the command could not do its job: bad flags, an invalid config,
     scenario or snapshot file, a file that is not a usable policy, a setting
     that cannot work on the host, `snapshot` without a hypervisor
  101  a bug (a panic): please report it";

/// `policy check`: the policy ran and failed.
const EXIT_POLICY_FAILED: u8 = 1;

/// Anything that stops a command (clap's usage errors exit 2 too).
const EXIT_ERROR: u8 = 2;

/// Balances KVM guests: each quantum, sandboxed WebAssembly policies decide
/// vCPU pins and balloon targets, a host-side guard checks every action, and
/// the survivors are applied.
#[derive(Parser, Debug)]
#[command(name = "vm-balancer", version, about, long_about = None, after_help = EXIT_STATUS_HELP)]
struct Cli {
    /// Config file (TOML). Without it, /etc/vm-balancer/config.toml is read
    /// if it exists, else built-in defaults apply. A --config file that is
    /// missing is an error.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log line format: text, or json (one object per line).
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<vm_balancer::config::LogFormat>,
    /// Log filter, e.g. `info` (the default), `debug`,
    /// `vm_balancer=debug,policy=trace` (or the config's `log`, or
    /// RUST_LOG). A bare level applies to vm-balancer and its
    /// policies; other crates (wasmtime, cranelift...) stay at `warn` unless
    /// named, e.g. `debug,wasmtime=debug`.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run policies against a simulated host described by a scenario file
    /// and print a quality report (offline; no hypervisor needed).
    Simulate {
        /// Scenario file (see examples/scenarios/).
        scenario: PathBuf,
        /// Policy to run: a component file or builtin:cpu, builtin:mem,
        /// builtin:classic. Repeat for several slots, applied in order.
        /// Default: builtin:cpu then builtin:mem.
        #[arg(long = "policy", value_name = "FILE|builtin:NAME")]
        policies: Vec<String>,
        /// Quanta to simulate (default: the scenario's own length).
        #[arg(long)]
        quanta: Option<u64>,
        /// Print the report as JSON (with per-slot decide times under `timing`).
        #[arg(long)]
        json: bool,
        /// Write one JSON record per quantum to FILE (JSON lines; the
        /// format: examples/TIMELINE.md).
        #[arg(long, value_name = "FILE.jsonl")]
        timeline: Option<PathBuf>,
        /// Draw the run to an SVG: pCPU demand against the lower bound,
        /// balloon targets against use, host memory against the reserve.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Feed a record's snapshots (`run --record DIR`) to candidate policies
    /// through the guard the recording ran, and report where they would
    /// have acted differently. Open loop: the snapshots do not react to the
    /// candidates' actions.
    Replay {
        /// The record directory.
        dir: PathBuf,
        /// Candidate policy: a component file or builtin:NAME. Repeat for
        /// several slots, in order (as `run --policy`).
        #[arg(long = "policy", value_name = "FILE|builtin:NAME", required = true)]
        policies: Vec<String>,
        /// Print the report as JSON (every differing quantum under `differences`).
        #[arg(long)]
        json: bool,
        /// Write the candidates' timeline on the recorded snapshots (JSON lines).
        #[arg(long, value_name = "FILE.jsonl")]
        timeline: Option<PathBuf>,
        /// Draw it to an SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Draw a timeline file (`simulate --timeline`, `replay --timeline`) to an SVG.
    Plot {
        /// The timeline (JSON lines).
        timeline: PathBuf,
        /// The SVG to write.
        #[arg(long, value_name = "FILE.svg")]
        plot: PathBuf,
    },
    /// Run the daemon on a libvirt host: every quantum, collect, decide,
    /// guard and apply. SIGINT/SIGTERM finish the quantum, restore what the
    /// daemon changed and exit 0; SIGHUP re-reads the policy files.
    Run {
        #[command(flatten)]
        settings: Settings,
        /// Decide and log, apply nothing (no pin, no balloon change).
        #[arg(long)]
        dry_run: bool,
        /// Stop after N quanta.
        #[arg(long, value_name = "N")]
        quanta: Option<u64>,
        /// Policy: a component file or builtin:NAME. Repeat for several
        /// slots, in order. Default: builtin:cpu then builtin:mem. A file
        /// that cannot be loaded runs the built-in defaults in its place.
        #[arg(long = "policy", value_name = "FILE|builtin:NAME")]
        policies: Vec<String>,
        /// On exit, leave pins and balloon targets as they are.
        #[arg(long)]
        no_restore: bool,
        /// Record every quantum (snapshot, each slot's actions, the guard's
        /// verdicts, what was applied) to DIR, for `vm-balancer replay`.
        /// DIR is made 0700 and must be the daemon's own; files are 0600.
        #[arg(long, value_name = "DIR")]
        record: Option<PathBuf>,
        /// With --record: segment size, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 64, requires = "record", value_parser = clap::value_parser!(u64).range(1..=4096))]
        record_segment_mib: u64,
        /// With --record: segments kept (the oldest are deleted).
        #[arg(long, value_name = "N", default_value_t = 16, requires = "record", value_parser = clap::value_parser!(u64).range(1..=100_000))]
        record_keep: u64,
        /// Run this policy beside the active ones every quantum, never
        /// applied; log and count where it disagrees. It runs on its own
        /// thread: a slow or failing shadow cannot delay the quantum.
        #[arg(long, value_name = "FILE|builtin:NAME")]
        shadow: Option<String>,
    },
    /// Check a config file and print every effective setting with where it
    /// comes from (default, file or cli).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Live view of a running daemon (through its read-only status socket
    /// in the state dir): pCPUs, domains with their last action, policies.
    /// q or Esc quits.
    Top {
        /// The daemon's URI (default: the config's `connect`).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// The daemon's state dir (default: the config's `state_dir`).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Why did this guest change? The last actions the running daemon took
    /// or refused on a domain, with the policy's reason and the guard's verdict.
    Explain {
        /// Domain name or UUID.
        domain: String,
        /// The daemon's URI (default: the config's `connect`).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// The daemon's state dir (default: the config's `state_dir`).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print exactly what a policy would receive right now (collects twice,
    /// one quantum apart; changes nothing). With sim:SCENARIO.toml, what it
    /// would receive at quantum N of that scenario (the defaults decide the
    /// quanta before it): a fixture for a policy's unit tests, or for
    /// `policy check --snapshot`.
    Snapshot {
        /// libvirt URI, or sim:SCENARIO.toml for the simulator (default:
        /// the config's `connect`, qemu:///system).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// With sim:, the quantum whose snapshot to print (default 0).
        #[arg(long, value_name = "N")]
        quantum: Option<u64>,
        /// Print JSON (pretty); otherwise a readable summary.
        #[arg(long)]
        json: bool,
    },
    /// Put every pin and balloon target back to what it was before a
    /// daemon first changed it, from the originals the daemon keeps in its
    /// state dir (after a crash or SIGKILL, or for a guest that was hung at
    /// the daemon's exit). Refused while a daemon runs for the same URI.
    Restore {
        /// libvirt URI (default: the config's `connect`, qemu:///system).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// Inspect and test policy components.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

/// Settings of `run` that the config file can also give (the command line
/// wins); `config check` takes them too, to show the effect.
#[derive(clap::Args, Debug, Default, Clone)]
struct Settings {
    /// libvirt URI (any, remote ones included: qemu+ssh://host/system),
    /// or sim:SCENARIO.toml to run the daemon on the simulator in real
    /// time (default: the config's `connect`, qemu:///system).
    #[arg(long, value_name = "URI")]
    connect: Option<String>,
    /// Length of a quantum, e.g. 500ms, 1s (default: the config's quantum_ms, 1s).
    #[arg(long, value_parser = vm_balancer::daemon::parse_duration, value_name = "DURATION")]
    quantum: Option<std::time::Duration>,
    /// Drop-in policy directory, watched while running (used when no
    /// --policy is given): every *.wasm in it is a policy, applied in
    /// file-name order. Default: the config's policy_dir,
    /// /etc/vm-balancer/policies.
    #[arg(long, value_name = "DIR")]
    policy_dir: Option<PathBuf>,
    /// State dir: originals, lock, compile cache, status socket (default:
    /// the config's state_dir, /var/lib/vm-balancer).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9109 (default: the config's metrics_addr; unset: off).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How figures are collected: `auto` reads CPU figures from procfs and
    /// refreshes balloons in a rolling subset on a local qemu:///system
    /// (the bulk libvirt call elsewhere); `bulk` forces one libvirt call
    /// with every group every quantum (default: the config's `collect`, auto).
    #[arg(long, value_name = "auto|bulk", value_parser = parse_collect)]
    collect: Option<vm_balancer::backend::libvirt::CollectMode>,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file (default: --config, else
    /// /etc/vm-balancer/config.toml) and print the effective settings.
    Check {
        /// The file to check.
        path: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Load a component, list its imports and exports, and run it on sample
    /// snapshots (or a scenario, or a snapshot file). Every answer is
    /// decoded strictly: an unknown action field is a warning. Prints the
    /// decide time against the deadline that would apply to it.
    ///
    /// Exit status: 0 the policy passed; 1 it failed on a snapshot or a
    /// scenario quantum (trap, timeout, memory limit, undecodable or
    /// oversized answer, err); 2 it could not be checked (not a usable
    /// policy file, bad flags, an invalid config, scenario or snapshot).
    #[command(after_help = EXIT_STATUS_HELP)]
    Check {
        /// The component file (or builtin:NAME).
        file: String,
        /// Run it on the simulator through this scenario (closed loop: its
        /// actions go through the guard and take effect) instead of the
        /// built-in samples.
        #[arg(long, value_name = "SCENARIO.toml", conflicts_with = "snapshot")]
        scenario: Option<PathBuf>,
        /// With --scenario, quanta to run (default: the scenario's length).
        #[arg(long, value_name = "N", requires = "scenario")]
        quanta: Option<u64>,
        /// Run it on this snapshot: JSON as `vm-balancer snapshot --json`
        /// prints it, or MessagePack.
        #[arg(long, value_name = "FILE")]
        snapshot: Option<PathBuf>,
        /// Decide on each sample (or the --snapshot) this many times; the
        /// time line gives the median. For measuring a policy's cost.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000), conflicts_with = "scenario")]
        repeat: u32,
    },
}

fn main() -> ExitCode {
    vm_balancer::ffi::limit_malloc_arenas();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // Report commands die quietly when their reader goes away (the
        // daemon keeps SIGPIPE ignored: see `ffi::restore_default_sigpipe`).
        vm_balancer::ffi::restore_default_sigpipe();
    }
    let loaded = match load_config(&cli) {
        Ok(loaded) => loaded,
        Err(error) => return fail(&error),
    };
    // The daemon explains itself at info by default; report commands print
    // their report and stay quiet unless asked.
    let default_level = if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" };
    init_logging(loaded.config.log.as_deref(), default_level, loaded.config.log_format);
    if matches!(cli.command, Command::Run { .. }) {
        match &loaded.file {
            Some(path) => tracing::info!(file = %path.display(), "config read"),
            None => tracing::info!(file = %loaded.tried.display(), "no config file: built-in defaults (and the command line)"),
        }
    }
    match run(cli, loaded) {
        Ok(code) => code,
        Err(error) => fail(&error),
    }
}

/// Prints the whole error chain and returns the error status.
fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::from(EXIT_ERROR)
}

/// The config in effect, and where each part of it came from.
struct Loaded {
    config: Config,
    /// The file read, if any.
    file: Option<PathBuf>,
    /// The file looked for (the default one when it was missing).
    tried: PathBuf,
    /// Dotted keys the file sets.
    file_keys: std::collections::BTreeSet<String>,
    /// Dotted keys the command line sets.
    cli_keys: std::collections::BTreeSet<String>,
}

/// The default config file: `/etc/vm-balancer/config.toml`, or the path in
/// `VMB_CONFIG_DEFAULT` (tests point it at a file that does not exist, so
/// that a machine's own /etc file never changes what they see).
fn default_config_path() -> PathBuf {
    std::env::var_os("VMB_CONFIG_DEFAULT").map_or_else(|| PathBuf::from(vm_balancer::config::DEFAULT_CONFIG_PATH), PathBuf::from)
}

/// Defaults, then the file (`--config`, `config check PATH`, or the
/// default file when it exists), then the command line.
fn load_config(cli: &Cli) -> Result<Loaded> {
    let explicit = match &cli.command {
        Command::Config { command: ConfigCommand::Check { path: Some(path), .. } } => Some(path.clone()),
        _ => cli.config.clone(),
    };
    let tried = explicit.clone().unwrap_or_else(default_config_path);
    let text = match std::fs::read_to_string(&tried) {
        Ok(text) => Some(text),
        Err(error) if explicit.is_none() && error.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(vm_balancer::config::ConfigError::Read { path: tried, source }.into()),
    };
    let (mut config, file_keys) = match &text {
        Some(text) => (Config::parse(text, &tried)?, Config::keys_in(text)),
        None => (Config::default(), Default::default()),
    };
    let mut cli_keys = std::collections::BTreeSet::new();
    let mut set = |key: &str| cli_keys.insert(key.to_string());
    if let Some(log) = &cli.log {
        config.log = Some(log.clone());
        set("log");
    }
    if let Some(format) = cli.log_format {
        config.log_format = format;
        set("log_format");
    }
    let settings = match &cli.command {
        Command::Run { settings, .. } | Command::Config { command: ConfigCommand::Check { settings, .. } } => Some(settings),
        _ => None,
    };
    if let Some(s) = settings {
        if let Some(connect) = &s.connect {
            config.connect = connect.clone();
            set("connect");
        }
        if let Some(quantum) = s.quantum {
            config.quantum_ms = quantum.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
            set("quantum_ms");
        }
        if let Some(dir) = &s.policy_dir {
            config.policy_dir = dir.clone();
            set("policy_dir");
        }
        if let Some(dir) = &s.state_dir {
            config.state_dir = dir.clone();
            set("state_dir");
        }
        if let Some(addr) = s.metrics_addr {
            config.metrics_addr = Some(addr);
            set("metrics_addr");
        }
        if let Some(mode) = s.collect {
            config.collect = mode;
            set("collect");
        }
        config.validate()?;
    }
    Ok(Loaded { config, file: text.is_some().then(|| tried.clone()), tried, file_keys, cli_keys })
}

/// Log targets that are this program's own: a bare level in a filter
/// applies to these, and every other crate stays at `warn`.
const OWN_TARGETS: [&str; 3] = ["vm_balancer", "vm_balancer_sdk", "policy"];

/// `debug` becomes `warn,vm_balancer=debug,vm_balancer_sdk=debug,policy=debug`:
/// a bare level in `--log` or RUST_LOG is about vm-balancer, not about the
/// 800,000 lines cranelift prints at debug. Named targets pass unchanged.
fn expand_filter(filter: &str) -> String {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let mut out = vec!["warn".to_string()];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            out.extend(OWN_TARGETS.iter().map(|t| format!("{t}={directive}")));
        } else {
            out.push(directive.to_string());
        }
    }
    out.join(",")
}

fn init_logging(filter: Option<&str>, default_level: &str, format: vm_balancer::config::LogFormat) {
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| default_level.to_string());
    let filter = tracing_subscriber::EnvFilter::new(expand_filter(&filter));
    match format {
        vm_balancer::config::LogFormat::Text => {
            // Colour only on a terminal: a log file or the journal gets plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
        }
        // Stable field names for shippers: timestamp, level, target,
        // fields (message and the event's own), no span list.
        vm_balancer::config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    vm_balancer::sdk::set_native_log_hook(|level, message| {
        use vm_balancer::sdk::Level;
        match level {
            Level::Error => tracing::error!(target: "policy", "{message}"),
            Level::Warn => tracing::warn!(target: "policy", "{message}"),
            Level::Info => tracing::info!(target: "policy", "{message}"),
            Level::Debug => tracing::debug!(target: "policy", "{message}"),
            Level::Trace => tracing::trace!(target: "policy", "{message}"),
        }
    });
}

/// `--collect auto|bulk`.
fn parse_collect(text: &str) -> Result<vm_balancer::backend::libvirt::CollectMode, String> {
    match text {
        "auto" => Ok(vm_balancer::backend::libvirt::CollectMode::Auto),
        "bulk" => Ok(vm_balancer::backend::libvirt::CollectMode::Bulk),
        other => Err(format!("{other:?}: expected auto or bulk")),
    }
}

fn run(cli: Cli, loaded: Loaded) -> Result<ExitCode> {
    let config = loaded.config.clone();
    match cli.command {
        Command::Config { command: ConfigCommand::Check { .. } } => {
            match &loaded.file {
                Some(path) => println!("config file {}: ok", path.display()),
                None => println!("no config file at {}: built-in defaults", loaded.tried.display()),
            }
            for (key, value) in config.settings() {
                let from = if loaded.cli_keys.contains(&key) {
                    "cli"
                } else if loaded.file_keys.contains(&key) {
                    "file"
                } else {
                    "default"
                };
                println!("{key} = {value}  # {from}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Top { connect, state_dir } => {
            let socket = status_socket(&config, connect, state_dir);
            vm_balancer::top::run(&socket)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { domain, connect, state_dir } => {
            let socket = status_socket(&config, connect, state_dir);
            let status = vm_balancer::status::fetch(&socket)?;
            print!("{}", vm_balancer::status::explain(&status, &domain)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate { scenario, policies, quanta, json, timeline, plot } => {
            let scenario = Scenario::load(&scenario)?;
            let n = quanta.unwrap_or(scenario.quanta);
            let progress = vm_balancer::progress::Progress::new(n, &format!("simulate {}", scenario.name), false);
            let mut writer = timeline.as_deref().map(vm_balancer::timeline::TimelineWriter::create).transpose()?;
            let mut records = Vec::new();
            let report = simulate_observed(&scenario, &policies, &config, quanta, user_cache(&config), |trace, sim| {
                progress.set(trace.snapshot.quantum + 1);
                if writer.is_none() && plot.is_none() {
                    return Ok(());
                }
                let record = vm_balancer::timeline::TimelineRecord::build(trace, Some(sim.last_quantum()));
                if let Some(w) = &mut writer {
                    w.write(&record)?;
                }
                if plot.is_some() {
                    records.push(record);
                }
                Ok(())
            })?;
            progress.finish();
            if let Some(w) = writer {
                w.finish()?;
            }
            if let Some(path) = &plot {
                let title = format!("{}: {} ({} quanta)", scenario.name, report.policies.join(" + "), report.quanta);
                vm_balancer::plot::plot(&records, &title, path)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { command: PolicyCommand::Check { file, scenario, quanta, snapshot, repeat } } => {
            let input = match (scenario, snapshot) {
                (Some(path), _) => {
                    let scenario = Scenario::load(&path)?;
                    vm_balancer::simulate::check_host(&scenario, &config)?;
                    CheckInput::Scenario(scenario, quanta)
                }
                (None, Some(path)) => CheckInput::Snapshot(read_snapshot(&path)?, path),
                (None, None) => CheckInput::Samples,
            };
            policy_check(&config, &file, input, repeat)
        }
        Command::Replay { dir, policies, json, timeline, plot } => replay(&config, dir, policies, json, timeline, plot),
        Command::Plot { timeline, plot } => {
            let records = vm_balancer::timeline::read(&timeline)?;
            vm_balancer::plot::plot(&records, &timeline.display().to_string(), &plot)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { settings: _, dry_run, quanta, policies, no_restore, record, record_segment_mib, record_keep, shadow } => {
            let connect = config.connect.clone();
            let quantum = std::time::Duration::from_millis(u64::from(config.quantum_ms));
            let policy_dir = config.policy_dir.clone();
            refuse_unworkable_host(&config, &connect)?;
            let record = record.map(|dir| vm_balancer::record::RecordOptions {
                dir,
                segment_max_bytes: record_segment_mib << 20,
                keep_segments: record_keep as usize,
            });
            let options = vm_balancer::daemon::RunOptions {
                connect,
                quantum,
                dry_run,
                quanta,
                policies,
                restore: !no_restore,
                policy_dir,
                collect: Some(config.collect),
                record,
                shadow,
            };
            vm_balancer::daemon::run(config, options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { connect } => {
            let connect = connect.unwrap_or_else(|| config.connect.clone());
            let restored = vm_balancer::daemon::restore(&config, &connect)?;
            println!("restored {restored} pin(s) and balloon target(s) on {connect}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { connect, quantum, json } => {
            let connect = connect.unwrap_or_else(|| config.connect.clone());
            let snapshot = match connect.strip_prefix("sim:") {
                Some(path) => {
                    let scenario = Scenario::load(std::path::Path::new(path))?;
                    let mut pipeline = vm_balancer::simulate::pipeline(&scenario, &[], &config, None)?;
                    for _ in 0..quantum.unwrap_or(0) {
                        pipeline.step()?;
                    }
                    pipeline.next_snapshot()?
                }
                None if quantum.is_some() => anyhow::bail!("--quantum N picks a quantum of a sim: scenario; a live host has only now"),
                None => vm_balancer::daemon::snapshot(&config, &connect)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print_snapshot(&snapshot);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `run` refuses, before it starts, a config that cannot work on a host
/// known up front: a `sim:` scenario's, or this machine for a local
/// `qemu:///` connection. (A remote host is checked at its first quantum,
/// by the pipeline, which also logs the warnings.)
fn refuse_unworkable_host(config: &Config, connect: &str) -> Result<()> {
    let host = match connect.strip_prefix("sim:") {
        Some(path) => Some(vm_balancer::simulate::host_facts(&Scenario::load(std::path::Path::new(path))?)),
        None if connect.starts_with("qemu:///") => vm_balancer::host_check::local(),
        None => None,
    };
    if let Some(host) = host {
        vm_balancer::host_check::check(config, &host)?;
    }
    Ok(())
}

/// The status socket of the daemon for `connect` (default: the config's)
/// in `state_dir` (default: the config's).
fn status_socket(config: &Config, connect: Option<String>, state_dir: Option<PathBuf>) -> PathBuf {
    let connect = connect.unwrap_or_else(|| config.connect.clone());
    vm_balancer::status::socket_path(&state_dir.unwrap_or_else(|| config.state_dir.clone()), &connect)
}

/// `vm-balancer replay`.
fn replay(
    config: &Config,
    dir: PathBuf,
    specs: Vec<String>,
    json: bool,
    timeline: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<ExitCode> {
    let options = vm_balancer::replay::ReplayOptions { dir: dir.clone(), specs, config: config.clone(), cache: user_cache(config) };
    let mut writer = timeline.as_deref().map(vm_balancer::timeline::TimelineWriter::create).transpose()?;
    let mut records = Vec::new();
    let mut progress: Option<vm_balancer::progress::Progress> = None;
    let report = vm_balancer::replay::replay(&options, |trace, _recorded, (done, total)| {
        progress.get_or_insert_with(|| vm_balancer::progress::Progress::new(total, &format!("replay {}", dir.display()), true)).set(done);
        if writer.is_none() && plot.is_none() {
            return Ok(());
        }
        let record = vm_balancer::timeline::TimelineRecord::build(trace, None);
        if let Some(w) = &mut writer {
            w.write(&record)?;
        }
        if plot.is_some() {
            records.push(record);
        }
        Ok(())
    })?;
    if let Some(p) = progress {
        p.finish();
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    if let Some(path) = &plot {
        let title = format!("replay of {}: {} (open loop, {} quanta)", dir.display(), report.policies.join(" + "), report.quanta);
        vm_balancer::plot::plot(&records, &title, path)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if let Some(why) = &report.stopped {
        eprintln!("warning: replay stopped before the end of the record: {why}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The per-user compile cache of the offline commands, if there is a home.
fn user_cache(config: &Config) -> Option<Arc<CompileCache>> {
    CompileCache::open_or_warn(&CompileCache::user_dir()?, config.compile_cache_max_mib)
}

/// What `policy check` runs a policy on.
enum CheckInput {
    /// The built-in sample snapshots.
    Samples,
    /// A simulator scenario, closed loop, for N quanta (default its length).
    Scenario(Scenario, Option<u64>),
    /// One snapshot from a file.
    Snapshot(Snapshot, PathBuf),
}

/// A snapshot file: JSON (as `snapshot --json` prints it) or MessagePack.
fn read_snapshot(path: &std::path::Path) -> Result<Snapshot> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read snapshot file {}", path.display()))?;
    let text_start = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if text_start == Some(&b'{') {
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a JSON snapshot", path.display()))
    } else {
        rmp_serde::from_slice(&bytes).with_context(|| format!("{} is neither a JSON nor a MessagePack snapshot", path.display()))
    }
}

fn policy_check(config: &Config, file: &str, input: CheckInput, repeat: u32) -> Result<ExitCode> {
    let mut config = config.clone();
    if let CheckInput::Scenario(scenario, _) = &input {
        config = vm_balancer::simulate::scenario_config(scenario, &config);
    }
    config.validate_policy_limits()?;
    let set = PolicySet::new(&config.limits)
        .with_cache(user_cache(&config))
        .with_file_rules(vm_balancer::policy::file::FileRules::offline(&config));
    let mut policy = set.load_spec(file).with_context(|| format!("{file} is not a usable vm-balancer policy"))?;
    policy.set_strict(true);
    let info = policy.info().clone();
    println!("policy   {file}");
    println!("name     {} {}", info.name, info.version);
    println!(
        "manages  {}",
        match (info.cpu, info.memory) {
            (true, true) => "cpu, memory",
            (true, false) => "cpu",
            (false, true) => "memory",
            (false, false) => "nothing (declares neither cpu nor memory)",
        }
    );
    println!("world    {} ({} snapshot and answer)", policy.encoding().world(), policy.encoding().format());
    println!("imports  {}", if policy.imports().is_empty() { "(none)".to_string() } else { policy.imports().join(", ") });
    println!("exports  {}", policy.exports().join(", "));
    let deadline_ms = policy.limits().timeout_ms;
    let slot = vm_balancer::policy::slots::slot_name(file);
    let deadline_from = if config.limits.policy.get(&slot).is_some_and(|p| p.decide_timeout_ms.is_some()) {
        format!("limits.policy.{slot:?}.decide_timeout_ms")
    } else {
        "limits.decide_timeout_ms".to_string()
    };
    let mut failed = 0;
    // Decide times: every call's for snapshots; the slot's own (median,
    // slowest) for a scenario.
    let mut times = Vec::new();
    let mut summary = None;
    let mut warnings = std::collections::BTreeMap::<String, u64>::new();
    match input {
        CheckInput::Scenario(scenario, quanta) => {
            let mut set = set;
            set.push(vm_balancer::policy::Slot::new(&slot, policy));
            let mut pipeline = vm_balancer::simulate::pipeline_with(&scenario, &config, set);
            let n = quanta.unwrap_or(scenario.quanta);
            let (mut actions, mut accepted) = (0usize, 0usize);
            for _ in 0..n {
                let outcome = pipeline.step()?;
                let slot = &mut pipeline.policies_mut().slots_mut()[0];
                if !outcome.fallback_slots.is_empty() {
                    failed += 1;
                    if failed <= 5 {
                        println!("quantum  {}: FAILED: {}", outcome.quantum, slot.last_failure().unwrap_or("(disabled after failures)"));
                    }
                }
                if let Some(p) = slot.policy_mut() {
                    for w in p.take_warnings() {
                        *warnings.entry(w).or_default() += 1;
                    }
                }
                actions += outcome.proposed;
                accepted += outcome.verdicts.iter().filter(|v| v.outcome != vm_balancer::sdk::Outcome::Rejected).count();
            }
            let stats = pipeline.policies().slots()[0].stats().clone();
            let t = pipeline.policies().slots()[0].decide_times();
            println!(
                "scenario {} ({n} quanta): decided {}, fell back {}, {actions} action(s) proposed, {accepted} applied (or clamped), {} rejected by the guard",
                scenario.name,
                stats.decided,
                stats.fallbacks,
                pipeline.guard().stats().rejected
            );
            summary = Some((std::time::Duration::from_micros(t.median_us), std::time::Duration::from_micros(t.max_us)));
        }
        CheckInput::Snapshot(snapshot, path) => {
            failed += run_one(&mut policy, &path.display().to_string(), &snapshot, repeat, &mut times, &mut warnings);
        }
        CheckInput::Samples => {
            for (label, snapshot) in vm_balancer::policy::samples::samples() {
                failed += run_one(&mut policy, label, &snapshot, repeat, &mut times, &mut warnings);
            }
        }
    }
    for (warning, count) in &warnings {
        println!("warning  {warning}{}", if *count > 1 { format!(" ({count} times)") } else { String::new() });
    }
    times.sort();
    let summary = summary.or_else(|| Some((*times.get(times.len() / 2)?, *times.last()?)));
    if let Some((median, max)) = summary {
        let over = if max.as_secs_f64() * 1000.0 * 2.0 > deadline_ms as f64 {
            "  <- over half the deadline: raise it for this policy or make it faster"
        } else {
            ""
        };
        println!("time     decide median {median:.2?}, slowest {max:.2?}; deadline {deadline_ms} ms ({deadline_from}){over}");
    }
    if failed > 0 {
        eprintln!("error: {file} failed on {failed} snapshot(s)");
        return Ok(ExitCode::from(EXIT_POLICY_FAILED));
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

/// `policy check` on one snapshot, `repeat` times; returns 1 if it failed.
fn run_one(
    policy: &mut vm_balancer::policy::LoadedPolicy,
    label: &str,
    snapshot: &Snapshot,
    repeat: u32,
    times: &mut Vec<std::time::Duration>,
    warnings: &mut std::collections::BTreeMap<String, u64>,
) -> usize {
    let bytes = policy.encoding().encode(snapshot);
    let mut result = policy.decide(&bytes);
    times.push(policy.last_decide());
    for _ in 1..repeat {
        if result.is_err() {
            break;
        }
        result = policy.decide(&bytes);
        times.push(policy.last_decide());
    }
    for w in policy.take_warnings() {
        *warnings.entry(format!("{label}: {w}")).or_default() += 1;
    }
    match result {
        Ok(actions) => {
            println!("sample   {label}: {} action(s) in {:.2?}", actions.len(), policy.last_decide());
            for action in &actions {
                println!("           {action}  ({})", action.reason());
            }
            0
        }
        Err(error) => {
            println!("sample   {label}: FAILED: {error}");
            1
        }
    }
}

/// A readable summary of a snapshot (`--json` prints it whole).
fn print_snapshot(s: &Snapshot) {
    let m = &s.host.memory;
    println!("quantum_ms {}  schema {}", s.quantum_ms, s.schema_version);
    println!(
        "host memory: total {} MiB, available {} MiB, reserve {} MiB",
        m.total_kib / 1024,
        m.available_kib / 1024,
        m.reserve_kib / 1024
    );
    for c in &s.host.cpus {
        println!(
            "cpu {:>3}: {:>5.1}%{}{}",
            c.id,
            c.usage * 100.0,
            if c.online { "" } else { " offline" },
            if c.reserved { " reserved" } else { "" }
        );
    }
    for d in &s.domains {
        let mem = &d.memory;
        let used = mem.used_kib().map_or("?".to_string(), |u| (u / 1024).to_string());
        println!(
            "domain {} ({}){}: balloon {} / max {} MiB, used {} MiB",
            d.name,
            d.uuid,
            if d.tags.is_empty() { String::new() } else { format!(" tags {:?}", d.tags) },
            mem.target_kib / 1024,
            mem.max_kib / 1024,
            used
        );
        for v in &d.vcpus {
            let steal = v.steal.map_or("?".to_string(), |x| format!("{:.1}%", x * 100.0));
            println!("  vcpu {}: on cpu {}, affinity {:?}, usage {:.1}%, steal {}", v.id, v.cpu, v.affinity, v.usage * 100.0, steal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::expand_filter;

    #[test]
    fn a_bare_level_is_about_vm_balancer_and_other_crates_stay_at_warn() {
        assert_eq!(expand_filter("debug"), "warn,vm_balancer=debug,vm_balancer_sdk=debug,policy=debug");
        assert_eq!(expand_filter("info,wasmtime=trace"), "warn,vm_balancer=info,vm_balancer_sdk=info,policy=info,wasmtime=trace");
        assert_eq!(expand_filter("vm_balancer=trace"), "warn,vm_balancer=trace");
    }
}
