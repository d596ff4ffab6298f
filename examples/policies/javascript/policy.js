// latency-isolate: the JavaScript example policy (a CPU policy).
//
// VMs that are latency-sensitive -- tagged "latency" (libvirt metadata or the
// daemon config), or named in [params.latency] names -- get one dedicated
// pCPU per vCPU, taken from the top of the usable CPUs. Every other vCPU is
// packed onto the remaining (shared) pCPUs: vCPUs found on a dedicated pCPU,
// or not pinned to one shared pCPU, go to the least-loaded shared pCPU,
// heaviest first; then up to `max_moves` vCPUs move from the busiest shared
// pCPU to the least-loaded one when that lowers the busier of the two by at
// least `min_gain` of a CPU.
//
//   [params.latency]
//   names = ["trading-0"]   # latency-sensitive by name (besides the tag)
//   tag = "latency"          # the tag that marks them (default "latency")
//   min_gain = 0.05          # CPUs
//   max_moves = 2            # rebalancing moves per quantum among shared pCPUs
//
// plan() is pure: test.js runs it under plain `node`.

import { params, pin } from 'vmb-policy';

export function readParams(snapshot) {
  const t = params(snapshot, 'latency');
  return {
    names: new Set(t.strings('names')),
    tag: t.string('tag', 'latency'),
    minGain: t.number('min_gain', 0.05),
    maxMoves: Math.max(0, Math.floor(t.number('max_moves', 2))),
  };
}

const demandOf = (v) => v.usage + (v.steal || 0);
const pinnedTo = (v) => (v.affinity && v.affinity.length === 1 ? v.affinity[0] : null);

export function plan(snapshot) {
  const p = readParams(snapshot);
  const usable = snapshot.host.cpus.filter((c) => c.online && !c.reserved).map((c) => c.id).sort((a, b) => a - b);
  if (usable.length < 2) return [];
  const isLatency = (d) => p.names.has(d.name) || (d.tags || []).includes(p.tag);
  const domains = [...snapshot.domains].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const latency = [];
  const rest = [];
  for (const d of domains) {
    for (const v of d.vcpus) (isLatency(d) ? latency : rest).push({ d: d.name, v });
  }
  const actions = [];
  const place = (item, cpu, reason) => {
    if (pinnedTo(item.v) !== cpu) actions.push(pin(item.d, item.v.id, [cpu], reason));
  };

  // Dedicated pCPUs: the top ones, one per latency vCPU, leaving at least one shared.
  const k = Math.min(latency.length, usable.length - 1);
  const pool = usable.slice(usable.length - k);
  const claimed = new Set();
  const waiting = [];
  for (const item of latency.slice(0, k)) {
    const c = pinnedTo(item.v);
    if (c !== null && pool.includes(c) && !claimed.has(c)) claimed.add(c);
    else waiting.push(item);
  }
  for (const item of waiting) {
    const c = pool.find((x) => !claimed.has(x));
    claimed.add(c);
    place(item, c, `latency-sensitive: dedicated pCPU ${c}`);
  }
  // Latency vCPUs beyond the cap share the shared pCPUs like everyone else.
  rest.push(...latency.slice(k));

  // Pack the rest onto the shared pCPUs.
  const shared = usable.slice(0, usable.length - k);
  const load = new Map(shared.map((c) => [c, 0]));
  const home = new Map();
  const unplaced = [];
  for (const item of rest) {
    const c = pinnedTo(item.v);
    if (c !== null && load.has(c)) {
      load.set(c, load.get(c) + demandOf(item.v));
      home.set(item, c);
    } else unplaced.push(item);
  }
  const leastLoaded = () => shared.reduce((a, b) => (load.get(b) < load.get(a) ? b : a));
  unplaced.sort((a, b) => demandOf(b.v) - demandOf(a.v));
  for (const item of unplaced) {
    const c = leastLoaded();
    load.set(c, load.get(c) + demandOf(item.v));
    home.set(item, c);
    place(item, c, `shared pCPU ${c} (least loaded)`);
  }
  for (let m = 0; m < p.maxMoves && shared.length > 1; m++) {
    const busiest = shared.reduce((a, b) => (load.get(b) > load.get(a) ? b : a));
    const idlest = leastLoaded();
    let best = null;
    for (const item of rest) {
      if (home.get(item) !== busiest) continue;
      const dm = demandOf(item.v);
      const after = Math.max(load.get(busiest) - dm, load.get(idlest) + dm);
      if (load.get(busiest) - after >= p.minGain && (best === null || after < best.after)) best = { item, after };
    }
    if (best === null) break;
    const dm = demandOf(best.item.v);
    load.set(busiest, load.get(busiest) - dm);
    load.set(idlest, load.get(idlest) + dm);
    home.set(best.item, idlest);
    // Replace an earlier pin of the same vCPU in this answer.
    const i = actions.findIndex((a) => a.domain === best.item.d && a.vcpu === best.item.v.id);
    if (i >= 0) actions.splice(i, 1);
    place(best.item, idlest, `rebalance shared pCPUs: ${busiest} -> ${idlest}`);
  }
  return actions;
}
