//! What a policy author touches: the JSON world, the decode messages,
//! `policy check --scenario/--snapshot`, `snapshot --connect sim:`, the
//! per-user compile cache of the offline commands, per-policy limits, the
//! log filter, and fallback actions labelled as such.

use vm_balancer::components as c;
use vm_balancer::config::{Limits, PolicyLimits};
use vm_balancer::policy::answer::Encoding;
use vm_balancer::policy::{PolicyError, PolicySet};
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};

use crate::util::{relaxed_config, relaxed_config_file, relaxed_limits, root, s, scenario, sim_pipeline, temp_file, vm_balancer, Run};

/// The binary with a private per-user cache (`XDG_CACHE_HOME`).
fn vm_balancer_cached(cache_home: &std::path::Path, args: &[&str]) -> Run {
    crate::util::vm_balancer_with_env(args, &[("XDG_CACHE_HOME", cache_home.as_os_str())])
}

#[test]
fn a_json_world_component_loads_and_its_mistakes_are_named() {
    let mut policy = PolicySet::new(&relaxed_limits()).load_spec(c::FIXTURE_JSONTYPO).expect("a policy-json component loads");
    assert_eq!(policy.encoding(), Encoding::Json);
    assert_eq!(policy.info().name, "jsontypo");
    let untagged = SnapshotBuilder::new(2, 1 << 20).domain(DomainBuilder::new("a").vcpu(0, 0.5)).build();
    assert_eq!(policy.decide(&Encoding::Json.encode(&untagged)).unwrap(), vec![], "an unknown top-level key is not an error");
    let tagged = SnapshotBuilder::new(2, 1 << 20).domain(DomainBuilder::new("rt").vcpu(0, 0.5).tag("latency")).build();
    let e = policy.decide(&Encoding::Json.encode(&tagged)).unwrap_err();
    assert!(matches!(e, PolicyError::Undecodable { format: "JSON", .. }), "{e}");
    assert!(e.to_string().contains("action 0 (pin): missing field `cpus`"), "{e}");
}

#[test]
fn a_json_world_component_runs_in_the_pipeline() {
    // `latency` tags its `rt` VM: every quantum the typo fails and the
    // fallback decides; the untagged `all-on-one` runs clean.
    let mut p = sim_pipeline(&scenario("all-on-one"), &[c::FIXTURE_JSONTYPO], relaxed_config());
    for _ in 0..3 {
        p.step().unwrap();
    }
    assert_eq!(p.policies().slots()[0].stats().decided, 3);
    let mut p = sim_pipeline(&scenario("latency"), &[c::FIXTURE_JSONTYPO], relaxed_config());
    p.step().unwrap();
    let slot = &p.policies().slots()[0];
    assert_eq!(slot.stats().failures.get("undecodable"), Some(&1), "{:?}", slot.stats());
    assert!(slot.last_failure().unwrap().contains("missing field `cpus`"), "{:?}", slot.last_failure());
}

#[test]
fn policy_check_catches_a_mistake_that_only_tagged_vms_reveal_and_warns_of_unknown_keys() {
    let (_d, config) = relaxed_config_file();
    let args = ["--config", s(&config), "policy", "check", c::FIXTURE_JSONTYPO];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 1, "{}", run.context(&args));
    for words in [
        "world    policy-json",
        "tagged guests",
        "FAILED",
        "action 0 (pin): missing field `cpus`",
        "warning  empty host: the answer has an unknown key `note`",
    ] {
        assert!(run.stdout.contains(words), "missing {words:?}: {}", run.context(&args));
    }
    // The same through a scenario with a tagged VM, closed loop.
    let latency = root().join("examples/scenarios/latency.toml");
    let args = ["--config", s(&config), "policy", "check", c::FIXTURE_JSONTYPO, "--scenario", s(&latency), "--quanta", "3"];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 1, "{}", run.context(&args));
    assert!(run.stdout.contains("quantum  0: FAILED") && run.stdout.contains("missing field `cpus`"), "{}", run.context(&args));
    // A good policy on a scenario passes and reports what it did.
    let all_on_one = root().join("examples/scenarios/all-on-one.toml");
    let args = ["--config", s(&config), "policy", "check", "builtin:cpu", "--scenario", s(&all_on_one)];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(
        run.stdout.contains("scenario all-on-one") && run.stdout.contains("fell back 0") && run.stdout.contains("\nok"),
        "{}",
        run.context(&args)
    );
    assert!(run.stdout.contains("deadline 10000 ms (limits.decide_timeout_ms)"), "{}", run.context(&args));
}

#[test]
fn snapshot_of_a_sim_scenario_feeds_policy_check() {
    let dir = tempfile::tempdir().unwrap();
    let sc = root().join("examples/scenarios/all-on-one.toml");
    let connect = format!("sim:{}", sc.display());
    let args = ["snapshot", "--connect", &connect, "--quantum", "3", "--json"];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    let snap: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.context(&args)));
    assert_eq!(snap["quantum"], 3, "{}", run.context(&args));
    assert_eq!(snap["domains"].as_array().unwrap().len(), 4, "{}", run.context(&args));
    let file = dir.path().join("q3.json");
    std::fs::write(&file, &run.stdout).unwrap();
    let (_d, config) = relaxed_config_file();
    let args = ["--config", s(&config), "policy", "check", "builtin:cpu", "--snapshot", s(&file)];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(run.stdout.contains(&format!("sample   {}", file.display())), "{}", run.context(&args));
    // --quantum means nothing for a live host, and a bad file is named.
    let run = vm_balancer(&["snapshot", "--connect", "test:///default", "--quantum", "2"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--quantum"), "{}", run.stderr);
    let (_d2, bad) = temp_file("bad.json", b"{\"quantum\": \"x\"}");
    let run = vm_balancer(&["policy", "check", "builtin:cpu", "--snapshot", s(&bad)]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("bad.json") && run.stderr.contains("not a JSON snapshot"), "{}", run.stderr);
}

#[test]
fn offline_commands_compile_once_through_the_per_user_cache() {
    let home = tempfile::tempdir().unwrap();
    let (_d, config) = relaxed_config_file();
    let sc = root().join("examples/scenarios/all-on-one.toml");
    let args = ["--config", s(&config), "--log", "info", "simulate", s(&sc), "--quanta", "2", "--policy", c::FIXTURE_COUNTER];
    let first = vm_balancer_cached(home.path(), &args);
    assert_eq!(first.code, 0, "{}", first.context(&args));
    assert!(first.stderr.contains("compiled policy (cache miss)"), "{}", first.context(&args));
    let entries = std::fs::read_dir(home.path().join("vm-balancer/compile-cache"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cwasm"))
        .count();
    assert_eq!(entries, 1, "one entry (and its digest) in the per-user cache");
    let again = vm_balancer_cached(home.path(), &args);
    assert_eq!(again.code, 0, "{}", again.context(&args));
    assert!(!again.stderr.contains("cache miss"), "the second run compiled again: {}", again.context(&args));
    let check = ["--config", s(&config), "--log", "info", "policy", "check", c::FIXTURE_COUNTER];
    let run = vm_balancer_cached(home.path(), &check);
    assert_eq!(run.code, 0, "{}", run.context(&check));
    assert!(!run.stderr.contains("cache miss"), "policy check uses the same cache: {}", run.context(&check));
}

#[test]
fn a_cache_directory_owned_by_someone_else_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("vm-balancer/compile-cache");
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: chown(2) on a path we created; the C string outlives the call.
    let rc = unsafe { libc::chown(path.as_ptr(), 65534, 65534) };
    assert_eq!(rc, 0, "the tests run as root");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = vm_balancer::policy::cache::CompileCache::new(&dir, 1 << 20).unwrap_err().to_string();
    assert!(e.contains(&dir.display().to_string()) && e.contains("owned by another user"), "{e}");
    let link = home.path().join("link");
    std::os::unix::fs::symlink(home.path(), &link).unwrap();
    let e = vm_balancer::policy::cache::CompileCache::new(&link, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("symlink"), "{e}");
}

/// Margins: the slow fixture takes about 0.3 s a call on the development
/// VM. Under a 20 ms deadline it always times out (a machine 10x faster
/// still takes 30 ms); under its own 20 s deadline it never does (3x slower
/// with both cores busy is about 2 s).
#[test]
fn a_slow_policy_with_its_own_longer_deadline_is_not_disabled_but_is_under_the_global_one() {
    let mut sc = scenario("all-on-one");
    sc.quantum_ms = 60_000; // a per-policy deadline may be up to half the quantum
    let global = Limits { decide_timeout_ms: 20, retry_backoff_quanta: 100, ..Limits::default() };
    let own = PolicyLimits { decide_timeout_ms: Some(20_000), ..PolicyLimits::default() };
    let with_own = Limits { policy: [("slow.wasm".to_string(), own)].into(), ..global.clone() };
    for (limits, disabled) in [(with_own, false), (global, true)] {
        let config = vm_balancer::config::Config { limits, ..relaxed_config() };
        let mut p = sim_pipeline(&sc, &[c::FIXTURE_SLOW], config);
        for _ in 0..4 {
            p.step().unwrap();
        }
        let slot = &p.policies().slots()[0];
        let stats = slot.stats().clone();
        if disabled {
            assert_eq!(stats.failures.get("timeout"), Some(&3), "{stats:?}");
            assert!(slot.is_disabled(p.quantum()), "{stats:?}");
        } else {
            assert_eq!((stats.decided, stats.fallbacks), (4, 0), "{stats:?}");
            assert_eq!(slot.policy().unwrap().limits().timeout_ms, 20_000);
            assert_eq!(slot.decide_times().deadline_us, 20_000_000);
        }
    }
}

#[test]
fn policy_check_prints_the_deadline_that_would_apply() {
    let (_d, config) = temp_file(
        "config.toml",
        b"quantum_ms = 60000\n[limits.policy.\"slow.wasm\"]\ndecide_timeout_ms = 20000\n[params.slow]\niterations = 1000\n",
    );
    let args = ["--config", s(&config), "policy", "check", c::FIXTURE_SLOW];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(run.stdout.contains("deadline 20000 ms (limits.policy.\"slow.wasm\".decide_timeout_ms)"), "{}", run.context(&args));
    // Bounded by the quantum, naming the policy.
    let (_d2, bad) = temp_file("bad.toml", b"[limits.policy.\"slow.wasm\"]\ndecide_timeout_ms = 20000\n");
    let args = ["--config", s(&bad), "policy", "check", c::FIXTURE_SLOW];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 2, "{}", run.context(&args));
    assert!(run.stderr.contains("slow.wasm") && run.stderr.contains("at most half the quantum"), "{}", run.context(&args));
}

#[test]
fn debug_logs_are_about_vm_balancer_and_fallback_actions_say_so() {
    let home = tempfile::tempdir().unwrap();
    let sc = root().join("examples/scenarios/all-on-one.toml");
    let (_d, config) = relaxed_config_file();
    // A fresh cache, so the policy is compiled: cranelift would log thousands of lines.
    let args = ["--config", s(&config), "--log", "debug", "simulate", s(&sc), "--quanta", "2", "--policy", c::FIXTURE_ERR];
    let run = vm_balancer_cached(home.path(), &args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(
        !run.stderr.contains("cranelift") && !run.stderr.contains("wasmtime::"),
        "third-party debug lines leaked: {} lines",
        run.stderr.lines().count()
    );
    assert!(run.stderr.lines().count() < 200, "{} lines", run.stderr.lines().count());
    let fallback_lines: Vec<&str> = run.stderr.lines().filter(|l| l.contains("accepted") && l.contains("err.wasm")).collect();
    assert!(!fallback_lines.is_empty(), "{}", run.stderr);
    assert!(fallback_lines.iter().all(|l| l.contains("by=\"built-in fallback\"")), "{fallback_lines:?}");
}

#[test]
fn simulate_reports_decide_times_per_slot() {
    let sc = root().join("examples/scenarios/all-on-one.toml");
    let (_d, config) = relaxed_config_file();
    let args = ["--config", s(&config), "simulate", s(&sc), "--json", "--quanta", "5"];
    let run = vm_balancer(&args);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}\n{}", run.context(&args)));
    for slot in ["cpu", "mem"] {
        let t = &report["timing"][slot];
        assert_eq!(t["calls"], 5, "{}", run.context(&args));
        assert!(t["median_us"].as_u64().unwrap() <= t["p99_us"].as_u64().unwrap(), "{t}");
        assert_eq!(t["deadline_us"], 10_000_000, "{t}");
    }
    let args = ["--config", s(&config), "simulate", s(&sc), "--quanta", "5"];
    let run = vm_balancer(&args);
    assert!(run.stdout.contains("decide median") && run.stdout.contains("(deadline 10000 ms)"), "{}", run.context(&args));
}
