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

/// A scenario whose random walk has min > max: refused at load, naming
/// the VM and the key, by `simulate` and by the daemon on `sim:` (both
/// used to panic, rc 101, at the second quantum).
#[test]
fn a_random_walk_with_min_above_max_exits_2_naming_the_vm_and_key() {
    let (_d, bad) = temp_file(
        "walk.toml",
        b"name = \"walk\"\nquanta = 5\n[host]\ncpus = 2\nmemory_mib = 4096\n[[vm]]\nname = \"web\"\ncount = 4\nmax_mib = 512\n\
          cpu = { kind = \"random-walk\", start = 0.5, step = 0.1, min = 1.0, max = 0.0 }\n",
    );
    let connect = format!("sim:{}", s(&bad));
    for args in [
        vec!["simulate", s(&bad)],
        vec!["run", "--connect", &connect, "--quantum", "10ms", "--quanta", "3", "--policy", "builtin:cpu"],
        vec!["snapshot", "--connect", &connect, "--quantum", "2"],
        vec!["policy", "check", "builtin:cpu", "--scenario", s(&bad)],
    ] {
        let run = vm_balancer(&args);
        assert_eq!(run.code, 2, "{}", run.context(&args));
        for words in ["walk.toml", "vm \"web\"", "cpu.min = 1", "cpu.max = 0"] {
            assert!(run.stderr.contains(words), "missing {words:?}: {}", run.context(&args));
        }
        assert!(!run.stderr.contains("panicked"), "{}", run.context(&args));
    }
}

/// Settings that cannot work are refused (exit 2, naming key and value);
/// ones that work but not as meant are a warning line at the start.
#[test]
fn settings_that_cannot_work_are_refused_and_odd_ones_warned_of() {
    let scenario = root().join("examples/scenarios/all-on-one.toml"); // 2 pCPUs, 8 GiB
    let connect = format!("sim:{}", s(&scenario));
    let refused: [(&[u8], &[&str]); 3] = [
        (b"[guard]\nreserved_cpus = [0, 1]\n", &["guard.reserved_cpus = [0, 1]", "every online CPU"]),
        (b"[guard]\nhost_reserve_mib = 8192\n", &["guard.host_reserve_mib = 8192", "8192 MiB"]),
        (b"[limits]\nmax_output_kib = 0\n", &["limits.max_output_kib = 0"]),
    ];
    for (text, words) in refused {
        let (_d, config) = temp_file("config.toml", text);
        for args in [
            vec!["--config", s(&config), "simulate", s(&scenario), "--quanta", "2"],
            vec!["--config", s(&config), "run", "--connect", &connect, "--quantum", "10ms", "--quanta", "2", "--policy", "builtin:cpu"],
            vec!["--config", s(&config), "policy", "check", "builtin:cpu", "--scenario", s(&scenario), "--quanta", "2"],
        ] {
            let run = vm_balancer(&args);
            assert_eq!(run.code, 2, "{}", run.context(&args));
            assert!(words.iter().all(|w| run.stderr.contains(w)), "missing {words:?}: {}", run.context(&args));
        }
    }
    let (_d, config) = temp_file("config.toml", b"[limits]\ndecide_timeout_ms = 10000\n[guard]\nreserved_cpus = [1, 7]\n");
    let args = ["--config", s(&config), "simulate", s(&scenario), "--quanta", "2"];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.contains("WARN") && l.contains("guard.reserved_cpus")).collect();
    assert_eq!(warnings.len(), 1, "one warning, at the start: {}", run.context(&args));
    assert!(warnings[0].contains("does not have: [7]"), "{}", run.context(&args));
}

/// One scheme for every subcommand: 0 ok, 1 the policy failed the check,
/// 2 the command could not do its job (usage, config, input).
#[test]
fn exit_codes_are_the_same_for_every_subcommand() {
    let scenario = root().join("examples/scenarios/all-on-one.toml");
    let (_d, bad_scenario) = temp_file("bad.toml", b"name = \"x\"\nquanta = 0\n[host]\ncpus = 2\nmemory_mib = 64\n");
    let (_d2, bad_config) = temp_file("bad-config.toml", b"quantum_ms = 1\n");
    let (_d3, spin_config) = temp_file("spin.toml", b"[limits]\ndecide_timeout_ms = 50\n");
    let bad_connect = format!("sim:{}", s(&bad_scenario));
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["simulate", s(&bad_scenario)], 2, "quanta = 0"),
        (vec!["snapshot", "--connect", &bad_connect], 2, "quanta = 0"),
        (vec!["run", "--connect", &bad_connect, "--quanta", "1"], 2, "quanta = 0"),
        (vec!["policy", "check", "builtin:cpu", "--scenario", s(&bad_scenario)], 2, "quanta = 0"),
        (vec!["--config", s(&bad_config), "simulate", s(&scenario)], 2, "quantum_ms = 1"),
        (vec!["--config", s(&bad_config), "policy", "check", "builtin:cpu"], 2, "quantum_ms = 1"),
        (vec!["simulate", s(&scenario), "--no-such-flag"], 2, "--no-such-flag"),
        (vec!["policy", "check", "/no/such/policy.wasm"], 2, "cannot read policy file"),
        (vec!["--config", s(&spin_config), "policy", "check", c::FIXTURE_SPIN], 1, "failed on"),
    ];
    for (args, code, words) in cases {
        let run = vm_balancer(&args);
        assert_eq!(run.code, code, "{}", run.context(&args));
        assert!(run.stderr.contains(words), "missing {words:?}: {}", run.context(&args));
    }
    let run = vm_balancer(&["policy", "check", "--help"]);
    assert_eq!(run.code, 0);
    for words in ["Exit status", "1 it failed on a snapshot", "timeout", "2 it could not be checked"] {
        assert!(run.stdout.contains(words), "missing {words:?}: {}", run.stdout);
    }
    let run = vm_balancer(&["--help"]);
    assert!(run.stdout.contains("Exit status (every subcommand)"), "{}", run.stdout);
}

/// Issue 11: an unreachable libvirt is never quiet. Every reconnect attempt
/// is logged with the next delay, and the delays grow (1, 2, 4 s ...), so
/// the log is neither silent nor flooded.
#[test]
fn an_unreachable_libvirt_logs_every_attempt_with_the_next_delay() {
    let state = tempfile::tempdir().unwrap();
    let config = format!("state_dir = {:?}\n", state.path().join("state"));
    let args = ["--connect", "test:///nonexistent/vmb.xml", "--quantum", "200ms", "--policy", "builtin:cpu"];
    let daemon = crate::util::Daemon::start("unreachable", "info", Some(&config), &args);
    crate::util::wait_until("the third connection attempt", std::time::Duration::from_secs(60), || daemon.log().contains("attempt=3"));
    let log = daemon.log();
    for (attempt, next_s) in [(1, 1), (2, 2), (3, 4)] {
        let line = format!("attempt={attempt} next_attempt_in_s={next_s}");
        assert!(log.lines().any(|l| l.contains(&line) && l.contains("test:///nonexistent/vmb.xml")), "no {line:?} line:\n{log}");
    }
}

/// Issue 11: two daemons for one hypervisor would fight over its pins. The
/// second exits 2, naming the first one's pid and the lock file.
#[test]
fn a_second_daemon_for_the_same_uri_exits_2_naming_the_first() {
    let state = tempfile::tempdir().unwrap();
    let config = format!("state_dir = {:?}\n", state.path().join("state"));
    let args = ["--connect", "test:///default", "--quantum", "200ms", "--policy", "builtin:cpu"];
    let first = crate::util::Daemon::start("lock-first", "info,vm_balancer::daemon=debug", Some(&config), &args);
    crate::util::wait_until("the first daemon's first quantum", std::time::Duration::from_secs(60), || !first.summaries().is_empty());
    let (_dir, file) = crate::util::temp_file("lock.toml", config.as_bytes());
    let second = crate::util::vm_balancer(&["--config", crate::util::s(&file), "run", "--connect", "test:///default", "--quanta", "1"]);
    assert_eq!(second.code, 2, "{}", second.context(&["run"]));
    let pid = format!("another vm-balancer (pid {}) is already running for test:///default", first.child.id());
    assert!(second.stderr.contains(&pid) && second.stderr.contains(".lock"), "{}", second.stderr);
    // Another URI has a lock of its own.
    let other =
        crate::util::vm_balancer(&["--config", crate::util::s(&file), "run", "--connect", "test:///nonexistent/x.xml", "--quanta", "1"]);
    assert_eq!(other.code, 0, "{}", other.context(&["run"]));
}
