//! Record → replay → shadow on the simulator, through the binary: replaying
//! the recording policies reproduces the record exactly; a different policy
//! shows differences that are really in the record; damage (a cut tail, a
//! flipped byte) replays up to the damage and says where; a shadow that
//! traps or spins changes no active decision. And the timeline of a
//! shipped scenario adds up to the report's totals.

use std::path::{Path, PathBuf};

use vm_balancer::components as c;
use vm_balancer::record::{Frame, RecordItem, RecordReader};
use vm_balancer::sdk::Action;
use vm_balancer::simulate::simulate_observed;
use vm_balancer::timeline::TimelineRecord;

use crate::util::{policy_tempdir, quiet_cpu, relaxed_config, relaxed_config_file, root, s, scenario, vm_balancer, Run};

const QUANTA: u64 = 40;

fn churn() -> String {
    format!("sim:{}", root().join("examples/scenarios/churn.toml").display())
}

/// Runs the daemon on the churn scenario for [`QUANTA`] quanta, recording to
/// `dir`, with `extra` arguments; returns the run.
fn record(dir: &Path, config: &Path, extra: &[&str]) -> Run {
    record_with(dir, config, "20ms", extra)
}

/// [`record`] with a quantum length.
fn record_with(dir: &Path, config: &Path, quantum: &str, extra: &[&str]) -> Run {
    let _quiet = quiet_cpu();
    let connect = churn();
    let mut args = vec![
        "--log",
        "info",
        "--config",
        s(config),
        "run",
        "--connect",
        &connect,
        "--quantum",
        quantum,
        "--quanta",
        "40",
        "--record",
        s(dir),
    ];
    args.extend_from_slice(extra);
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    run
}

/// Every recorded frame of `dir`.
fn frames(dir: &Path) -> Vec<Frame> {
    RecordReader::open(dir)
        .unwrap()
        .filter_map(|p| match p.unwrap().item {
            RecordItem::Quantum(f) => Some(*f),
            RecordItem::Header(_) => None,
        })
        .collect()
}

fn replay_json(dir: &Path, policies: &[&str]) -> (serde_json::Value, Run) {
    let (_cfg_dir, config) = relaxed_config_file();
    let mut args = vec!["--config", s(&config), "replay", s(dir), "--json"];
    for p in policies {
        args.extend(["--policy", p]);
    }
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    (serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.context(&args))), run)
}

fn recorded_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let (_cfg_dir, config) = relaxed_config_file();
    record(&dir, &config, &[]);
    (tmp, dir)
}

fn segment(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

#[test]
fn replaying_the_recording_policies_reproduces_the_record_exactly() {
    let (_tmp, dir) = recorded_dir();
    let recorded = frames(&dir);
    assert_eq!(recorded.len() as u64, QUANTA);
    assert!(recorded.iter().map(|f| f.applied.len()).sum::<usize>() > 50, "the run did something to reproduce");
    let (report, run) = replay_json(&dir, &["builtin:cpu", "builtin:mem"]);
    assert_eq!(report["quanta"], QUANTA, "{}", run.stdout);
    assert_eq!(report["identical_quanta"], QUANTA, "{}", run.stdout);
    assert_eq!(report["differing_quanta"], 0);
    assert_eq!(report["differences"].as_array().unwrap().len(), 0, "{}", run.stdout);
    assert!(report["note"].as_str().unwrap().contains("open loop"));
    assert_eq!(report["quality"]["recorded"], report["quality"]["candidate"]);
}

#[test]
fn a_different_policy_shows_differences_that_are_in_the_record() {
    let (_tmp, dir) = recorded_dir();
    let recorded = frames(&dir);
    let (report, run) = replay_json(&dir, &["builtin:classic"]);
    assert!(report["differing_quanta"].as_u64().unwrap() > QUANTA / 2, "{}", run.stdout);
    let diffs = report["differences"].as_array().unwrap();
    for d in diffs {
        let q = d["quantum"].as_u64().unwrap();
        let frame = recorded.iter().find(|f| f.quantum == q).expect("a recorded quantum");
        let applied: Vec<String> = frame.applied.iter().map(Action::to_string).collect();
        for a in d["only_recorded"].as_array().unwrap() {
            assert!(applied.contains(&a.as_str().unwrap().to_string()), "quantum {q}: {a} is not in the record {applied:?}");
        }
        for a in d["only_candidate"].as_array().unwrap() {
            assert!(!applied.contains(&a.as_str().unwrap().to_string()), "quantum {q}: {a} was in the record too");
        }
    }
    // The text form says the same, and says it is open loop.
    let (_cfg_dir, config) = relaxed_config_file();
    let text = vm_balancer(&["--config", s(&config), "replay", s(&dir), "--policy", "builtin:classic"]);
    assert!(text.stdout.contains("open loop") && text.stdout.contains("recorded only:"), "{}", text.stdout);
}

#[test]
fn a_cut_tail_replays_up_to_the_damage_and_says_where() {
    let (_tmp, dir) = recorded_dir();
    let file = segment(&dir);
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - 10).unwrap();
    let (report, run) = replay_json(&dir, &["builtin:cpu", "builtin:mem"]);
    assert_eq!(report["quanta"], QUANTA - 1, "{}", run.stdout);
    assert_eq!(report["identical_quanta"], QUANTA - 1);
    let skipped = report["skipped"][0].as_str().unwrap();
    assert!(skipped.contains(s(&file)) && skipped.contains("offset") && skipped.contains(&format!("frame {QUANTA}")), "{skipped}");
    assert!(report["stopped"].is_null());
}

#[test]
fn a_flipped_byte_stops_the_replay_there_with_a_clear_message() {
    let (_tmp, dir) = recorded_dir();
    let file = segment(&dir);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let (report, run) = replay_json(&dir, &["builtin:cpu", "builtin:mem"]);
    let replayed = report["quanta"].as_u64().unwrap();
    assert!(replayed > 0 && replayed < QUANTA, "{}", run.stdout);
    assert_eq!(report["identical_quanta"], replayed, "what came before the damage is still exact");
    let stopped = report["stopped"].as_str().expect("the replay says it stopped");
    assert!(stopped.contains("damaged") && stopped.contains("offset") && stopped.contains(s(&file)), "{stopped}");
    assert!(run.stderr.contains("replay stopped before the end"), "{}", run.stderr);
}

/// (quantum, applied) of every frame: the active decisions.
fn decisions(dir: &Path) -> Vec<(u64, Vec<Action>)> {
    frames(dir).into_iter().map(|f| (f.quantum, f.applied)).collect()
}

fn shadow_leaves_the_active_decisions_alone(fixture: &str, name: &str, quantum: &str, config_text: &str, failure: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let policies = policy_tempdir();
    let shadow = policies.path().join(name);
    std::fs::copy(fixture, &shadow).unwrap();
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, config_text).unwrap();
    let (without, with) = (tmp.path().join("without"), tmp.path().join("with"));
    record_with(&without, &config, quantum, &[]);
    let run = record_with(&with, &config, quantum, &["--shadow", s(&shadow)]);
    let (a, b) = (decisions(&without), decisions(&with));
    assert_eq!(a.len() as u64, QUANTA, "every quantum ran without the shadow");
    assert_eq!(b.len() as u64, QUANTA, "every quantum ran with the shadow: {}", run.stderr);
    assert_eq!(a, b, "the shadow changed an active decision");
    let summary = run.stderr.lines().find(|l| l.contains("shadow summary")).unwrap_or_else(|| panic!("no shadow summary:\n{}", run.stderr));
    assert!(!summary.contains("failed=0 "), "{summary}");
    assert!(summary.contains("quanta=0 "), "a failing shadow decided nothing of its own: {summary}");
    assert!(run.stderr.contains(failure), "{}", run.stderr);
}

#[test]
fn a_shadow_that_traps_every_quantum_changes_no_active_decision() {
    let config = format!("[limits]\ndecide_timeout_ms = {}\n", crate::util::RELAXED_TIMEOUT_MS);
    shadow_leaves_the_active_decisions_alone(c::FIXTURE_TRAP, "trap.wasm", "20ms", &config, "kind=\"trap\"");
}

#[test]
fn a_shadow_that_spins_to_its_deadline_changes_no_active_decision() {
    let config = format!(
        "[limits]\ndecide_timeout_ms = {}\n[limits.policy.\"spin.wasm\"]\ndecide_timeout_ms = {}\n",
        crate::util::RELAXED_TIMEOUT_MS,
        crate::util::SPIN_TIMEOUT_MS
    );
    // A 200 ms quantum: a per-policy deadline is at most half of it.
    shadow_leaves_the_active_decisions_alone(c::FIXTURE_SPIN, "spin.wasm", "200ms", &config, "kind=\"timeout\"");
}

#[test]
fn a_shadow_of_the_active_policy_agrees_every_quantum() {
    let tmp = tempfile::tempdir().unwrap();
    let (_cfg_dir, config) = relaxed_config_file();
    let run = record(&tmp.path().join("rec"), &config, &["--shadow", "builtin:cpu"]);
    let summary = run.stderr.lines().find(|l| l.contains("shadow summary")).unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(summary.contains("disagreed=0 ") && summary.contains("failed=0 "), "{summary}");
}

#[test]
fn the_timeline_of_a_shipped_scenario_agrees_with_the_report() {
    for name in ["churn", "host-short", "all-on-one"] {
        let sc = scenario(name);
        let mut records: Vec<TimelineRecord> = Vec::new();
        let report = simulate_observed(&sc, &[], &relaxed_config(), None, None, |trace, sim| {
            records.push(TimelineRecord::build(trace, Some(sim.last_quantum())));
            Ok(())
        })
        .unwrap();
        assert_eq!(records.len() as u64, report.quanta, "{name}");
        let pins: usize = records.iter().map(TimelineRecord::pins_applied).sum();
        assert_eq!(pins as u64, report.cpu.pin_changes, "{name}: pins");
        let mean = records.iter().map(|r| r.load_ratio).sum::<f64>() / records.len() as f64;
        assert!((mean - report.cpu.mean_load_ratio).abs() < 1e-9, "{name}: {mean} vs {}", report.cpu.mean_load_ratio);
        let pressure = records.iter().flat_map(|r| &r.domains).filter(|d| d.pressure).count() as u64;
        let oom = records.iter().flat_map(|r| &r.domains).filter(|d| d.oom).count() as u64;
        assert_eq!((pressure, oom), (report.memory.pressure_events, report.memory.oom_events), "{name}: memory events");
        let lowest = records.iter().map(|r| r.host.available_kib).min().unwrap() / 1024;
        assert_eq!(lowest, report.memory.lowest_host_available_mib, "{name}: lowest host available");
        let verdict = |v: &str| records.iter().flat_map(|r| &r.actions).filter(|a| a.verdict == v).count() as u64;
        let g = &report.guard;
        assert_eq!(
            (verdict("accepted"), verdict("clamped"), verdict("rejected"), verdict("dropped")),
            (g.accepted, g.clamped, g.rejected, g.dropped),
            "{name}: guard"
        );
        let peak = records.iter().map(|r| r.domains.len()).max().unwrap();
        assert_eq!(peak, report.peak_vms, "{name}: peak VMs");
    }
}

#[test]
fn simulate_writes_a_timeline_file_and_a_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let (timeline, plot) = (tmp.path().join("t.jsonl"), tmp.path().join("p.svg"));
    let path = root().join("examples/scenarios/all-on-one.toml");
    let args = ["simulate", s(&path), "--timeline", s(&timeline), "--plot", s(&plot)];
    let run = vm_balancer(&args);
    assert_eq!(run.code, 0, "{}", run.context(&args));
    assert!(run.stderr.is_empty(), "no progress bar when not on a terminal: {}", run.stderr);
    let records = vm_balancer::timeline::read(&timeline).unwrap();
    assert_eq!(records.len() as u64, scenario("all-on-one").quanta);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("lower bound") && svg.contains("quantum"), "{}", &svg[..200.min(svg.len())]);
    let again = tmp.path().join("again.svg");
    let run = vm_balancer(&["plot", s(&timeline), "--plot", s(&again)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}
