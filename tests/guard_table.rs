//! The guard as tables: (proposals on a snapshot) → (outcome, applied value,
//! words in the reason).

use vm_balancer::config::GuardConfig;
use vm_balancer::guard::Guard;
use vm_balancer::policy::Proposal;
use vm_balancer::sdk::builder::{DomainBuilder, SnapshotBuilder};
use vm_balancer::sdk::{Action, Outcome, Snapshot};

const MIB: u64 = 1024;

/// Host: 4 CPUs (CPU 3 reserved, CPU 2 offline), 8 GiB with 4 GiB available and a 1 GiB reserve.
fn host() -> Snapshot {
    let mut s = SnapshotBuilder::new(4, 8192 * MIB)
        .host_memory(4096 * MIB, 1024 * MIB)
        .reserve_cpu(3)
        .domain(DomainBuilder::new("web").vcpu(0, 0.5).vcpu(1, 0.5).memory_mib(2048, 1024, Some(600)))
        .domain(DomainBuilder::new("nostats").vcpu(0, 0.1).memory_mib(1024, 1024, None))
        .domain(DomainBuilder::new("stale").vcpu(0, 0.1).memory_mib(2048, 1024, Some(600)).memory_age(11_000))
        .domain(DomainBuilder::new("fresh-enough").vcpu(0, 0.1).memory_mib(2048, 1024, Some(600)).memory_age(2000))
        .domain(DomainBuilder::new("hung").vcpu(0, 0.1).memory_mib(2048, 1024, Some(600)).not_answering(3000))
        .build();
    s.host.cpus[2].online = false;
    s
}

fn propose(actions: Vec<(&str, Action)>) -> Vec<Proposal> {
    actions.into_iter().map(|(slot, action)| Proposal { slot: slot.into(), action, from_fallback: false }).collect()
}

fn pin(vcpu: u32, cpus: Vec<u32>) -> Action {
    Action::pin("web", vcpu, cpus, "t")
}

fn mem(domain: &str, target_mib: u64) -> Action {
    Action::set_memory(domain, target_mib * MIB, "t")
}

/// Expected: Some((outcome, reason fragment)) or None for silently dropped.
type Row = (&'static str, Vec<(&'static str, Action)>, Vec<Option<(Outcome, &'static str)>>);

#[test]
fn pin_rules() {
    let rows: Vec<Row> = vec![
        ("unknown domain", vec![("a", Action::pin("ghost", 0, vec![1], ""))], vec![Some((Outcome::Rejected, "not managed"))]),
        ("vCPU out of range", vec![("a", pin(7, vec![1]))], vec![Some((Outcome::Rejected, "has no vCPU 7"))]),
        ("empty set", vec![("a", pin(0, vec![]))], vec![Some((Outcome::Rejected, "empty CPU set"))]),
        ("reserved CPU", vec![("a", pin(0, vec![3]))], vec![Some((Outcome::Rejected, "CPU 3"))]),
        ("offline CPU", vec![("a", pin(0, vec![2]))], vec![Some((Outcome::Rejected, "CPU 2"))]),
        ("nonexistent CPU", vec![("a", pin(0, vec![99]))], vec![Some((Outcome::Rejected, "CPU 99"))]),
        ("no-op is dropped", vec![("a", pin(0, vec![0]))], vec![None]),
        ("valid", vec![("a", pin(0, vec![1]))], vec![Some((Outcome::Accepted, "t"))]),
        (
            "conflict: first slot wins",
            vec![("a", pin(0, vec![1])), ("b", pin(0, vec![0, 1]))],
            vec![Some((Outcome::Accepted, "t")), Some((Outcome::Rejected, "conflict: slot a"))],
        ),
    ];
    run(rows, GuardConfig::default());
}

#[test]
fn memory_rules() {
    let rows: Vec<Row> = vec![
        ("above max is clamped", vec![("a", mem("web", 4096))], vec![Some((Outcome::Clamped, "above max"))]),
        // used = 1024 - 600 = 424 MiB; floor = 424 + 32.
        ("below floor is clamped", vec![("a", mem("web", 300))], vec![Some((Outcome::Clamped, "guest floor"))]),
        ("shrink without stats", vec![("a", mem("nostats", 900))], vec![Some((Outcome::Rejected, "no balloon stats"))]),
        ("no-op without stats is dropped", vec![("a", mem("nostats", 1024))], vec![None]),
        ("no-op is dropped", vec![("a", mem("web", 1024))], vec![None]),
        ("valid shrink", vec![("a", mem("web", 1000))], vec![Some((Outcome::Accepted, "t"))]),
        (
            "conflict: first slot wins",
            vec![("a", mem("web", 1000)), ("b", mem("web", 1100))],
            vec![Some((Outcome::Accepted, "t")), Some((Outcome::Rejected, "conflict: slot a"))],
        ),
    ];
    run(rows, GuardConfig::default());
}

/// Issue 11: figures that did not come in time never shrink a guest, and a
/// domain whose monitor does not answer gets no action (libvirt would block).
#[test]
fn stale_figures_and_hung_domains() {
    let rows: Vec<Row> = vec![
        (
            "shrink on stale figures",
            vec![("a", mem("stale", 1000))],
            vec![Some((Outcome::Rejected, "11000 ms old (stale after 10000 ms)"))],
        ),
        ("grow on stale figures passes", vec![("a", mem("stale", 1100))], vec![Some((Outcome::Accepted, "t"))]),
        ("figures within the bound", vec![("a", mem("fresh-enough", 1000))], vec![Some((Outcome::Accepted, "t"))]),
        (
            "no pin on a hung domain",
            vec![("a", Action::pin("hung", 0, vec![1], "t"))],
            vec![Some((Outcome::Rejected, "not answered for 3000 ms"))],
        ),
        ("no grow of a hung domain", vec![("a", mem("hung", 1100))], vec![Some((Outcome::Rejected, "not answered"))]),
        ("no shrink of a hung domain", vec![("a", mem("hung", 1000))], vec![Some((Outcome::Rejected, "not answered"))]),
    ];
    run(rows, GuardConfig::default());
    // The bound is the config's.
    let rows: Vec<Row> =
        vec![("stricter bound", vec![("a", mem("fresh-enough", 1000))], vec![Some((Outcome::Rejected, "stale after 1999 ms"))])];
    run(rows, GuardConfig { stale_after_ms: 1999, ..GuardConfig::default() });
}

#[test]
fn step_limits() {
    let config = GuardConfig { max_shrink_pct: 5.0, max_grow_pct: 10.0, ..GuardConfig::default() };
    let rows: Vec<Row> = vec![
        ("shrink step", vec![("a", mem("web", 900))], vec![Some((Outcome::Clamped, "shrink step"))]),
        ("grow step", vec![("a", mem("web", 2000))], vec![Some((Outcome::Clamped, "grow step"))]),
    ];
    run(rows, config);
    let mut guard = Guard::new(GuardConfig { max_shrink_pct: 5.0, ..GuardConfig::default() });
    let checked = guard.check(&host(), propose(vec![("a", mem("web", 900))]));
    assert_eq!(checked.accepted, vec![Action::set_memory("web", 1024 * MIB - 2048 * MIB / 20, "t")]);
}

#[test]
fn host_oom_guard() {
    // 3 GiB above the reserve: the second grow is clamped to what is left, the third refused.
    let mut s = host();
    s.domains.push(DomainBuilder::new("b").memory_mib(4096, 1024, Some(10)).into_domain());
    s.domains.push(DomainBuilder::new("c").memory_mib(4096, 1024, Some(10)).into_domain());
    let config = GuardConfig { max_grow_pct: 100.0, ..GuardConfig::default() };
    let mut guard = Guard::new(config);
    let checked = guard.check(&s, propose(vec![("a", mem("web", 2048)), ("a", mem("b", 4096)), ("a", mem("c", 2048))]));
    let outcomes: Vec<_> = checked.verdicts.iter().map(|v| v.outcome).collect();
    assert_eq!(outcomes, [Outcome::Accepted, Outcome::Clamped, Outcome::Rejected], "{:#?}", checked.verdicts);
    assert_eq!(checked.accepted[1], Action::set_memory("b", (1024 + 2048) * MIB, "t"));
    let given: u64 = 1024 + 2048;
    assert_eq!(given, 4096 - 1024, "exactly available minus reserve was given");

    // Host already below its reserve: only reclaim passes.
    let mut short = host();
    short.host.memory.available_kib = 512 * MIB;
    let checked = Guard::new(GuardConfig::default()).check(&short, propose(vec![("a", mem("web", 1100)), ("b", mem("web", 1000))]));
    assert_eq!(checked.verdicts[0].outcome, Outcome::Rejected, "{:?}", checked.verdicts);
    assert!(checked.verdicts[0].reason.contains("only reclaiming"));
    assert_eq!(checked.verdicts[1].outcome, Outcome::Accepted, "reclaim is allowed: {:?}", checked.verdicts);
}

#[test]
fn pin_rate_limits() {
    let s = host();
    let mut guard = Guard::new(GuardConfig { pin_cooldown_quanta: 3, max_pins_per_quantum: 1, ..GuardConfig::default() });
    let checked = guard.check(&s, propose(vec![("a", pin(0, vec![1])), ("a", pin(1, vec![0]))]));
    assert_eq!(checked.verdicts[0].outcome, Outcome::Accepted);
    assert!(checked.verdicts[1].reason.contains("at most 1 pins per quantum"), "{:?}", checked.verdicts);
    assert_eq!(checked.verdicts[1].rule, vm_balancer::sdk::Rule::PinRateLimit, "the rule, for a program to act on");
    // Next quantum: the vCPU is pinned to 1 now and asked back to 0: cooling down.
    let mut next = s.clone();
    next.quantum = 1;
    next.domains[0].vcpus[0].affinity = vm_balancer::sdk::smallvec![1];
    let checked = guard.check(&next, propose(vec![("a", pin(0, vec![0]))]));
    assert!(checked.verdicts[0].reason.contains("cooldown 3"), "{:?}", checked.verdicts);
    next.quantum = 3;
    let checked = guard.check(&next, propose(vec![("a", pin(0, vec![0]))]));
    assert_eq!(checked.verdicts[0].outcome, Outcome::Accepted, "cooldown over: {:?}", checked.verdicts);
}

#[test]
fn feedback_carries_only_non_accepted_verdicts() {
    let checked = Guard::new(GuardConfig::default()).check(&host(), propose(vec![("a", pin(0, vec![1])), ("a", pin(1, vec![3]))]));
    let feedback = checked.feedback();
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0].outcome, Outcome::Rejected);
    assert_eq!(feedback[0].slot, "a");
}

fn run(rows: Vec<Row>, config: GuardConfig) {
    for (name, actions, expected) in rows {
        let mut guard = Guard::new(config.clone());
        let checked = guard.check(&host(), propose(actions));
        let mut verdicts = checked.verdicts.iter();
        for want in &expected {
            let Some((outcome, words)) = want else { continue };
            let v = verdicts.next().unwrap_or_else(|| panic!("{name}: missing verdict; got {:?}", checked.verdicts));
            assert_eq!(v.outcome, *outcome, "{name}: {v:?}");
            let text = if *outcome == Outcome::Accepted { v.action.reason() } else { &v.reason };
            assert!(text.contains(words), "{name}: reason {text:?} lacks {words:?}");
        }
        assert!(verdicts.next().is_none(), "{name}: extra verdicts {:?}", checked.verdicts);
    }
}

/// `max_pins_per_quantum = 0` means no limit, not "no pins".
#[test]
fn zero_pins_per_quantum_means_no_limit() {
    let mut guard = Guard::new(GuardConfig { max_pins_per_quantum: 0, ..GuardConfig::default() });
    let checked = guard.check(&host(), propose(vec![("a", pin(0, vec![1])), ("a", pin(1, vec![0]))]));
    let outcomes: Vec<_> = checked.verdicts.iter().map(|v| v.outcome).collect();
    assert_eq!(outcomes, [Outcome::Accepted, Outcome::Accepted], "{:?}", checked.verdicts);
    assert_eq!(checked.accepted.len(), 2);
}
