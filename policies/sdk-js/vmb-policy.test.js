// Native tests of vmb-policy.js: `node --test` in this directory.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DomainBuilder, SnapshotBuilder, log, nativeLog, params, pin, setMemory, world } from './vmb-policy.js';

const MIB = 1024;
const mk = (decide, extra = {}) => world({ name: 't', version: '1.2.3', cpu: true, memory: false, decide, ...extra });
const errOf = (fn) => {
  try {
    fn();
  } catch (e) {
    assert.equal(typeof e, 'string', 'the glue throws a string (componentize-js: err)');
    return e;
  }
  assert.fail('did not throw');
};

test('describe', () => {
  assert.deepEqual(mk(() => []).describe(), { name: 't', version: '1.2.3', cpu: true, memory: false });
});

test('decide round-trips JSON', () => {
  let seen;
  const w = mk((s) => {
    seen = s;
    return [pin(s.domains[0].name, 0, [1], 'r'), setMemory('a', 1048576.0)];
  });
  const out = w.decide(new SnapshotBuilder(2, 4 << 20).domain(new DomainBuilder('a').vcpu(0, 0.5)).json());
  assert.equal(seen.domains[0].vcpus[0].usage, 0.5);
  assert.equal(
    out,
    '{"actions":[{"kind":"pin","domain":"a","vcpu":0,"cpus":[1],"reason":"r"},{"kind":"set-memory","domain":"a","target_kib":1048576,"reason":""}]}',
  );
});

test('every exception is an err string with name, message and stack', () => {
  function inner(s) {
    return s.host.cpus;
  }
  const msg = errOf(() => mk((s) => inner(s)).decide('{}'));
  assert.match(msg, /^t: TypeError: Cannot read properties of undefined \(reading 'cpus'\)\n  at inner /);
  assert.match(msg, /vmb-policy\.test\.js:\d+:\d+/);
  assert.doesNotMatch(msg, /vmbPolicyDecide/, 'the glue and what called it are left out');
});

test('thrown non-Errors, bad JSON and bad answers are errs too', () => {
  assert.equal(errOf(() => mk(() => { throw 'plain words'; }).decide('{}')), 't: plain words');
  assert.equal(errOf(() => mk(() => { throw { code: 7 }; }).decide('{}')), 't: thrown: {"code":7}');
  assert.match(errOf(() => mk(() => []).decide('not json')), /^t: SyntaxError: /);
  assert.match(errOf(() => mk(() => null).decide('{}')), /^t: TypeError: decide must return an array of actions, got null/);
  assert.match(errOf(() => mk(() => [{ n: 1n }]).decide('{}')), /^t: TypeError: .*BigInt/);
  assert.match(errOf(() => mk(() => [pin('a', 0, [1.5])]).decide('{}')), /^t: RangeError: pin: cpus\[0\] must be an integer, got 1\.5/);
});

test('causes are shown', () => {
  const msg = errOf(() => mk(() => { throw new Error('outer', { cause: new RangeError('inner') }); }).decide('{}'));
  assert.match(msg, /^t: Error: outer\n[^]*caused by:\nRangeError: inner/);
});

test('state lives across calls', () => {
  let n = 0;
  const w = mk(() => (n++, []));
  w.decide('{}');
  w.decide('{}');
  assert.equal(n, 2);
});

test('world checks its arguments', () => {
  assert.throws(() => world({ name: 't', version: '1', cpu: 'yes', memory: false, decide: () => [] }), TypeError);
  assert.throws(() => world({ name: 't', version: '1', cpu: true, memory: false }), TypeError);
  assert.throws(() => world({ name: 't', version: '1', cpu: true, memory: false, decide: () => [], log: 3 }), TypeError);
});

test('pin and setMemory', () => {
  assert.deepEqual(pin('web', 1, [2, 3], 'why'), { kind: 'pin', domain: 'web', vcpu: 1, cpus: [2, 3], reason: 'why' });
  assert.deepEqual(setMemory('db', 2048 * MIB), { kind: 'set-memory', domain: 'db', target_kib: 2048 * MIB, reason: '' });
});

test('non-integers are refused, naming the field and the value', () => {
  for (const [fn, type, words] of [
    [() => setMemory('db', 1.5), RangeError, 'setMemory: target_kib must be an integer, got 1.5'],
    [() => setMemory('db', '3'), TypeError, 'setMemory: target_kib must be an integer, got string "3"'],
    [() => setMemory('db', true), TypeError, 'target_kib must be an integer, got boolean true'],
    [() => setMemory('db', NaN), RangeError, 'target_kib must be an integer, got NaN'],
    [() => setMemory('db', 2 ** 60), RangeError, 'target_kib must be an integer'],
    [() => setMemory('db', -1), RangeError, 'target_kib must not be negative, got -1'],
    [() => pin('w', undefined, [1]), TypeError, 'vcpu must be an integer, got undefined'],
    [() => pin('w', 0, [1, false]), TypeError, 'cpus[1] must be an integer, got boolean false'],
    [() => pin('w', 0, 3), TypeError, 'cpus must be an array of integers'],
    [() => pin('w', 0, []), RangeError, 'cpus must not be empty'],
    [() => pin(7, 0, [1]), TypeError, 'domain must be a string'],
    [() => setMemory('db', 1, null), TypeError, 'reason must be a string'],
  ]) {
    assert.throws(fn, (e) => e instanceof type && e.message.includes(words), words);
  }
});

test('params: missing tables are empty, getters fall back to defaults', () => {
  assert.deepEqual(params({}, 'me').values, {});
  assert.deepEqual(params({ params: { me: 3 } }, 'me').values, {});
  assert.deepEqual(params({ params: { me: [1] } }, 'me').values, {});
  const s = new SnapshotBuilder(1, 1).param('me', { n: 3, f: 0.5, b: true, s: 'x', l: ['a', 1, 'b'], t: { k: 2 } }).build();
  assert.deepEqual(params(s, 'other').keys(), []);
  const p = params(s, 'me');
  assert.equal(p.number('n', 1), 3);
  assert.equal(p.number('f', 1, 0.6), 0.6);
  assert.equal(p.number('n', 1, 0, 2), 2);
  assert.equal(p.number('b', 1), 1);
  assert.equal(p.number('s', 1), 1);
  assert.equal(p.number('missing', 1), 1);
  assert.equal(p.integer('n', 0), 3);
  assert.equal(p.integer('f', 7), 7);
  assert.equal(p.boolean('b', false), true);
  assert.equal(p.boolean('n', false), false);
  assert.equal(p.string('s', 'd'), 'x');
  assert.equal(p.string('n', 'd'), 'd');
  assert.deepEqual(p.strings('l'), ['a', 'b']);
  assert.deepEqual(p.strings('s', ['z']), ['z']);
  assert.equal(p.table('t').integer('k', 0), 2);
  assert.deepEqual(p.table('s').values, {});
  assert.equal(p.get('toString'), undefined, 'only own keys');
});

test('log: collected natively, sent to the host once world() has the import', () => {
  nativeLog.length = 0;
  log('info', 'hello');
  log('warn', 3);
  assert.deepEqual(nativeLog, [['info', 'hello'], ['warn', '3']]);
  assert.throws(() => log('loud', 'x'), RangeError);
  const host = [];
  mk(() => [], { log: (l, m) => host.push([l, m]) });
  log('error', 'to the host');
  assert.deepEqual(host, [['error', 'to the host']]);
  assert.equal(nativeLog.length, 2);
});

test('the snapshot builder gives the daemon shape', () => {
  const s = new SnapshotBuilder(4, 16384 * MIB)
    .hostMemory(8192 * MIB, 512 * MIB)
    .reserveCpu(3)
    .quantum(7)
    .param('latency', { names: ['db'] })
    .domain(
      new DomainBuilder('web').vcpu(0, 0.5).vcpu(0, 0.75, { steal: 0.25 }).vcpu(1, 0.1, { affinity: [] }).memoryMib(4096, 2048, 1000).tag('latency'),
    )
    .domain(new DomainBuilder('db').tag())
    .build();
  assert.deepEqual(Object.keys(s).sort(), ['domains', 'host', 'params', 'quantum', 'quantum_ms', 'schema_version', 'verdicts']);
  assert.deepEqual([s.schema_version, s.quantum, s.quantum_ms], [1, 7, 1000]);
  assert.deepEqual(s.host.cpus[0], { id: 0, online: true, reserved: false, usage: 1, node: 0 });
  assert.deepEqual(s.host.cpus.map((c) => c.usage), [1, 0.1, 0, 0]);
  assert.equal(s.host.cpus[3].reserved, true);
  assert.deepEqual(s.host.memory, { total_kib: 16384 * MIB, available_kib: 8192 * MIB, reserve_kib: 512 * MIB });
  const [web, db] = s.domains;
  assert.deepEqual(web.tags, ['latency']);
  const pin = { kind: 'pin', domain: 'web', vcpu: 0, cpus: [9], reason: 'r' };
  const v = new SnapshotBuilder(2, MIB).verdict('cpu', pin, 'rejected', 'no CPU 9', 'bad_cpu').verdict('cpu', pin, 'clamped', 'x').build().verdicts;
  assert.deepEqual(v.map((x) => x.rule), ['bad_cpu', 'other']); // the daemon's field, 'other' unless named
  assert.equal('tags' in db, false, 'optional fields are absent, not null');
  assert.deepEqual(web.vcpus[0], { id: 0, cpu: 0, affinity: [0], usage: 0.5 });
  assert.equal(web.vcpus[1].steal, 0.25);
  assert.deepEqual(web.vcpus[2].affinity, []);
  assert.deepEqual(web.memory, {
    max_kib: 4096 * MIB, target_kib: 2048 * MIB, autodeflate: false,
    usable_kib: 1000 * MIB, unused_kib: 1000 * MIB, available_kib: 2048 * MIB,
  });
  assert.deepEqual(db.memory, { max_kib: 1024 * MIB, target_kib: 1024 * MIB, autodeflate: false });
  assert.match(web.uuid, /^00000000-0000-0000-0000-[0-9a-f]{12}$/);
  assert.deepEqual(s.params, { latency: { names: ['db'] } });
});

test('explicit usage, raw memory fields, independent builds', () => {
  const b = new SnapshotBuilder(2, 1 << 20)
    .cpuUsage([0.3, 0.9])
    .offlineCpu(1)
    .domain(new DomainBuilder('a').vcpu(0, 1).memory({ target_kib: 5000, rss_kib: 4000 }).pressure(10, 2));
  const s = b.build();
  assert.deepEqual(s.host.cpus.map((c) => c.usage), [0.3, 0.9]);
  assert.equal(s.host.cpus[1].online, false);
  const m = s.domains[0].memory;
  assert.deepEqual([m.target_kib, m.rss_kib, m.swap_in_kib, m.major_faults], [5000, 4000, 10, 2]);
  s.domains.length = 0;
  assert.equal(b.build().domains.length, 1);
});
