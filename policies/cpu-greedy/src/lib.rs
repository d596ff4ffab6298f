//! **The previous default CPU policy, kept for comparison**: `cargo bench
//! --bench quality` runs it natively beside the default and `classic`, and
//! `cargo build --release --target wasm32-wasip2 -p vmb-policy-cpu-greedy`
//! builds it as a component for `vm-balancer simulate --policy` (the
//! README's shipped-scenario comparison). Not built into the daemon.
//! It is a greedy local search from the current placement, which issue 12
//! replaced with plan-then-move (`policies/cpu`): on constant demands it can
//! stop for good in a local optimum (a 1-for-2 exchange needed, a chain over
//! three pCPUs, a partner outside the four least-loaded pCPUs it tries).
//!
//! The default CPU policy: pins vCPUs so that the busiest pCPU is as close as
//! possible to the lower bound `max(total demand / CPUs, largest vCPU demand)`.
//!
//! It generalises the original busiest/freest swap to any number of CPUs:
//! - **Demand, not usage.** A vCPU's demand is `usage + steal`; usage alone
//!   hides what a vCPU sharing a pCPU wanted, which is why the original stalled
//!   at 3/1 with four busy guests on two pCPUs.
//! - **Greedy, improving moves only (irqbalance's rule).** From the busiest
//!   pCPU, try moving one vCPU to, or swapping it with one on, the least-loaded
//!   pCPUs. A move is taken only if the pair's larger load drops by at least
//!   `max(cpu.min_gain, cpu.min_gain_pct % of the demand moved)`. Each move lowers the sorted load vector, so the
//!   loop ends, and noise below `min_gain` never flaps a vCPU back and forth.
//! - **Several moves per quantum** (`cpu.max_moves`, default a quarter of the
//!   CPUs, at least 2) so a large host converges in a few quanta, and a
//!   per-vCPU cooldown (`cpu.cooldown_quanta`) so nothing moves every quantum.
//! - **Unpinned vCPUs are pinned where they run** (the original did this at
//!   start), so the hypervisor does not move them behind the policy's back.
#![deny(missing_docs)]

use rustc_hash::FxHashMap;

use vm_balancer_sdk::{export_policy, Action, Info, Policy, Reads, Snapshot};

/// Tunables, read from `[params.cpu]` each quantum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuParams {
    /// Minimum drop of the busier pCPU's load, in CPUs, for a move to be worth it.
    pub min_gain: f32,
    /// The same, relative to the demand a move or swap shifts (percent):
    /// demand estimates are noisy in proportion to their size, so swapping
    /// two big vCPUs needs a larger gain than moving a small one.
    pub min_gain_pct: f32,
    /// Moves per quantum; 0 means `max(2, cpus / 4)`.
    pub max_moves: usize,
    /// Quanta a moved vCPU is left alone.
    pub cooldown_quanta: u64,
    /// vCPUs below this demand are never moved (they cannot matter).
    pub ignore_below: f32,
}

impl CpuParams {
    /// Reads the parameters, with defaults.
    pub fn from_snapshot(s: &Snapshot) -> Self {
        CpuParams {
            min_gain: s.param_f64("cpu.min_gain", 0.05) as f32,
            min_gain_pct: s.param_f64("cpu.min_gain_pct", 5.0) as f32,
            max_moves: s.param_f64("cpu.max_moves", 0.0).max(0.0) as usize,
            cooldown_quanta: s.param_f64("cpu.cooldown_quanta", 3.0).max(0.0) as u64,
            ignore_below: s.param_f64("cpu.ignore_below", 0.02) as f32,
        }
    }
}

/// The default CPU policy. State: when each vCPU was last moved.
#[derive(Default, Debug)]
pub struct CpuPolicy {
    /// Domain → (vCPU, quantum it was last moved). Keyed by name so the hot
    /// path looks up with a borrowed `&str` instead of cloning a String per vCPU.
    /// (FxHash: the keys are the daemon's domain names, not attacker-chosen,
    /// and SipHash was a visible share of a 1,000-domain quantum in wasm.)
    last_moved: FxHashMap<String, Vec<(u32, u64)>>,
    /// Per-CPU candidate lists, kept between quanta only for their memory:
    /// refilling them allocates nothing on a steady host.
    on_cpu: Vec<Vec<(f32, usize)>>,
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
        Info { name: "cpu-greedy", version: env!("CARGO_PKG_VERSION"), cpu: true, memory: false }
    }

    fn decide(&mut self, snap: &Snapshot) -> Result<Vec<Action>, String> {
        let params = CpuParams::from_snapshot(snap);
        let usable: Vec<u32> = snap.usable_cpus().map(|c| c.id).collect();
        if usable.is_empty() {
            return Ok(Vec::new());
        }
        let slots = SlotIndex::new(&usable);
        self.last_moved.retain(|_, moves| {
            moves.retain(|(_, q)| snap.quantum.saturating_sub(*q) < params.cooldown_quanta);
            !moves.is_empty()
        });
        let mut load = background_load(snap, &slots, usable.len());
        let (mut items, unpinned) = self.items(snap, &slots, &mut load, &params);
        let budget = if params.max_moves == 0 { (usable.len() / 4).max(2) } else { params.max_moves };
        let gain = Gain { min: params.min_gain, ratio: params.min_gain_pct / 100.0 };
        let moves = plan_moves(&mut items, &mut load, &mut self.on_cpu, budget, gain);
        Ok(self.actions(snap, &usable, &items, &unpinned, moves))
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
    for v in snap.domains.iter().flat_map(|d| &d.vcpus) {
        if let Some(i) = slots.get(v.cpu) {
            vcpu_usage[i] += v.usage;
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

/// Plans at most `budget` improving moves or swaps; mutates homes and loads.
/// Returns (item index, reason) for each vCPU whose home changed.
///
/// `on_cpu` is scratch: per CPU, the (demand, item) of its *movable* vCPUs,
/// in item order. Only movable vCPUs can be candidates and a moved vCPU is
/// not movable again this quantum, so the lists hold exactly the candidates,
/// contiguous, and the inner loops never look anything up.
#[inline(never)]
fn plan_moves(
    items: &mut [Item],
    load: &mut [f32],
    on_cpu: &mut Vec<Vec<(f32, usize)>>,
    budget: usize,
    gain: Gain,
) -> Vec<(usize, String)> {
    let ncpu = load.len();
    let mut moved: Vec<(usize, String)> = Vec::new();
    if ncpu < 2 {
        return moved;
    }
    let mean = load.iter().sum::<f32>() / ncpu as f32;
    // The loop below stops at once when even the busiest CPU is within
    // `min_gain` of the mean (a balanced host): say so before building anything.
    if load.iter().copied().max_by(f32::total_cmp).is_some_and(|busiest| busiest <= mean + gain.min) {
        return moved;
    }
    fill_candidates(items, on_cpu, ncpu);
    // Sources that cannot be improved are skipped for the rest of the quantum.
    let mut stuck = vec![false; ncpu];
    let mut by_load = ByLoad::new(load);
    // The busiest CPUs already found stuck (a host of lone vCPUs would
    // otherwise cost a scan per stuck CPU); back to 0 when a move reorders.
    let mut skipped = 0;
    const DESTINATIONS: usize = 4;
    while moved.len() < budget {
        let Some(src) = by_load.busiest(&mut skipped, |c| !stuck[c]) else {
            break;
        };
        if load[src] <= mean + gain.min {
            break;
        }
        if on_cpu[src].is_empty() {
            // Nothing movable here (all cooling down or negligible): no need
            // to look for destinations. On a host where the hot CPUs' vCPUs
            // all moved recently this skips a CPU-count-squared scan.
            stuck[src] = true;
            continue;
        }
        let a = load[src];
        let slack = 1e-4 * a.abs().max(1.0);
        let mut best: Option<Candidate> = None;
        for dst in by_load.least_loaded(src, DESTINATIONS) {
            // A move or swap between two CPUs keeps their sum, so the
            // larger of the two ends at least at the mean; destinations come
            // least loaded first, so later ones cannot do better either.
            let pair = Pair::new(a, load[dst], slack, gain);
            if pair.floor >= best.map_or(a - gain.min, |x| x.score) {
                break;
            }
            if let Some((score, item, swap)) = pair.best(&on_cpu[src], &on_cpu[dst], best.map(|x| x.score)) {
                best = Some(Candidate { score, item, swap, dst });
            }
        }
        match best {
            Some(Candidate { score, item, swap, dst }) => {
                let before = load[src];
                by_load.take_out(load, [src, dst]);
                relocate(items, load, on_cpu, item, dst);
                if let Some(j) = swap {
                    relocate(items, load, on_cpu, j, src);
                    moved.push((j, format!("swap: busiest pCPU load {} -> {}", Hundredths(before), Hundredths(score))));
                }
                moved.push((item, format!("busiest pCPU load {} -> {}", Hundredths(before), Hundredths(score))));
                by_load.put_back(load, [src, dst]);
                skipped = 0;
            }
            None => stuck[src] = true,
        }
    }
    moved
}

/// Refills `on_cpu`: per CPU, the (demand, item) of its movable vCPUs, in
/// item order. (Out of line: see the note on `impl CpuPolicy`.)
#[inline(never)]
fn fill_candidates(items: &[Item], on_cpu: &mut Vec<Vec<(f32, usize)>>, ncpu: usize) {
    on_cpu.iter_mut().for_each(Vec::clear);
    on_cpu.resize_with(ncpu, Vec::new);
    for (i, it) in items.iter().enumerate().filter(|(_, it)| it.movable) {
        on_cpu[it.home].push((it.demand, i));
    }
}

/// How much a move must gain: the busier CPU's load must drop by at least
/// `max(min, ratio × the demand moved)`, since demand estimates are noisy in
/// proportion to their size.
#[derive(Clone, Copy)]
struct Gain {
    min: f32,
    ratio: f32,
}

impl Gain {
    #[inline(always)]
    fn required(self, moved: f32) -> f32 {
        larger(self.min, self.ratio * moved)
    }
}

/// The best move or swap found so far for the busiest CPU.
#[derive(Clone, Copy)]
struct Candidate {
    /// The larger of the two CPUs' loads after it.
    score: f32,
    item: usize,
    /// The item sent back the other way, for a swap.
    swap: Option<usize>,
    dst: usize,
}

/// A source CPU at load `a` and a destination at load `b`.
#[derive(Clone, Copy)]
struct Pair {
    a: f32,
    b: f32,
    /// `(a + b) / 2 - slack`: no move or swap between them ends below it.
    floor: f32,
    slack: f32,
    gain: Gain,
}

impl Pair {
    fn new(a: f32, b: f32, slack: f32, gain: Gain) -> Self {
        Pair { a, b, floor: (a + b) / 2.0 - slack, slack, gain }
    }

    /// The best move of one of `on_src`'s vCPUs to the destination, or
    /// swap of one with a smaller one of `on_dst`'s, if it beats `best`
    /// (a score) and gains enough. Returns (score, item, swap item). Ties
    /// keep the earlier candidate.
    ///
    /// Pruning never changes the answer: a candidate replaces the best only
    /// with a strictly lower score, and any accepted score is below
    /// `a - gain.min`. Bounds are lowered by `slack` so float rounding can
    /// never make a skipped candidate the better one.
    ///
    /// Out of line, and taking plain numbers, so that its loops keep their
    /// values in registers (see the note on `impl CpuPolicy`).
    #[inline(never)]
    fn best(self, on_src: &[(f32, usize)], on_dst: &[(f32, usize)], best: Option<f32>) -> Option<(f32, usize, Option<usize>)> {
        let Pair { a, b, floor, slack, gain } = self;
        let mut found = None;
        let mut bar = best.unwrap_or(a - gain.min);
        let mut any = best.is_some();
        for &(d, i) in on_src {
            // Moving i, or swapping it for something no bigger, leaves src at ≥ a - d.
            if larger(a - d - slack, floor) >= bar {
                continue;
            }
            let score = larger(a - d, b + d);
            if score < a - gain.required(d) && (!any || score < bar) {
                (found, bar, any) = (Some((score, i, None)), score, true);
            }
            let swap_score = |e: f32| larger(a - d + e, b - e + d);
            let beats = |e: f32, score: f32, any: bool, bar: f32| e < d && score < a - gain.required(d + e) && (!any || score < bar);
            // Four at a time, tested against the bar as it stands, then one
            // by one only where one of the four beats it (the bar only
            // falls, so that second test is the stricter). A quarter of the
            // loop headers: in wasm each is an interruption check that
            // sends the loop's values to the stack.
            for quad in on_dst.chunks(4) {
                if !quad.iter().any(|&(e, _)| beats(e, swap_score(e), any, bar)) {
                    continue;
                }
                for &(e, j) in quad {
                    let score = swap_score(e);
                    if beats(e, score, any, bar) {
                        (found, bar, any) = (Some((score, i, Some(j))), score, true);
                    }
                }
            }
        }
        found
    }
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

/// CPU indexes ordered by (load, index), kept sorted as loads change: the
/// busiest is last, the least loaded first. Sorting once and repositioning
/// the two CPUs a move touches replaces two scans of every CPU per move.
/// The order is the one `max_by`/`min_by` with `total_cmp` would give
/// (ties: the higher index counts as busier), so decisions do not change.
struct ByLoad {
    order: Vec<usize>,
}

impl ByLoad {
    fn new(load: &[f32]) -> Self {
        // Sorted as plain integers: a comparator that looks loads up was
        // most of a small host's quantum in wasm.
        let mut keys: Vec<u64> = (0..load.len()).map(|cpu| Self::key(load, cpu)).collect();
        keys.sort_unstable();
        ByLoad { order: keys.into_iter().map(|k| (k & u64::from(u32::MAX)) as usize).collect() }
    }

    /// The order's one definition: (load in `total_cmp` order, index),
    /// packed so that plain integer order is it.
    fn key(load: &[f32], cpu: usize) -> u64 {
        u64::from(total_order_key(load[cpu])) << 32 | cpu as u64
    }

    /// The busiest CPU that `eligible` accepts. `skipped` counts the
    /// busiest CPUs already known to be rejected: the search starts below
    /// them and counts the ones it rejects, so a caller whose rejections
    /// stand looks at each CPU once, not once per call. The caller sets it
    /// back to 0 when the order changes.
    fn busiest(&self, skipped: &mut usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self.order.iter().rev().skip(*skipped).position(|c| eligible(*c)) {
            Some(rejected) => {
                *skipped += rejected;
                Some(self.order[self.order.len() - 1 - *skipped])
            }
            None => {
                *skipped = self.order.len();
                None
            }
        }
    }

    /// Up to `k` least-loaded CPUs other than `skip`, least loaded first.
    fn least_loaded(&self, skip: usize, k: usize) -> impl Iterator<Item = usize> + '_ {
        self.order.iter().copied().filter(move |c| *c != skip).take(k)
    }

    /// Takes `cpus` out of the order, before their loads change. Each is
    /// found by binary search on its (still current) load: a move costs
    /// two searches and two block copies instead of a pass over every CPU.
    fn take_out<const N: usize>(&mut self, load: &[f32], cpus: [usize; N]) {
        for cpu in cpus {
            let at = self.order.partition_point(|c| Self::key(load, *c) < Self::key(load, cpu));
            debug_assert_eq!(self.order.get(at), Some(&cpu), "the order was sorted by the current loads");
            self.order.remove(at);
        }
    }

    /// Puts `cpus` back in order, by their new loads.
    fn put_back<const N: usize>(&mut self, load: &[f32], cpus: [usize; N]) {
        for cpu in cpus {
            let at = self.order.partition_point(|c| Self::key(load, *c) < Self::key(load, cpu));
            self.order.insert(at, cpu);
        }
    }
}

/// A key whose unsigned order is `f32::total_cmp`'s order (the same bit
/// flip `total_cmp` does, then the sign bit flipped to make it unsigned).
fn total_order_key(x: f32) -> u32 {
    let bits = x.to_bits() as i32;
    let signed = bits ^ (((bits >> 31) as u32) >> 1) as i32;
    (signed as u32) ^ 0x8000_0000
}

/// Moves item `i` to `dst`. It is no longer movable, so it leaves the candidate lists.
fn relocate(items: &mut [Item], load: &mut [f32], on_cpu: &mut [Vec<(f32, usize)>], i: usize, dst: usize) {
    let src = items[i].home;
    on_cpu[src].retain(|(_, x)| *x != i);
    load[src] -= items[i].demand;
    load[dst] += items[i].demand;
    items[i].home = dst;
    items[i].movable = false;
    items[i].moved = true;
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
            .domain(DomainBuilder::new("a").vcpu(0, 0.5).vcpu(0, 0.05))
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
        assert!(!policy.decide(&snap).unwrap().is_empty());
        // Same (stale) picture next quantum: the moved vCPUs are cooling, the
        // remaining two alone cannot improve pCPU 0 enough... but they may move;
        // the moved ones must not move again.
        let mut next = snap.clone();
        next.quantum = 1;
        let again = policy.decide(&next).unwrap();
        for a in &again {
            assert!(!matches!(a, Action::Pin { domain, .. } if domain == "vm0" || domain == "vm1"), "{again:?}");
        }
    }

    #[test]
    fn hundredths_read_like_two_decimals() {
        let shown: Vec<String> = [0.0, 1.0, 2.345, 0.999, -0.5, 12.3, f32::NAN].iter().map(|x| Hundredths(*x).to_string()).collect();
        assert_eq!(shown, ["0.00", "1.00", "2.35", "1.00", "-0.50", "12.30", "NaN"]);
    }

    #[test]
    fn by_load_matches_a_stable_sort_and_max_by_as_loads_change() {
        let mut load: Vec<f32> = vec![0.5, 0.1, 0.3, 0.1, 0.9, 0.0, 0.3, 0.9];
        let mut by_load = ByLoad::new(&load);
        // Deterministic pseudo-random load changes, two CPUs at a time, with ties.
        let mut seed = 7u32;
        for _ in 0..500 {
            let mut next = || {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (seed >> 16) as usize
            };
            let (x, y) = (next() % load.len(), next() % load.len());
            if x == y {
                continue;
            }
            let delta = (next() % 5) as f32 / 10.0;
            by_load.take_out(&load, [x, y]);
            load[x] += delta;
            load[y] = (load[y] - delta).max(0.0);
            by_load.put_back(&load, [x, y]);
            let mut sorted: Vec<usize> = (0..load.len()).filter(|c| *c != 5).collect();
            sorted.sort_by(|a, b| load[*a].total_cmp(&load[*b]));
            assert_eq!(by_load.least_loaded(5, 4).collect::<Vec<_>>(), sorted[..4]);
            let max_by = (0..load.len()).filter(|c| *c != 2).max_by(|a, b| load[*a].total_cmp(&load[*b]));
            assert_eq!(by_load.busiest(&mut 0, |c| c != 2), max_by);
            // Rejections that stand, found with one cursor: each call agrees with a fresh scan.
            let mut skipped = 0;
            let mut rejected = vec![2];
            while let Some(c) = by_load.busiest(&mut skipped, |c| !rejected.contains(&c)) {
                let fresh = (0..load.len()).filter(|c| !rejected.contains(c)).max_by(|a, b| load[*a].total_cmp(&load[*b]));
                assert_eq!(Some(c), fresh);
                rejected.push(c);
            }
            assert_eq!(rejected.len(), load.len());
        }
        assert_eq!(ByLoad::new(&[1.0, 2.0]).least_loaded(0, 4).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn total_order_keys_sort_as_total_cmp() {
        let values =
            [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0, 0.5, 3.25, f32::MAX, f32::MIN];
        for a in values {
            for b in values {
                assert_eq!(total_order_key(a).cmp(&total_order_key(b)), a.total_cmp(&b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn scales_to_256_cpus() {
        let mut b = SnapshotBuilder::new(256, 1 << 30);
        for i in 0..1000 {
            b = b.domain(DomainBuilder::new(&format!("vm{i}")).vcpu_with_steal(0, 0.001, 0.3));
        }
        let actions = CpuPolicy::default().decide(&b.build()).unwrap();
        assert_eq!(actions.len(), 64, "budget is cpus/4");
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
}
