//! Helpers shared by the test modules.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use vm_balancer::backend::sim::{Scenario, SimBackend};
use vm_balancer::config::{Config, Limits};
use vm_balancer::pipeline::Pipeline;
use vm_balancer::policy::PolicySet;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A shipped scenario by name.
pub fn scenario(name: &str) -> Scenario {
    Scenario::load(&root().join("examples/scenarios").join(format!("{name}.toml"))).expect("shipped scenario loads")
}

/// The deadline every test uses unless it tests the deadline itself: one
/// limit per fixture. Why 10 s holds: the slowest call any test makes (a
/// Python or JavaScript component's first `decide`, which also instantiates
/// it) takes well under 0.5 s on the development VM; a machine 3× slower with
/// both cores busy (2 tests at a time) makes that about 3 s, still 3× under.
pub const RELAXED_TIMEOUT_MS: u64 = 10_000;

/// The deadline of the spinning fixture, the only one meant to time out.
/// Its margin is the other way round: the spinner never returns, so any
/// deadline is hit; 50 ms keeps the test quick.
pub const SPIN_TIMEOUT_MS: u64 = 50;

/// Defaults with [`RELAXED_TIMEOUT_MS`]: only the limit a test is about can
/// be hit, never the deadline by accident on a loaded machine.
pub fn relaxed_limits() -> Limits {
    Limits { decide_timeout_ms: RELAXED_TIMEOUT_MS, ..Limits::default() }
}

/// The spinner's limits: the short deadline, everything else default.
pub fn spin_limits() -> Limits {
    Limits { decide_timeout_ms: SPIN_TIMEOUT_MS, ..Limits::default() }
}

/// The default config with [`relaxed_limits`].
pub fn relaxed_config() -> Config {
    Config { limits: relaxed_limits(), ..Config::default() }
}

/// The same as a config file, for the binary.
pub fn relaxed_config_file() -> (tempfile::TempDir, PathBuf) {
    temp_file("relaxed.toml", format!("[limits]\ndecide_timeout_ms = {RELAXED_TIMEOUT_MS}\n").as_bytes())
}

/// A simulator pipeline over `scenario` with the given policy specs.
pub fn sim_pipeline(scenario: &Scenario, specs: &[&str], config: Config) -> Pipeline<SimBackend> {
    let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    let mut config = config;
    config.quantum_ms = scenario.quantum_ms;
    if let Some(reserve) = scenario.host.reserve_mib {
        config.guard.host_reserve_mib = reserve;
    }
    let policies = PolicySet::from_specs(&config.limits, &specs).expect("policies load");
    Pipeline::new(SimBackend::new(scenario.clone()), policies, config, false)
}

/// Output of a finished command.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A config file that never exists: what the binary reads when no
/// `--config` is given (`VMB_CONFIG_DEFAULT`), so that a machine's own
/// `/etc/vm-balancer/config.toml` never changes what a test sees.
pub const NO_DEFAULT_CONFIG: &str = "/nonexistent/vm-balancer-test/config.toml";

/// The built binary, hermetic: see [`NO_DEFAULT_CONFIG`].
pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-balancer"));
    cmd.env("VMB_CONFIG_DEFAULT", NO_DEFAULT_CONFIG);
    cmd
}

/// Runs the built binary; on any later assertion failure, the message
/// carries the command and both streams (see [`Run::context`]).
pub fn vm_balancer(args: &[&str]) -> Run {
    vm_balancer_with_env(args, &[])
}

/// [`vm_balancer`] with extra environment variables.
pub fn vm_balancer_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Run {
    let mut cmd = binary();
    cmd.args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().expect("binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Run {
    /// Everything needed to understand a failure.
    pub fn context(&self, args: &[&str]) -> String {
        format!("command: vm-balancer {}\nexit: {}\nstdout:\n{}\nstderr:\n{}", args.join(" "), self.code, self.stdout, self.stderr)
    }
}

/// Writes `bytes` to a fresh temp file and returns it (kept alive by the guard).
pub fn temp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A fresh directory for policy files: under the target dir's tmp
/// (`CARGO_TARGET_TMPDIR`), not `/tmp`, because the daemon refuses a policy
/// under a directory that others can write, sticky `/tmp` included (the
/// rule of `policy::file`).
pub fn policy_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vmb-policies-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A path as &str.
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The tests share one binary and run in parallel threads. The libvirt e2e
/// test boots guests that burn both cores, which would make the real-time
/// tests (hot swap, 50 ms quanta) miss deadlines that no production host
/// would. Real-time tests hold this shared; the e2e test holds it exclusively.
static CPU: RwLock<()> = RwLock::new(());

/// For real-time tests: no CPU-burning guests while held.
pub fn quiet_cpu() -> RwLockReadGuard<'static, ()> {
    CPU.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// For the e2e test: nothing timing-sensitive runs while held.
pub fn busy_cpu() -> RwLockWriteGuard<'static, ()> {
    CPU.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits until `f` holds, or panics with `what` after `timeout`. Polls
/// every 250 ms: tests wait for states, never for fixed times.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A running `vm-balancer --log FILTER [--config FILE] run ARGS`, its log in
/// a file (read with [`log`](Self::log) at any time); killed on drop, so a
/// failed test never leaves a daemon behind.
pub struct Daemon {
    /// The process.
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts it; `config` is the text of a config file, if any.
    pub fn start(tag: &str, log_filter: &str, config: Option<&str>, run_args: &[&str]) -> Daemon {
        let dir = std::env::temp_dir();
        let log = dir.join(format!("vmbtest-{}-{tag}.log", std::process::id()));
        let mut cmd = binary();
        cmd.env("NO_COLOR", "1").arg("--log").arg(log_filter);
        if let Some(text) = config {
            let path = dir.join(format!("vmbtest-{}-{tag}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        cmd.arg("run").args(run_args);
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("cannot start vm-balancer");
        Daemon { child, log }
    }

    /// Waits for it to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < timeout, "vm-balancer did not exit within {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends it a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// The log so far, without ANSI colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Its `quantum summary` lines so far (they are at debug: start it
    /// with a filter that has `vm_balancer::daemon=debug`).
    pub fn summaries(&self) -> Vec<String> {
        self.log().lines().filter(|l| l.contains("quantum summary")).map(String::from).collect()
    }

    /// Waits for it to exit, and checks it exited 0 without a panic.
    pub fn assert_clean_exit(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        let log = self.log();
        assert!(status.success(), "vm-balancer exited with {status}; log:\n{log}");
        assert!(!log.contains("panicked"), "vm-balancer panicked; log:\n{log}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` without ANSI escape sequences.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
