//! Policies in other languages (`examples/policies/`): each is built from
//! source by its own build script (which installs its toolchain; a toolchain
//! it cannot install is a failure, never a skip), loaded by
//! `vm-balancer policy check`, and run on a simulator scenario whose outcome
//! shows the policy's intended effect.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use vm_balancer::config::Config;

use crate::util::{relaxed_config, relaxed_config_file, root, s, scenario, sim_pipeline, vm_balancer};

/// Builds `examples/policies/LANG` once per test run; returns the component.
fn built(lang: &'static str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<BTreeMap<&'static str, PathBuf>>> = OnceLock::new();
    let cache = BUILT.get_or_init(Default::default);
    // One build at a time: the builds compete for the same 2 cores anyway.
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = cache.get(lang) {
        return path.clone();
    }
    let out = root().join("target/examples").join(format!("{lang}.wasm"));
    let script = root().join("examples/policies").join(lang).join("build.sh");
    let started = Instant::now();
    let run = Command::new("bash").arg(&script).arg(&out).output().expect("bash runs");
    assert!(
        run.status.success(),
        "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        script.display(),
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let size = std::fs::metadata(&out).unwrap_or_else(|e| panic!("{} did not produce {}: {e}", script.display(), out.display())).len();
    eprintln!("[languages] {lang}: built in {:.1?}, {size} bytes", started.elapsed());
    cache.insert(lang, out.clone());
    out
}

/// `policy check` passes, names the policy, and the component imports only
/// `log` (zero WASI imports).
fn check(lang: &'static str, name: &str, manages: &str) {
    let run = check_run(lang, name, manages);
    assert!(run.contains("imports  log\n"), "zero WASI imports expected:\n{run}");
}

/// `policy check` passes and names the policy; returns the output.
fn check_run(lang: &'static str, name: &str, manages: &str) -> String {
    let wasm = built(lang);
    let (_d, config) = relaxed_config_file();
    let args = ["--config", s(&config), "policy", "check", s(&wasm)];
    let started = Instant::now();
    let run = vm_balancer(&args);
    eprintln!("[languages] {lang}: policy check (compile + 3 samples) in {:.1?}", started.elapsed());
    assert_eq!(run.code, 0, "{}", run.context(&args));
    for line in [format!("name     {name}"), format!("manages  {manages}"), "\nok".to_string()] {
        assert!(run.stdout.contains(&line), "missing {line:?}:\n{}", run.context(&args));
    }
    run.context(&args)
}

/// A config with the relaxed deadline and `params` (a TOML fragment).
fn config_with_params(params_toml: &str) -> Config {
    let params: toml::Table = toml::from_str(params_toml).unwrap();
    let mut config = relaxed_config();
    config.params = params.into_iter().collect();
    config
}

#[test]
fn python_keepfree_checks() {
    check("python", "keepfree-python", "memory");
}

#[test]
fn python_keepfree_keeps_the_target_free_and_honours_overrides() {
    let wasm = built("python");
    let config = config_with_params("[keepfree]\npct = 25\noverrides = { \"db-0\" = 40 }\n");
    let mut p = sim_pipeline(&scenario("keep-free"), &[s(&wasm)], config);
    for _ in 0..30 {
        p.step().unwrap();
    }
    assert_eq!(p.policies().slots()[0].stats().fallbacks, 0, "the Python policy decided every quantum itself");
    // Every guest of keep-free.toml uses a constant 1000 MiB.
    let used = 1000.0 * 1024.0;
    let free_pct = |vm: &str| {
        let target = p.backend().target_kib(vm).unwrap() as f64;
        100.0 * (target - used) / target
    };
    for vm in ["web-0", "web-1", "web-2", "tight"] {
        let f = free_pct(vm);
        // At least the target; at most target + slack (10 points): reclaimed.
        assert!((24.9..=35.0).contains(&f), "{vm}: {f:.1} % free, wanted 25 %");
    }
    let db = free_pct("db-0");
    assert!((39.9..=50.0).contains(&db), "db-0 (override 40 %): {db:.1} % free");
    let m = p.backend().metrics();
    assert_eq!(m.pressure_events, 0);
    assert!(m.reclaimed_kib > 8000 * 1024 && m.given_kib > 200 * 1024, "{m:?}");
}

#[test]
fn javascript_latency_checks() {
    check("javascript", "latency-isolate-js", "cpu");
}

#[test]
fn javascript_latency_vms_end_up_alone_on_their_pcpus() {
    let wasm = built("javascript");
    // `rt` is tagged "latency" in the scenario; `trading` is named here.
    let config = config_with_params("[latency]\nnames = [\"trading\"]\n");
    let mut p = sim_pipeline(&scenario("latency"), &[s(&wasm)], config);
    for _ in 0..10 {
        p.step().unwrap();
    }
    assert_eq!(p.policies().slots()[0].stats().fallbacks, 0);
    let placements = p.backend().placements();
    let latency = |d: &str| d == "rt" || d == "trading";
    let mut dedicated = BTreeSet::new();
    for (d, v, cpus) in placements.iter().filter(|(d, _, _)| latency(d)) {
        assert_eq!(cpus.len(), 1, "{d} vCPU {v} pinned to one pCPU: {placements:?}");
        assert!(dedicated.insert(cpus[0]), "{d} vCPU {v} shares pCPU {}: {placements:?}", cpus[0]);
    }
    assert_eq!(dedicated.len(), 3, "rt's 2 vCPUs + trading's 1");
    for (d, v, cpus) in placements.iter().filter(|(d, _, _)| !latency(d)) {
        assert!(!cpus.is_empty() && cpus.iter().all(|c| !dedicated.contains(c)), "{d} vCPU {v} on {cpus:?}, dedicated {dedicated:?}");
    }
    // The rest is spread over the 5 shared pCPUs, not piled up where it started.
    let used: BTreeSet<u32> = placements.iter().filter(|(d, _, _)| !latency(d)).flat_map(|(_, _, c)| c.clone()).collect();
    assert_eq!(used.len(), 5, "{placements:?}");
}

#[test]
fn c_hottest_checks() {
    check("c", "hottest-c", "cpu");
}

#[test]
fn c_hottest_improves_the_load_ratio() {
    let wasm = built("c");
    for name in ["all-on-one", "uneven"] {
        let mut p = sim_pipeline(&scenario(name), &[s(&wasm)], relaxed_config());
        for _ in 0..30 {
            p.step().unwrap();
        }
        assert_eq!(p.policies().slots()[0].stats().fallbacks, 0);
        let ratio = &p.backend().metrics().load_ratio;
        let (first, last) = (ratio[0], *ratio.last().unwrap());
        assert!(last < first - 0.01, "{name}: load ratio {first:.2} -> {last:.2}: {ratio:?}");
        if name == "all-on-one" {
            assert!(last < 1.01, "all-on-one ends balanced: {ratio:?}");
        }
    }
}

#[test]
fn rust_template_checks_and_balances() {
    let out = check_run("rust", "spread", "cpu");
    // wasm32-wasip2's std imports wasi:cli and wasi:io, both allowed; nothing else.
    let imports = out.lines().find(|l| l.starts_with("imports  ")).unwrap_or_default();
    assert!(imports.split(", ").all(|i| i.contains("wasi:cli/") || i.contains("wasi:io/") || i.ends_with("log")), "{out}");
    let wasm = built("rust");
    let mut p = sim_pipeline(&scenario("all-on-one"), &[s(&wasm)], relaxed_config());
    for _ in 0..10 {
        p.step().unwrap();
    }
    let ratio = &p.backend().metrics().load_ratio;
    assert!(*ratio.last().unwrap() < 1.01, "{ratio:?}");
}

/// The guide shows the Rust template verbatim (bar its doc comment).
#[test]
fn the_guide_shows_the_rust_template_as_it_is() {
    let guide = std::fs::read_to_string(root().join("policies/README.md")).unwrap();
    let src = std::fs::read_to_string(root().join("examples/policies/rust/src/lib.rs")).unwrap();
    let body: String = src.lines().filter(|l| !l.starts_with("//!")).map(|l| format!("{l}\n")).collect();
    assert!(
        guide.contains(&format!("```rust\n{body}```")),
        "policies/README.md's Rust block differs from examples/policies/rust/src/lib.rs"
    );
}

/// The CLI runs each example end to end (`simulate --policy FILE --json`).
#[test]
fn every_example_runs_in_simulate() {
    for (lang, scenario) in [("c", "all-on-one"), ("javascript", "latency"), ("python", "keep-free")] {
        let wasm = built(lang);
        let (_d, config) = relaxed_config_file();
        let sc = root().join("examples/scenarios").join(format!("{scenario}.toml"));
        let args = ["--config", s(&config), "simulate", s(&sc), "--policy", s(&wasm), "--json", "--quanta", "5"];
        let run = vm_balancer(&args);
        assert_eq!(run.code, 0, "{}", run.context(&args));
        let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}\n{}", run.context(&args)));
        let slot = &report["slots"][format!("{lang}.wasm")];
        assert_eq!(slot["decided"], 5, "{}", run.context(&args));
        assert_eq!(slot["fallbacks"], 0, "{}", run.context(&args));
    }
}

/// The SDK glue inside the real components: an exception in the policy
/// becomes `err(..)` carrying its type, message and traceback (before the
/// SDKs, a Python `KeyError` surfaced as a trap about
/// `filesystem_preopens_get_directories`, and a JavaScript `Error` as
/// `wasm trap`). `{}` is valid JSON without `host` or `domains`, so both
/// policies throw.
#[test]
fn an_exception_in_a_python_or_javascript_policy_is_an_err_with_its_traceback() {
    use vm_balancer::policy::{PolicyError, PolicySet};
    for (lang, words) in [("python", ["KeyError", "Traceback (most recent call last)"]), ("javascript", ["TypeError", "@bundle.js:"])] {
        let wasm = built(lang);
        let mut policy = PolicySet::new(&crate::util::relaxed_limits()).load_spec(s(&wasm)).expect("loads");
        assert_eq!(policy.encoding(), vm_balancer::policy::answer::Encoding::Json, "{lang} uses the JSON world");
        match policy.decide(b"{}") {
            Err(PolicyError::Refused { message, .. }) => {
                for w in words {
                    assert!(message.contains(w), "{lang}: {w:?} missing from the err: {message}");
                }
            }
            other => panic!("{lang}: expected an err(..) with the exception, got {other:?}"),
        }
        // The instance survives its own err (no trap): the next call works.
        assert_eq!(policy.instantiations(), 1, "{lang}: an err is not a trap");
    }
}
