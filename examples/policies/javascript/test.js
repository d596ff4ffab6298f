// Native unit tests of policy.js: `node --test test.js`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DomainBuilder, SnapshotBuilder } from 'vmb-policy';
import { plan } from './policy.js';

// A VM with one vCPU per [pCPU it runs on (and is pinned to), usage].
const vm = (name, placements, tags = []) => {
  const d = new DomainBuilder(name).tag(...tags);
  for (const [cpu, usage] of placements) d.vcpu(cpu, usage, { steal: 0 });
  return d;
};
const snap = (n, domains, params = {}) => {
  const b = new SnapshotBuilder(n, 16 << 20);
  for (const d of domains) b.domain(d);
  for (const [k, v] of Object.entries(params)) b.param(k, v);
  return b.build();
};

test('a tagged VM gets a dedicated pCPU and others leave it', () => {
  const s = snap(4, [vm('rt', [[0, 0.5]], ['latency']), vm('web', [[3, 0.5], [0, 0.5]])]);
  const a = plan(s);
  assert.deepEqual(a.find((x) => x.domain === 'rt').cpus, [3]);
  for (const x of a.filter((x) => x.domain === 'web')) assert.notEqual(x.cpus[0], 3);
});

test('names from params count as latency-sensitive', () => {
  const s = snap(4, [vm('db', [[0, 0.5]]), vm('web', [[3, 0.9]])], { latency: { names: ['db'] } });
  const a = plan(s);
  assert.deepEqual(a.find((x) => x.domain === 'db').cpus, [3]);
});

test('a settled placement is left alone', () => {
  const s = snap(4, [vm('rt', [[3, 0.5]], ['latency']), vm('web', [[0, 0.5], [1, 0.5]])]);
  assert.deepEqual(plan(s), []);
});

test('the shared pCPUs are balanced', () => {
  const s = snap(3, [vm('web', [[0, 0.9], [0, 0.9]])]);
  const a = plan(s);
  assert.equal(a.length, 1);
  assert.notEqual(a[0].cpus[0], 0);
});

test('odd params fall back to the defaults', () => {
  const domains = [vm('rt', [[0, 0.5]], ['latency']), vm('web', [[0, 0.9], [0, 0.9]])];
  const odd = { latency: { names: 'rt', tag: 3, min_gain: 'x', max_moves: null } };
  assert.deepEqual(plan(snap(4, domains, odd)), plan(snap(4, domains)));
});
