//! The `vm-balancer` command line. `anyhow` lives only here, at the edge;
//! the library's errors are typed, and the whole chain is printed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vm_balancer::config::Config;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};
use vm_balancer::sdk::{Action, Snapshot};
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
    }
}

/// Sample snapshots a policy must handle: empty host, CPU imbalance,
/// memory pressure and excess, a guest without stats.
fn sample_snapshots() -> Vec<(&'static str, Snapshot)> {
    let mut imbalance = SnapshotBuilder::new(4, 16 << 20);
    for i in 0..6 {
        imbalance = imbalance.domain(DomainBuilder::new(&format!("busy-{i}")).vcpu_with_steal(0, 0.16, 0.84));
    }
    let memory = SnapshotBuilder::new(2, 8 << 20)
        .host_memory(4 << 20, 512 << 10)
        .domain(DomainBuilder::new("idle").vcpu(0, 0.01).memory_mib(2048, 2048, Some(1900)))
        .domain(DomainBuilder::new("starved").vcpu(1, 0.3).memory_mib(2048, 512, Some(8)).pressure(4096, 900))
        .domain(DomainBuilder::new("nostats").vcpu(1, 0.1).memory_mib(1024, 1024, None));
    vec![
        ("empty host", SnapshotBuilder::new(2, 4 << 20).build()),
        ("6 busy vCPUs on pCPU 0 of 4", imbalance.build()),
        ("idle, starved and stat-less guests", memory.build()),
    ]
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
    for (label, snapshot) in sample_snapshots() {
        let bytes = vm_balancer::sdk::encode_snapshot(&snapshot);
        let started = std::time::Instant::now();
        match policy.decide(&bytes) {
            Ok(actions) => {
                println!("sample   {label}: {} action(s) in {:.2?}", actions.len(), started.elapsed());
                for action in &actions {
                    let reason = action.reason();
                    match action {
                        Action::Pin { .. } | Action::SetMemory { .. } => println!("           {action}  ({reason})"),
                    }
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
