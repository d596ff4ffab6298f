//! Hot swap on the simulator backend, in real time with a short quantum:
//! replace, half-write, break, delete and hammer policy files while the
//! pipeline runs; a warm compile cache; a failing policy disabled until its
//! file changes.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_balancer::backend::sim::SimBackend;
use vm_balancer::components as c;
use vm_balancer::config::Config;
use vm_balancer::pipeline::Pipeline;
use vm_balancer::policy::builtin::Builtin;
use vm_balancer::policy::cache::CompileCache;
use vm_balancer::policy::reload::Reloader;
use vm_balancer::policy::PolicySet;

use crate::util::{policy_tempdir, quiet_cpu, relaxed_config, scenario, wait_until, Daemon};

const QUANTUM: Duration = Duration::from_millis(50);
const DEBOUNCE: Duration = Duration::from_millis(200);

struct Harness {
    _quiet: std::sync::RwLockReadGuard<'static, ()>,
    lenient: bool,
    dir: tempfile::TempDir,
    pipeline: Pipeline<SimBackend>,
    reloader: Reloader,
}

impl Harness {
    fn start(files: &[(&str, &[u8])], cache: Option<Arc<CompileCache>>) -> Harness {
        Harness::start_with(files, cache, relaxed_config())
    }

    fn start_with(files: &[(&str, &[u8])], cache: Option<Arc<CompileCache>>, config: Config) -> Harness {
        let quiet = quiet_cpu();
        let dir = policy_tempdir();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let mut set = PolicySet::new(&config.limits);
        let config = Config { reload_debounce_ms: DEBOUNCE.as_millis() as u64, ..config };
        let reloader = Reloader::spawn(dir.path(), &config, cache, set.last_snapshot());
        assert!(reloader.wait_and_apply(&mut set, Duration::from_secs(60)), "initial plan");
        let pipeline = Pipeline::new(SimBackend::new(scenario("churn")), set, config, false);
        Harness { _quiet: quiet, lenient: false, dir, pipeline, reloader }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// One quantum: apply ready plans at the boundary, then run it. No
    /// quantum may fall back unless `lenient`.
    fn step(&mut self) {
        self.reloader.poll(self.pipeline.policies_mut());
        let outcome = self.pipeline.step().expect("no quantum is lost");
        assert!(self.lenient || outcome.fallback_slots.is_empty(), "quantum {} fell back: {:?}", outcome.quantum, outcome.fallback_slots);
        std::thread::sleep(QUANTUM);
    }

    /// (slot name, policy name) of every slot.
    fn slots(&self) -> Vec<(String, String)> {
        self.pipeline
            .policies()
            .slots()
            .iter()
            .map(|s| (s.name().to_string(), s.policy().map_or("-".into(), |p| p.info().name.clone())))
            .collect()
    }

    /// Steps until `want` holds or 30 s pass; returns the quanta it took.
    fn step_until(&mut self, what: &str, want: impl Fn(&Harness) -> bool) -> u64 {
        let start = self.pipeline.quantum();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !want(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; slots {:?}; {:?}", self.slots(), self.reloader.stats());
            self.step();
        }
        self.pipeline.quantum() - start
    }
}

fn rename_into(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn one(slot: &str, policy: &str) -> Vec<(String, String)> {
    vec![(slot.to_string(), policy.to_string())]
}

#[test]
fn replacing_a_policy_takes_effect_without_missing_a_quantum() {
    let mut h = Harness::start(&[("10-cpu.wasm", Builtin::Cpu.wasm())], None);
    assert_eq!(h.slots(), one("10-cpu.wasm", "cpu-default"));
    for _ in 0..3 {
        h.step();
    }
    let before = h.pipeline.quantum();
    rename_into(h.dir.path(), "10-cpu.wasm", Builtin::Classic.wasm());
    // No bound on how many quanta the swap takes: that is a figure of the
    // machine's speed (`cargo bench --bench reload`), not a property.
    let took = h.step_until("classic to take over", |h| h.slots() == one("10-cpu.wasm", "classic"));
    h.step();
    let slot = &h.pipeline.policies().slots()[0];
    // The swap happened at the boundary of the quantum that `step_until`
    // ran last, so the new policy decided that one and the next.
    assert_eq!(slot.stats().decided, 2, "the new policy decided every quantum since the swap");
    assert_eq!(h.pipeline.quantum(), before + took + 1, "every quantum ran");
}

#[test]
fn a_slowly_written_file_swaps_only_when_complete() {
    let mut h = Harness::start(&[("10-p.wasm", Builtin::Cpu.wasm())], None);
    let target = Builtin::Classic.wasm();
    let path = h.path("10-p.wasm");
    let mut file = std::fs::File::create(&path).unwrap(); // truncates in place: the worst case
    let chunk = target.len() / 6 + 1;
    for part in target.chunks(chunk) {
        use std::io::Write;
        file.write_all(part).unwrap();
        file.flush().unwrap();
        for _ in 0..6 {
            h.step();
            let slots = h.slots();
            assert_eq!(slots.len(), 1, "{slots:?}");
            assert!(slots[0].1 == "cpu-default" || slots[0].1 == "classic", "never a broken policy: {slots:?}");
        }
    }
    drop(file);
    h.step_until("the completed file to load", |h| h.slots() == one("10-p.wasm", "classic"));
    assert!(h.reloader.stats().refused >= 1, "partial files were refused: {:?}", h.reloader.stats());
}

#[test]
fn a_bad_file_changes_nothing_and_deleting_brings_the_defaults_back() {
    let mut h = Harness::start(&[("10-cpu.wasm", Builtin::Cpu.wasm())], None);
    std::fs::write(h.path("20-bad.wasm"), b"definitely not wasm").unwrap();
    std::fs::copy(c::FIXTURE_WRONGWORLD, h.path("30-other.wasm")).unwrap();
    h.step_until("the bad files to be refused", |h| h.reloader.stats().refused >= 2);
    assert_eq!(h.slots(), one("10-cpu.wasm", "cpu-default"));
    rename_into(h.dir.path(), "10-cpu.wasm", b"\0asm garbage");
    h.step_until("the broken replacement to be refused", |h| h.reloader.stats().refused >= 3);
    for _ in 0..5 {
        h.step();
    }
    assert_eq!(h.slots(), one("10-cpu.wasm", "cpu-default"), "the old policy stayed");
    for name in ["10-cpu.wasm", "20-bad.wasm", "30-other.wasm"] {
        std::fs::remove_file(h.path(name)).unwrap();
    }
    h.step_until("the defaults", |h| {
        h.slots() == vec![("cpu".to_string(), "cpu-default".to_string()), ("mem".to_string(), "mem-default".to_string())]
    });
}

#[test]
fn a_burst_of_50_replacements_ends_with_the_last_and_settles() {
    let mut h = Harness::start(&[("10-p.wasm", Builtin::Cpu.wasm())], None);
    for i in 0..50 {
        let bytes = if i % 2 == 0 { Builtin::Cpu.wasm() } else { Builtin::Classic.wasm() };
        rename_into(h.dir.path(), "10-p.wasm", bytes);
    }
    h.step_until("the last version (classic)", |h| h.slots() == one("10-p.wasm", "classic"));
    let settled = h.reloader.stats();
    // 50 events; a few scans on the development VM. 12 leaves room for a
    // loaded machine descheduling the writer past the 200 ms debounce, and
    // still proves debouncing.
    assert!(settled.scans <= 12, "debounced, not one reload per event: {settled:?}");
    for _ in 0..20 {
        h.step();
    }
    assert_eq!(h.reloader.stats().scans, settled.scans, "no reload loop from the daemon's own reads");
}

#[test]
fn a_warm_cache_does_not_recompile_on_restart() {
    let state = tempfile::tempdir().unwrap();
    let files: [(&str, &[u8]); 2] = [("10-cpu.wasm", Builtin::Cpu.wasm()), ("20-classic.wasm", Builtin::Classic.wasm())];
    let cold = Arc::new(CompileCache::new(state.path(), 64 << 20).unwrap());
    let h = Harness::start(&files, Some(cold.clone()));
    assert_eq!(cold.stats().misses.load(Ordering::Relaxed), 2);
    assert_eq!(cold.stats().hits.load(Ordering::Relaxed), 0);
    drop(h);
    let warm = Arc::new(CompileCache::new(state.path(), 64 << 20).unwrap());
    let h = Harness::start(&files, Some(warm.clone()));
    assert_eq!(warm.stats().misses.load(Ordering::Relaxed), 0, "restart compiled nothing");
    assert_eq!(warm.stats().hits.load(Ordering::Relaxed), 2);
    assert_eq!(h.slots().len(), 2);
}

#[test]
fn the_cache_is_bounded_and_rejects_foreign_entries() {
    let state = tempfile::tempdir().unwrap();
    let cache = CompileCache::new(state.path(), 1).unwrap(); // 1 byte: every entry is evicted
    cache.component("cpu", Builtin::Cpu.wasm()).unwrap();
    assert!(cache.stats().evicted.load(Ordering::Relaxed) >= 1);
    let cache = CompileCache::new(state.path(), 64 << 20).unwrap();
    cache.component("cpu", Builtin::Cpu.wasm()).unwrap();
    // Corrupt the entry: it must be rejected and recompiled, never trusted.
    for entry in std::fs::read_dir(state.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not a compiled component").unwrap();
    }
    cache.component("cpu", Builtin::Cpu.wasm()).unwrap();
    assert_eq!(cache.stats().rejected.load(Ordering::Relaxed), 1);
    assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 2);
}

#[test]
fn a_failing_policy_is_disabled_until_its_file_changes() {
    // The counter fixture passes its trial run, then traps on every quantum
    // after 40: it must be disabled after 3 failures (the default decides
    // meanwhile) and come back only when its file changes.
    let mut config = relaxed_config();
    config
        .params
        .insert("counter".into(), toml::Value::Table([("trap_after_quantum".to_string(), toml::Value::Integer(40))].into_iter().collect()));
    let mut h = Harness::start_with(&[("10-p.wasm", Builtin::Cpu.wasm())], None, config);
    h.lenient = true;
    // A file that fails its trial is refused outright.
    rename_into(h.dir.path(), "10-p.wasm", &std::fs::read(c::FIXTURE_TRAP).unwrap());
    h.step_until("the trapping file to be refused", |h| h.reloader.stats().refused >= 1);
    assert_eq!(h.slots(), one("10-p.wasm", "cpu-default"));
    rename_into(h.dir.path(), "10-p.wasm", &std::fs::read(c::FIXTURE_COUNTER).unwrap());
    h.step_until("the counter to load", |h| h.slots() == one("10-p.wasm", "counter"));
    h.step_until("the counter to be disabled", |h| h.pipeline.policies().slots()[0].stats().disabled >= 1);
    let q = h.pipeline.quantum();
    assert!(h.pipeline.policies().slots()[0].is_disabled(q), "disabled, not retried every quantum");
    let stats = h.pipeline.policies().slots()[0].stats().clone();
    assert_eq!(stats.failures.get("trap"), Some(&3), "{stats:?}");
    for _ in 0..3 {
        h.step();
    }
    assert_eq!(h.pipeline.policies().slots()[0].stats().failures.get("trap"), Some(&3), "no retry during the backoff");
    // Changing the file brings a fresh slot.
    rename_into(h.dir.path(), "10-p.wasm", Builtin::Cpu.wasm());
    h.step_until("the fixed file", |h| h.slots() == one("10-p.wasm", "cpu-default"));
    h.step();
    assert_eq!(h.pipeline.policies().slots()[0].stats().decided, 2, "fresh slot, deciding since the swap");
    assert!(h.pipeline.policies().slots()[0].stats().failures.is_empty());
}

#[test]
fn an_unsafe_directory_is_refused_naming_path_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = policy_tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = vm_balancer::policy::dir::scan(dir.path(), 16).unwrap_err().to_string();
    assert!(err.contains(&dir.path().display().to_string()) && err.contains("0777"), "{err}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("10-x.wasm");
    std::fs::write(&file, Builtin::Cpu.wasm()).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = vm_balancer::policy::dir::scan(dir.path(), 16).unwrap_err().to_string();
    assert!(err.contains("10-x.wasm") && err.contains("0666"), "{err}");
    let missing = vm_balancer::policy::dir::scan(&dir.path().join("nope"), 16).unwrap();
    assert!(missing.files.is_empty(), "a missing directory means the defaults");
}

/// The daemon itself (`run` on the simulator in real time): a policy dropped
/// into the directory mid-run is loaded, validated and swapped in; SIGHUP
/// rescans; SIGTERM stops it cleanly; an unsafe directory stops the start
/// with a clear error.
///
/// Event-driven, not timed: each step waits for the log line that proves the
/// previous one happened (up to 120 s, far beyond the ~1 s it takes on the
/// development VM, so a machine 3x slower with both cores busy passes), and
/// the daemon runs until it is told to stop.
#[test]
fn the_daemon_picks_up_a_dropped_in_policy() {
    use std::os::unix::fs::PermissionsExt;
    let _quiet = quiet_cpu();
    let dir = policy_tempdir();
    let state = tempfile::tempdir().unwrap();
    let config = format!("state_dir = {:?}\n[limits]\ndecide_timeout_ms = {}\n", state.path(), crate::util::RELAXED_TIMEOUT_MS);
    let scenario = crate::util::root().join("examples/scenarios/all-on-one.toml");
    let connect = format!("sim:{}", scenario.display());
    let policy_dir = dir.path().display().to_string();
    let run = ["--connect", connect.as_str(), "--quantum", "100ms", "--policy-dir", policy_dir.as_str()];
    let mut daemon = Daemon::start("hot-swap", "info,vm_balancer::daemon=debug", Some(&config), &run);
    let minutes = Duration::from_secs(120);
    let logged = |d: &Daemon, words: &[&str]| d.log().lines().any(|l| words.iter().all(|w| l.contains(w)));
    wait_until("the first quantum", minutes, || logged(&daemon, &["quantum summary"]));
    rename_into(dir.path(), "50-classic.wasm", Builtin::Classic.wasm());
    wait_until("the dropped-in policy to be validated", minutes, || logged(&daemon, &["policy loaded and validated", "50-classic.wasm"]));
    wait_until("the swap", minutes, || logged(&daemon, &["policy slots swapped"]));
    daemon.signal(libc::SIGHUP);
    wait_until("the SIGHUP rescan", minutes, || logged(&daemon, &["SIGHUP: re-reading policies"]));
    let seen = daemon.summaries().len();
    wait_until("a quantum after the rescan", minutes, || daemon.summaries().len() > seen);
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(minutes);
    let log = daemon.log();
    assert!(!log.contains("policy failed"), "{log}");
    assert!(std::fs::read_dir(state.path().join("compile-cache")).unwrap().count() >= 1, "the compile cache was used");

    let config = state.path().join("config.toml");
    std::fs::write(&config, format!("state_dir = {:?}\n", state.path())).unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec!["--config".to_string(), config.display().to_string(), "run".into()];
        a.extend(run.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = crate::util::binary().args(args(&["--quanta", "1"])).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("0777") && err.contains(&dir.path().display().to_string()), "{err}");
}
