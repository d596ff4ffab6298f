//! Plan, then move: from the quantum's demands, a target placement
//! ([`crate::target`]), on one NUMA node per VM where that costs at most
//! `cpu.numa_slack_pct` of the makespan; the target is taken only when it
//! beats the current placement by the hysteresis margin; then the moves
//! that reach it, within the quantum's budget, in an order that never
//! raises the busiest pCPU.

use crate::target::{self, Problem, Target, NONE};
use crate::{larger, Hundredths, Item};

/// How the planner decides; read from `[params.cpu]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// A target is taken only when the busiest pCPU's load drops by at
    /// least `max(min_gain, gain_pct % of the current busiest load)`:
    /// demand estimates are noisy in proportion to their size, so a plan
    /// that gains less than the noise would flap.
    pub(crate) min_gain: f32,
    /// See `min_gain` (percent).
    pub(crate) gain_pct: f32,
    /// Moves per quantum; 0 means the automatic budget (see [`budget`]).
    pub(crate) max_moves: usize,
    /// The automatic budget reaches any target within this many quanta.
    pub(crate) converge_quanta: usize,
    /// A VM's vCPUs stay on one NUMA node when that costs at most this
    /// share of the best makespan (percent).
    pub(crate) numa_slack_pct: f32,
    /// A plan must also gain this much (CPUs): `cpu.noise_factor` times
    /// the demand noise measured on the host.
    pub(crate) noise_margin: f32,
    /// The measured demand noise itself (CPUs; 0 when `cpu.noise_factor`
    /// is): see [`Problem::noise`].
    pub(crate) noise: f32,
    /// Moves the guard lets through a quantum, as learnt from its verdicts
    /// (`usize::MAX`: no limit seen).
    pub(crate) pin_cap: usize,
}

/// The quantum's move budget: `cpu.max_moves` when set; else enough to
/// reach the target in `converge_quanta` quanta, at least `max(8, CPUs /
/// 4)`, and at least `carry`, the budget of a previous quantum whose target
/// was cut short (so a target is reached in `converge_quanta` quanta, not
/// approached by halves). Why scale with the need: a host whose vCPUs all
/// sit on one pCPU (unpinned guests at boot, a CPU back online) should not
/// take dozens of quanta to spread, while on a converged host the need is
/// a few moves and the floor is what limits churn. The floor of 8 lets a
/// small host's plan (a 1-for-2 exchange, a chain over three pCPUs) land in
/// one quantum. Whatever the rule, never more than the guard was seen to
/// let through in a quantum (`pin_cap`).
pub(crate) fn budget(s: &Settings, cpus: usize, needed: usize, carry: usize) -> usize {
    if s.max_moves > 0 {
        return s.max_moves.min(s.pin_cap);
    }
    (cpus / 4).max(8).max(needed.div_ceil(s.converge_quanta.max(1))).max(carry).min(s.pin_cap)
}

/// A target being reached over several quanta.
#[derive(Debug, Default)]
pub(crate) struct Carried {
    /// The budget it began with; 0 when nothing is carried.
    pub(crate) budget: usize,
    /// In: per item, the pCPU the carried target sends it to, or [`NONE`]
    /// (empty: nothing carried).
    pub(crate) hint: Vec<usize>,
    /// Out: (item, pCPU) for each vCPU the target still has to move.
    pub(crate) left: Vec<(usize, usize)>,
}

/// Plans this quantum's moves; updates homes and loads. `load` is each
/// usable pCPU's load (vCPUs and host work); `node` each one's NUMA node.
/// `carried` holds what a previous quantum's target cut short left, and
/// takes what this one leaves. Returns (item index, reason) for each vCPU
/// whose home changed, in order.
pub(crate) fn plan_moves(items: &mut [Item], load: &mut [f32], node: &[u32], s: &Settings, carried: &mut Carried) -> Vec<(usize, String)> {
    let hint = std::mem::take(&mut carried.hint);
    let carry = carried.budget;
    carried.budget = 0;
    let m = load.len();
    if m < 2 {
        return Vec::new();
    }
    // The problem's vectors in one pass over the vCPUs (a pass each was a
    // visible share of a 4,000-vCPU quantum in wasm).
    let n = items.len();
    let (mut movable, mut demand, mut home, mut domain) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let mut fixed: Vec<(u32, usize)> = Vec::with_capacity(n);
    let mut base = load.to_vec();
    for (i, it) in items.iter().enumerate() {
        if it.movable {
            movable.push(i);
            demand.push(it.demand);
            home.push(it.home);
            domain.push(it.domain as u32);
            base[it.home] -= it.demand;
        } else {
            fixed.push((it.domain as u32, it.home));
        }
    }
    if movable.is_empty() {
        return Vec::new();
    }
    // The carried target, for the vCPUs still movable (the ones it moved
    // already are cooling, in `base`).
    let hint: Vec<usize> = if hint.is_empty() { Vec::new() } else { movable.iter().map(|i| hint[*i]).collect() };
    let mut problem = Problem {
        demand: &demand,
        home: &home,
        domain: &domain,
        base: &base,
        hint: &hint,
        fixed: &fixed,
        goal: f32::INFINITY,
        noise: s.noise,
    };
    let current = load.iter().copied().fold(0.0, larger);
    let numa = Numa::new(node, items);
    let spanning = numa.as_ref().map_or(0, |n| n.spanning(items, |i| items[i].home));
    // Within the margin of the bound no new plan can be worth its moves. A
    // carried one is finished until the busiest pCPU is within `gain_pct`
    // of the bound (and so of the best placement): its last moves there
    // gain less than the hysteresis would ever start a plan for, on a host
    // that has converged (the quality bench: 8 pins after convergence on a
    // 64-pCPU instance, for 1.02 against 0.99 CPU).
    let lower = problem.lower_bound();
    let balanced = if hint.is_empty() { current <= lower + s.min_gain } else { current <= lower * (1.0 + s.gain_pct / 100.0) };
    // A target begun in an earlier quantum is finished while it beats the
    // current placement by a quarter of the margin (the margin was paid
    // when it began; the rest of it is not churn for nothing while it gains
    // that). Half the margin, and no plan at all within the margin of the
    // bound, left the last few moves of a first plan cut by the budget
    // undone for good (16 pCPUs, 4 vCPUs/VM, giants, random, seed 2 of the
    // quality bench: 12 moves planned, 8 allowed, stuck at 1.10 x best).
    let margin = larger(s.min_gain, s.gain_pct / 100.0 * current);
    // The noise margin holds back a new target only: a carried one was
    // worth its moves when it began.
    let hysteresis = if hint.is_empty() { larger(margin, s.noise_margin) } else { margin / 4.0 };
    // What a plan must reach to be taken: a large host's cheap plan trims
    // only the pCPUs above it (see `target::FAST_TRIGGER_PCT`).
    problem.goal = current - hysteresis;

    let planned = (!balanced).then(|| target::plan(&problem));
    let local = numa.as_ref().filter(|_| !balanced || spanning > 0).map(|n| n.plan(&problem, items, &movable));
    let best_known = planned.as_ref().map_or(current, |t| t.makespan.min(current));
    let mut chosen: Option<(Target, &str)> = None;
    if let (Some(n), Some(local)) = (&numa, local) {
        let local_spanning = n.spanning(items, |i| movable.binary_search(&i).map_or(items[i].home, |k| local.at[k]));
        let within_slack = local.makespan <= best_known * (1.0 + s.numa_slack_pct / 100.0) + 1e-5;
        let gains = local.makespan < current - hysteresis;
        let gathers = local_spanning < spanning && local.makespan <= current * (1.0 + s.numa_slack_pct / 100.0) + 1e-5;
        if within_slack && (gains || gathers) {
            chosen = Some((local, "plan, VMs on one NUMA node"));
        }
    }
    if chosen.is_none() {
        // Second to the busiest pCPU, demand above capacity (see
        // [`target::Overload`]): a plan that keeps the busiest and leaves
        // less overload by the margin is worth its moves.
        let overload = target::Overload::of(load);
        if let Some(t) = planned
            .filter(|t| t.makespan < current - hysteresis || (t.makespan <= current + 1e-4 && t.overload.beats(overload, hysteresis)))
        {
            chosen = Some((t, "plan"));
        }
    }
    let (at, why, after) = match chosen {
        Some((t, why)) => (t.at, why, t.makespan),
        None => {
            // Nothing worth a plan: only spread a VM's vCPUs that share a pCPU.
            let mut at = home.clone();
            target::spread(&problem, &mut at, current, false);
            (at, "spread a VM's vCPUs", current)
        }
    };
    let pending: Vec<usize> = (0..movable.len()).filter(|k| at[*k] != home[*k]).collect();
    let allowed = budget(s, m, pending.len(), carry);
    let order = order_moves(&demand, &home, &at, &pending, load, allowed);
    // Carried to the next quantum: a target the budget cut short (not the
    // rule that no move may raise the busiest pCPU: those moves wait for a
    // plan that makes room).
    if order.len() < pending.len() && order.len() >= allowed && s.max_moves == 0 {
        carried.budget = allowed;
        let done: Vec<bool> = {
            let mut done = vec![false; movable.len()];
            order.iter().for_each(|k| done[*k] = true);
            done
        };
        carried.left = pending.iter().filter(|k| !done[**k]).map(|k| (movable[*k], at[*k])).collect();
    }
    let reason = format!("{why}: busiest pCPU load {} -> {}", Hundredths(current), Hundredths(after));
    order
        .into_iter()
        .map(|k| {
            let i = movable[k];
            items[i].home = at[k];
            items[i].movable = false;
            items[i].moved = true;
            (i, reason.clone())
        })
        .collect()
}

/// Orders the moves (`pending`, indexes into the problem's vCPUs) from
/// `home` to `at`, at most `budget` of them, updating `load`. All of them
/// when the budget allows (they land in one quantum), still in the order
/// below: the guard lets the first ones through when a plan is larger than
/// its per-quantum pin limit, which the policy learns only from the
/// verdicts of a quantum where it was hit. Otherwise each quantum's share
/// never raises the busiest pCPU (see [`drain`]): safe single moves
/// first, from the busiest source, then pairs of moves the opposite ways
/// between two pCPUs.
fn order_moves(demand: &[f32], home: &[usize], at: &[usize], pending: &[usize], load: &mut [f32], budget: usize) -> Vec<usize> {
    if pending.len() > budget {
        return drain(demand, home, at, pending, load, budget);
    }
    let mut order = drain(demand, home, at, pending, load, pending.len());
    if order.len() < pending.len() {
        // The rest land too: the whole target is reached this quantum.
        let mut done = vec![false; demand.len()];
        order.iter().for_each(|k| done[*k] = true);
        for &k in pending.iter().filter(|k| !done[**k]) {
            shift(load, home[k], at[k], demand[k]);
            order.push(k);
        }
    }
    order
}

/// Moves `demand` of load from pCPU `from` to pCPU `to`.
fn shift(load: &mut [f32], from: usize, to: usize, demand: f32) {
    load[from] -= demand;
    load[to] += demand;
}

/// At most `budget` of `pending`'s moves that never raise the busiest pCPU,
/// busiest source first (see [`order_moves`]), applied to `load`.
fn drain(demand: &[f32], home: &[usize], at: &[usize], pending: &[usize], load: &mut [f32], budget: usize) -> Vec<usize> {
    let apply = |load: &mut [f32], k: usize| shift(load, home[k], at[k], demand[k]);
    let max = load.iter().copied().fold(0.0, larger);
    let tol = 1e-5 * larger(max, 1.0);
    let mut done = Vec::with_capacity(budget);
    // Each pCPU's load once every pending move has landed.
    let mut goal = load.to_vec();
    for &k in pending {
        apply(&mut goal, k);
    }
    // Safe single moves, each from the busiest source of the moment (its
    // largest move that is safe first). Draining whichever source is
    // busiest now, rather than each source in turn down to its target,
    // lowers the busiest pCPU the most per move when the budget cuts the
    // plan short (`large`, whose first plan is 1,700 moves and whose guard
    // lets 256 a quantum through: mean busiest load 1.21 × the bound,
    // against 1.31 draining each source in turn). Two passes:
    // - a destination ends no higher than its goal (its load once the plan
    //   is done) or than the source is left with (the pair's larger load
    //   drops): a pCPU that trades small vCPUs for a large one takes the
    //   large one once the small ones have left. (Before, `large`'s first
    //   256 moves filled such pCPUs up to 1.29 while the busiest came down
    //   to it; mean busiest load 1.201 × the best against 1.208.)
    // - then, for what a cycle of full pCPUs holds back, a destination ends
    //   no higher than the busiest pCPU of the moment (irqbalance's rule:
    //   no move reverses the imbalance).
    // A move that does not fit yet may once others have left its
    // destination, so a few rounds each. The busiest load of the moment is
    // kept up to date move by move at O(log pCPUs).
    let mut busiest = MaxTree::new(load);
    let m = load.len();
    let mut left: Vec<usize> = pending.to_vec();
    for strict in [true, false] {
        for _ in 0..16 {
            // Each source's moves, smallest first (popped largest first).
            let mut from: Vec<Vec<usize>> = vec![Vec::new(); m];
            for &k in &left {
                from[home[k]].push(k);
            }
            for moves in &mut from {
                moves.sort_unstable_by(|x, y| demand[*x].total_cmp(&demand[*y]).then(y.cmp(x)));
            }
            let mut sources: std::collections::BinaryHeap<(u32, std::cmp::Reverse<usize>)> =
                (0..m).filter(|c| !from[*c].is_empty()).map(|c| (target::order_bits(load[c]), std::cmp::Reverse(c))).collect();
            let mut next = Vec::with_capacity(left.len());
            let before = done.len();
            while done.len() < budget {
                let Some((_, std::cmp::Reverse(c))) = sources.pop() else { break };
                let moves = &mut from[c];
                // The largest of its moves that is safe now; the others wait.
                let ceiling = |k: usize| if strict { larger(goal[at[k]], load[c] - demand[k]) } else { busiest.max() };
                let safe = moves.iter().rposition(|&k| load[at[k]] + demand[k] <= ceiling(k) + tol);
                let Some(pos) = safe else {
                    next.append(moves);
                    continue;
                };
                let k = moves.remove(pos);
                apply(load, k);
                busiest.set(home[k], load[home[k]]);
                busiest.set(at[k], load[at[k]]);
                done.push(k);
                if !moves.is_empty() {
                    sources.push((target::order_bits(load[c]), std::cmp::Reverse(c)));
                }
            }
            for moves in &mut from {
                next.append(moves);
            }
            left = next;
            if done.len() == before || done.len() >= budget {
                break;
            }
        }
    }
    let cap = load.iter().copied().fold(0.0, larger) + tol;
    // Then pairs of moves the opposite ways between two pCPUs (a swap
    // neither half of which fits alone), found by a lookup, not a scan.
    let mut by_route: std::collections::BTreeMap<(usize, usize), Vec<usize>> = std::collections::BTreeMap::new();
    for &k in &left {
        by_route.entry((home[k], at[k])).or_default().push(k);
    }
    let mut used = vec![false; demand.len()];
    for &x in &left {
        if budget - done.len() < 2 {
            break;
        }
        if used[x] {
            continue;
        }
        let Some(back) = by_route.get(&(at[x], home[x])) else { continue };
        let partner = back.iter().copied().find(|&y| {
            let shift = demand[x] - demand[y];
            !used[y] && load[at[x]] + shift <= cap && load[home[x]] - shift <= cap
        });
        if let Some(y) = partner {
            for k in [x, y] {
                used[k] = true;
                apply(load, k);
                done.push(k);
            }
        }
    }
    done
}

/// The largest of a set of loads under updates: a tournament tree, each
/// inner node the larger of its two children (node 1 covers every leaf,
/// whatever the count: each leaf's chain of halvings ends there).
struct MaxTree {
    /// `len` leaves from index `len` on; node `i`'s children are `2i`, `2i + 1`.
    node: Vec<f32>,
    len: usize,
}

impl MaxTree {
    fn new(load: &[f32]) -> Self {
        let len = load.len().max(1);
        let mut node = vec![0.0f32; 2 * len];
        node[len..len + load.len()].copy_from_slice(load);
        for i in (1..len).rev() {
            node[i] = larger(node[2 * i], node[2 * i + 1]);
        }
        MaxTree { node, len }
    }

    fn set(&mut self, i: usize, value: f32) {
        let mut i = i + self.len;
        self.node[i] = value;
        while i > 1 {
            i /= 2;
            self.node[i] = larger(self.node[2 * i], self.node[2 * i + 1]);
        }
    }

    /// The largest load (at least 0, as a fold from 0 would give).
    fn max(&self) -> f32 {
        larger(self.node[1], 0.0)
    }
}

/// The host's NUMA nodes, when it has more than one.
struct Numa {
    /// Each usable pCPU's node, as a dense index.
    of_cpu: Vec<usize>,
    /// Nodes' count.
    nodes: usize,
    /// Domains' count (the largest domain index + 1).
    domains: usize,
}

impl Numa {
    fn new(node: &[u32], items: &[Item]) -> Option<Self> {
        let mut ids: Vec<u32> = node.to_vec();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < 2 {
            return None;
        }
        let of_cpu = node.iter().map(|n| ids.binary_search(n).unwrap_or(0)).collect();
        let domains = items.iter().map(|it| it.domain + 1).max().unwrap_or(0);
        Some(Numa { of_cpu, nodes: ids.len(), domains })
    }

    /// VMs whose vCPUs (placed by `at`) span more than one node.
    fn spanning(&self, items: &[Item], at: impl Fn(usize) -> usize) -> usize {
        let mut first = vec![usize::MAX; self.domains];
        let mut spans = vec![false; self.domains];
        for (i, it) in items.iter().enumerate() {
            let n = self.of_cpu[at(i)];
            match first[it.domain] {
                usize::MAX => first[it.domain] = n,
                f if f != n => spans[it.domain] = true,
                _ => {}
            }
        }
        spans.iter().filter(|s| **s).count()
    }

    /// The target with each VM on one node: VMs stay on the node holding
    /// most of their demand, then whole VMs move from the busiest node
    /// (per pCPU) to the least busy while that lowers the pair's larger
    /// load; then each node is planned on its own.
    fn plan(&self, p: &Problem, items: &[Item], movable: &[usize]) -> Target {
        let k = self.nodes;
        // Per domain and node, demand (all its vCPUs, movable or not).
        let mut held = vec![0.0f32; self.domains * k];
        for it in items {
            held[it.domain * k + self.of_cpu[it.home]] += it.demand + 1e-6;
        }
        let mut home_node: Vec<usize> = (0..self.domains)
            .map(|d| (0..k).max_by(|a, b| held[d * k + a].total_cmp(&held[d * k + b]).then(b.cmp(a))).unwrap_or(0))
            .collect();
        let mut cpus = vec![0usize; k];
        let mut node_load = vec![0.0f32; k];
        for (c, &n) in self.of_cpu.iter().enumerate() {
            cpus[n] += 1;
            node_load[n] += p.base[c];
        }
        let mut movable_demand = vec![0.0f32; self.domains];
        for (kk, &i) in movable.iter().enumerate() {
            movable_demand[items[i].domain] += p.demand[kk];
        }
        for (d, &dd) in movable_demand.iter().enumerate() {
            node_load[home_node[d]] += dd;
        }
        let per_cpu = |load: &[f32], n: usize| load[n] / cpus[n].max(1) as f32;
        for _ in 0..self.domains.max(1) {
            let h = (0..k).max_by(|a, b| per_cpu(&node_load, *a).total_cmp(&per_cpu(&node_load, *b))).unwrap_or(0);
            let l = (0..k).min_by(|a, b| per_cpu(&node_load, *a).total_cmp(&per_cpu(&node_load, *b))).unwrap_or(0);
            let before = per_cpu(&node_load, h);
            let best = (0..self.domains)
                .filter(|d| home_node[*d] == h && movable_demand[*d] > 0.0)
                .map(|d| {
                    let dd = movable_demand[d];
                    let after = larger((node_load[h] - dd) / cpus[h] as f32, (node_load[l] + dd) / cpus[l] as f32);
                    (after, d)
                })
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            match best {
                Some((after, d)) if after < before - 1e-4 * larger(before, 1.0) => {
                    node_load[h] -= movable_demand[d];
                    node_load[l] += movable_demand[d];
                    home_node[d] = l;
                }
                _ => break,
            }
        }
        // Each node on its own: its pCPUs, the VMs assigned to it.
        let mut at = vec![NONE; p.demand.len()];
        for n in 0..k {
            let slots: Vec<usize> = (0..self.of_cpu.len()).filter(|c| self.of_cpu[*c] == n).collect();
            let mut local = vec![NONE; self.of_cpu.len()];
            for (j, &c) in slots.iter().enumerate() {
                local[c] = j;
            }
            let members: Vec<usize> = (0..p.demand.len()).filter(|kk| home_node[items[movable[*kk]].domain] == n).collect();
            let demand: Vec<f32> = members.iter().map(|kk| p.demand[*kk]).collect();
            let home: Vec<usize> = members.iter().map(|kk| local[p.home[*kk]]).collect();
            let domain: Vec<u32> = members.iter().map(|kk| p.domain[*kk]).collect();
            let base: Vec<f32> = slots.iter().map(|c| p.base[*c]).collect();
            let fixed: Vec<(u32, usize)> = p.fixed.iter().filter(|f| local[f.1] != NONE).map(|f| (f.0, local[f.1])).collect();
            let t = target::plan(&Problem {
                demand: &demand,
                home: &home,
                domain: &domain,
                base: &base,
                hint: &[],
                fixed: &fixed,
                goal: p.goal,
                noise: p.noise,
            });
            for (j, &kk) in members.iter().enumerate() {
                at[kk] = slots[t.at[j]];
            }
        }
        p.target(at)
    }
}

#[cfg(test)]
mod tests {
    use super::MaxTree;

    #[test]
    fn the_max_tree_follows_every_update_at_every_size() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % 1000) as f32 / 100.0
        };
        for len in 1..40 {
            let mut load: Vec<f32> = (0..len).map(|_| next()).collect();
            let mut tree = MaxTree::new(&load);
            for step in 0..200 {
                let i = step * 7 % len;
                load[i] = next();
                tree.set(i, load[i]);
                assert_eq!(tree.max(), load.iter().copied().fold(0.0, f32::max), "{len} loads, step {step}");
            }
        }
    }
}
