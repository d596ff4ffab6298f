//! The default CPU policy: pins vCPUs so that the busiest pCPU is as close
//! as possible to the best placement of the quantum's demands.
//!
//! It plans, then moves (issue 12):
//! - **Demand, not usage.** A vCPU's demand is `usage + steal`; usage alone
//!   hides what a vCPU sharing a pCPU wanted, which is why the original stalled
//!   at 3/1 with four busy guests on two pCPUs.
//! - **A target placement each quantum** ([`target`]): the exact optimum
//!   on small instances, LPT on large ones, the current placement repaired
//!   and the current placement improved, each finished by a local search
//!   with moves and 1↔1, 2↔1, 1↔2 exchanges against every pCPU; the best
//!   makespan wins, then the fewest pCPUs above capacity, then the fewest
//!   vCPUs moved. A local search alone stops
//!   in local optima (a 1-for-2 exchange needed, a chain over three pCPUs);
//!   a planned target does not.
//! - **Hysteresis.** The target is taken only when it lowers the busiest
//!   pCPU's load by `max(cpu.min_gain, cpu.min_gain_pct % of it)` (0.05
//!   CPU, 5 %), or keeps it and leaves fewer pCPUs above capacity with that
//!   margin gained on each (demand above capacity is not served), so demand
//!   noise never flaps a vCPU back and forth and a
//!   converged host makes no moves. On hosts whose demand jumps every
//!   quantum, `cpu.noise_factor` (2; 0 turns it off) also asks a new plan
//!   to gain that many times the measured noise of a pCPU's load, and
//!   candidate targets within the noise of the best count as equal (the
//!   one that moves less wins).
//! - **A budget that scales with the need** ([`plan::budget`]): at least
//!   `max(8, CPUs / 4)` moves a quantum, more when the target needs more, so
//!   any target is reached within `cpu.converge_quanta` (2) quanta; a
//!   share cut by the budget never raises the busiest pCPU (irqbalance's
//!   rule). `cpu.max_moves` sets a hard cap instead. A per-vCPU cooldown
//!   (`cpu.cooldown_quanta`) keeps a moved vCPU where it is for a while.
//! - **What people who run VMs expect:** a VM's vCPUs are spread over
//!   distinct pCPUs where that costs nothing (co-located siblings hurt the
//!   guest's own scheduling); on a host of several NUMA nodes each VM stays
//!   on one node where that costs at most `cpu.numa_slack_pct` (10 %) of the
//!   best makespan; reserved and offline CPUs are never targets.
//! - **Unpinned vCPUs are pinned where they run** (the original did this at
//!   start), so the hypervisor does not move them behind the policy's back.
#![deny(missing_docs)]

mod plan;
mod target;

use rustc_hash::FxHashMap;

use vm_balancer_sdk::{export_policy, Action, Info, Outcome, Policy, Reads, Rule, Snapshot};

/// Tunables, read from `[params.cpu]` each quantum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuParams {
    /// Minimum drop of the busiest pCPU's load, in CPUs, for a plan to be worth moving to.
    pub min_gain: f32,
    /// The same, relative to the busiest pCPU's load (percent): demand
    /// estimates are noisy in proportion to their size, so a plan must beat
    /// the noise of the load it lowers.
    pub min_gain_pct: f32,
    /// Moves per quantum; 0 means automatic: enough to reach the target in
    /// `converge_quanta` quanta, at least `max(8, cpus / 4)`.
    pub max_moves: usize,
    /// Quanta the automatic budget spreads a target's moves over.
    pub converge_quanta: usize,
    /// Quanta a moved vCPU is left alone.
    pub cooldown_quanta: u64,
    /// vCPUs below this demand are never moved (they cannot matter).
    pub ignore_below: f32,
    /// A VM's vCPUs stay on one NUMA node when that costs at most this
    /// share of the best makespan (percent; 0 keeps VMs on one node only
    /// when it costs nothing).
    pub numa_slack_pct: f32,
    /// A new plan must also gain this many times the demand noise measured
    /// on the host: the (lower) median change of a pCPU's load from one
    /// quantum to the next that no move explains (the median of the last
    /// three quanta's, smoothed: a step of demand is not noise). Demand
    /// that jumps every quantum makes last quantum's best placement stale
    /// before it is reached, and moving to it is churn. Default 2: with the
    /// tie below it cuts the pins of a jumpy 8-pCPU host by 30 % for a
    /// busiest pCPU 0-1.3 % higher (the unit test `jumpy_demand_…`); the
    /// constant-demand quality bench is as without it. The noise itself
    /// is also the tie between candidate targets and where the local
    /// search stops above the lower bound (`target::Problem::noise`). 0
    /// turns both off.
    pub noise_factor: f32,
}

impl CpuParams {
    /// Reads the parameters, with defaults.
    pub fn from_snapshot(s: &Snapshot) -> Self {
        CpuParams {
            min_gain: s.param_f64("cpu.min_gain", 0.05).max(0.0) as f32,
            min_gain_pct: s.param_f64("cpu.min_gain_pct", 5.0).max(0.0) as f32,
            max_moves: s.param_f64("cpu.max_moves", 0.0).max(0.0) as usize,
            converge_quanta: s.param_f64("cpu.converge_quanta", 2.0).clamp(1.0, 1e6) as usize,
            cooldown_quanta: s.param_f64("cpu.cooldown_quanta", 3.0).max(0.0) as u64,
            ignore_below: s.param_f64("cpu.ignore_below", 0.02) as f32,
            numa_slack_pct: s.param_f64("cpu.numa_slack_pct", 10.0).clamp(0.0, 1e6) as f32,
            noise_factor: s.param_f64("cpu.noise_factor", 2.0).clamp(0.0, 1e3) as f32,
        }
    }
}

/// The default CPU policy. State: when each vCPU was last moved, a target
/// being reached over several quanta, the pin limit the guard showed, and
/// the host's demand noise.
#[derive(Default, Debug)]
pub struct CpuPolicy {
    /// Domain → (vCPU, quantum it was last moved). Keyed by name so the hot
    /// path looks up with a borrowed `&str` instead of cloning a String per vCPU.
    /// (FxHash: the keys are the daemon's domain names, not attacker-chosen,
    /// and SipHash was a visible share of a 1,000-domain quantum in wasm.)
    last_moved: FxHashMap<String, Vec<(u32, u64)>>,
    /// A target being reached over several quanta (its budget and where
    /// the vCPUs not moved yet are to go), so the next quantum finishes it
    /// instead of planning around the half already moved.
    carry: Carry,
    /// Pins sent last quantum (initial pins and moves).
    last_pins: usize,
    /// Pins the guard let through in a quantum where it refused more for
    /// its per-quantum limit: the budget stays under it from then on, so the
    /// plan the policy believes in is the one that happened.
    pin_cap: Option<usize>,
    /// The host's demand noise, for the plan's margin.
    noise: Noise,
}

/// Demand noise: how much each pCPU's load moves between quanta on its
/// own. Measured per pCPU, not per vCPU, so it costs one pass over the
/// pCPUs and no state per domain.
#[derive(Debug, Default)]
struct Noise {
    /// The usable CPUs the loads below are of.
    usable: Vec<u32>,
    /// Each usable CPU's load as last quantum's moves left it.
    expected: Vec<f32>,
    /// The last two quanta's changes, CPUs (0 until measured).
    last: [f32; 2],
    /// Smoothed mean absolute change, CPUs.
    cpus: f32,
}

impl Noise {
    /// Share of a new quantum's change in the smoothed figure.
    const WEIGHT: f32 = 0.3;

    /// Takes this quantum's loads (before any move); returns the smoothed
    /// noise. A change of the usable CPUs starts the comparison afresh.
    fn observe(&mut self, usable: &[u32], load: &[f32]) -> f32 {
        if self.usable == usable && self.expected.len() == load.len() && !load.is_empty() {
            // The median change: a shift of a few pCPUs (a VM started or
            // stopped) is not noise. The lower median of an even count: on
            // 2 pCPUs the upper one is the larger change, and one pCPU
            // whose two co-located vCPUs swing together read as the host's
            // noise; its margin then held back the plan that would part
            // them, for good (the random sweep's seed 89: 1.21 × best
            // against 1.06; over seeds 1-100, 1.1363 against 1.1397, with
            // 6,592 pins against 6,360).
            let mut changes: Vec<f32> = load.iter().zip(&self.expected).map(|(l, e)| (l - e).abs()).collect();
            let mid = (changes.len() - 1) / 2;
            let change = *changes.select_nth_unstable_by(mid, f32::total_cmp).1;
            if change.is_finite() {
                // What is smoothed is the median of the last three quanta's
                // changes. Noise is demand that moves every quantum; a step
                // (a phase change) is one large change, and counted it read
                // as noise for quanta: a 2-pCPU host whose one VM went from
                // 0.06 to 0.55 a vCPU waited 5 quanta at 1.74 for its
                // margin to decay before the plan to 1.45 (mean 1.26
                // against 1.08 × best).
                let [a, b] = self.last;
                let median = change.max(a.min(b)).min(a.max(b));
                self.last = [b, change];
                self.cpus += Self::WEIGHT * (median - self.cpus);
            }
        }
        self.cpus
    }

    /// Remembers the loads this quantum's moves leave.
    fn expect(&mut self, usable: &[u32], load: &[f32]) {
        self.usable.clear();
        self.usable.extend_from_slice(usable);
        self.expected.clear();
        self.expected.extend_from_slice(load);
    }
}

/// What a target cut short by the move budget leaves for the next quantum.
#[derive(Default, Debug)]
struct Carry {
    /// The budget it was begun with (0: nothing carried).
    budget: usize,
    /// Domain → (vCPU, host CPU id) still to move there.
    left: FxHashMap<String, Vec<(u32, u32)>>,
}

/// A vCPU as the planner sees it.
#[derive(Clone, Copy, Debug)]
struct Item {
    domain: usize,
    vcpu: usize,
    demand: f32,
    /// Index into the usable-CPU table.
    home: usize,
    movable: bool,
    /// Moved this quantum (a move is final: the vCPU leaves the candidate lists).
    moved: bool,
}

impl Policy for CpuPolicy {
    const READS: Reads = Reads { vcpus: true, domain_memory: false };

    fn info() -> Info {
        Info { name: "cpu-default", version: env!("CARGO_PKG_VERSION"), cpu: true, memory: false }
    }

    fn decide(&mut self, snap: &Snapshot) -> Result<Vec<Action>, String> {
        let params = CpuParams::from_snapshot(snap);
        let usable: Vec<u32> = snap.usable_cpus().map(|c| c.id).collect();
        if usable.is_empty() {
            return Ok(Vec::new());
        }
        let slots = SlotIndex::new(&usable);
        self.read_verdicts(snap);
        self.last_moved.retain(|_, moves| {
            moves.retain(|(_, q)| snap.quantum.saturating_sub(*q) < params.cooldown_quanta);
            !moves.is_empty()
        });
        let mut load = background_load(snap, &slots, usable.len());
        let (mut items, unpinned) = self.items(snap, &slots, &mut load, &params);
        let noise_cpus = self.noise.observe(&usable, &load);
        let nodes: Vec<u32> = snap.usable_cpus().map(|c| c.node).collect();
        let settings = plan::Settings {
            min_gain: params.min_gain,
            gain_pct: params.min_gain_pct,
            max_moves: params.max_moves,
            converge_quanta: params.converge_quanta,
            numa_slack_pct: params.numa_slack_pct,
            noise_margin: params.noise_factor * noise_cpus,
            noise: if params.noise_factor > 0.0 { noise_cpus } else { 0.0 },
            // Initial pins count against the guard's limit too.
            pin_cap: self.pin_cap.map_or(usize::MAX, |cap| cap.saturating_sub(unpinned.len()).max(1)),
        };
        let mut carried = plan::Carried { budget: self.carry.budget, hint: self.hint(snap, &slots, &items), left: Vec::new() };
        let moves = plan::plan_moves(&mut items, &mut load, &nodes, &settings, &mut carried);
        self.noise.expect(&usable, &load);
        self.carry.budget = carried.budget;
        self.carry.left.clear();
        for (i, slot) in carried.left {
            let d = &snap.domains[items[i].domain];
            self.carry.left.entry(d.name.clone()).or_default().push((d.vcpus[items[i].vcpu].id, usable[slot]));
        }
        let actions = self.actions(snap, &usable, &items, &unpinned, moves);
        self.last_pins = actions.len();
        Ok(actions)
    }
}

// The phases of `decide` are separate functions on purpose: inlined into one
// body, the compiler that turns wasm into machine code (Cranelift) ran out
// of registers and kept every loop's values on the stack.
impl CpuPolicy {
    /// One planner item per vCPU, with each vCPU's demand added to its home
    /// CPU's load. Also returns the vCPUs not pinned to one usable CPU, with
    /// the CPU each is to be pinned to.
    #[inline(never)]
    fn items(&self, snap: &Snapshot, slots: &SlotIndex, load: &mut [f32], params: &CpuParams) -> (Vec<Item>, Vec<(usize, usize)>) {
        let mut unpinned = Vec::new();
        let mut items = Vec::with_capacity(snap.domains.iter().map(|d| d.vcpus.len()).sum());
        for (di, d) in snap.domains.iter().enumerate() {
            // One lookup per domain, not per vCPU.
            let recent = self.last_moved.get(d.name.as_str());
            for (vi, v) in d.vcpus.iter().enumerate() {
                let home = match v.pinned_to().and_then(|c| slots.get(c)) {
                    Some(h) => h,
                    None => {
                        // Not pinned to one usable CPU: pin it where it runs if
                        // that CPU is usable, else onto the least-loaded one.
                        let h = slots.get(v.cpu).unwrap_or_else(|| argmin(load));
                        unpinned.push((items.len(), h));
                        h
                    }
                };
                // Negative demand is meaningless, and the planner's pruning relies on demand ≥ 0.
                let demand = larger(v.demand(), 0.0);
                load[home] += demand;
                let cooled = recent
                    .and_then(|moves| moves.iter().find(|(id, _)| *id == v.id))
                    .is_none_or(|(_, q)| snap.quantum.saturating_sub(*q) >= params.cooldown_quanta);
                items.push(Item { domain: di, vcpu: vi, demand, home, movable: cooled && demand >= params.ignore_below, moved: false });
            }
        }
        (items, unpinned)
    }

    /// Honours the guard's verdicts on last quantum's pins: a refused pin
    /// did not move its vCPU (no cooldown for it), and refusals for the
    /// per-quantum pin limit set the budget's cap to what got through.
    fn read_verdicts(&mut self, snap: &Snapshot) {
        let mut over_limit = 0;
        for v in snap.verdicts.iter().filter(|v| v.outcome == Outcome::Rejected) {
            let Action::Pin { domain, vcpu, .. } = &v.action else { continue };
            if let Some(moves) = self.last_moved.get_mut(domain.as_str()) {
                moves.retain(|(id, _)| id != vcpu);
            }
            over_limit += usize::from(v.rule == Rule::PinRateLimit);
        }
        if over_limit > 0 {
            let through = self.last_pins.saturating_sub(over_limit).max(1);
            self.pin_cap = Some(self.pin_cap.map_or(through, |cap| cap.min(through)));
        }
    }

    /// Per item, the usable-CPU index a carried target sends it to, or
    /// `target::NONE`. Empty when nothing is carried (the common case).
    #[inline(never)]
    fn hint(&self, snap: &Snapshot, slots: &SlotIndex, items: &[Item]) -> Vec<usize> {
        if self.carry.budget == 0 || self.carry.left.is_empty() {
            return Vec::new();
        }
        let mut hint = vec![target::NONE; items.len()];
        let mut any = false;
        // Items come domain by domain: one lookup per domain, and nothing
        // per vCPU of a domain with nothing carried (most of them; a push
        // per vCPU was 2.3 times its native cost in wasm).
        let mut first = 0;
        for run in items.chunk_by(|a, b| a.domain == b.domain) {
            let d = &snap.domains[run[0].domain];
            if let Some(left) = self.carry.left.get(d.name.as_str()) {
                for (h, it) in hint[first..first + run.len()].iter_mut().zip(run) {
                    let id = d.vcpus[it.vcpu].id;
                    if let Some(c) = left.iter().find(|(v, _)| *v == id).and_then(|(_, cpu)| slots.get(*cpu)) {
                        *h = c;
                        any = true;
                    }
                }
            }
            first += run.len();
        }
        // None of them is still here (a new set of domains): nothing carried.
        if !any {
            return Vec::new();
        }
        hint
    }

    /// The pins to send: each unpinned vCPU where it was placed, unless it
    /// was moved, then the moves in the order they were planned (a vCPU
    /// moves at most once a quantum: it leaves the candidate lists). Records
    /// the moves for the cooldown.
    #[inline(never)]
    fn actions(
        &mut self,
        snap: &Snapshot,
        usable: &[u32],
        items: &[Item],
        unpinned: &[(usize, usize)],
        moves: Vec<(usize, String)>,
    ) -> Vec<Action> {
        let mut actions = Vec::with_capacity(unpinned.len() + moves.len());
        for &(i, home) in unpinned.iter().filter(|(i, _)| !items[*i].moved) {
            let d = &snap.domains[items[i].domain];
            actions.push(Action::pin(&d.name, d.vcpus[items[i].vcpu].id, vec![usable[home]], "initial pin where it runs"));
        }
        for (i, reason) in moves {
            let it = items[i];
            let d = &snap.domains[it.domain];
            let v = &d.vcpus[it.vcpu];
            let cooldown = self.last_moved.entry(d.name.clone()).or_default();
            cooldown.retain(|(id, _)| *id != v.id);
            cooldown.push((v.id, snap.quantum));
            actions.push(Action::pin(&d.name, v.id, vec![usable[it.home]], reason));
        }
        actions
    }
}

/// Per usable CPU, the load that is not the vCPUs in the snapshot
/// (host work, other guests): the CPU's usage less its vCPUs' usage.
#[inline(never)]
fn background_load(snap: &Snapshot, slots: &SlotIndex, cpus: usize) -> Vec<f32> {
    let mut vcpu_usage = vec![0.0f32; cpus];
    for d in &snap.domains {
        for v in &d.vcpus {
            if let Some(i) = slots.get(v.cpu) {
                vcpu_usage[i] += v.usage;
            }
        }
    }
    let mut load = vec![0.0f32; cpus];
    for cpu in &snap.host.cpus {
        if let Some(i) = slots.get(cpu.id) {
            load[i] = larger(cpu.usage - vcpu_usage[i], 0.0);
        }
    }
    load
}

/// Host CPU id → index into the usable-CPU table, by direct indexing
/// (CPU ids are small and dense; a hash map here costs a lookup per vCPU).
struct SlotIndex(Vec<Option<usize>>);

impl SlotIndex {
    fn new(usable: &[u32]) -> Self {
        let len = usable.iter().max().map_or(0, |m| *m as usize + 1);
        let mut index = vec![None; len];
        for (i, id) in usable.iter().enumerate() {
            index[*id as usize] = Some(i);
        }
        SlotIndex(index)
    }

    fn get(&self, cpu: u32) -> Option<usize> {
        self.0.get(cpu as usize).copied().flatten()
    }
}

fn argmin(load: &[f32]) -> usize {
    (0..load.len()).min_by(|a, b| load[*a].total_cmp(&load[*b])).unwrap_or(0)
}

/// A load with two decimals, for reasons. `{:.2}` on a float takes the exact
/// (and in wasm slow) formatting path; loads need no more than this.
struct Hundredths(f32);

impl std::fmt::Display for Hundredths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hundredths = (self.0 * 100.0).round();
        if !hundredths.is_finite() || hundredths.abs() > 1e15 {
            return write!(f, "{:.2}", self.0);
        }
        let hundredths = hundredths as i64;
        let sign = if hundredths < 0 { "-" } else { "" };
        write!(f, "{sign}{}.{:02}", hundredths.abs() / 100, hundredths.abs() % 100)
    }
}

/// `a.max(b)` where `b` is not NaN (a NaN `a` gives `b`, as `f32::max` does). `f32::max` is a libm call in wasm (its
/// NaN rule differs from the `f32.max` instruction's), and this is in the
/// planner's innermost loop.
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    // `>=` is false for a NaN `a`, so the result is `b`.
    if a >= b {
        a
    } else {
        b
    }
}

export_policy!(CpuPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use vm_balancer_sdk::builder::{DomainBuilder, SnapshotBuilder};

    fn busy_guests_on_cpu0(n: usize, cpus: u32) -> Snapshot {
        let mut b = SnapshotBuilder::new(cpus, 8 << 20);
        for i in 0..n {
            let share = 1.0 / n as f32;
            b = b.domain(DomainBuilder::new(&format!("vm{i}")).vcpu_with_steal(0, share, 1.0 - share));
        }
        b.build()
    }

    fn targets(actions: &[Action]) -> Vec<u32> {
        actions.iter().filter_map(|a| if let Action::Pin { cpus, .. } = a { Some(cpus[0]) } else { None }).collect()
    }

    #[test]
    fn four_busy_guests_on_one_of_two_cpus_end_two_and_two_in_one_quantum() {
        let actions = CpuPolicy::default().decide(&busy_guests_on_cpu0(4, 2)).unwrap();
        assert_eq!(targets(&actions), vec![1, 1], "two vCPUs move to pCPU 1: {actions:?}");
    }

    #[test]
    fn balanced_load_produces_no_moves() {
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .domain(DomainBuilder::new("a").vcpu(0, 0.9))
            .domain(DomainBuilder::new("b").vcpu(1, 0.85))
            .build();
        assert!(CpuPolicy::default().decide(&snap).unwrap().is_empty());
    }

    #[test]
    fn noise_below_min_gain_never_flaps() {
        // 0.55 vs 0.45: moving the 0.05 vCPU gains less than min_gain.
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .domain(DomainBuilder::new("a").vcpu(0, 0.5))
            .domain(DomainBuilder::new("c").vcpu(0, 0.05))
            .domain(DomainBuilder::new("b").vcpu(1, 0.45))
            .build();
        assert!(CpuPolicy::default().decide(&snap).unwrap().is_empty());
    }

    #[test]
    fn unpinned_vcpus_are_pinned_where_they_run() {
        let mut snap = SnapshotBuilder::new(4, 8 << 20).domain(DomainBuilder::new("a").vcpu(2, 0.1)).build();
        snap.domains[0].vcpus[0].affinity.clear();
        let actions = CpuPolicy::default().decide(&snap).unwrap();
        assert_eq!(targets(&actions), vec![2]);
    }

    #[test]
    fn noise_on_busy_pcpus_does_not_swap() {
        // 2/2 split of burning vCPUs whose measured demand wobbles by a few
        // percent: the best swap gains 0.08 CPU, under 5 % of the 2.02 it shifts.
        let snap = SnapshotBuilder::new(2, 8 << 20)
            .domain(DomainBuilder::new("a").vcpu_with_steal(0, 0.5, 0.56))
            .domain(DomainBuilder::new("b").vcpu_with_steal(0, 0.5, 0.56))
            .domain(DomainBuilder::new("c").vcpu_with_steal(1, 0.5, 0.46))
            .domain(DomainBuilder::new("d").vcpu_with_steal(1, 0.5, 0.48))
            .build();
        assert!(CpuPolicy::default().decide(&snap).unwrap().is_empty());
    }

    #[test]
    fn reserved_cpus_are_never_targets() {
        let snap = {
            let mut b = SnapshotBuilder::new(3, 8 << 20).reserve_cpu(1);
            for i in 0..4 {
                b = b.domain(DomainBuilder::new(&format!("vm{i}")).vcpu_with_steal(0, 0.25, 0.75));
            }
            b.build()
        };
        let actions = CpuPolicy::default().decide(&snap).unwrap();
        assert!(!targets(&actions).contains(&1), "{actions:?}");
        assert!(!actions.is_empty());
    }

    #[test]
    fn moved_vcpus_cool_down() {
        let mut policy = CpuPolicy::default();
        let snap = busy_guests_on_cpu0(4, 2);
        let first = policy.decide(&snap).unwrap();
        let moved: Vec<&str> =
            first.iter().filter_map(|a| if let Action::Pin { domain, .. } = a { Some(domain.as_str()) } else { None }).collect();
        assert_eq!(moved.len(), 2, "{first:?}");
        // Same (stale) picture next quantum: the moved vCPUs are cooling, the
        // remaining two may move; the moved ones must not move again.
        let mut next = snap.clone();
        next.quantum = 1;
        let again = policy.decide(&next).unwrap();
        for a in &again {
            assert!(!matches!(a, Action::Pin { domain, .. } if moved.contains(&domain.as_str())), "{again:?}");
        }
    }

    #[test]
    fn hundredths_read_like_two_decimals() {
        let shown: Vec<String> = [0.0, 1.0, 2.345, 0.999, -0.5, 12.3, f32::NAN].iter().map(|x| Hundredths(*x).to_string()).collect();
        assert_eq!(shown, ["0.00", "1.00", "2.35", "1.00", "-0.50", "12.30", "NaN"]);
    }

    #[test]
    fn scales_to_256_cpus() {
        let mut b = SnapshotBuilder::new(256, 1 << 30);
        for i in 0..1000 {
            b = b.domain(DomainBuilder::new(&format!("vm{i}")).vcpu_with_steal(0, 0.001, 0.3));
        }
        let actions = CpuPolicy::default().decide(&b.build()).unwrap();
        // 1,000 vCPUs of 0.3 on one pCPU: the best placement keeps 4 on
        // pCPU 0 and moves 996, half of them this quantum (the automatic
        // budget reaches a target within `cpu.converge_quanta` = 2 quanta).
        assert_eq!(actions.len(), 498, "{:?}", &actions[..actions.len().min(3)]);
    }

    #[test]
    fn reads_only_what_it_declares() {
        // The wasm glue decodes only `READS`; the daemon's native fallback
        // gets everything. Both must decide the same.
        let mut snap = busy_guests_on_cpu0(6, 4);
        snap.domains[0].memory.usable_kib = Some(100);
        let partial = vm_balancer_sdk::builder::as_read_by::<CpuPolicy>(&snap);
        assert_ne!(partial, snap, "something was skipped");
        let full = CpuPolicy::default().decide(&snap).unwrap();
        assert!(!full.is_empty());
        assert_eq!(CpuPolicy::default().decide(&partial).unwrap(), full);
    }

    /// Applies the pins to the snapshot as a host would (demands constant).
    fn apply(snap: &mut Snapshot, actions: &[Action]) -> usize {
        let mut pins = 0;
        for a in actions {
            if let Action::Pin { domain, vcpu, cpus, .. } = a {
                let d = snap.domains.iter_mut().find(|d| &d.name == domain).expect("a known domain");
                let v = d.vcpus.iter_mut().find(|v| v.id == *vcpu).expect("a known vCPU");
                if v.affinity.as_slice() != cpus.as_slice() {
                    pins += 1;
                }
                v.affinity = cpus.iter().copied().collect();
                v.cpu = cpus[0];
            }
        }
        pins
    }

    fn busiest(snap: &Snapshot) -> f32 {
        let mut load = vec![0.0f32; snap.host.cpus.len()];
        for v in snap.domains.iter().flat_map(|d| &d.vcpus) {
            load[v.cpu as usize] += v.demand();
        }
        load.into_iter().fold(0.0, f32::max)
    }

    /// Runs the policy on `snap` for `quanta` quanta; returns the busiest
    /// pCPU's load after each quantum's pins, and the pins of each.
    fn closed_loop(mut snap: Snapshot, quanta: u64) -> (Vec<f32>, Vec<usize>, Snapshot) {
        let mut policy = CpuPolicy::default();
        let (mut loads, mut pins) = (Vec::new(), Vec::new());
        for q in 0..quanta {
            snap.quantum = q;
            let actions = policy.decide(&snap).unwrap();
            pins.push(apply(&mut snap, &actions));
            loads.push(busiest(&snap));
        }
        (loads, pins, snap)
    }

    /// Demands `(domain, demand)` at pinned pCPUs; `usage` 0 and the rest
    /// as steal, so no host work is inferred.
    fn host(cpus: u32, vcpus: &[(u32, f32, u32)]) -> SnapshotBuilder {
        let mut b = SnapshotBuilder::new(cpus, 64 << 20);
        let domains = vcpus.iter().map(|v| v.0).max().map_or(0, |m| m + 1);
        for d in 0..domains {
            let mut db = DomainBuilder::new(&format!("vm{d}"));
            for &(_, demand, cpu) in vcpus.iter().filter(|v| v.0 == d) {
                db = db.vcpu_with_steal(cpu, 0.0, demand);
            }
            b = b.domain(db);
        }
        b
    }

    #[test]
    fn the_issues_stall_family_reaches_the_optimum_within_three_quanta_on_every_seed() {
        use rand::{Rng, SeedableRng};
        // 4 pCPUs, 4 heavy (1.0) and 4 light (0.5) one-vCPU VMs placed at
        // random: the best placement is 1.5 on every pCPU.
        for seed in 1..=40u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let vcpus: Vec<(u32, f32, u32)> = (0..8).map(|i| (i, if i < 4 { 1.0 } else { 0.5 }, rng.gen_range(0..4))).collect();
            let (loads, pins, _) = closed_loop(host(4, &vcpus).build(), 13);
            assert!((loads[2] - 1.5).abs() < 1e-5, "seed {seed}: busiest {loads:?}");
            assert_eq!(pins[3..].iter().sum::<usize>(), 0, "seed {seed}: no pins once there: {pins:?}");
        }
    }

    #[test]
    fn the_issues_stalls_a_and_b_are_left() {
        // (A) a 1-for-2 exchange: {0.2 × 4} and {0.6, 0.6} on 2 pCPUs.
        let a: Vec<(u32, f32, u32)> = vec![(0, 0.2, 0), (1, 0.2, 0), (2, 0.2, 0), (3, 0.2, 0), (4, 0.6, 1), (5, 0.6, 1)];
        let (loads, _, _) = closed_loop(host(2, &a).build(), 3);
        assert!((loads[0] - 1.0).abs() < 1e-5, "(A): {loads:?}");
        // (B) a chain over three pCPUs: {L,L,L}, {H,H}, {H}.
        let b: Vec<(u32, f32, u32)> = vec![(0, 0.5, 0), (1, 0.5, 0), (2, 0.5, 0), (3, 1.0, 1), (4, 1.0, 1), (5, 1.0, 2)];
        let (loads, _, _) = closed_loop(host(3, &b).build(), 3);
        assert!((loads[0] - 1.5).abs() < 1e-5, "(B): {loads:?}");
        // (C) the useful partner is the busiest-but-one of many pCPUs: 8
        // pCPUs at 0.9 with a 0.5 and a 0.4 each, and one at 1.4 holding
        // 0.5 + 0.9; the least loaded are all 0.9.
        let mut c: Vec<(u32, f32, u32)> = Vec::new();
        for cpu in 0..8u32 {
            c.push((2 * cpu, 0.5, cpu));
            c.push((2 * cpu + 1, 0.4, cpu));
        }
        c.push((16, 0.5, 8));
        c.push((17, 0.9, 8));
        let (loads, _, _) = closed_loop(host(9, &c).build(), 3);
        let demands: Vec<f64> = c.iter().map(|v| f64::from(v.1)).collect();
        let best = vm_balancer_sdk::makespan::best_placement(&demands, 9, 1_000_000);
        assert!(best.proven_optimal);
        assert!(f64::from(loads[2]) <= best.makespan + 1e-5, "(C): {loads:?} against {}", best.makespan);
    }

    #[test]
    fn a_first_plan_cut_by_the_budget_is_finished_on_a_lightly_loaded_host() {
        use rand::{Rng, SeedableRng};
        // Small vCPUs (0.02-0.08) over 16 pCPUs, all on the first two: the
        // first plan needs more moves than a quantum's budget, and what is
        // left gains less than the margin (0.05 CPU). It is finished anyway.
        for seed in 1..=20u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let vcpus: Vec<(u32, f32, u32)> = (0..40).map(|i| (i / 4, rng.gen_range(0.02..0.08), rng.gen_range(0..2))).collect();
            let (loads, pins, _) = closed_loop(host(16, &vcpus).build(), 8);
            assert!(pins[0] < pins.iter().sum::<usize>(), "seed {seed}: the budget cut the first plan: {pins:?}");
            let demands: Vec<f64> = vcpus.iter().map(|v| f64::from(v.1)).collect();
            let best = vm_balancer_sdk::makespan::best_placement(&demands, 16, 200_000);
            assert!(f64::from(loads[2]) <= best.makespan * 1.05 + 1e-5, "seed {seed}: {loads:?} against {}", best.makespan);
            // Siblings sharing a pCPU are spread once their cooldown ends.
            assert_eq!(pins[5..].iter().sum::<usize>(), 0, "seed {seed}: {pins:?}");
        }
    }

    #[test]
    fn everything_on_one_pcpu_of_a_large_host_spreads_within_two_quanta() {
        let vcpus: Vec<(u32, f32, u32)> = (0..512).map(|i| (i, 0.1 + (i % 9) as f32 / 10.0, 0)).collect();
        let (loads, pins, _) = closed_loop(host(256, &vcpus).build(), 6);
        let total: f32 = vcpus.iter().map(|v| v.1).sum();
        let lower = (total / 256.0).max(0.9);
        assert!(loads[1] <= lower * 1.05, "{loads:?} against the lower bound {lower}");
        assert_eq!(pins[3..].iter().sum::<usize>(), 0, "{pins:?}");
    }

    #[test]
    fn once_within_five_percent_of_the_best_no_plan_follows() {
        use rand::{Rng, SeedableRng};
        // Multi-vCPU VMs (siblings to spread) with constant demand, from
        // random, all-on-one and round-robin pins, on 16 to 256 pCPUs. Once
        // the busiest pCPU is within 5 % of the best placement found, the
        // host has converged: no plan moves anything after that, not
        // even the rest of a target the per-quantum budget cut short (it
        // would gain less than the hysteresis ever starts a plan for). Only
        // siblings left sharing a pCPU may still be spread, where cooldown
        // or room held them back, and few.
        // The quality bench's families: about 2 vCPUs a pCPU, each VM's
        // vCPUs alike, demand uniform, bimodal or a few giants.
        for seed in 1..=3u64 {
            for (cpus, per_vm) in [(16u32, 4u32), (64, 2), (64, 4), (256, 2), (256, 4)] {
                for (mix, pins) in
                    ["uniform", "bimodal", "giants"].into_iter().flat_map(|m| ["random", "first", "round-robin"].map(|p| (m, p)))
                {
                    let case = format!("seed {seed}, {cpus} pCPUs, {per_vm} vCPUs/VM, {mix}, {pins}");
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ u64::from(cpus) << 32 ^ u64::from(per_vm) << 48);
                    let vms = (2 * cpus).div_ceil(per_vm);
                    let mut vcpus: Vec<(u32, f32, u32)> = Vec::new();
                    for vm in 0..vms {
                        let demand = match mix {
                            "uniform" => rng.gen_range(0.05..0.75),
                            "bimodal" if rng.gen_bool(0.35) => rng.gen_range(0.8..1.0),
                            "bimodal" => rng.gen_range(0.1..0.3),
                            _ if rng.gen_bool(0.1) => 1.0,
                            _ => rng.gen_range(0.02..0.25),
                        };
                        for _ in 0..per_vm {
                            let i = vcpus.len() as u32;
                            let cpu = match pins {
                                "random" => rng.gen_range(0..cpus),
                                "first" => 0,
                                _ => i % cpus,
                            };
                            vcpus.push((vm, demand, cpu));
                        }
                    }
                    let n = vcpus.len();
                    let demands: Vec<f64> = vcpus.iter().map(|v| f64::from(v.1)).collect();
                    let best = vm_balancer_sdk::makespan::best_placement(&demands, cpus as usize, 100_000).makespan as f32;
                    let mut snap = host(cpus, &vcpus).build();
                    let mut policy = CpuPolicy::default();
                    let mut within_at = None;
                    let mut late_spreads = 0;
                    for q in 0..12u64 {
                        snap.quantum = q;
                        let actions = policy.decide(&snap).unwrap();
                        if within_at.is_some() {
                            for a in &actions {
                                if let Action::Pin { reason, .. } = a {
                                    assert!(reason.starts_with("spread"), "{case}: quantum {q} after convergence at {within_at:?}: {a:?}");
                                    late_spreads += 1;
                                }
                            }
                        }
                        apply(&mut snap, &actions);
                        if within_at.is_none() && busiest(&snap) <= best * 1.05 + 1e-5 {
                            within_at = Some(q);
                        }
                    }
                    let at = within_at.unwrap_or_else(|| panic!("{case}: never within 5 % of {best}"));
                    assert!(at <= 3, "{case}: within 5 % of the best only at quantum {at}");
                    assert!(late_spreads * 50 <= n.max(100), "{case}: {late_spreads} siblings spread after convergence");
                }
            }
        }
    }

    #[test]
    fn a_vms_vcpus_spread_over_distinct_pcpus_where_it_costs_nothing() {
        // Two 2-vCPU VMs, each VM's vCPUs sharing a pCPU: balanced already,
        // but each guest competes with itself.
        let vcpus = [(0, 0.5, 0), (0, 0.5, 0), (1, 0.5, 1), (1, 0.5, 1)];
        let (loads, pins, snap) = closed_loop(host(2, &vcpus).build(), 4);
        for d in &snap.domains {
            assert_ne!(d.vcpus[0].cpu, d.vcpus[1].cpu, "{}: {loads:?}", d.name);
        }
        assert!((loads[3] - 1.0).abs() < 1e-5);
        assert_eq!(pins[1..].iter().sum::<usize>(), 0, "{pins:?}");
        // Where spreading would raise the busiest pCPU, it does not.
        let vcpus = [(0, 0.9, 0), (0, 0.1, 0), (1, 0.95, 1)];
        let (_, pins, _) = closed_loop(host(2, &vcpus).build(), 3);
        assert_eq!(pins.iter().sum::<usize>(), 0, "{pins:?}");
    }

    fn two_nodes(mut snap: Snapshot) -> Snapshot {
        let half = snap.host.cpus.len() as u32 / 2;
        for c in &mut snap.host.cpus {
            c.node = u32::from(c.id >= half);
        }
        snap
    }

    fn spanning(snap: &Snapshot) -> usize {
        let half = snap.host.cpus.len() as u32 / 2;
        snap.domains.iter().filter(|d| d.vcpus.iter().any(|v| v.cpu < half) && d.vcpus.iter().any(|v| v.cpu >= half)).count()
    }

    #[test]
    fn vms_stay_on_one_numa_node_within_the_slack() {
        // 4 pCPUs on 2 nodes; two 2-vCPU VMs each split across the nodes.
        // Gathering each VM on one node costs nothing.
        let vcpus = [(0, 0.5, 0), (0, 0.5, 2), (1, 0.5, 1), (1, 0.5, 3)];
        let (loads, pins, snap) = closed_loop(two_nodes(host(4, &vcpus).build()), 5);
        assert_eq!(spanning(&snap), 0, "{loads:?} {pins:?}");
        assert!((loads[4] - 0.5).abs() < 1e-5, "{loads:?}");
        assert_eq!(pins[2..].iter().sum::<usize>(), 0, "{pins:?}");
        // One 4-vCPU VM of 0.9s: on one node it would need 1.8 against
        // 0.9, far beyond the 10 % slack, so it stays spread.
        let vcpus = [(0, 0.9, 0), (0, 0.9, 1), (0, 0.9, 2), (0, 0.9, 3)];
        let (loads, pins, snap) = closed_loop(two_nodes(host(4, &vcpus).build()), 3);
        assert_eq!(spanning(&snap), 1);
        assert_eq!(pins.iter().sum::<usize>(), 0, "{loads:?}");
    }

    /// 16 one-vCPU VMs on 8 pCPUs whose demands jump by up to 0.2 CPU a
    /// quantum (a random walk in [0.1, 1.0], as `churn`'s guests): the
    /// pins made and the mean busiest pCPU over 80 quanta.
    fn jumpy_host(noise_factor: f64, seed: u64) -> (usize, f32) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let vcpus: Vec<(u32, f32, u32)> = (0..16).map(|i| (i, rng.gen_range(0.1..1.0), rng.gen_range(0..8))).collect();
        let cpu =
            vm_balancer_sdk::Param::Map([("noise_factor".to_string(), vm_balancer_sdk::Param::Float(noise_factor))].into_iter().collect());
        let mut snap = host(8, &vcpus).param("cpu", cpu).build();
        let mut policy = CpuPolicy::default();
        let (mut pins, mut busiest_sum) = (0, 0.0);
        for q in 0..80 {
            snap.quantum = q;
            for d in &mut snap.domains {
                for v in &mut d.vcpus {
                    let steal = v.steal.unwrap_or(0.0) + rng.gen_range(-0.2f32..0.2);
                    v.steal = Some(steal.clamp(0.1, 1.0));
                }
            }
            let actions = policy.decide(&snap).unwrap();
            pins += apply(&mut snap, &actions);
            busiest_sum += busiest(&snap);
        }
        (pins, busiest_sum / 80.0)
    }

    /// With the busiest pCPU at its best, demand above capacity is still
    /// served: 40 vCPUs of 0.84 on 32 pCPUs must double 8 pCPUs (1.68),
    /// but a placement that doubles 12 and leaves 4 idle serves 2.7 CPUs
    /// less. No plan lowered the busiest pCPU, so none was taken (a
    /// random scenario of `examples/scenarios/sweep.py`, seed 94: 19.9 %
    /// of the demand unserved against classic's 15.7 %).
    #[test]
    fn with_the_busiest_at_its_best_idle_pcpus_take_doubled_vcpus() {
        // 20 VMs of 2 vCPUs: pCPUs 0-11 hold 2 vCPUs of different VMs,
        // pCPUs 12-27 one each, 28-31 none.
        let vcpus: Vec<(u32, f32, u32)> = (0..40u32).map(|i| (i / 2, 0.84, if i < 24 { (i + 1) % 24 / 2 } else { i - 12 })).collect();
        let snap = host(32, &vcpus).build();
        let overloaded = |s: &Snapshot| {
            let mut load = [0.0f32; 32];
            for v in s.domains.iter().flat_map(|d| &d.vcpus) {
                load[v.cpu as usize] += v.demand();
            }
            load.iter().filter(|l| **l > 1.0).count()
        };
        assert_eq!(overloaded(&snap), 12);
        let (loads, pins, snap) = closed_loop(snap, 4);
        assert_eq!(overloaded(&snap), 8, "busiest {loads:?}, pins {pins:?}");
        assert!((busiest(&snap) - 1.68).abs() < 1e-3, "the busiest stays at its best: {loads:?}");
        assert_eq!(pins.iter().sum::<usize>(), 4, "one vCPU to each idle pCPU: {pins:?}");
    }

    /// A step of demand is not noise; demand that moves every quantum is.
    /// (The smoothed mean of raw changes read a step of 2 CPUs on one of
    /// two pCPUs as 0.62 CPU of noise, a margin of 1.24 that held the plan
    /// back for 5 quanta.)
    #[test]
    fn a_step_of_demand_is_not_noise_a_jump_every_quantum_is() {
        let usable = [0, 1];
        let mut quiet = Noise::default();
        let mut load = [0.21f32, 0.47];
        for _ in 0..10 {
            quiet.observe(&usable, &load);
            quiet.expect(&usable, &load);
        }
        load = [2.29, 0.35];
        for q in 0..10 {
            let noise = quiet.observe(&usable, &load);
            assert!(noise < 0.05, "quantum {q} after the step: noise {noise}");
            quiet.expect(&usable, &load);
        }
        let mut jumpy = Noise::default();
        let mut noise = 0.0;
        for q in 0..20 {
            let swing = if q % 2 == 0 { 0.3 } else { -0.3 };
            let load = [0.8 + swing, 0.8 - swing];
            noise = jumpy.observe(&usable, &load);
            jumpy.expect(&usable, &[0.8, 0.8]);
        }
        assert!(noise > 0.25, "a swing of 0.3 every quantum: noise {noise}");
    }

    /// On 2 pCPUs, one pCPU whose load swings is not the host's noise: its
    /// swing would hold back the very plan that parts what swings.
    #[test]
    fn one_swinging_pcpu_of_two_is_not_the_hosts_noise() {
        let usable = [0, 1];
        let mut noise = Noise::default();
        let mut last = 0.0;
        for q in 0..20 {
            let load = [0.8, if q % 2 == 0 { 2.5 } else { 2.0 }];
            last = noise.observe(&usable, &load);
            noise.expect(&usable, &load);
        }
        assert!(last < 0.05, "one pCPU of two swinging by 0.5: noise {last}");
    }

    #[test]
    fn jumpy_demand_raises_the_margin_and_cuts_the_churn_not_the_balance() {
        let (mut total_off, mut total_on) = (0, 0);
        for seed in 1..=5 {
            let (pins_off, busiest_off) = jumpy_host(0.0, seed);
            let (pins_on, busiest_on) = jumpy_host(2.0, seed);
            total_off += pins_off;
            total_on += pins_on;
            // Measured (seeds 1-5): a busiest pCPU 0-1.3 % higher. With
            // the margin alone, and with the noise read as the upper
            // median of the pCPUs' changes, 2.9-5 % (seed 3).
            assert!(busiest_on <= busiest_off * 1.025, "seed {seed}: busiest {busiest_on} with the noise margin, {busiest_off} without");
        }
        // Measured: 854 pins against 1,215 (70 %).
        assert!(total_on * 100 <= total_off * 75, "{total_on} pins with the noise margin, {total_off} without");
    }

    #[test]
    fn a_set_move_cap_holds_and_never_raises_the_busiest() {
        let vcpus: Vec<(u32, f32, u32)> = (0..40).map(|i| (i, 0.25, 0)).collect();
        let cpu = vm_balancer_sdk::Param::Map([("max_moves".to_string(), vm_balancer_sdk::Param::Int(3))].into_iter().collect());
        let snap = host(8, &vcpus).param("cpu", cpu).build();
        let (loads, pins, _) = closed_loop(snap, 12);
        assert!(pins.iter().all(|p| *p <= 3), "{pins:?}");
        assert!(loads.windows(2).all(|w| w[1] <= w[0] + 1e-5), "{loads:?}");
    }

    #[test]
    fn random_and_hostile_snapshots_give_valid_pins_only() {
        use rand::{Rng, SeedableRng};
        // Odd demands (NaN, infinite, negative, huge), offline and reserved
        // CPUs, affinities to CPUs that do not exist, big VMs crowded on one
        // pCPU, odd params: decide never panics, pins only usable CPUs, and
        // pins each vCPU at most once a quantum.
        for seed in 0..300u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let cpus = rng.gen_range(1..=40u32);
            let mut b = SnapshotBuilder::new(cpus, 64 << 20);
            for c in 0..cpus {
                if rng.gen_bool(0.1) {
                    b = b.reserve_cpu(c);
                }
            }
            let odd = [f32::NAN, f32::INFINITY, -1.0, 1e30, 0.0, 1e-9];
            for d in 0..rng.gen_range(0..30) {
                let mut db = DomainBuilder::new(&format!("vm{d}"));
                let crowd = rng.gen_bool(0.2);
                for _ in 0..rng.gen_range(1..=if crowd { 40 } else { 4 }) {
                    let cpu = if crowd { 0 } else { rng.gen_range(0..cpus + 2) };
                    let demand = if rng.gen_bool(0.05) { odd[rng.gen_range(0..odd.len())] } else { rng.gen_range(0.0f32..1.0) };
                    db = db.vcpu_with_steal(cpu, 0.0, demand);
                }
                b = b.domain(db);
            }
            let mut cpu_params = std::collections::BTreeMap::new();
            if rng.gen_bool(0.3) {
                cpu_params.insert("min_gain".to_string(), vm_balancer_sdk::Param::Float(rng.gen_range(-1.0..1.0)));
                cpu_params.insert("converge_quanta".to_string(), vm_balancer_sdk::Param::Int(rng.gen_range(-3..5)));
                cpu_params.insert("numa_slack_pct".to_string(), vm_balancer_sdk::Param::Float(rng.gen_range(-10.0..1e9)));
            }
            let mut snap = b.param("cpu", vm_balancer_sdk::Param::Map(cpu_params)).build();
            for c in &mut snap.host.cpus {
                if rng.gen_bool(0.1) {
                    c.online = false;
                }
                c.node = rng.gen_range(0..3);
            }
            let mut policy = CpuPolicy::default();
            for q in 0..3 {
                snap.quantum = q;
                let actions = policy.decide(&snap).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                let mut seen = std::collections::BTreeSet::new();
                for a in &actions {
                    let Action::Pin { domain, vcpu, cpus, .. } = a else { continue };
                    assert!(seen.insert((domain.clone(), *vcpu)), "seed {seed}: {domain}/{vcpu} pinned twice: {actions:?}");
                    assert_eq!(cpus.len(), 1, "seed {seed}");
                    let c = snap.host.cpus.iter().find(|c| c.id == cpus[0]).unwrap_or_else(|| panic!("seed {seed}: no CPU {}", cpus[0]));
                    assert!(c.online && !c.reserved, "seed {seed}: pin onto an unusable CPU {}", c.id);
                }
                apply(&mut snap, &actions);
            }
        }
    }

    #[test]
    fn a_small_move_cap_still_makes_progress_on_tied_busiest_pcpus() {
        // Six pCPUs tied at 1.0 (two vCPUs of 0.5 each) and six idle ones,
        // with one move a quantum: no single move lowers the maximum, but
        // each leaves one tied pCPU fewer at the top, so the host still
        // converges (to 0.5 everywhere) instead of stalling.
        let mut vcpus: Vec<(u32, f32, u32)> = Vec::new();
        for cpu in 0..6u32 {
            vcpus.push((2 * cpu, 0.5, cpu));
            vcpus.push((2 * cpu + 1, 0.5, cpu));
        }
        let cpu = vm_balancer_sdk::Param::Map([("max_moves".to_string(), vm_balancer_sdk::Param::Int(1))].into_iter().collect());
        let (loads, pins, _) = closed_loop(host(12, &vcpus).param("cpu", cpu).build(), 12);
        assert!(pins.iter().all(|p| *p <= 1), "{pins:?}");
        assert!((loads[11] - 0.5).abs() < 1e-5, "{pins:?} {loads:?}");
        assert!(loads.windows(2).all(|w| w[1] <= w[0] + 1e-5), "{loads:?}");
    }
}
