//! The `vm-balancer` command line. `anyhow` lives only here, at the edge;
//! the library's errors are typed, and the whole chain is printed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vm_balancer::config::Config;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::Snapshot;
use vm_balancer::sim::{simulate, Scenario};

/// Balances KVM guests: each quantum, sandboxed WebAssembly policies decide
/// vCPU pins and balloon targets, a host-side guard checks every action, and
/// the survivors are applied.
#[derive(Parser, Debug)]
#[command(name = "vm-balancer", version, about, long_about = None)]
struct Cli {
    /// Config file (TOML). Without it, built-in defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info`, `debug`, `vm_balancer=debug,policy=trace`
    /// (or set RUST_LOG).
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
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon on a libvirt host: every quantum, collect, decide,
    /// guard and apply. SIGINT/SIGTERM finish the quantum, restore what the
    /// daemon changed and exit 0; SIGHUP re-reads the policy files.
    Run {
        /// libvirt URI (any, remote ones included: qemu+ssh://host/system),
        /// or sim:SCENARIO.toml to run the daemon on the simulator in real time.
        #[arg(long, default_value = "qemu:///system", value_name = "URI")]
        connect: String,
        /// Length of a quantum, e.g. 500ms, 1s (default: the config's quantum_ms, 1s).
        #[arg(long, value_parser = vm_balancer::daemon::parse_duration, value_name = "DURATION")]
        quantum: Option<std::time::Duration>,
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
        /// Drop-in policy directory, watched while running (used when no
        /// --policy is given): every *.wasm in it is a policy, applied in
        /// file-name order. Default: the config's policy_dir,
        /// /etc/vm-balancer/policies.
        #[arg(long, value_name = "DIR")]
        policy_dir: Option<PathBuf>,
    },
    /// Print exactly what a policy would receive right now (collects twice,
    /// one quantum apart; changes nothing).
    Snapshot {
        /// libvirt URI.
        #[arg(long, default_value = "qemu:///system", value_name = "URI")]
        connect: String,
        /// Print JSON (pretty); otherwise a readable summary.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and test policy components.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Load a component, list its imports and exports, and run it on sample
    /// snapshots. Exits non-zero, naming the problem, if the file is not a
    /// usable policy.
    Check {
        /// The component file (or builtin:NAME).
        file: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // Report commands die quietly when their reader goes away
        // (`vm-balancer simulate ... | head`), like other Unix tools. The
        // daemon keeps Rust's default (SIGPIPE ignored): a closed log pipe
        // must not kill it mid-quantum.
        // SAFETY: called before any thread is spawned; resetting a signal
        // disposition to its default has no other precondition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging(cli.log.as_deref());
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(2)
        }
    }
}

fn init_logging(filter: Option<&str>) {
    let filter = filter
        .map(tracing_subscriber::EnvFilter::new)
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = load_config(cli.config.as_ref())?;
    match cli.command {
        Command::Simulate { scenario, policies, quanta, json } => {
            let scenario = Scenario::load(&scenario)?;
            let report = simulate(&scenario, &policies, &config, quanta)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { command: PolicyCommand::Check { file } } => policy_check(&config, &file),
        Command::Run { connect, quantum, dry_run, quanta, policies, no_restore, policy_dir } => {
            let quantum = quantum.unwrap_or(std::time::Duration::from_millis(u64::from(config.quantum_ms)));
            let policy_dir = policy_dir.unwrap_or_else(|| config.policy_dir.clone());
            let options = vm_balancer::daemon::RunOptions { connect, quantum, dry_run, quanta, policies, restore: !no_restore, policy_dir };
            vm_balancer::daemon::run(config, options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { connect, json } => {
            let snapshot = vm_balancer::daemon::snapshot(&config, &connect)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print_snapshot(&snapshot);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn policy_check(config: &Config, file: &str) -> Result<ExitCode> {
    let set = PolicySet::new(&config.limits);
    let mut policy = set.load_spec(file).with_context(|| format!("{file} is not a usable vm-balancer policy"))?;
    let info = policy.info().clone();
    println!("policy   {file}");
    println!("name     {} {}", info.name, info.version);
    println!("manages  {}", match (info.cpu, info.memory) {
        (true, true) => "cpu, memory",
        (true, false) => "cpu",
        (false, true) => "memory",
        (false, false) => "nothing (declares neither cpu nor memory)",
    });
    println!("imports  {}", if policy.imports().is_empty() { "(none)".to_string() } else { policy.imports().join(", ") });
    println!("exports  {}", policy.exports().join(", "));
    let mut failed = 0;
    for (label, snapshot) in vm_balancer::policy::samples::samples() {
        let bytes = vm_balancer::sdk::encode_snapshot(&snapshot);
        let started = std::time::Instant::now();
        match policy.decide(&bytes) {
            Ok(actions) => {
                println!("sample   {label}: {} action(s) in {:.2?}", actions.len(), started.elapsed());
                for action in &actions {
                    println!("           {action}  ({})", action.reason());
                }
            }
            Err(error) => {
                failed += 1;
                println!("sample   {label}: FAILED: {error}");
            }
        }
    }
    if failed > 0 {
        eprintln!("error: {file} failed on {failed} sample snapshot(s)");
        return Ok(ExitCode::from(1));
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
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
