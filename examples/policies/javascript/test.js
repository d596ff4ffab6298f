// Native unit tests of policy.js: `node --test test.js`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { plan } from './policy.js';

const cpus = (n) => Array.from({ length: n }, (_, id) => ({ id, online: true, reserved: false, usage: 0, node: 0 }));
const vm = (name, placements, tags) => ({
  name,
  tags,
  vcpus: placements.map(([cpu, usage], id) => ({ id, cpu, affinity: [cpu], usage, steal: 0 })),
});
const snap = (n, domains, params = {}) => ({ host: { cpus: cpus(n) }, domains, params });

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
