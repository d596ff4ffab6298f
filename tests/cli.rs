//! The command line: help, simulate, and `policy check` on good and bad files.

use vm_balancer::components as c;

use crate::util::{relaxed_config_file, root, s, temp_file, vm_balancer};

#[test]
fn help_explains_itself() {
    let run = vm_balancer(&["--help"]);
    assert_eq!(run.code, 0);
    for word in ["simulate", "policy", "--config"] {
        assert!(run.stdout.contains(word), "{}", run.context(&["--help"]));
    }
}

#[test]
fn simulate_prints_a_report_and_json() {
    let scenario = root().join("examples/scenarios/all-on-one.toml");
    let (_d, config) = relaxed_config_file();
    let args = ["--config", s(&config), "simulate", s(&scenario)];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(run.stdout.contains("busiest pCPU / lower bound"), "{}", run.context(&args));
    let args = ["--config", s(&config), "simulate", s(&scenario), "--json", "--quanta", "5", "--policy", "builtin:classic"];
    let run = vm_balancer(&args);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}\n{}", run.context(&args)));
    assert_eq!(report["quanta"], 5);
    assert_eq!(report["policies"][0], "classic");
}

#[test]
fn simulate_bad_inputs_name_the_problem() {
    let (_d, bad) = temp_file("bad.toml", b"name = \"x\"\nquanta = 3\n[host]\ncpus = 2\nmemory_mib = 1\nbogus = 1\n");
    let args = ["simulate", s(&bad)];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 2, "{}", run.context(&args));
    assert!(run.stderr.contains("bogus"), "{}", run.context(&args));
    let args = ["simulate", "/nonexistent.toml"];
    let run = vm_balancer(&args);
    assert!(run.stderr.contains("/nonexistent.toml"), "{}", run.context(&args));
    let scenario = root().join("examples/scenarios/all-on-one.toml");
    let args = ["simulate", s(&scenario), "--policy", "builtin:nope"];
    let run = vm_balancer(&args);
    assert!(run.stderr.contains("builtin:nope"), "{}", run.context(&args));
}

#[test]
fn policy_check_accepts_the_defaults() {
    let (_d, config) = relaxed_config_file();
    for spec in ["builtin:cpu", "builtin:mem", "builtin:classic", c::CPU] {
        let args = ["--config", s(&config), "policy", "check", spec];
        let run = vm_balancer(&args);
        assert_eq!(run.code, 0, "{}", run.context(&args));
        assert!(run.stdout.contains("imports  log") || run.stdout.contains("imports  (none)"), "{}", run.context(&args));
        assert!(run.stdout.contains("exports  describe, decide"), "{}", run.context(&args));
    }
}

#[test]
fn policy_check_refuses_bad_files_clearly() {
    let (_d, text) = temp_file("notes.wasm", b"not wasm at all");
    let full = std::fs::read(c::MEM).unwrap();
    let (_d2, cut) = temp_file("cut.wasm", &full[..full.len() / 3]);
    let cases = [
        (s(&text).to_string(), "not a WebAssembly file"),
        (s(&cut).to_string(), "invalid or truncated"),
        (c::FIXTURE_WRONGWORLD.to_string(), "is not a vm-balancer:policy"),
        (c::FIXTURE_FORBIDDEN.to_string(), "imports `exec`"),
        ("/no/such/policy.wasm".to_string(), "cannot read policy file"),
    ];
    for (file, words) in cases {
        let args = ["policy", "check", &file];
        let run = vm_balancer(&args);
        assert_eq!(run.code, 2, "{}", run.context(&args));
        assert!(run.stderr.contains(words), "{}", run.context(&args));
    }
    let (_d3, config) = relaxed_config_file();
    let args = ["--config", s(&config), "policy", "check", c::FIXTURE_TRAP];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 1, "a policy that fails on the samples: {}", run.context(&args));
    assert!(run.stdout.contains("FAILED"), "{}", run.context(&args));
}
