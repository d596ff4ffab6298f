//! Every sandbox limit has an adversarial fixture (tests/fixtures/examples)
//! and a test asserting the precise error, and that the loop carries on with
//! the fallback.
//!
//! One limit per fixture: every test here runs with the relaxed 10 s
//! deadline ([`crate::util::RELAXED_TIMEOUT_MS`], margin explained there)
//! except the spinner's, so a loaded machine can never turn "output too
//! large" or "memory limit" into "timed out".

use vm_balancer::components as c;
use vm_balancer::config::{Config, Limits};
use vm_balancer::policy::{PolicyError, PolicySet};
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};
use vm_balancer::sdk::{encode_snapshot, Action, Param};

use crate::util::{relaxed_limits, scenario, sim_pipeline, spin_limits, temp_file, SPIN_TIMEOUT_MS};

fn load_err(limits: &Limits, path: &str) -> PolicyError {
    match PolicySet::new(limits).load_spec(path) {
        Ok(_) => panic!("{path} loaded but should have been refused"),
        Err(vm_balancer::policy::slots::SlotError::Policy(e)) => e,
        Err(e) => panic!("{path}: unexpected error {e}"),
    }
}

fn decide_err(limits: &Limits, path: &str) -> PolicyError {
    let mut policy = PolicySet::new(limits).load_spec(path).expect("fixture loads");
    let snap = SnapshotBuilder::new(2, 1 << 20).domain(DomainBuilder::new("a").vcpu(0, 0.5)).build();
    policy.decide(&encode_snapshot(&snap)).expect_err("fixture must fail")
}

#[test]
fn infinite_loop_times_out() {
    let e = decide_err(&spin_limits(), c::FIXTURE_SPIN);
    assert!(matches!(e, PolicyError::Timeout { timeout_ms: SPIN_TIMEOUT_MS, .. }), "{e}");
}

#[test]
fn panic_is_a_trap() {
    let e = decide_err(&relaxed_limits(), c::FIXTURE_TRAP);
    assert!(matches!(e, PolicyError::Trap { .. }), "{e}");
}

#[test]
fn memory_bomb_hits_the_memory_limit() {
    let e = decide_err(&Limits { max_memory_mib: 32, ..relaxed_limits() }, c::FIXTURE_BOMB);
    match e {
        PolicyError::MemoryLimit { requested_bytes, limit_bytes, .. } => {
            assert_eq!(limit_bytes, 32 << 20);
            assert!(requested_bytes > limit_bytes);
        }
        other => panic!("expected MemoryLimit, got {other}"),
    }
}

#[test]
fn garbage_output_is_undecodable() {
    let e = decide_err(&relaxed_limits(), c::FIXTURE_GARBAGE);
    assert!(matches!(e, PolicyError::Undecodable { .. }), "{e}");
}

#[test]
fn huge_output_is_refused() {
    let e = decide_err(&relaxed_limits(), c::FIXTURE_HUGE);
    assert!(
        matches!(e, PolicyError::OutputTooLarge { size_bytes, limit_bytes, .. } if size_bytes == 24 << 20 && limit_bytes == 4 << 20),
        "{e}"
    );
}

#[test]
fn err_answer_is_refused() {
    let e = decide_err(&relaxed_limits(), c::FIXTURE_ERR);
    assert!(matches!(&e, PolicyError::Refused { message, .. } if message.contains("fixture refuses")), "{e}");
}

#[test]
fn forbidden_import_is_refused_at_load_naming_it() {
    let e = load_err(&relaxed_limits(), c::FIXTURE_FORBIDDEN);
    assert!(matches!(&e, PolicyError::ForbiddenImport { import, .. } if import == "exec"), "{e}");
}

#[test]
fn wrong_world_is_refused_at_load() {
    let e = load_err(&relaxed_limits(), c::FIXTURE_WRONGWORLD);
    assert!(matches!(e, PolicyError::WrongWorld { .. }), "{e}");
}

#[test]
fn non_wasm_truncated_and_core_module_files_are_refused() {
    let (_d, text) = temp_file("notes.wasm", b"hello, I am not wasm");
    assert!(matches!(load_err(&relaxed_limits(), text.to_str().unwrap()), PolicyError::NotWasm { .. }));
    let full = std::fs::read(c::CPU).unwrap();
    let (_d2, cut) = temp_file("cut.wasm", &full[..full.len() / 2]);
    assert!(matches!(load_err(&relaxed_limits(), cut.to_str().unwrap()), PolicyError::Invalid { .. }));
    let (_d3, core) = temp_file("core.wasm", b"\0asm\x01\0\0\0");
    assert!(matches!(load_err(&relaxed_limits(), core.to_str().unwrap()), PolicyError::CoreModule { .. }));
    let (_d4, empty) = temp_file("empty.wasm", b"");
    assert!(matches!(load_err(&relaxed_limits(), empty.to_str().unwrap()), PolicyError::NotWasm { .. }));
}

#[test]
fn state_persists_across_calls_and_resets_after_a_trap() {
    let mut policy = PolicySet::new(&relaxed_limits()).load_spec(c::FIXTURE_COUNTER).unwrap();
    let mut snap = SnapshotBuilder::new(2, 1 << 20).param("counter", Param::Map([("trap_at".to_string(), Param::Int(3))].into())).build();
    let count = |actions: Vec<Action>| match &actions[0] {
        Action::SetMemory { target_kib, .. } => *target_kib,
        other => panic!("{other}"),
    };
    let bytes = encode_snapshot(&snap);
    assert_eq!(count(policy.decide(&bytes).unwrap()), 1);
    assert_eq!(count(policy.decide(&bytes).unwrap()), 2);
    assert!(matches!(policy.decide(&bytes), Err(PolicyError::Trap { .. })));
    snap.params.clear();
    assert_eq!(count(policy.decide(&encode_snapshot(&snap)).unwrap()), 1, "a fresh instance after the trap");
    assert_eq!(policy.instantiations(), 2);
}

/// Each hostile fixture in a running pipeline: the loop keeps going, the
/// fallback decides, failures are counted by kind, and after K failures
/// the policy is disabled (not retried every quantum).
#[test]
fn every_failure_falls_back_and_the_loop_keeps_running() {
    // The relaxed deadline except for the spinner: only it may time out.
    let relaxed = relaxed_limits();
    let cases = [
        (c::FIXTURE_SPIN, "timeout", spin_limits()),
        (c::FIXTURE_TRAP, "trap", relaxed.clone()),
        (c::FIXTURE_BOMB, "memory-limit", Limits { max_memory_mib: 32, ..relaxed.clone() }),
        (c::FIXTURE_GARBAGE, "undecodable", relaxed.clone()),
        (c::FIXTURE_HUGE, "output-too-large", relaxed.clone()),
        (c::FIXTURE_ERR, "refused", relaxed.clone()),
    ];
    let sc = scenario("all-on-one");
    for (fixture, kind, limits) in cases {
        let config = Config { limits: Limits { retry_backoff_quanta: 4, ..limits }, ..Config::default() };
        let mut p = sim_pipeline(&sc, &[fixture], config);
        for _ in 0..10 {
            p.step().expect("the loop survives every policy failure");
        }
        let stats = p.policies().slots()[0].stats().clone();
        assert_eq!(stats.fallbacks, 10, "{kind}: every quantum decided by the fallback: {stats:?}");
        // 3 failures, disabled for 4 quanta, 1 retry failure, disabled for 8.
        assert_eq!(stats.failures.get(kind), Some(&4), "{kind}: {stats:?}");
        assert_eq!(stats.disabled, 2, "{kind}: {stats:?}");
        // The fallback balanced the CPUs anyway: 2 and 2.
        let on_cpu0 = p.backend().placements().iter().filter(|(_, _, cpus)| cpus == &vec![0]).count();
        assert_eq!(on_cpu0, 2, "{kind}: fallback default cpu policy balanced the host");
    }
}

#[test]
fn soak_10000_calls_hit_no_limit_by_accident() {
    let mut policy = PolicySet::new(&relaxed_limits()).load_spec("builtin:cpu").unwrap();
    let mut b = SnapshotBuilder::new(8, 1 << 22);
    for i in 0..20 {
        b = b.domain(DomainBuilder::new(&format!("vm{i}")).vcpu(i % 8, 0.3).vcpu((i + 1) % 8, 0.2));
    }
    let bytes = encode_snapshot(&b.build());
    for i in 0..10_000 {
        policy.decide(&bytes).unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert_eq!(policy.instantiations(), 1);
}
