//! The planner: improving exchanges from the current placement, and, when
//! those are stuck, a target placement planned from scratch (LPT plus local
//! search), relabelled onto the current pCPUs and reached by moves that
//! never raise the busiest pCPU's load.
//!
//! Why two parts: exchanges from the current placement move few vCPUs and
//! converge fast on a large host, but a local search stops in local optima
//! (a 1-for-2 exchange needed, a chain over three pCPUs, a partner far
//! down the load order: issue 12's stalls). A planned target has none of
//! those, but reaching it moves more vCPUs, so it is used only when it
//! beats where the exchanges got by `min_gain`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::{larger, Gain, Hundredths, Item};

/// Work limit of one search (candidate exchanges looked at): keeps the
/// 4,000-vCPU quantum within its budget whatever the placement.
const EVAL_BUDGET: usize = 200_000;
/// 2↔1 and 1↔2 exchanges are tried only between pCPUs with at most this
/// many movable vCPUs (their cost is cubic; on hosts with more vCPUs per
/// pCPU single moves and swaps have enough granularity).
const SMALL: usize = 8;
/// Instances up to this many movable vCPUs and pCPUs are planned exactly
/// (the search is bounded by `EXACT_NODES`, a few tens of microseconds).
const EXACT_ITEMS: usize = 16;
/// See `EXACT_ITEMS`.
const EXACT_CPUS: usize = 16;
/// Node budget of the exact plan.
const EXACT_NODES: u64 = 20_000;

/// Per-pCPU loads and the movable vCPUs on each.
#[derive(Clone, Debug)]
struct State {
    load: Vec<f32>,
    on: Vec<Vec<usize>>,
    at: Vec<usize>,
}

impl State {
    fn shift(&mut self, d: &[f32], i: usize, to: usize, keep_movable: bool) {
        let from = self.at[i];
        self.on[from].retain(|x| *x != i);
        self.load[from] -= d[i];
        self.load[to] += d[i];
        self.at[i] = to;
        if keep_movable {
            self.on[to].push(i);
        }
    }

    fn busiest(&self) -> f32 {
        self.load.iter().copied().fold(0.0, larger)
    }
}

/// One exchange between pCPUs `a` (busier) and `b`.
#[derive(Clone, Copy, Debug)]
struct Exchange {
    score: f32,
    out: [usize; 2],
    n_out: usize,
    back: [usize; 2],
    n_back: usize,
    b: usize,
}

/// Why a search stopped.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// The busiest pCPU is within `min_gain` of the mean.
    Balanced,
    /// No improving exchange left.
    Stuck,
    /// The move budget or the work limit ran out: it could go on.
    Budget,
}

/// Improving exchanges from the busiest pCPUs, each lowering the pair's
/// larger load by at least the gain (so the sorted load vector falls:
/// ties at the maximum do not stop it, and nothing cycles). Returns the
/// (item, from, to, exchange number) of each move, in order, and why it stopped.
fn descend(s: &mut State, d: &[f32], gain: Gain, max_moves: usize, once: bool) -> (Vec<(usize, usize, usize, usize)>, Stop) {
    let m = s.load.len();
    let mut steps = Vec::new();
    if m < 2 {
        return (steps, Stop::Balanced);
    }
    let mean = s.load.iter().sum::<f32>() / m as f32;
    let mut stuck = vec![false; m];
    let mut evals = 0usize;
    let mut order: Vec<u64> = Vec::with_capacity(m);
    let mut exchanges = 0;
    loop {
        let Some(a) = (0..m).filter(|c| !stuck[*c]).max_by(|x, y| s.load[*x].total_cmp(&s.load[*y])) else {
            return (steps, Stop::Stuck);
        };
        let la = s.load[a];
        if la <= mean + gain.min {
            return (steps, if stuck.iter().any(|x| *x) { Stop::Stuck } else { Stop::Balanced });
        }
        if s.on[a].is_empty() {
            stuck[a] = true;
            continue;
        }
        order.clear();
        order.extend((0..m).filter(|c| *c != a).map(|c| (u64::from(s.load[c].max(0.0).to_bits()) << 32) | c as u64));
        order.sort_unstable();
        let slack = 1e-4 * la.abs().max(1.0);
        // No exchange of one vCPU leaves `a` below `la - largest`.
        let largest = s.on[a].iter().map(|i| d[*i]).fold(0.0, larger);
        let small = s.on[a].len() <= SMALL;
        let mut best: Option<Exchange> = None;
        for &key in &order {
            let b = (key & u64::from(u32::MAX)) as usize;
            let lb = s.load[b];
            let bar = best.map_or(la - gain.min, |x| x.score);
            if (la + lb) / 2.0 - slack >= bar || (!small && la - largest >= bar) {
                break;
            }
            if let Some(x) = best_exchange(s, d, a, b, gain, bar, best.is_some(), &mut evals) {
                best = Some(x);
            }
            if evals > EVAL_BUDGET {
                break;
            }
        }
        match best {
            Some(x) => {
                for &i in &x.out[..x.n_out] {
                    steps.push((i, a, x.b, exchanges));
                    s.shift(d, i, x.b, !once);
                }
                for &j in &x.back[..x.n_back] {
                    steps.push((j, x.b, a, exchanges));
                    s.shift(d, j, a, !once);
                }
                stuck[x.b] = false;
                exchanges += 1;
                if steps.len() >= max_moves || evals > EVAL_BUDGET {
                    return (steps, Stop::Budget);
                }
            }
            None if evals > EVAL_BUDGET => return (steps, Stop::Budget),
            None => stuck[a] = true,
        }
    }
}

/// The best exchange between `a` and `b` scoring below `bar` (strictly,
/// when `any`), gaining enough for the demand it shifts.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn best_exchange(s: &State, d: &[f32], a: usize, b: usize, gain: Gain, bar: f32, any: bool, evals: &mut usize) -> Option<Exchange> {
    let (la, lb) = (s.load[a], s.load[b]);
    let (on_a, on_b) = (&s.on[a], &s.on[b]);
    let small = on_a.len() <= SMALL && on_b.len() <= SMALL;
    let mut best = Best { found: None, bar, any, la, lb, gain, b };
    for (k, &x) in on_a.iter().enumerate() {
        let dx = d[x];
        *evals += 1;
        if !small && best.any && la - dx >= best.bar {
            continue;
        }
        *evals += on_b.len();
        best.consider(dx, dx, &[x], &[]);
        for (l, &y) in on_b.iter().enumerate() {
            let dy = d[y];
            if dy < dx {
                best.consider(dx - dy, dx + dy, &[x], &[y]);
            }
            if small {
                for &y2 in &on_b[l + 1..] {
                    let dy2 = d[y2];
                    if dy + dy2 < dx {
                        best.consider(dx - dy - dy2, dx + dy + dy2, &[x], &[y, y2]);
                    }
                }
            }
        }
        if small {
            *evals += on_a.len() * on_b.len();
            for &x2 in &on_a[k + 1..] {
                let dx2 = d[x2];
                for &y in on_b {
                    let dy = d[y];
                    if dy < dx + dx2 {
                        best.consider(dx + dx2 - dy, dx + dx2 + dy, &[x, x2], &[y]);
                    }
                }
            }
        }
    }
    best.found
}

/// The best exchange found so far between `a` and `b`.
struct Best {
    found: Option<Exchange>,
    bar: f32,
    any: bool,
    la: f32,
    lb: f32,
    gain: Gain,
    b: usize,
}

impl Best {
    #[inline(always)]
    fn consider(&mut self, delta: f32, shifted: f32, out: &[usize], back: &[usize]) {
        if delta <= 0.0 {
            return;
        }
        let score = larger(self.la - delta, self.lb + delta);
        if score < self.la - self.gain.required(shifted) && (!self.any || score < self.bar) {
            let mut x = Exchange { score, out: [0; 2], n_out: out.len(), back: [0; 2], n_back: back.len(), b: self.b };
            x.out[..out.len()].copy_from_slice(out);
            x.back[..back.len()].copy_from_slice(back);
            (self.found, self.bar, self.any) = (Some(x), score, true);
        }
    }
}

/// A target placement of the movable items from scratch: largest first onto
/// the least-loaded pCPU (over each pCPU's fixed load), preferring, among
/// equally loaded pCPUs, one without a vCPU of the same domain. Returns each
/// movable item's target "group" (an LPT pCPU index).
fn lpt(items: &[Item], movable: &[usize], base: &[f32]) -> Vec<usize> {
    let m = base.len();
    let mut order: Vec<usize> = movable.to_vec();
    order.sort_by(|x, y| items[*y].demand.total_cmp(&items[*x].demand).then(x.cmp(y)));
    let key = |load: f32, c: usize| Reverse((u64::from(load.max(0.0).to_bits()) << 32) | c as u64);
    let mut heap: BinaryHeap<Reverse<u64>> = (0..m).map(|c| key(base[c], c)).collect();
    let mut load = base.to_vec();
    let mut domains: Vec<Vec<usize>> = vec![Vec::new(); m];
    let mut target = vec![usize::MAX; items.len()];
    let mut held: Vec<Reverse<u64>> = Vec::new();
    for i in order {
        let dom = items[i].domain;
        let Some(first) = heap.pop() else { break };
        let mut pick = first;
        let low = load[(first.0 & u64::from(u32::MAX)) as usize];
        // Spread: look at a few equally loaded pCPUs for one without a sibling.
        if domains[(first.0 & u64::from(u32::MAX)) as usize].contains(&dom) {
            for _ in 0..3 {
                let Some(next) = heap.pop() else { break };
                let c = (next.0 & u64::from(u32::MAX)) as usize;
                held.push(next);
                if load[c] > low + 1e-6 {
                    break;
                }
                if !domains[c].contains(&dom) {
                    held.pop();
                    held.push(pick);
                    pick = next;
                    break;
                }
            }
        }
        heap.extend(held.drain(..));
        let c = (pick.0 & u64::from(u32::MAX)) as usize;
        load[c] += items[i].demand;
        domains[c].push(dom);
        target[i] = c;
        heap.push(key(load[c], c));
    }
    target
}

/// The planned placement of the movable items over the fixed loads `base`,
/// relabelled onto the current pCPUs: exact (SDK branch and bound, a small
/// node budget) on tiny instances, LPT otherwise; each item's target pCPU.
fn target_placement(items: &[Item], movable: &[usize], base: &[f32]) -> Vec<usize> {
    let group = if movable.len() <= EXACT_ITEMS && base.len() <= EXACT_CPUS {
        let demands: Vec<f64> = movable.iter().map(|i| f64::from(items[*i].demand)).collect();
        let base64: Vec<f64> = base.iter().map(|b| f64::from(*b)).collect();
        let best = vm_balancer_sdk::makespan::best_placement_with_base(&demands, &base64, EXACT_NODES);
        let mut group = vec![usize::MAX; items.len()];
        for (k, &i) in movable.iter().enumerate() {
            group[i] = best.assignment[k];
        }
        group
    } else {
        lpt(items, movable, base)
    };
    relabel(items, movable, &group, base)
}

/// Maps the LPT groups onto pCPUs so that as much demand as possible stays
/// where it is (greedy matching on overlap weight), keeping each pCPU
/// within the plan's busiest load where possible. Returns each movable
/// item's target pCPU.
fn relabel(items: &[Item], movable: &[usize], group: &[usize], base: &[f32]) -> Vec<usize> {
    let m = base.len();
    let mut group_load = vec![0.0f32; m];
    for &i in movable {
        group_load[group[i]] += items[i].demand;
    }
    let cap = (0..m).map(|g| base[g] + group_load[g]).fold(0.0, larger);
    let tol = 1e-4 * cap.max(1.0);
    let mut overlap: Vec<(usize, usize, f32)> = movable.iter().map(|&i| (group[i], items[i].home, items[i].demand)).collect();
    overlap.sort_unstable_by_key(|(g, p, _)| (*g, *p));
    let mut merged: Vec<(usize, usize, f32)> = Vec::with_capacity(overlap.len());
    for (g, p, w) in overlap {
        match merged.last_mut() {
            Some(last) if last.0 == g && last.1 == p => last.2 += w,
            _ => merged.push((g, p, w)),
        }
    }
    merged.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
    let mut to = vec![usize::MAX; m];
    let mut taken = vec![false; m];
    for (g, p, _) in merged {
        if to[g] == usize::MAX && !taken[p] && base[p] + group_load[g] <= cap + tol {
            to[g] = p;
            taken[p] = true;
        }
    }
    // The rest: the heaviest groups onto the least-loaded free pCPUs.
    let mut groups: Vec<usize> = (0..m).filter(|g| to[*g] == usize::MAX).collect();
    groups.sort_by(|x, y| group_load[*y].total_cmp(&group_load[*x]).then(x.cmp(y)));
    let mut cpus: Vec<usize> = (0..m).filter(|p| !taken[*p]).collect();
    cpus.sort_by(|x, y| base[*x].total_cmp(&base[*y]).then(x.cmp(y)));
    for (g, p) in groups.into_iter().zip(cpus) {
        to[g] = p;
    }
    let mut target = vec![usize::MAX; items.len()];
    for &i in movable {
        target[i] = to[group[i]];
    }
    target
}

/// Orders the moves from the current placement to `target` so that none
/// raises the busiest pCPU's load (a move that would is made as a swap with
/// a move the other way, or deferred), at most `budget` of them. Returns
/// (item, to) in order; loads are updated.
fn order_moves(items: &[Item], load: &mut [f32], target: &[usize], movable: &[usize], budget: usize) -> Vec<(usize, usize)> {
    let mut pending: Vec<usize> = movable.iter().copied().filter(|&i| target[i] != items[i].home).collect();
    let mut done = Vec::new();
    let tol = 1e-5;
    while done.len() < budget && !pending.is_empty() {
        let max = load.iter().copied().fold(0.0, larger);
        // A safe single move, from the busiest source first.
        let single = pending
            .iter()
            .enumerate()
            .filter(|(_, &i)| load[target[i]] + items[i].demand <= max + tol)
            .max_by(|(_, &x), (_, &y)| load[items[x].home].total_cmp(&load[items[y].home]))
            .map(|(k, _)| k);
        if let Some(k) = single {
            let i = pending.swap_remove(k);
            load[items[i].home] -= items[i].demand;
            load[target[i]] += items[i].demand;
            done.push((i, target[i]));
            continue;
        }
        if budget - done.len() < 2 {
            break;
        }
        // A safe pair of moves the opposite ways between two pCPUs.
        let mut pair = None;
        'outer: for (k, &x) in pending.iter().enumerate() {
            let (a, b) = (items[x].home, target[x]);
            for (l, &y) in pending.iter().enumerate() {
                if items[y].home == b && target[y] == a {
                    let shift = items[x].demand - items[y].demand;
                    if load[b] + shift <= max + tol && load[a] - shift <= max + tol {
                        pair = Some((k, l));
                        break 'outer;
                    }
                }
            }
        }
        let Some((k, l)) = pair else { break };
        let (x, y) = (pending[k], pending[l]);
        for i in [x, y] {
            load[items[i].home] -= items[i].demand;
            load[target[i]] += items[i].demand;
            done.push((i, target[i]));
        }
        pending.retain(|i| *i != x && *i != y);
    }
    done
}

/// Plans at most `budget` moves; mutates homes and loads. Returns
/// (item index, reason) for each vCPU whose home changed, in the order to apply.
#[inline(never)]
pub(crate) fn plan_moves(items: &mut [Item], load: &mut [f32], budget: usize, gain: Gain) -> Vec<(usize, String)> {
    let m = load.len();
    if m < 2 {
        return Vec::new();
    }
    let d: Vec<f32> = items.iter().map(|it| it.demand).collect();
    let movable: Vec<usize> = (0..items.len()).filter(|i| items[*i].movable).collect();
    let mut state = State { load: load.to_vec(), on: vec![Vec::new(); m], at: items.iter().map(|it| it.home).collect() };
    for &i in &movable {
        state.on[items[i].home].push(i);
    }
    let before = state.busiest();
    // Where exchanges alone get (looking a little past this quantum's
    // budget, so that a plan is compared with where they lead, not with
    // their first steps).
    let (steps, stop) = descend(&mut state, &d, gain, 4 * budget + 8, true);
    let reached = state.busiest();
    let mut out = Vec::new();
    if stop == Stop::Stuck && !movable.is_empty() {
        // Stuck above the lower bound? Plan from scratch and compare.
        let mut base = load.to_vec();
        for &i in &movable {
            base[items[i].home] -= items[i].demand;
        }
        let total: f32 = load.iter().sum();
        let largest = movable.iter().map(|i| d[*i]).fold(0.0, larger);
        let min_base = base.iter().copied().fold(f32::INFINITY, f32::min);
        let lower = larger(total / m as f32, largest + min_base);
        if reached > lower + gain.min {
            let target = target_placement(items, &movable, &base);
            let mut planned = State { load: base.clone(), on: vec![Vec::new(); m], at: items.iter().map(|it| it.home).collect() };
            for &i in &movable {
                planned.at[i] = target[i];
                planned.load[target[i]] += d[i];
                planned.on[target[i]].push(i);
            }
            let fine = Gain { min: 1e-4 * lower.max(1.0), ratio: 0.0 };
            descend(&mut planned, &d, fine, 4 * movable.len() + 16, false);
            let best = planned.busiest();
            // The plan must gain enough for the demand it shifts, as a single exchange must.
            let shifted: f32 = movable.iter().filter(|i| planned.at[**i] != items[**i].home).map(|i| d[*i]).sum();
            if best < reached - gain.required(shifted) {
                let moves = order_moves(items, load, &planned.at, &movable, budget);
                for (i, to) in moves {
                    items[i].home = to;
                    items[i].movable = false;
                    items[i].moved = true;
                    out.push((i, format!("plan: busiest pCPU load {} -> {}", Hundredths(before), Hundredths(best))));
                }
                return out;
            }
        }
    }
    // The first exchanges within the budget (an exchange is never split:
    // half a swap could raise the busiest pCPU).
    let mut last = usize::MAX;
    for (i, from, to, exchange) in steps {
        if exchange != last && out.len() >= budget {
            break;
        }
        last = exchange;
        load[from] -= d[i];
        load[to] += d[i];
        items[i].home = to;
        items[i].movable = false;
        items[i].moved = true;
        out.push((i, format!("busiest pCPU load {} -> {}", Hundredths(before), Hundredths(reached))));
    }
    out
}

/// The planned target's busiest load for a fully movable instance (tests).
#[cfg(test)]
pub(crate) fn planned_makespan(items: &[Item], base: &[f32]) -> f32 {
    let movable: Vec<usize> = (0..items.len()).collect();
    let d: Vec<f32> = items.iter().map(|it| it.demand).collect();
    let target = target_placement(items, &movable, base);
    let m = base.len();
    let mut planned = State { load: base.to_vec(), on: vec![Vec::new(); m], at: target.clone() };
    for &i in &movable {
        planned.load[target[i]] += d[i];
        planned.on[target[i]].push(i);
    }
    let fine = Gain { min: 1e-4, ratio: 0.0 };
    descend(&mut planned, &d, fine, 4 * movable.len() + 16, false);
    planned.busiest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(domain: usize, demand: f32, home: usize) -> Item {
        Item { domain, vcpu: 0, demand, home, movable: true, moved: false }
    }

    #[test]
    fn lpt_spreads_siblings_over_equal_pcpus() {
        let items: Vec<Item> = (0..4).map(|_| item(0, 0.5, 0)).collect();
        let group = lpt(&items, &[0, 1, 2, 3], &[0.0; 4]);
        let mut g = group.clone();
        g.sort();
        assert_eq!(g, [0, 1, 2, 3], "{group:?}");
    }

    #[test]
    fn order_never_raises_the_busiest() {
        // {L,L,L}, {H,H}, {H}: the chain.
        let mut items = vec![item(0, 0.5, 0), item(1, 0.5, 0), item(2, 0.5, 0), item(3, 1.0, 1), item(4, 1.0, 1), item(5, 1.0, 2)];
        let mut load = vec![1.5, 2.0, 1.0];
        let movable: Vec<usize> = (0..6).collect();
        let base = vec![0.0; 3];
        let group = lpt(&items, &movable, &base);
        let target = relabel(&items, &movable, &group, &base);
        let moves = order_moves(&items, &mut load, &target, &movable, 10);
        let mut l = vec![1.5f32, 2.0, 1.0];
        for (i, to) in moves {
            l[items[i].home] -= items[i].demand;
            l[to] += items[i].demand;
            items[i].home = to;
            assert!(l.iter().all(|x| *x <= 2.0 + 1e-5), "{l:?}");
        }
        assert!(l.iter().all(|x| (*x - 1.5).abs() < 1e-5), "{l:?}");
    }
}
