//! Operating the daemon: the default config file and `config check`, the
//! example config, systemd readiness messages, logs at info and as JSON,
//! the metrics endpoint (against the simulator's own counts, odd names, a
//! real Prometheus answering OpenStack Watcher's PromQL), the alert rules,
//! `explain`, and `top` as a person sees it under tmux.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_balancer::config::Config;
use vm_balancer::metrics::{Metrics, QuantumTimes};

use crate::util::{binary, quiet_cpu, relaxed_config, root, s, scenario, sim_pipeline, temp_file, vm_balancer, wait_until, Daemon};

const MINUTE: Duration = Duration::from_secs(60);

fn sim(name: &str) -> String {
    format!("sim:{}", root().join("examples/scenarios").join(format!("{name}.toml")).display())
}

/// `vm-balancer ARGS` with the default config file at `default`.
fn with_default(default: &Path, args: &[&str]) -> crate::util::Run {
    crate::util::vm_balancer_with_env(args, &[("VMB_CONFIG_DEFAULT", default.as_os_str())])
}

#[test]
fn the_default_file_is_read_when_it_exists_and_the_command_line_wins() {
    let args = ["config", "check"];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(run.stdout.contains("no config file at") && run.stdout.contains("built-in defaults"), "{}", run.context(&args));
    assert!(run.stdout.contains("quantum_ms = 1000  # default"), "{}", run.context(&args));
    assert!(run.stdout.contains("connect = \"qemu:///system\"  # default"), "{}", run.context(&args));

    let (_d, file) = temp_file("config.toml", b"quantum_ms = 500\nlog_format = \"json\"\n[guard]\nhost_reserve_mib = 1024\n");
    let run = with_default(&file, &args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    for line in [
        "quantum_ms = 500  # file",
        "log_format = \"json\"  # file",
        "guard.host_reserve_mib = 1024  # file",
        "guard.guest_floor_mib = 128  # default",
    ] {
        assert!(run.stdout.contains(line), "{line}: {}", run.context(&args));
    }
    let args = ["--log-format", "text", "config", "check", "--quantum", "2s", "--metrics-addr", "127.0.0.1:9109"];
    let run = with_default(&file, &args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    for line in [
        "quantum_ms = 2000  # cli",
        "log_format = \"text\"  # cli",
        "metrics_addr = \"127.0.0.1:9109\"  # cli",
        "guard.host_reserve_mib = 1024  # file",
    ] {
        assert!(run.stdout.contains(line), "{line}: {}", run.context(&args));
    }
    // `config check PATH` and `--config PATH` read that file instead.
    let args = ["config", "check", s(&file)];
    let run = vm_balancer(&args);
    assert!(run.stdout.contains("quantum_ms = 500  # file"), "{}", run.context(&args));

    // A --config file that is missing is an error; a missing default is not.
    let args = ["--config", "/nonexistent/vmb.toml", "config", "check"];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 2, "{}", run.context(&args));
    assert!(run.stderr.contains("/nonexistent/vmb.toml"), "{}", run.context(&args));
}

#[test]
fn config_errors_name_the_key_the_line_and_the_file() {
    let (_d, file) = temp_file("bad.toml", b"quantum_ms = 1000\n\n[guard]\nguest_floor_mib = 128\nmax_shrink_pct = 200.0\n");
    let args = ["config", "check", s(&file)];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 2, "{}", run.context(&args));
    for words in [s(&file), "line 5", "guard.max_shrink_pct = 200", "0..=100"] {
        assert!(run.stderr.contains(words), "{words}: {}", run.context(&args));
    }
    let (_d, file) = temp_file("typo.toml", b"[limits.policy.\"30-web.wasm\"]\ndecide_timeout_ms = 900\n");
    let run = with_default(&file, &["run", "--connect", &sim("all-on-one"), "--quanta", "1"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("line 2") && run.stderr.contains("decide_timeout_ms = 900") && run.stderr.contains(s(&file)),
        "{}",
        run.stderr
    );
    let (_d, file) = temp_file("unknown.toml", b"quantum_ms = 1000\nmetrics_adr = \"127.0.0.1:1\"\n");
    let run = vm_balancer(&["config", "check", s(&file)]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("metrics_adr") && run.stderr.contains("line 2") && run.stderr.contains(s(&file)), "{}", run.stderr);
}

/// Every key of the config struct is in `examples/config.toml` (set, or
/// commented out as `# key = ...` for keys without a default), and the
/// file parses, commented keys included.
#[test]
fn the_example_config_parses_and_documents_every_key() {
    let path = root().join("examples/config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = Config::parse(&text, &path).expect("examples/config.toml parses");
    let defaults: BTreeMap<String, String> = Config::default().settings().into_iter().collect();
    let set: BTreeMap<String, String> = config.settings().into_iter().collect();
    assert_eq!(set, defaults, "the example sets every key to its default");
    // Uncomment `# key = value` lines: those keys must be real ones too.
    let uncommented: String = text
        .lines()
        .map(|l| {
            let t = l.trim_start_matches("# ");
            let is_key = t.split_once('=').is_some_and(|(k, _)| {
                let k = k.trim();
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '.' || c == '"' || c == '-')
            });
            if l.starts_with("# ") && (is_key || t.starts_with("[limits.policy.")) {
                t.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    Config::parse(&uncommented, &path).unwrap_or_else(|e| panic!("commented keys are real keys: {e}\n{uncommented}"));
    let documented = Config::keys_in(&uncommented);
    let missing: Vec<&String> = defaults.keys().filter(|k| !documented.contains(*k)).collect();
    assert!(missing.is_empty(), "keys of Config not in examples/config.toml: {missing:?}");
}

/// Runs the daemon with NOTIFY_SOCKET on a datagram socket the test reads:
/// READY=1 after the first quantum, WATCHDOG=1 every quantum, RELOADING=1
/// then READY=1 around SIGHUP, STOPPING=1 at the end.
#[test]
fn systemd_hears_ready_watchdog_reloading_and_stopping_in_order() {
    let _quiet = quiet_cpu();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let (_c, config) = crate::util::relaxed_config_file();
    let connect = sim("all-on-one");
    // As systemd starts it: WATCHDOG_PID is the daemon's own pid (`exec`
    // keeps the shell's).
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$@\"", "sh", env!("CARGO_BIN_EXE_vm-balancer")])
        .env("VMB_CONFIG_DEFAULT", crate::util::NO_DEFAULT_CONFIG)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "30000000")
        .args(["--config", s(&config), "--log", "warn", "run", "--connect", &connect, "--quantum", "100ms", "--policy", "builtin:cpu"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut messages: Vec<String> = Vec::new();
    let receive_until = |what: &str, messages: &mut Vec<String>| {
        let start = Instant::now();
        loop {
            let mut buf = [0u8; 4096];
            if let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if messages.last().unwrap().lines().any(|l| l == what) {
                    return;
                }
            }
            assert!(start.elapsed() < MINUTE, "no {what} within a minute; got {messages:?}");
        }
    };
    receive_until("READY=1", &mut messages);
    receive_until("WATCHDOG=1", &mut messages);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    receive_until("RELOADING=1", &mut messages);
    receive_until("READY=1", &mut messages);
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    receive_until("STOPPING=1", &mut messages);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let has = |m: &String, line: &str| m.lines().any(|l| l == line);
    let first_ready = messages.iter().position(|m| has(m, "READY=1")).unwrap();
    let reloading = messages.iter().position(|m| has(m, "RELOADING=1")).unwrap();
    assert!(messages[..first_ready].iter().all(|m| !has(m, "WATCHDOG=1") && !has(m, "STOPPING=1")), "{messages:?}");
    assert!(messages[reloading].lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "systemd 253+ needs MONOTONIC_USEC: {messages:?}");
    assert!(messages[first_ready..reloading].iter().any(|m| has(m, "WATCHDOG=1")), "{messages:?}");
    assert!(has(messages.last().unwrap(), "STOPPING=1"), "{messages:?}");
}

#[test]
fn run_at_its_default_level_explains_itself() {
    let _quiet = quiet_cpu();
    let state = tempfile::tempdir().unwrap();
    let config =
        format!("state_dir = {:?}\nsummary_every_s = 1\n[limits]\ndecide_timeout_ms = {}\n", state.path(), crate::util::RELAXED_TIMEOUT_MS);
    let (_c, file) = temp_file("c.toml", config.as_bytes());
    let connect = sim("all-on-one");
    // No --log: run's default is info.
    let out = binary()
        .env("NO_COLOR", "1")
        .args(["--config", s(&file), "run", "--connect", &connect, "--quantum", "100ms", "--quanta", "25"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let start = log.lines().find(|l| l.contains("vm-balancer started")).unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert!(
        start.contains("uri=sim:")
            && start.contains("quantum_ms=100")
            && start.contains("cpu (cpu-default)")
            && start.contains("mem (mem-default)"),
        "{start}"
    );
    assert!(log.contains("config read"), "{log}");
    // One line per applied action: domain, old -> new, the policy's reason.
    let applied: Vec<&str> = log.lines().filter(|l| l.contains("action applied")).collect();
    assert!(
        applied.iter().any(|l| l.contains("domain=\"busy-")
            && l.contains("change=\"vcpu 0 [0] -> [1]\"")
            && l.contains("reason=\"plan: busiest pCPU")),
        "{log}"
    );
    assert!(applied.iter().any(|l| l.contains("change=\"memory 512 -> ")), "{log}");
    assert!(log.contains("activity summary") && log.contains("decide="), "a summary every summary_every_s:\n{log}");
    assert!(!log.contains("quantum summary"), "per-quantum summaries are at debug:\n{log}");
}

#[test]
fn json_logs_are_one_object_per_line_with_stable_fields() {
    let _quiet = quiet_cpu();
    let state = tempfile::tempdir().unwrap();
    let connect = sim("all-on-one");
    let (_c, file) = crate::util::relaxed_config_file();
    let args = [
        "--config",
        s(&file),
        "--log-format",
        "json",
        "run",
        "--connect",
        &connect,
        "--quantum",
        "50ms",
        "--quanta",
        "3",
        "--state-dir",
        s(state.path()),
    ];
    let out = binary().args(args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {e}: {l:?}\n{log}"))).collect();
    for line in &lines {
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    let start = lines.iter().find(|l| l["fields"]["message"] == "vm-balancer started").expect("a start line");
    assert_eq!(start["level"], "INFO");
    assert_eq!(start["fields"]["quantum_ms"], 50);
    assert!(start["fields"]["uri"].as_str().unwrap().starts_with("sim:"), "{start}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "action applied" && l["fields"]["domain"].is_string()), "{log}");
}

/// One HTTP GET over loopback; the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(MINUTE)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {text}"));
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
    body.to_string()
}

/// Parses the text exposition format strictly enough that one broken line
/// fails: `name{label="escaped",...} value`. Returns (name, labels, value).
fn parse_exposition(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment {line:?}"
            );
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = &line[..name_end];
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {line:?}");
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let (start, _) = *chars.peek().unwrap_or_else(|| panic!("unterminated labels: {line:?}"));
                if r[start..].starts_with('}') {
                    rest = &r[start + 1..];
                    break;
                }
                let eq = r[start..].find("=\"").unwrap_or_else(|| panic!("bad label in {line:?}")) + start;
                let key = r[start..eq].to_string();
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name {key:?} in {line:?}");
                while chars.peek().is_some_and(|(i, _)| *i < eq + 2) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    let (_, c) = chars.next().unwrap_or_else(|| panic!("unterminated value in {line:?}"));
                    match c {
                        '"' => break,
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        '\n' => panic!("raw newline in {line:?}"),
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                if chars.peek().is_some_and(|(_, c)| *c == ',') {
                    chars.next();
                }
            }
        }
        let value = rest.trim().split(' ').next().unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
        };
        out.push((name.to_string(), labels, value));
    }
    out
}

fn series<'a>(all: &'a [(String, BTreeMap<String, String>, f64)], name: &str) -> Vec<&'a (String, BTreeMap<String, String>, f64)> {
    all.iter().filter(|(n, _, _)| n == name).collect()
}

fn sum(all: &[(String, BTreeMap<String, String>, f64)], name: &str) -> f64 {
    series(all, name).iter().map(|(_, _, v)| v).sum()
}

/// The endpoint over loopback while a simulator pipeline runs, against the
/// pipeline's and the simulator's own counts.
#[test]
fn metrics_match_the_simulators_own_counts() {
    let scenario = scenario("churn");
    let mut pipeline = sim_pipeline(&scenario, &["builtin:cpu", "builtin:mem"], relaxed_config());
    let metrics = Arc::new(Mutex::new(Metrics::new(Some("compute-1.example.org".into()))));
    let addr = vm_balancer::metrics::serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&metrics)).unwrap();
    let quanta = 60;
    let mut last = None;
    for _ in 0..quanta {
        let outcome = pipeline.step().unwrap();
        let times = QuantumTimes { quantum_s: 0.001, collect_s: outcome.collect_time.0.as_secs_f64(), period_s: 1.0 };
        metrics.lock().unwrap().quantum(&outcome.snapshot, &outcome.verdicts, pipeline.policies(), times, Default::default());
        last = Some(outcome);
    }
    let last = last.unwrap();
    let all = parse_exposition(&http_get(addr, "/metrics"));
    assert_eq!(sum(&all, "vm_balancer_quanta_total"), quanta as f64);
    assert_eq!(sum(&all, "vm_balancer_quantum_duration_seconds_count"), quanta as f64);
    let applied = pipeline.applier().stats();
    let pins = series(&all, "vm_balancer_actions_applied_total").iter().filter(|(_, l, _)| l["kind"] == "pin").map(|s| s.2).sum::<f64>();
    let memory =
        series(&all, "vm_balancer_actions_applied_total").iter().filter(|(_, l, _)| l["kind"] == "memory").map(|s| s.2).sum::<f64>();
    assert_eq!((pins, memory), (applied.pins as f64, applied.memory as f64), "applied actions: the apply stage's counters");
    assert!(applied.memory > 0, "the scenario moves memory");
    let guard = pipeline.guard().stats();
    assert_eq!(sum(&all, "vm_balancer_actions_rejected_total"), guard.rejected as f64);
    assert_eq!(sum(&all, "vm_balancer_actions_clamped_total"), guard.clamped as f64);
    for slot in pipeline.policies().slots() {
        let count =
            series(&all, "vm_balancer_policy_decide_duration_seconds_count").iter().find(|(_, l, _)| l["slot"] == slot.name()).map(|s| s.2);
        assert_eq!(count, Some(slot.stats().decided as f64), "decide calls of {}", slot.name());
    }
    // The simulator's host and domains as the last snapshot saw them.
    let snapshot = &last.snapshot;
    assert_eq!(series(&all, "vm_balancer_cpu_load_ratio").len(), snapshot.host.cpus.len());
    assert_eq!(sum(&all, "vm_balancer_host_available_memory_bytes"), (snapshot.host.memory.available_kib * 1024) as f64);
    assert_eq!(sum(&all, "vm_balancer_host_memory_reserve_bytes"), (snapshot.host.memory.reserve_kib * 1024) as f64);
    let targets = series(&all, "vm_balancer_domain_balloon_target_bytes");
    assert_eq!(targets.len(), snapshot.domains.len());
    for d in &snapshot.domains {
        let t = targets
            .iter()
            .find(|(_, l, _)| l["domain"] == d.name && l["uuid"] == d.uuid)
            .unwrap_or_else(|| panic!("no series for {}", d.name));
        assert_eq!(t.2, (d.memory.target_kib * 1024) as f64, "{}", d.name);
        let m = series(&all, "ceilometer_memory_usage").into_iter().find(|(_, l, _)| l["resource"] == d.uuid).expect("fleet memory series");
        assert_eq!(m.1["fqdn"], "compute-1.example.org");
        assert_eq!(m.2, d.memory.used_kib().unwrap() as f64 / 1024.0);
    }
    assert_eq!(series(&all, "ceilometer_cpu").len(), snapshot.domains.len());
}

/// A domain name with quotes, a backslash and a newline cannot break the
/// exposition format: it is escaped, and reads back as itself.
#[test]
fn odd_domain_names_cannot_break_the_exposition_format() {
    use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};
    let odd = "we\"ird\\name\nnext_line{x=\"1\"} 5";
    let snapshot = SnapshotBuilder::new(2, 8 << 20)
        .domain(DomainBuilder::new(odd).vcpu(0, 0.5))
        .domain(DomainBuilder::new("plain").vcpu(1, 0.25))
        .build();
    let set = vm_balancer::policy::PolicySet::new(&relaxed_config().limits);
    let mut metrics = Metrics::new(Some("host\"x".into()));
    metrics.quantum(&snapshot, &[], &set, QuantumTimes::default(), Default::default());
    let text = metrics.encode();
    let all = parse_exposition(&text);
    let names: BTreeSet<&str> = series(&all, "vm_balancer_domain_vcpu_demand_cpus").iter().map(|(_, l, _)| l["domain"].as_str()).collect();
    assert_eq!(names, BTreeSet::from([odd, "plain"]), "{text}");
    assert!(series(&all, "ceilometer_cpu").iter().all(|(_, l, _)| l["fqdn"] == "host\"x"));
    if let Some(promtool) = which("promtool") {
        // Prometheus's own parser agrees (lint findings aside: exit 3).
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!said.contains("error while linting") && !said.contains("text format parsing error"), "{said}\n{text}");
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills a helper process (Prometheus) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Percent-encodes a PromQL query for a URL.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn promql(addr: SocketAddr, query: &str) -> Vec<serde_json::Value> {
    let body = http_get(addr, &format!("/api/v1/query?query={}", url_encode(query)));
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(answer["status"], "success", "{query}: {body}");
    answer["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The daemon on the simulator with `fleet_metrics`, scraped by a real
/// Prometheus (Debian's `prometheus`, installed by .ci/setup.sh), which
/// answers the PromQL that OpenStack Watcher's Prometheus datasource sends.
#[test]
fn a_real_prometheus_answers_openstack_watchers_queries() {
    let _quiet = quiet_cpu();
    let prometheus = which("prometheus").expect("prometheus is installed (bash .ci/setup.sh)");
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "state_dir = {:?}\nfleet_metrics = true\nfqdn = \"compute-1.example.org\"\nmetrics_addr = \"127.0.0.1:{port}\"\n[limits]\ndecide_timeout_ms = {}\n",
        state.path(),
        crate::util::RELAXED_TIMEOUT_MS
    );
    let connect = sim("filling");
    let daemon = Daemon::start("prometheus", "info", Some(&config), &["--connect", &connect, "--quantum", "200ms"]);
    wait_until("the metrics endpoint", MINUTE, || daemon.log().contains("serving Prometheus metrics"));
    let prom_dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let prom_config = prom_dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vm-balancer\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n        labels:\n          fqdn: compute-1.example.org\n"),
    )
    .unwrap();
    let prom_log = std::fs::File::create(prom_dir.path().join("log")).unwrap();
    let server = Command::new(prometheus)
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(prom_log)
        .spawn()
        .unwrap();
    let _server = Killed(server);
    let addr: SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();
    let prom_log = || std::fs::read_to_string(prom_dir.path().join("log")).unwrap_or_default();
    let up = || TcpStream::connect(addr).is_ok() && !promql(addr, "ceilometer_memory_usage").is_empty();
    let start = Instant::now();
    while !up() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "Prometheus never scraped the daemon; its log:\n{}\ndaemon:\n{}",
            prom_log(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let uuids: BTreeSet<String> =
        promql(addr, "ceilometer_memory_usage").iter().map(|r| r["metric"]["resource"].as_str().unwrap().to_string()).collect();
    let uuid = uuids.iter().next().unwrap().clone();
    assert!(promql(addr, "ceilometer_memory_usage").iter().all(|r| r["metric"]["fqdn"] == "compute-1.example.org"));
    // Watcher's own queries (its Prometheus helper), for instance RAM and CPU.
    let ram = promql(addr, &format!("avg_over_time(ceilometer_memory_usage{{resource='{uuid}'}}[300s])"));
    assert_eq!(ram.len(), 1, "{ram:?}");
    let mb: f64 = ram[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(mb > 0.0, "{ram:?}");
    let cpu_query = format!("clamp_max((avg by (resource)(rate(ceilometer_cpu{{resource='{uuid}'}}[300s]))/10e+8) *(100/1), 100)");
    wait_until("two CPU samples for rate()", MINUTE, || !promql(addr, &cpu_query).is_empty());
    let cpu = promql(addr, &cpu_query);
    let pct: f64 = cpu[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{cpu:?}");
    // Hosts are matched by the fqdn label of the scrape target.
    let hosts = promql(addr, "count by (fqdn) (vm_balancer_quanta_total)");
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0]["metric"]["fqdn"], "compute-1.example.org");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let promtool = which("promtool").expect("promtool is installed (bash .ci/setup.sh)");
    let rules = root().join("examples/prometheus/alerts.yml");
    let out = Command::new(promtool).args(["check", "rules"]).arg(&rules).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("SUCCESS"), "{said}");
    let text = std::fs::read_to_string(&rules).unwrap();
    for name in [
        "vm_balancer_policy_disabled",
        "vm_balancer_host_available_memory_bytes",
        "vm_balancer_host_memory_reserve_bytes",
        "vm_balancer_quantum_overruns_total",
    ] {
        assert!(text.contains(name), "alerts.yml uses {name}");
    }
}

/// A daemon on the simulator with a status socket in a fresh state dir.
fn status_daemon(tag: &str, state: &Path) -> Daemon {
    let config = format!("state_dir = {:?}\n[limits]\ndecide_timeout_ms = {}\n", state, crate::util::RELAXED_TIMEOUT_MS);
    let connect = sim("all-on-one");
    let daemon = Daemon::start(tag, "info", Some(&config), &["--connect", &connect, "--quantum", "200ms"]);
    wait_until("the status socket", MINUTE, || daemon.log().contains("serving the read-only status socket"));
    wait_until("an applied action", MINUTE, || daemon.log().contains("action applied"));
    daemon
}

#[test]
fn explain_says_why_a_domain_changed_and_the_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let _quiet = quiet_cpu();
    let state = tempfile::tempdir().unwrap();
    let daemon = status_daemon("explain", state.path());
    let connect = sim("all-on-one");
    let socket = vm_balancer::status::socket_path(state.path(), &connect);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", socket.display());
    let args = ["explain", "busy-0", "--connect", &connect, "--state-dir", s(state.path())];
    let mut run = vm_balancer(&args);
    let start = Instant::now();
    while !run.stdout.contains("memory 512 -> ") {
        assert!(start.elapsed() < MINUTE, "{}\n{}", run.context(&args), daemon.log());
        std::thread::sleep(Duration::from_millis(250));
        run = vm_balancer(&args);
    }
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(run.stdout.contains("busy-0") && run.stdout.contains("applied") && run.stdout.contains("reclaim"), "{}", run.context(&args));
    let args = ["explain", "nope", "--connect", &connect, "--state-dir", s(state.path())];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 2, "{}", run.context(&args));
    assert!(run.stderr.contains("\"nope\"") && run.stderr.contains("busy-0"), "{}", run.context(&args));
    // Read-only: whatever a client writes, the daemon only ever sends status.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let _ = stream.write_all(b"{\"command\":\"stop\"}\n");
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(serde_json::from_str::<vm_balancer::status::Status>(&text).is_ok(), "{text}");
    assert!(daemon.log().lines().all(|l| !l.contains("vm-balancer stopped")), "{}", daemon.log());
    let mut daemon = daemon;
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(MINUTE);
    assert!(!socket.exists(), "the socket goes with the daemon: {}", socket.display());
}

/// A tmux session, killed on drop.
struct Tmux(String);

impl Tmux {
    fn capture(&self) -> String {
        let out = Command::new("tmux").args(["capture-pane", "-p", "-t", &self.0]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn alive(&self) -> bool {
        Command::new("tmux").args(["has-session", "-t", &self.0]).stderr(Stdio::null()).status().unwrap().success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).stderr(Stdio::null()).status();
    }
}

/// `vm-balancer top` as a person sees it: run under tmux, the screen read
/// with `capture-pane`, q pressed.
#[test]
fn top_shows_cpus_domains_and_policies_under_tmux() {
    let _quiet = quiet_cpu();
    assert!(which("tmux").is_some(), "tmux is installed (bash .ci/setup.sh)");
    let state = tempfile::tempdir().unwrap();
    let daemon = status_daemon("top", state.path());
    let connect = sim("all-on-one");
    let session = Tmux(format!("vmbtest-top-{}", std::process::id()));
    let command = format!(
        "VMB_CONFIG_DEFAULT={} {} top --connect '{}' --state-dir '{}'",
        crate::util::NO_DEFAULT_CONFIG,
        env!("CARGO_BIN_EXE_vm-balancer"),
        connect,
        state.path().display()
    );
    let started = Command::new("tmux").args(["new-session", "-d", "-s", &session.0, "-x", "180", "-y", "40", &command]).status().unwrap();
    assert!(started.success());
    let want =
        ["host CPUs", "cpu 0", "cpu 1", "busy-0", "busy-3", "applied memory", "reclaim", "cpu-default", "mem-default", "policies", "ok"];
    let mut screen = String::new();
    let start = Instant::now();
    while !want.iter().all(|w| screen.contains(w)) {
        assert!(start.elapsed() < MINUTE, "top never showed {want:?}; screen:\n{screen}\ndaemon:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(250));
        screen = session.capture();
    }
    // The vCPUs are listed on the pCPU they run on.
    assert!(screen.lines().any(|l| l.contains("cpu 1") && l.contains("busy-")), "{screen}");
    eprintln!("top under tmux:\n{screen}");
    Command::new("tmux").args(["send-keys", "-t", &session.0, "q"]).status().unwrap();
    wait_until("top to quit on q", MINUTE, || !session.alive());
}
