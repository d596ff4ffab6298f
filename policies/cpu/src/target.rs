//! A target placement for one set of pCPUs: where every movable vCPU should
//! be, planned from the demands alone, then brought as close as possible to
//! where the vCPUs already are.
//!
//! Why plan instead of only improving the current placement: a local search
//! from where the vCPUs are stops in local optima (issue 12's stalls: a
//! 1-for-2 exchange needed, a chain across three pCPUs, a partner far down
//! the load order). A placement planned from scratch has none of those, but
//! reaching it may move many vCPUs. So several candidates are built, and the
//! lowest makespan wins, with fewer moved vCPUs (weighted by demand)
//! breaking near-ties ([`TIE_PCT`]):
//! - **carried**: the target an earlier quantum began and the move budget
//!   cut short, so it is finished rather than re-planned around the half
//!   already moved;
//! - **descent** (up to [`DESCENT_ITEMS`] vCPUs): the current placement,
//!   improved by local search;
//! - **repair**: the current placement with the least it takes removed from
//!   each pCPU above the planned level (on a large host, of the vCPUs some
//!   pCPU has room for, while any is left), put back largest first onto the least-loaded
//!   pCPUs, and where a large vCPU found no room under the level, the pCPU
//!   it landed on trimmed in turn (few moves on a large host);
//! - **plan**: the exact optimum on small instances (the SDK's branch and
//!   bound) or LPT on large ones (the same branch and bound, budgeted, on
//!   medium ones where LPT ends more than [`SEARCH_ABOVE_PCT`] above the
//!   bound), relabelled onto the current pCPUs so that the most demand
//!   stays where it is (greedy matching on overlap), then improved by local
//!   search.
//!
//! A large host tries the cheapest first: the repair of the pCPUs above
//! the goal (the busiest load a plan must reach to be taken), or above
//! [`FAST_TRIGGER_PCT`] over the lower bound if that is lower, to just
//! above the bound ([`FAST_LEVEL_PCT`]). When that lands there, nothing
//! else can beat it by much, and the rest is not computed (this keeps a
//! 4,000-vCPU quantum short).
//!
//! Finally, a multi-vCPU VM's vCPUs sharing a pCPU are spread over pCPUs
//! without a sibling where that keeps every pCPU within the makespan. On
//! hosts of more than [`DESCENT_ITEMS`] vCPUs, unless the plan lowers the
//! busiest pCPU by more than [`SPREAD_ALL_GAIN_PCT`], only the vCPUs the
//! plan moves anyway are, and those of the pCPUs it moves vCPUs off (the
//! others on quanta when no plan is taken): spreading on top of every plan
//! was churn there, see [`plan`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::larger;

/// A vCPU with no current pCPU in this problem (it must be placed).
pub(crate) const NONE: usize = usize::MAX;

/// Instances up to this many movable vCPUs and pCPUs are planned exactly
/// (a bounded branch and bound: tens of microseconds).
const EXACT_ITEMS: usize = 16;
/// See [`EXACT_ITEMS`].
const EXACT_CPUS: usize = 8;
/// Up to this many movable vCPUs and pCPUs, when LPT ends more than
/// [`SEARCH_ABOVE_PCT`] above the lower bound, the same bounded branch and
/// bound is tried: not proven, but better than LPT and its local search
/// where that matters (16 pCPUs, 32 vCPUs of 4-vCPU VMs all on pCPU 0: 0.808
/// against 0.756, and nothing the margin would act on in between).
const SEARCHED_ITEMS: usize = 64;
/// See [`SEARCHED_ITEMS`].
const SEARCHED_CPUS: usize = 16;
/// Node budget of that search (it is seldom proven, so runs to it).
const SEARCHED_NODES: u64 = 4_000;
/// See [`SEARCHED_ITEMS`]: the default hysteresis. Closer to the bound no
/// better plan could be worth its moves, and on a host whose demand jumps
/// every quantum the search's plans move more for a balance the next
/// quantum undoes (`churn`, 8 pCPUs: with the search on every plan, 628
/// pins and a steady 1.08 × best; with this rule 607 and 1.00; without the
/// search 591 and 1.05).
const SEARCH_ABOVE_PCT: f32 = 5.0;
/// Node budget of the exact plan; past it the best found is used.
const EXACT_NODES: u64 = 20_000;
/// Work limit of one local search (candidate exchanges looked at): keeps a
/// 4,000-vCPU quantum within its budget whatever the placement.
const IMPROVE_EVALS: usize = 150_000;
/// A large host's cheap plan trims the pCPUs it trims to this share above
/// the lower bound (2.5 %, half the default hysteresis): trimming to the
/// bound itself would move vCPUs off half the host each time demand
/// wanders, for no gain at the busiest pCPU the hysteresis would see.
const FAST_LEVEL_PCT: f32 = 2.5;
/// A large host's cheap plan trims only the pCPUs above the goal, or above
/// this share over the lower bound when the goal is higher (a host far from
/// balance): an (s, S) rule, as in stock keeping. A pCPU is trimmed when it
/// passes S and then to s ([`FAST_LEVEL_PCT`]); the pCPUs in between are
/// left alone. Trimming every pCPU above s at each plan, as before, moved
/// a vCPU off a quarter of `large`'s host every other quantum while its
/// demand wandered, to gain what the next drift undid: over `large` with
/// seeds 1-6, 7,887 pins against 9,593, and a mean 1.196 × best against
/// 1.198. 4 %, under the 5 % of the quality target, so that a host planned
/// from far lands within it (at 5 % the quality bench's 256-pCPU instances
/// ended at 1.050 × best at worst; at 4 %, 1.040).
const FAST_TRIGGER_PCT: f32 = 4.0;
/// Where demand wanders, S is also at least this many times the measured
/// noise above the lower bound ([`Problem::noise`]; twice the default noise
/// margin): a pCPU within that of the bound crosses the 4 % line and back
/// on its own. On `large` (noise 0.012 CPU a quantum, bound 0.55-0.85)
/// the 10 % of pCPUs just above 1.04 × the bound were trimmed every other
/// quantum: over seeds 1-6, 7,220 pins against 7,838, mean 1.196 against
/// 1.195 × best, steady 1.086 against 1.085; at 8 times, 6,704 pins for a
/// mean of 1.208 and steady 1.105. On constant demand the noise is 0.
const FAST_TRIGGER_NOISE: f32 = 4.0;
/// A plan that lowers the busiest pCPU by more than this share spreads
/// every sibling that shares a pCPU, on a large host too (see
/// [`spread_moved_only`]).
const SPREAD_ALL_GAIN_PCT: f32 = 10.0;
/// Work limit of spreading siblings (pCPUs and vCPUs looked at).
const SPREAD_WORK: usize = 50_000;
/// The local search takes an exchange only when it lowers the pair's
/// larger load by this share (0.1 %): smaller steps cost a search each
/// and gain nothing the hysteresis (5 %) would act on.
const STEP: f32 = 1e-3;
/// Passes of the repair over the pCPUs its first pass overfilled.
const REPAIR_PASSES: usize = 3;
/// Above this many movable vCPUs the current placement is not improved
/// by local search from scratch (hundreds of small steps); the repair
/// candidate moves as little and costs one sort.
const DESCENT_ITEMS: usize = 256;
/// 2↔1 and 1↔2 exchanges only between pCPUs with at most this many movable
/// vCPUs each (their cost is cubic; with more vCPUs per pCPU, moves and
/// swaps have enough granularity).
const SMALL: usize = 8;
/// Candidates within this share of the best makespan count as equal, and
/// the one that moves less demand wins: on large instances, where no
/// candidate is known to be the optimum, 1 % of the makespan is not worth
/// moving many more vCPUs for. On small ones the exact optimum is known,
/// and only a true tie goes to the candidate that moves less.
const TIE_PCT: f32 = 1.0;
/// [`TIE_PCT`] on hosts of more than [`DESCENT_ITEMS`] vCPUs (half the default
/// hysteresis: 2.5 %): there a plan from scratch moves most vCPUs and the
/// repair only what is above its level, and under the guard's per-quantum
/// pin limit the many moves take quanta, while demand wanders meanwhile.
const TIE_PCT_LARGE: f32 = 2.5;
/// [`TIE_PCT`] on instances planned exactly (float rounding only).
const TIE_PCT_EXACT: f32 = 0.001;

/// A placement problem: movable vCPUs over pCPUs that carry fixed loads.
pub(crate) struct Problem<'a> {
    /// Each vCPU's demand (≥ 0).
    pub(crate) demand: &'a [f32],
    /// Each vCPU's current pCPU (an index into `base`), or [`NONE`].
    pub(crate) home: &'a [usize],
    /// Each vCPU's domain, to spread siblings.
    pub(crate) domain: &'a [u32],
    /// Each pCPU's load that no plan moves (host work, cooling vCPUs).
    pub(crate) base: &'a [f32],
    /// Where a target begun in an earlier quantum sends each vCPU (or
    /// [`NONE`]); empty when none was. It is one more candidate, so a
    /// target cut short by the move budget is finished, not re-planned
    /// around the half already moved.
    pub(crate) hint: &'a [usize],
    /// (domain, pCPU) of the vCPUs that stay where they are this quantum
    /// (cooling down, or too small to matter): siblings to spread from.
    pub(crate) fixed: &'a [(u32, usize)],
    /// The busiest load a target must reach to be taken (the current
    /// busiest less the hysteresis), or infinity when unknown: a large
    /// host's cheap plan trims only the pCPUs above it ([`FAST_TRIGGER_PCT`]).
    pub(crate) goal: f32,
    /// The host's demand noise (CPUs): how much a pCPU's load moves from
    /// one quantum to the next on its own; 0 on constant demand, and when
    /// `cpu.noise_factor` is 0. Candidates that reach the goal and whose
    /// busiest loads differ by less are equal (the one that moves less
    /// demand wins), and the local search stops within it of the lower
    /// bound once under the goal. Why: by the time a target is reached,
    /// the busiest pCPU has drifted by about that much, so a finer edge is
    /// stale before it is paid for. On `churn` (demand that moves by up to
    /// 0.2 CPU a quantum) over seeds 1-6: 2,726 pins against 3,135 without,
    /// busiest pCPU 1.279 against 1.293 × best. Twice the noise (measured
    /// when the noise was the upper median of the pCPUs' changes) cut the
    /// pins to 1,439, but left a host of one-vCPU VMs that jump the same
    /// way 3 % higher.
    pub(crate) noise: f32,
}

/// A target placement and its busiest pCPU's load.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Each vCPU's target pCPU.
    pub(crate) at: Vec<usize>,
    /// The busiest pCPU's load in the target.
    pub(crate) makespan: f32,
    /// Its demand above the pCPUs' capacity.
    pub(crate) overload: Overload,
}

/// Demand above the pCPUs' capacity (1 CPU each): what no pCPU serves.
/// Second to the busiest pCPU: with the busiest at its best (40 vCPUs of
/// 0.84 on 32 pCPUs: 8 must share, 1.68), a placement that doubled 12
/// pCPUs and left 4 idle served 2.7 CPUs less, and no plan lowered the
/// busiest pCPU to undo it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Overload {
    /// Load above 1 CPU, summed over the pCPUs.
    cpus: f32,
    /// pCPUs above 1 CPU.
    pcpus: usize,
}

impl Overload {
    pub(crate) fn of(loads: &[f32]) -> Self {
        Overload { cpus: loads.iter().map(|l| larger(l - 1.0, 0.0)).sum(), pcpus: loads.iter().filter(|l| **l > 1.0).count() }
    }

    /// Fewer pCPUs overloaded than `than`, and `margin` less overload on
    /// each of `than`'s (their noise adds up in the sum).
    pub(crate) fn beats(self, than: Overload, margin: f32) -> bool {
        self.pcpus < than.pcpus && self.cpus < than.cpus - margin * than.pcpus as f32
    }
}

impl Problem<'_> {
    fn loads(&self, at: &[usize]) -> Vec<f32> {
        let mut load = self.base.to_vec();
        // Zipped, and `NONE` (no pCPU) fails the same range check as a bad
        // index: in wasm, an index and two bounds checks per vCPU spilled
        // the loop's registers to the stack (three times the native cost).
        for (&c, &d) in at.iter().zip(self.demand) {
            debug_assert!(c == NONE || c < load.len(), "vCPU placed on pCPU {c} of {}", load.len());
            if let Some(l) = load.get_mut(c) {
                *l += d;
            }
        }
        load
    }

    /// The busiest pCPU's load under `at`.
    fn makespan(&self, at: &[usize]) -> f32 {
        self.loads(at).into_iter().fold(0.0, larger)
    }

    /// `at` with its busiest pCPU's load.
    pub(crate) fn target(&self, at: Vec<usize>) -> Target {
        let loads = self.loads(&at);
        let makespan = loads.iter().copied().fold(0.0, larger);
        Target { at, makespan, overload: Overload::of(&loads) }
    }

    /// Demand that `at` moves away from its current pCPU.
    fn moved(&self, at: &[usize]) -> f32 {
        at.iter().enumerate().filter(|(i, c)| self.home[*i] != **c).map(|(i, _)| self.demand[i]).sum()
    }

    /// `max(total / m, largest + least base)`: no placement does better.
    pub(crate) fn lower_bound(&self) -> f32 {
        let m = self.base.len().max(1) as f32;
        let total: f32 = self.demand.iter().sum::<f32>() + self.base.iter().sum::<f32>();
        let min_base = self.base.iter().copied().fold(f32::INFINITY, f32::min);
        let largest = self.demand.iter().copied().fold(0.0, larger);
        larger(total / m, largest + if min_base.is_finite() { min_base } else { 0.0 })
    }
}

/// The target placement of `p`'s vCPUs (see the module docs).
pub(crate) fn plan(p: &Problem) -> Target {
    let m = p.base.len();
    if m == 0 {
        return Target { at: p.home.to_vec(), makespan: 0.0, overload: Overload::default() };
    }
    let n = p.demand.len();
    let exact = n <= EXACT_ITEMS && m <= EXACT_CPUS;
    let tie_pct = if exact {
        TIE_PCT_EXACT
    } else if n > DESCENT_ITEMS {
        TIE_PCT_LARGE
    } else {
        TIE_PCT
    };
    let tie = |makespan: f32| tie_pct / 100.0 * larger(makespan, 1e-3);
    // Within the demand noise, between targets that both reach the goal
    // (see [`Problem::noise`]): one that does not must not win for moving
    // less, or a plan worth taking is dropped for it (over the random
    // sweep's seeds 1-100, measured with the noise as the upper median of
    // the pCPUs' changes, this rule cost 3 % more pins, 6,360 against
    // 6,189, for a busiest pCPU of 1.1397 against 1.1399 × best).
    // `reaches`: the candidates compared all reach the goal.
    let tie_of = |makespan: f32, reaches: bool| if reaches { larger(tie(makespan), p.noise) } else { tie(makespan) };
    // A large host first tries the cheapest plan: the pCPUs above the
    // trigger repaired to just above the lower bound. Within the tie of the
    // bound (or under the trigger, which is under the goal), nothing can
    // beat it by enough to be worth more moves, so it is the target and
    // LPT is not needed.
    // No placement beats the lower bound: the fast path's level and the
    // local search's stop, computed once.
    let lower = p.lower_bound();
    if !exact && n > DESCENT_ITEMS {
        let level = lower * (1.0 + FAST_LEVEL_PCT / 100.0);
        let trigger = larger(level, p.goal.min(larger(lower * (1.0 + FAST_TRIGGER_PCT / 100.0), lower + FAST_TRIGGER_NOISE * p.noise)));
        let Placed { mut at, load } = repair_above(p, trigger, level);
        let makespan = load.iter().copied().fold(0.0, larger);
        if makespan <= larger(trigger, level + tie(lower)) + 1e-5 {
            // Spread as below.
            spread(p, &mut at, makespan, spread_moved_only(p, makespan));
            return p.target(at);
        }
    }
    let mut groups = if exact { exact_groups(p, EXACT_NODES) } else { lpt(p) };
    let mut groups_makespan = p.makespan(&groups);
    if !exact && n <= SEARCHED_ITEMS && m <= SEARCHED_CPUS && groups_makespan > lower * (1.0 + SEARCH_ABOVE_PCT / 100.0) {
        // LPT left room above the bound that a plan could act on: search.
        let searched = exact_groups(p, SEARCHED_NODES);
        let makespan = p.makespan(&searched);
        if makespan < groups_makespan {
            (groups, groups_makespan) = (searched, makespan);
        }
    }
    let mut candidates: Vec<Target> = Vec::with_capacity(4);
    if let Some(carried) = (!p.hint.is_empty()).then(|| {
        let mut at: Vec<usize> = p.hint.iter().zip(p.home).map(|(h, c)| if *h == NONE { *c } else { *h }).collect();
        if at.contains(&NONE) {
            place_largest_first(p, &mut at);
        }
        improve(p, &mut at, lower);
        p.target(at)
    }) {
        candidates.push(carried);
    }
    if exact || n <= DESCENT_ITEMS {
        let mut at: Vec<usize> = p.home.to_vec();
        if at.contains(&NONE) {
            place_largest_first(p, &mut at);
        }
        improve(p, &mut at, lower);
        candidates.push(p.target(at));
    }
    let level = candidates.iter().map(|t| t.makespan).fold(groups_makespan, f32::min);
    let repaired = {
        let at = repair(p, level).at;
        let mut t = p.target(at);
        // Searched on only when it missed the level it was repaired to (by
        // more than the noise, if it reaches the goal).
        if t.makespan > level + tie_of(level, t.makespan <= p.goal) {
            improve(p, &mut t.at, lower);
            t = p.target(t.at);
        }
        t
    };
    // When LPT is within the tie of the lower bound and the repair ties
    // it, the repair moves far less and nothing can do better by more
    // than the tie: the plan is relabelled and searched only otherwise.
    let repair_ties = !exact
        && groups_makespan <= lower + tie_of(lower, true)
        && repaired.makespan <= groups_makespan + tie_of(groups_makespan, repaired.makespan <= p.goal);
    candidates.push(repaired);
    if !repair_ties {
        let mut at = relabel(p, &groups);
        improve(p, &mut at, lower);
        candidates.push(p.target(at));
    }
    let best = candidates
        .into_iter()
        .map(|t| {
            let moved = p.moved(&t.at);
            (t, moved)
        })
        .fold(None::<(Target, f32)>, |best, (t, moved)| match best {
            None => Some((t, moved)),
            Some((b, bm)) => {
                let tie = tie_of(b.makespan.min(t.makespan), t.makespan <= p.goal && b.makespan <= p.goal);
                // Within the tie, a candidate that leaves less overload
                // wins (see [`Overload`]); then the one that moves less.
                let better = t.makespan < b.makespan - tie
                    || (t.makespan <= b.makespan + tie
                        && (t.overload.beats(b.overload, tie) || (!b.overload.beats(t.overload, tie) && moved < bm)));
                Some(if better { (t, moved) } else { (b, bm) })
            }
        })
        .map(|(t, _)| t)
        .expect("the repair is a candidate");
    let mut at = best.at;
    // On a large host a plan is taken nearly every quantum (demand
    // wanders), and spreading on top of it moved vCPUs the plan did not
    // need to move, a thousand pins a run more for no balance (`large`:
    // 4,144 pins against 2,874 with this rule, steady state 1.11 x the
    // bound against 1.10). There only the vCPUs the plan moves anyway are
    // spread (a destination without a sibling costs no extra pin), and
    // those of the pCPUs it moves vCPUs off, unless the plan is a large
    // step ([`spread_moved_only`]); the others on the quanta when no plan
    // is worth taking (`plan_moves`).
    spread(p, &mut at, best.makespan, n > DESCENT_ITEMS && spread_moved_only(p, best.makespan));
    p.target(at)
}

/// Whether a large host's plan to `makespan` spreads only the siblings it
/// moves anyway, and those on the pCPUs it moves vCPUs off (see [`plan`]).
/// Not when the plan lowers the busiest pCPU by more than
/// [`SPREAD_ALL_GAIN_PCT`]: a host far from balance (a first plan, a phase
/// change) is planned once and then left alone, and the siblings a plan
/// leaves sharing a pCPU would be spread on a later quantum, after the host
/// has converged (the quality bench's 256-pCPU instances: 2.5 pins a run in
/// steady state).
fn spread_moved_only(p: &Problem, makespan: f32) -> bool {
    p.makespan(p.home) <= makespan * (1.0 + SPREAD_ALL_GAIN_PCT / 100.0)
}

/// The exact optimum's groups (the SDK's branch and bound, seeded by LPT
/// and local search; past its node budget, the best found).
fn exact_groups(p: &Problem, nodes: u64) -> Vec<usize> {
    let demands: Vec<f64> = p.demand.iter().map(|d| f64::from(*d)).collect();
    let base: Vec<f64> = p.base.iter().map(|b| f64::from(*b)).collect();
    vm_balancer_sdk::makespan::best_placement_with_base(&demands, &base, nodes).assignment
}

/// `(load, pCPU)` packed so that integer order is load order, then index:
/// a min-heap of these pops the least-loaded pCPU. Loads at or below zero
/// (`-0.0` and rounding residue included) and NaN all count as 0: the bits
/// of a positive float sort as the float, those of `-0.0` would not.
fn key(load: f32, c: usize) -> Reverse<u64> {
    Reverse((u64::from(order_bits(load)) << 32) | c as u64)
}

/// Bits whose unsigned order is the order of non-negative floats; zero,
/// `-0.0`, anything below zero and NaN all map to 0.
pub(crate) fn order_bits(x: f32) -> u32 {
    if x > 0.0 {
        x.to_bits()
    } else {
        0
    }
}

fn key_cpu(k: Reverse<u64>) -> usize {
    (k.0 & u64::from(u32::MAX)) as usize
}

/// vCPU indexes by demand, largest first (ties: index order).
fn largest_first(p: &Problem, items: impl Iterator<Item = usize>) -> Vec<usize> {
    // Sorted as plain integers (demand bits, inverted for descending, then
    // index): a comparator that looks demands up was most of LPT's time.
    let mut keys: Vec<u64> = items.map(|i| (u64::from(!order_bits(p.demand[i])) << 32) | i as u64).collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| (k & u64::from(u32::MAX)) as usize).collect()
}

/// Largest-processing-time first from scratch: each vCPU, largest first,
/// onto the least-loaded pCPU (over the fixed loads). Among pCPUs loaded
/// alike, one without a sibling of the same VM is preferred.
fn lpt(p: &Problem) -> Vec<usize> {
    let mut at = vec![NONE; p.demand.len()];
    let order = largest_first(p, 0..p.demand.len());
    place(p, &mut at, &order, p.base.to_vec());
    at
}

/// A placement with each pCPU's load.
struct Placed {
    at: Vec<usize>,
    load: Vec<f32>,
}

/// Where each multi-vCPU VM's vCPUs are, in one flat array (a slice per
/// domain, as long as its vCPUs): "does this VM have a vCPU on pCPU c?" in
/// a scan of its few vCPUs, with no allocation per domain or per pCPU.
/// One-vCPU VMs have no slice and never have a sibling.
struct Siblings {
    /// Per domain: (start of its slice, vCPUs placed in it, its length).
    slice: Vec<(u32, u32, u32)>,
    cpus: Vec<u32>,
}

impl Siblings {
    /// The vCPUs of `at` that have a pCPU, and the fixed ones.
    fn new(p: &Problem, at: &[usize]) -> Self {
        // Sized once, then counted in plain loops (a chained iterator and
        // a resize check per vCPU were most of this in wasm).
        let mut domains = 0;
        for &d in p.domain {
            domains = domains.max(d as usize + 1);
        }
        for f in p.fixed {
            domains = domains.max(f.0 as usize + 1);
        }
        let mut slice: Vec<(u32, u32, u32)> = vec![(0, 0, 0); domains];
        for &d in p.domain {
            slice[d as usize].2 += 1;
        }
        for f in p.fixed {
            slice[f.0 as usize].2 += 1;
        }
        let mut start = 0u32;
        for s in &mut slice {
            // A one-vCPU VM needs no slice: nothing can be its sibling.
            s.2 = if s.2 > 1 { s.2 } else { 0 };
            s.0 = start;
            start += s.2;
        }
        let mut s = Siblings { slice, cpus: vec![0; start as usize] };
        if start > 0 {
            for (&c, &dom) in at.iter().zip(p.domain) {
                if c != NONE {
                    s.add(dom, c);
                }
            }
            for &(dom, c) in p.fixed {
                s.add(dom, c);
            }
        }
        s
    }

    /// True when no VM has two vCPUs: nothing to spread or look up.
    fn none(&self) -> bool {
        self.cpus.is_empty()
    }

    fn of(&self, dom: u32) -> &[u32] {
        let (start, len, _) = self.slice[dom as usize];
        &self.cpus[start as usize..(start + len) as usize]
    }

    fn has(&self, dom: u32, c: usize) -> bool {
        self.of(dom).contains(&(c as u32))
    }

    fn add(&mut self, dom: u32, c: usize) {
        let (start, len, cap) = &mut self.slice[dom as usize];
        // Only domains with a slice (two or more vCPUs) are recorded.
        if *len < *cap {
            self.cpus[(*start + *len) as usize] = c as u32;
            *len += 1;
        }
    }

    fn remove(&mut self, dom: u32, c: usize) {
        let (start, len, _) = self.slice[dom as usize];
        let list = &mut self.cpus[start as usize..(start + len) as usize];
        if let Some(k) = list.iter().position(|x| *x == c as u32) {
            list.swap(k, len as usize - 1);
            self.slice[dom as usize].1 -= 1;
        }
    }
}

/// Each pCPU's vCPUs (indexes into `at`), as one flat array and offsets:
/// no allocation per pCPU. vCPUs without a pCPU are left out.
fn by_cpu(at: &[usize], m: usize) -> (Vec<u32>, Vec<usize>) {
    let mut start = vec![0u32; m + 1];
    for &c in at {
        if c != NONE {
            start[c + 1] += 1;
        }
    }
    for c in 0..m {
        start[c + 1] += start[c];
    }
    let mut fill = start.clone();
    let mut items = vec![0usize; start[m] as usize];
    for (i, &c) in at.iter().enumerate() {
        if c != NONE {
            items[fill[c] as usize] = i;
            fill[c] += 1;
        }
    }
    (start, items)
}

/// Places the vCPUs of `order` (largest first) onto the least-loaded pCPU
/// of `load`, preferring, among equally loaded pCPUs, one without a sibling.
/// Returns the loads after.
fn place(p: &Problem, at: &mut [usize], order: &[usize], mut load: Vec<f32>) -> Vec<f32> {
    let m = load.len();
    let mut heap: BinaryHeap<Reverse<u64>> = (0..m).map(|c| key(load[c], c)).collect();
    // Where each VM's vCPUs are: to spread siblings on ties.
    let mut siblings = Siblings::new(p, at);
    let mut held: Vec<Reverse<u64>> = Vec::new();
    for &i in order {
        let dom = p.domain[i];
        // The common case: the least-loaded pCPU has no sibling. Its key
        // is replaced in place (one sift instead of a pop and a push).
        if let Some(mut top) = heap.peek_mut() {
            let c = key_cpu(*top);
            if siblings.none() || !siblings.has(dom, c) {
                load[c] += p.demand[i];
                siblings.add(dom, c);
                at[i] = c;
                *top = key(load[c], c);
                continue;
            }
        }
        let Some(first) = heap.pop() else { break };
        let mut pick = first;
        let low = load[key_cpu(first)];
        if siblings.has(dom, key_cpu(first)) {
            // Look at a few equally loaded pCPUs for one without a sibling.
            for _ in 0..4 {
                let Some(next) = heap.pop() else { break };
                held.push(next);
                let c = key_cpu(next);
                if load[c] > low + 1e-6 * larger(low, 1.0) {
                    break;
                }
                if !siblings.has(dom, c) {
                    held.pop();
                    held.push(pick);
                    pick = next;
                    break;
                }
            }
        }
        heap.extend(held.drain(..));
        let c = key_cpu(pick);
        load[c] += p.demand[i];
        siblings.add(dom, c);
        at[i] = c;
        heap.push(key(load[c], c));
    }
    load
}

/// Places every vCPU that has no pCPU ([`NONE`]), largest first.
fn place_largest_first(p: &Problem, at: &mut [usize]) {
    let order = largest_first(p, (0..at.len()).filter(|i| at[*i] == NONE));
    let load = p.loads(at);
    place(p, at, &order, load);
}

/// The current placement with, from each pCPU above `level`, the least
/// that brings it there taken off (the smallest vCPU that is enough alone,
/// else the largest, and again; on a large host, among the vCPUs no larger
/// than the most room any pCPU has under the level, while there are any), then
/// everything taken off (and every vCPU without a pCPU) put back largest
/// first onto the least loaded. Why the room: a vCPU larger than it lands
/// above the level wherever it goes, and the pCPU it lands on must give up
/// vCPUs in turn (`large`'s batch VMs of 0.2 CPU on a host whose freest
/// pCPU had 0.12 to spare: the repair missed its level, and the plan from
/// scratch that replaced it moved 365 vCPUs).
fn repair(p: &Problem, level: f32) -> Placed {
    repair_above(p, level, level)
}

/// [`repair`] of the pCPUs above `trigger` only, down to `level`, in every
/// pass: the pCPUs between the two are left alone (see
/// [`FAST_TRIGGER_PCT`]).
fn repair_above(p: &Problem, trigger: f32, level: f32) -> Placed {
    let mut placed = repair_from(p, p.home.to_vec(), trigger, level, true);
    // The large vCPUs taken off may find no room under the level: the
    // pCPUs they land on are trimmed in turn (of their own smaller vCPUs, a
    // chain over three pCPUs), while that lowers the busiest. (`large`
    // after its batch VMs woke: 670 moves planned from scratch each quantum
    // for four quanta, since one pass of the repair ended at 0.93-0.96
    // against a level of 0.87.)
    // Only what passed the trigger: the pCPUs the first pass left between
    // the level and the trigger are left alone here too.
    let eps = 1e-5 * larger(trigger, 1.0);
    let mut makespan = placed.load.iter().copied().fold(0.0, larger);
    for _ in 0..REPAIR_PASSES {
        if makespan <= trigger + eps {
            break;
        }
        let next = repair_from(p, placed.at.clone(), trigger, level, false);
        let next_makespan = next.load.iter().copied().fold(0.0, larger);
        if next_makespan >= makespan {
            break;
        }
        (placed, makespan) = (next, next_makespan);
    }
    placed
}

/// One pass of [`repair`] from the placement `at` (`first`: every vCPU at
/// home), trimming the pCPUs above `trigger` down to `level`.
fn repair_from(p: &Problem, mut at: Vec<usize>, trigger: f32, level: f32, first: bool) -> Placed {
    let m = p.base.len();
    let mut load = p.loads(&at);
    let (start, mut on) = by_cpu(&at, m);
    let eps = 1e-5 * larger(level, 1.0);
    let mut removed: Vec<usize> = (0..at.len()).filter(|i| at[*i] == NONE).collect();
    // The most room any pCPU has under the level: a vCPU larger than that
    // lands above it wherever it goes, so it is taken off only when nothing
    // that fits is left. On a large host only, where the repair is the plan
    // (the fast path): on small ones, where it is one candidate among the
    // exact plan, LPT and the local search, taking off several small vCPUs
    // instead of one large one cost 350 pins more over the random sweep's
    // seeds 1-100 (7,464 against 7,113) for a busiest pCPU no better.
    let room = if p.demand.len() > DESCENT_ITEMS { level - load.iter().copied().fold(f32::INFINITY, f32::min) } else { f32::INFINITY };
    for c in 0..m {
        if load[c] <= trigger + eps {
            continue;
        }
        // Smallest first, so the smallest sufficient one is found by a scan;
        // only vCPUs still at home (one a previous pass put here would only
        // bounce on).
        let items = &mut on[start[c] as usize..start[c + 1] as usize];
        let home_count = if first {
            // Everything is at home (the common case, and the cheap one).
            items.sort_unstable_by(|x, y| p.demand[*x].total_cmp(&p.demand[*y]).then(x.cmp(y)));
            items.len()
        } else {
            items.sort_unstable_by(|x, y| {
                (at[*x] != p.home[*x]).cmp(&(at[*y] != p.home[*y])).then(p.demand[*x].total_cmp(&p.demand[*y])).then(x.cmp(y))
            });
            let home_count = items.iter().filter(|i| at[**i] == p.home[**i]).count();
            // And smaller than the largest that arrived: taking off one as
            // large only moves the same shortage of room elsewhere.
            // (A pCPU above the level with none arrived had nothing left
            // to take off in the first pass.)
            let arrived = items[home_count..].iter().map(|i| p.demand[*i]).fold(f32::NEG_INFINITY, larger);
            items[..home_count].iter().filter(|i| p.demand[**i] < arrived).count()
        };
        let mut left: &mut [usize] = &mut items[..home_count];
        while load[c] > level + eps && !left.is_empty() {
            let excess = load[c] - level;
            // `left` is sorted by demand: the ones that fit come first.
            let fit = left.partition_point(|i| p.demand[*i] <= room + eps);
            let k = if fit == 0 {
                left.iter().position(|i| p.demand[*i] >= excess).unwrap_or(left.len() - 1)
            } else {
                left[..fit].iter().position(|i| p.demand[*i] >= excess).unwrap_or(fit - 1)
            };
            let i = left[k];
            // Keep the rest in order: shift the taken one to the end.
            left[k..].rotate_left(1);
            let n = left.len() - 1;
            left = &mut left[..n];
            load[c] -= p.demand[i];
            at[i] = NONE;
            removed.push(i);
        }
    }
    // Every vCPU taken off, and every one without a pCPU, largest first.
    let order = largest_first(p, removed.into_iter());
    let load = place(p, &mut at, &order, load);
    Placed { at, load }
}

/// Maps the planned groups onto pCPUs so that as much demand as possible
/// stays where it is (greedy matching on overlap weight), keeping each
/// pCPU within the plan's busiest load where the fixed loads allow.
/// Returns each vCPU's target pCPU.
fn relabel(p: &Problem, group: &[usize]) -> Vec<usize> {
    let m = p.base.len();
    let mut group_load = vec![0.0f32; m];
    for (i, &g) in group.iter().enumerate() {
        group_load[g] += p.demand[i];
    }
    let cap = (0..m).map(|g| p.base[g] + group_load[g]).fold(0.0, larger);
    let tol = 1e-4 * larger(cap, 1.0);
    // (group, current pCPU, demand in both), merged and heaviest first.
    let mut overlap: Vec<(usize, usize, f32)> =
        group.iter().enumerate().filter(|(i, _)| p.home[*i] != NONE).map(|(i, &g)| (g, p.home[i], p.demand[i])).collect();
    overlap.sort_unstable_by_key(|(g, c, _)| (*g, *c));
    let mut merged: Vec<(usize, usize, f32)> = Vec::with_capacity(overlap.len());
    for (g, c, w) in overlap {
        match merged.last_mut() {
            Some(last) if last.0 == g && last.1 == c => last.2 += w,
            _ => merged.push((g, c, w)),
        }
    }
    merged.sort_unstable_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
    let mut to = vec![NONE; m];
    let mut taken = vec![false; m];
    for (g, c, _) in merged {
        if to[g] == NONE && !taken[c] && p.base[c] + group_load[g] <= cap + tol {
            to[g] = c;
            taken[c] = true;
        }
    }
    // The rest: the heaviest groups onto the least-loaded free pCPUs.
    let mut groups: Vec<usize> = (0..m).filter(|g| to[*g] == NONE).collect();
    groups.sort_unstable_by(|x, y| group_load[*y].total_cmp(&group_load[*x]).then(x.cmp(y)));
    let mut cpus: Vec<usize> = (0..m).filter(|c| !taken[*c]).collect();
    cpus.sort_unstable_by(|x, y| p.base[*x].total_cmp(&p.base[*y]).then(x.cmp(y)));
    for (g, c) in groups.into_iter().zip(cpus) {
        to[g] = c;
    }
    let at: Vec<usize> = group.iter().map(|g| to[*g]).collect();
    // The greedy matching can leave a heavy group only a pCPU with a
    // larger fixed load than the one it was planned on: then the plan's
    // own labels (each group on the pCPU it was planned for) are kept.
    if p.makespan(&at) > cap + tol {
        return group.to_vec();
    }
    at
}

/// One exchange between the busiest pCPU `a` and pCPU `b`: up to two vCPUs
/// each way.
#[derive(Clone, Copy, Debug)]
struct Exchange {
    /// The larger of the two loads after it.
    score: f32,
    out: [usize; 2],
    n_out: usize,
    back: [usize; 2],
    n_back: usize,
    b: usize,
}

/// Local search from the busiest pCPU: moves, 1↔1, 2↔1 and 1↔2 exchanges
/// with every other pCPU, each taken when the pair's larger load drops (so
/// the sorted load vector falls: ties at the maximum do not stop it, and
/// nothing cycles). Stops when the busiest pCPU has no such exchange, or
/// after about [`IMPROVE_EVALS`] candidates.
fn improve(p: &Problem, at: &mut [usize], lower: f32) {
    let m = p.base.len();
    if m < 2 {
        return;
    }
    let d = p.demand;
    let mut load = p.loads(at);
    let mut on: Vec<Vec<usize>> = vec![Vec::new(); m];
    for (i, &c) in at.iter().enumerate() {
        on[c].push(i);
    }
    let mut evals = 0usize;
    let mut order: Vec<u64> = Vec::with_capacity(m);
    // No placement beats the lower bound: stop there, or within the
    // demand noise of it (see [`Problem::noise`]) once under the goal.
    let done = larger(lower * (1.0 + STEP), (lower + p.noise).min(p.goal * (1.0 - STEP)));
    while evals < IMPROVE_EVALS {
        let a = (0..m).max_by(|x, y| load[*x].total_cmp(&load[*y])).unwrap_or(0);
        let la = load[a];
        if la <= done {
            return;
        }
        let tol = STEP * larger(la, 1e-3);
        let largest = on[a].iter().map(|i| d[*i]).fold(0.0, larger);
        // Partners least loaded first: the bounds below then end the scan.
        order.clear();
        order.extend((0..m).filter(|b| *b != a).map(|b| key(load[b], b).0));
        order.sort_unstable();
        evals += m;
        let mut best: Option<Exchange> = None;
        for &k in &order {
            let b = key_cpu(Reverse(k));
            let lb = load[b];
            let bar = best.map_or(la - tol, |x| x.score - tol);
            // No exchange between two pCPUs ends below their mean, and
            // (with one vCPU out) none leaves `a` below `la - largest`.
            let (on_a, on_b) = (&on[a], &on[b]);
            let small = on_a.len() <= SMALL && on_b.len() <= SMALL;
            if (la + lb) / 2.0 >= bar {
                break;
            }
            if !small && la - largest >= bar {
                continue;
            }
            let consider = |delta: f32, out: &[usize], back: &[usize], best: &mut Option<Exchange>| {
                if delta <= tol {
                    return;
                }
                let score = larger(la - delta, lb + delta);
                if score < best.map_or(la - tol, |x| x.score - tol) {
                    let mut x = Exchange { score, out: [0; 2], n_out: out.len(), back: [0; 2], n_back: back.len(), b };
                    x.out[..out.len()].copy_from_slice(out);
                    x.back[..back.len()].copy_from_slice(back);
                    *best = Some(x);
                }
            };
            for (k, &x) in on_a.iter().enumerate() {
                let dx = d[x];
                evals += 1 + on_b.len();
                consider(dx, &[x], &[], &mut best);
                for (l, &y) in on_b.iter().enumerate() {
                    if d[y] < dx {
                        consider(dx - d[y], &[x], &[y], &mut best);
                    }
                    if small {
                        for &y2 in &on_b[l + 1..] {
                            if d[y] + d[y2] < dx {
                                consider(dx - d[y] - d[y2], &[x], &[y, y2], &mut best);
                            }
                        }
                    }
                }
                if small {
                    evals += on_a.len() * on_b.len();
                    for &x2 in &on_a[k + 1..] {
                        for &y in on_b {
                            if d[y] < dx + d[x2] {
                                consider(dx + d[x2] - d[y], &[x, x2], &[y], &mut best);
                            }
                        }
                    }
                }
            }
        }
        let Some(x) = best else { return };
        for &i in &x.out[..x.n_out] {
            shift(d, &mut load, &mut on, at, i, x.b);
        }
        for &j in &x.back[..x.n_back] {
            shift(d, &mut load, &mut on, at, j, a);
        }
    }
}

fn shift(d: &[f32], load: &mut [f32], on: &mut [Vec<usize>], at: &mut [usize], i: usize, to: usize) {
    let from = at[i];
    on[from].retain(|x| *x != i);
    on[to].push(i);
    load[from] -= d[i];
    load[to] += d[i];
    at[i] = to;
}

/// Spreads a VM's vCPUs that share a pCPU onto pCPUs without a sibling,
/// by a move or a swap that keeps both pCPUs within `makespan` (it costs
/// nothing). Each step lowers the number of sibling pairs sharing a pCPU,
/// so it ends. With `moved_only`, only vCPUs that `at` already moves from
/// their home are moved again (no pin beyond the plan's).
pub(crate) fn spread(p: &Problem, at: &mut [usize], makespan: f32, moved_only: bool) {
    if p.base.len() < 2 || at.len() < 2 {
        return;
    }
    let mut siblings = Siblings::new(p, at);
    if siblings.none() {
        return;
    }
    let mut load = p.loads(at);
    let siblings = &mut siblings;
    let m = p.base.len();
    let n = at.len();
    // With `moved_only`, also the vCPUs of a pCPU the plan moves some
    // off: a sibling left beside a sibling there would be spread on the
    // next quantum without a plan anyway, one pin either way, and now it
    // lands with the plan instead of after the host has converged.
    let source: Vec<bool> = if moved_only {
        let mut source = vec![false; p.base.len()];
        for (i, &c) in at.iter().enumerate() {
            let h = p.home[i];
            if h != NONE && c != h {
                source[h] = true;
            }
        }
        source
    } else {
        Vec::new()
    };
    let may_move = |i: usize, at: &[usize]| !moved_only || at[i] != p.home[i] || (p.home[i] != NONE && source[p.home[i]]);
    // vCPUs that share a pCPU with a sibling. Most VMs have one vCPU, and
    // most siblings are apart already.
    let crowded_at = |siblings: &Siblings, i: usize, c: usize| siblings.of(p.domain[i]).iter().filter(|x| **x as usize == c).count() > 1;
    let mut crowded: Vec<usize> = Vec::new();
    for i in 0..n {
        if may_move(i, at) && crowded_at(siblings, i, at[i]) {
            crowded.push(i);
        }
    }
    if crowded.is_empty() {
        return;
    }
    // Smallest first: a small vCPU fits a move where a large one needs a
    // swap, and one move spreads a pair as well as two.
    crowded.sort_unstable_by(|x, y| p.demand[*x].total_cmp(&p.demand[*y]).then(x.cmp(y)));
    // Each pCPU's vCPUs, for swaps: built the first time a move does not fit.
    let mut on: Vec<Vec<usize>> = Vec::new();
    let cap = makespan + 1e-5 * larger(makespan, 1.0);
    let mut work = 0usize;
    for &i in &crowded {
        let a = at[i];
        let dom = p.domain[i];
        if !crowded_at(siblings, i, a) {
            continue;
        }
        if work > SPREAD_WORK {
            // Spreading is a nicety: its work is bounded whatever the host
            // (4,000 vCPUs of 4-vCPU VMs placed at random crowd thousands).
            break;
        }
        let d = p.demand[i];
        // A move that fits, onto the least-loaded pCPU without a sibling.
        let dest = (0..m).filter(|b| *b != a && load[*b] + d <= cap && !siblings.has(dom, *b)).min_by(|x, y| load[*x].total_cmp(&load[*y]));
        work += m + m * siblings.of(dom).len();
        let mut pick = dest.map(|b| (b, None));
        if pick.is_none() && work < SPREAD_WORK {
            // Else the swap whose partner's demand is closest.
            if on.is_empty() {
                on = vec![Vec::new(); m];
                for (j, &c) in at.iter().enumerate() {
                    on[c].push(j);
                }
            }
            let mut best: Option<(f32, usize, usize)> = None;
            for b in (0..m).filter(|b| *b != a && !siblings.has(dom, *b)) {
                work += on[b].len();
                for &j in &on[b] {
                    let delta = d - p.demand[j];
                    if load[b] + delta <= cap
                        && load[a] - delta <= cap
                        && may_move(j, at)
                        && !siblings.has(p.domain[j], a)
                        && best.is_none_or(|(c, _, _)| delta.abs() < c)
                    {
                        best = Some((delta.abs(), b, j));
                    }
                }
                if work > SPREAD_WORK {
                    break;
                }
            }
            pick = best.map(|(_, b, j)| (b, Some(j)));
        }
        let Some((b, swap)) = pick else { continue };
        let mut relocate = |i: usize, to: usize, siblings: &mut Siblings| {
            let from = at[i];
            siblings.remove(p.domain[i], from);
            siblings.add(p.domain[i], to);
            load[from] -= p.demand[i];
            load[to] += p.demand[i];
            if !on.is_empty() {
                on[from].retain(|x| *x != i);
                on[to].push(i);
            }
            at[i] = to;
        };
        relocate(i, b, siblings);
        if let Some(j) = swap {
            relocate(j, a, siblings);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A problem with no carried target, no fixed vCPUs, no goal and no noise.
    fn problem<'a>(demand: &'a [f32], home: &'a [usize], domain: &'a [u32], base: &'a [f32]) -> Problem<'a> {
        Problem { demand, home, domain, base, hint: &[], fixed: &[], goal: f32::INFINITY, noise: 0.0 }
    }

    fn makespan_of(d: &[f32], base: &[f32]) -> f32 {
        let home = vec![NONE; d.len()];
        let domain: Vec<u32> = (0..d.len() as u32).collect();
        plan(&problem(d, &home, &domain, base)).makespan
    }

    #[test]
    fn the_stall_family_reaches_one_and_a_half() {
        // {L,L,L}, {H,H}, {H} on 3 pCPUs, plus an empty fourth: 1.5 each.
        let d = [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5];
        let home = [0, 0, 0, 1, 1, 2, 3, 3];
        let domain: Vec<u32> = (0..8).collect();
        let t = plan(&problem(&d, &home, &domain, &[0.0; 4]));
        assert!((t.makespan - 1.5).abs() < 1e-5, "{t:?}");
    }

    #[test]
    fn the_repair_makes_room_for_a_large_vcpu_down_a_chain() {
        // pCPU 0 holds two of 0.4 and must give one up; no pCPU has 0.4 of
        // room under 0.6, so where it lands gives up a small one in turn.
        // One pass ends at 0.7; the level is reachable with two moves.
        let mut d = vec![0.4, 0.4, 0.1];
        let mut home = vec![0, 0, 0];
        for (c, count) in [(1, 6), (2, 6), (3, 3)] {
            d.extend(std::iter::repeat_n(0.1, count));
            home.extend(std::iter::repeat_n(c, count));
        }
        let domain: Vec<u32> = (0..d.len() as u32).collect();
        let p = problem(&d, &home, &domain, &[0.0; 4]);
        let one_pass = repair_from(&p, home.clone(), 0.6, 0.6, true).load.into_iter().fold(0.0, larger);
        assert!((one_pass - 0.7).abs() < 1e-5, "one pass: {one_pass}");
        let Placed { at, load } = repair(&p, 0.6);
        let makespan = load.into_iter().fold(0.0, larger);
        assert!(makespan <= 0.6 + 1e-5, "repaired to {makespan}");
        let moved = at.iter().zip(&home).filter(|(a, h)| a != h).count();
        assert_eq!(moved, 2, "{at:?}");
    }

    /// 128 pCPUs of 0.1-CPU vCPUs: 96 at 0.9, 16 at 0.9 + `extra` (one
    /// vCPU of that more), 8 at 1.0 and 8 at 0.8. Demands and homes.
    fn banded_host(extra: f32) -> (Vec<f32>, Vec<usize>) {
        let (mut d, mut home) = (Vec::new(), Vec::new());
        for c in 0..128usize {
            let count = match c {
                0..112 => 9,
                112..120 => 10,
                _ => 8,
            };
            d.extend(std::iter::repeat_n(0.1f32, count));
            home.extend(std::iter::repeat_n(c, count));
            if (96..112).contains(&c) {
                d.push(extra);
                home.push(c);
            }
        }
        (d, home)
    }

    #[test]
    fn a_large_hosts_plan_leaves_pcpus_between_the_level_and_the_goal_alone() {
        // 128 pCPUs of 0.1-CPU vCPUs: 96 at 0.9, 16 at 0.93 (one of 0.03
        // more), 8 at 1.0 and 8 at 0.8. The bound is 0.904, the level
        // 0.926, and a plan must reach 0.95 (1.0 less the hysteresis).
        // Only the 8 pCPUs above the goal give a vCPU each to the 8 at 0.8;
        // the 16 at 0.93, above the level but under the goal, are left as
        // they are: trimming them is what drifting demand undoes.
        let (d, home) = banded_host(0.03);
        let domain: Vec<u32> = (0..d.len() as u32).collect();
        let base = vec![0.0; 128];
        let p = Problem { goal: 0.95, ..problem(&d, &home, &domain, &base) };
        assert!(d.len() > DESCENT_ITEMS);
        let t = plan(&p);
        assert!(t.makespan <= 0.95, "{}", t.makespan);
        let moved: Vec<usize> = (0..d.len()).filter(|i| t.at[*i] != home[*i]).collect();
        assert_eq!(moved.len(), 8, "{moved:?}");
        assert!(moved.iter().all(|i| (112..120).contains(&home[*i])), "{moved:?}");
    }

    /// Where demand wanders, the pCPUs within a few times the noise of the
    /// bound are left alone even above 1.04 × the bound: they cross that
    /// line and back on their own.
    #[test]
    fn a_noisy_large_hosts_plan_leaves_pcpus_near_the_bound_alone() {
        // 128 pCPUs of 0.1-CPU vCPUs: 96 at 0.9, 16 at 0.945 (one of 0.045
        // more), 8 at 1.0 and 8 at 0.8. The bound is 0.906, so 1.04 × it
        // is 0.942: on constant demand the 16 at 0.945 are trimmed too.
        // With a noise of 0.02 CPU, S is 0.986 and the goal (0.95) decides.
        let (d, home) = banded_host(0.045);
        let domain: Vec<u32> = (0..d.len() as u32).collect();
        let base = vec![0.0; 128];
        let moved = |noise: f32| {
            let t = plan(&Problem { goal: 0.95, noise, ..problem(&d, &home, &domain, &base) });
            assert!(t.makespan <= 0.95, "noise {noise}: {}", t.makespan);
            (0..d.len()).filter(|i| t.at[*i] != home[*i]).collect::<Vec<usize>>()
        };
        let quiet = moved(0.0);
        assert!(quiet.iter().any(|i| (96..112).contains(&home[*i])), "{quiet:?}");
        let noisy = moved(0.02);
        assert_eq!(noisy.len(), 8, "{noisy:?}");
        assert!(noisy.iter().all(|i| (112..120).contains(&home[*i])), "{noisy:?}");
    }

    #[test]
    fn the_repair_takes_off_what_fits_elsewhere() {
        // A large host (more than DESCENT_ITEMS vCPUs): pCPU 0 holds 0.3 and
        // four of 0.05, 0.15 above the level of 0.35; the other 60 hold five
        // of 0.05 each. The 0.3 alone would be enough, but no pCPU has room
        // for it (0.1 at most): where it landed would give up vCPUs in
        // turn. Three of 0.05 fit, and that is all it takes.
        let mut d = vec![0.3];
        let mut home = vec![0];
        for c in 0..61 {
            let count = if c == 0 { 4 } else { 5 };
            d.extend(std::iter::repeat_n(0.05, count));
            home.extend(std::iter::repeat_n(c, count));
        }
        assert!(d.len() > DESCENT_ITEMS);
        let domain: Vec<u32> = (0..d.len() as u32).collect();
        let p = problem(&d, &home, &domain, &[0.0; 61]);
        let Placed { at, load } = repair(&p, 0.35);
        let makespan = load.into_iter().fold(0.0, larger);
        assert!(makespan <= 0.35 + 1e-5, "repaired to {makespan}");
        assert_eq!(at[0], 0, "the 0.3 stays: {at:?}");
        let moved = at.iter().zip(&home).filter(|(a, h)| a != h).count();
        assert_eq!(moved, 3, "{at:?}");
    }

    #[test]
    fn a_medium_instance_lpt_leaves_above_the_margin_is_searched() {
        // The quality bench's 16,4,uniform,first,2: eight 4-vCPU VMs, all
        // on pCPU 0 of 16. LPT and its local search end at 0.808, the best
        // is 0.756: a gap just over the margin (0.05), so without the
        // search the host stayed at 1.07 × best for good.
        let per_vm = [0.3352f32, 0.0584, 0.2287, 0.2501, 0.6358, 0.3052, 0.2773, 0.5793];
        let d: Vec<f32> = per_vm.iter().flat_map(|x| [*x; 4]).collect();
        let home = vec![0; d.len()];
        let domain: Vec<u32> = (0..d.len() as u32).map(|i| i / 4).collect();
        let base = [0.0; 16];
        let p = problem(&d, &home, &domain, &base);
        assert!(p.makespan(&lpt(&p)) > 0.8, "LPT alone");
        let t = plan(&p);
        assert!(t.makespan < 0.76, "{}", t.makespan);
    }

    #[test]
    fn a_one_for_two_exchange_is_found() {
        // (A): four of 0.2 on one pCPU, two of 0.6 on the other.
        let d = [0.2, 0.2, 0.2, 0.2, 0.6, 0.6];
        let home = [0, 0, 0, 0, 1, 1];
        let domain: Vec<u32> = (0..6).collect();
        let t = plan(&problem(&d, &home, &domain, &[0.0; 2]));
        assert!((t.makespan - 1.0).abs() < 1e-5, "{t:?}");
    }

    #[test]
    fn large_instances_come_within_five_percent_of_the_best_found() {
        let d: Vec<f32> = (0..600).map(|i| ((i * 37) % 97) as f32 / 100.0 + 0.01).collect();
        let base = vec![0.0; 200];
        let d64: Vec<f64> = d.iter().map(|x| f64::from(*x)).collect();
        let best = vm_balancer_sdk::makespan::best_placement(&d64, 200, 100_000);
        let found = makespan_of(&d, &base);
        assert!(f64::from(found) <= best.makespan * 1.05, "{found} vs {}", best.makespan);
    }

    #[test]
    fn siblings_spread_where_it_costs_nothing() {
        // Two VMs of two equal vCPUs, each VM's pair on one pCPU.
        let d = [0.5, 0.5, 0.5, 0.5];
        let home = [0, 0, 1, 1];
        let domain = [0, 0, 1, 1];
        let t = plan(&problem(&d, &home, &domain, &[0.0; 2]));
        assert_ne!(t.at[0], t.at[1], "{t:?}");
        assert_ne!(t.at[2], t.at[3], "{t:?}");
        assert!((t.makespan - 1.0).abs() < 1e-5);
    }

    #[test]
    fn relabel_keeps_demand_in_place() {
        // Already optimal: the plan must not move anything.
        let d = [1.0, 0.5, 1.0, 0.5];
        let home = [0, 0, 1, 1];
        let domain: Vec<u32> = (0..4).collect();
        let t = plan(&problem(&d, &home, &domain, &[0.0; 2]));
        assert_eq!(t.at, home);
    }

    /// On a host whose demand moves every quantum, a target within the
    /// noise of the best is as good, and the one that moves less wins; the
    /// local search stops there too, unless that misses the goal. Without
    /// noise the 0.1 CPU moves.
    #[test]
    fn within_the_noise_of_the_best_nothing_moves() {
        // 0.7 against 0.5; the best is 0.6 / 0.6, the bound 0.6.
        let d = [0.6, 0.1, 0.5];
        let home = [0, 0, 1];
        let domain = [0, 1, 2];
        let quiet = plan(&problem(&d, &home, &domain, &[0.0; 2]));
        assert!((quiet.makespan - 0.6).abs() < 1e-5, "{quiet:?}");
        let noisy = plan(&Problem { noise: 0.15, ..problem(&d, &home, &domain, &[0.0; 2]) });
        assert_eq!(noisy.at, home, "{noisy:?}");
        let mut at = home.to_vec();
        improve(&Problem { noise: 0.15, ..problem(&d, &home, &domain, &[0.0; 2]) }, &mut at, 0.6);
        assert_eq!(at, home);
        // But where a plan must reach 0.65 (the hysteresis under 0.7),
        // staying put is no candidate: the plan reaches the best.
        let goal = plan(&Problem { noise: 0.15, goal: 0.65, ..problem(&d, &home, &domain, &[0.0; 2]) });
        assert!((goal.makespan - 0.6).abs() < 1e-5, "{goal:?}");
    }

    /// The exact optimum by the SDK's branch and bound with a large budget.
    fn optimum(d: &[f32], base: &[f32]) -> f32 {
        let d64: Vec<f64> = d.iter().map(|x| f64::from(*x)).collect();
        let b64: Vec<f64> = base.iter().map(|x| f64::from(*x)).collect();
        let best = vm_balancer_sdk::makespan::best_placement_with_base(&d64, &b64, 5_000_000);
        assert!(best.proven_optimal);
        best.makespan as f32
    }

    fn random_problem(rng: &mut rand_chacha::ChaCha8Rng, m: usize, n: usize) -> (Vec<f32>, Vec<usize>, Vec<u32>, Vec<f32>) {
        use rand::Rng;
        let d: Vec<f32> = (0..n)
            .map(|_| match rng.gen_range(0..3) {
                0 => rng.gen_range(0.02f32..1.0),
                1 => [1.0f32, 0.5][rng.gen_range(0..2)],
                _ => (rng.gen_range(1..=10) as f32) / 10.0,
            })
            .collect();
        let home: Vec<usize> = (0..n).map(|_| if rng.gen_bool(0.1) { NONE } else { rng.gen_range(0..m) }).collect();
        let domain: Vec<u32> = (0..n).map(|_| rng.gen_range(0..(n as u32 / 2 + 1))).collect();
        let base: Vec<f32> = (0..m).map(|_| if rng.gen_bool(0.2) { rng.gen_range(0.0f32..0.5) } else { 0.0 }).collect();
        (d, home, domain, base)
    }

    #[test]
    fn the_target_is_the_exact_optimum_on_a_thousand_small_instances() {
        use rand::{Rng, SeedableRng};
        for seed in 0..1000u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let m = rng.gen_range(2..=EXACT_CPUS);
            let n = rng.gen_range(1..=12);
            let (d, home, domain, base) = random_problem(&mut rng, m, n);
            let t = plan(&problem(&d, &home, &domain, &base));
            let best = optimum(&d, &base);
            assert!(t.makespan <= best + 1e-4, "seed {seed}: {} against the optimum {best}: {d:?} over {base:?}", t.makespan);
            assert!(t.at.iter().all(|c| *c < m), "seed {seed}: every vCPU placed: {:?}", t.at);
        }
    }

    #[test]
    fn larger_instances_end_within_five_percent_of_the_best_found() {
        use rand::{Rng, SeedableRng};
        for seed in 0..60u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let m = rng.gen_range(9..=64);
            let n = m * rng.gen_range(1..=4) + rng.gen_range(0..m);
            let (d, home, domain, base) = random_problem(&mut rng, m, n);
            let t = plan(&problem(&d, &home, &domain, &base));
            let d64: Vec<f64> = d.iter().map(|x| f64::from(*x)).collect();
            let b64: Vec<f64> = base.iter().map(|x| f64::from(*x)).collect();
            let best = vm_balancer_sdk::makespan::best_placement_with_base(&d64, &b64, 200_000);
            assert!(f64::from(t.makespan) <= best.makespan * 1.05 + 1e-4, "seed {seed}: {} against {}", t.makespan, best.makespan);
        }
    }

    #[test]
    fn odd_loads_never_break_the_plan() {
        // -0.0, rounding residue below zero, and zero demands: every vCPU
        // still lands on a real pCPU and the makespan is finite.
        let d = [0.3, 0.0, 0.3, 0.3];
        let home = [0, 0, 0, NONE];
        let domain = [0, 1, 2, 3];
        let t = plan(&problem(&d, &home, &domain, &[-1e-6, -0.0, 0.0]));
        assert!(t.at.iter().all(|c| *c < 3) && t.makespan.is_finite() && t.makespan <= 0.3 + 1e-5, "{t:?}");
    }
}
