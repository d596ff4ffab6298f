// vmb-policy: a one-file SDK for vm-balancer policies in JavaScript.
//
// It targets the `policy-json` world of wit/policy.wit: the snapshot arrives
// as JSON text and the answer goes back as JSON text, parsed and written by
// the engine's native JSON.parse / JSON.stringify.
//
//   import log from 'log';                       // the component's only import
//   import { world, pin } from 'vmb-policy';
//
//   export const { describe, decide } = world({
//     name: 'my-policy', version: '0.1.0', cpu: true, memory: false, log,
//     decide: (snapshot) => [pin('web-0', 0, [3], 'why')],
//   });
//
// What it gives you:
// - world(): the `describe` and `decide` exports. `decide` parses the
//   snapshot, calls yours, and writes `{"actions": [...]}`; EVERY exception
//   becomes the `err(..)` answer (a thrown string, which is what
//   componentize-js turns into `err`; anything else thrown traps), with the
//   error's name, message and stack. The built-in default then decides
//   that quantum. Module state lives across quanta.
// - pin(), setMemory(): action objects with checked integer fields.
// - params(snapshot, 'name'): your [params.name] table, with typed getters
//   that fall back to defaults.
// - log(level, message): the host's log inside the component (once world()
//   has been given the `log` import); collected in `nativeLog` and otherwise
//   silent under plain node.
// - SnapshotBuilder / DomainBuilder: snapshots for `node --test`, in the
//   shape the daemon sends.
//
// This module imports nothing, so it runs under plain node as well as inside
// the component (where esbuild bundles it).

export const LEVELS = Object.freeze(['trace', 'debug', 'info', 'warn', 'error']);
export const KIB_PER_MIB = 1024;
const MAX_FRAMES = 24; // innermost stack frames kept in an err message

// ------------------------------------------------------------------ the glue

/**
 * The `describe` and `decide` exports of the `policy-json` world.
 * `decide(snapshot) -> action[]` is your policy; `log` is the component's
 * `log` import (`import log from 'log'`), leave it out in native tests.
 */
export function world({ name, version, cpu, memory, decide, log: hostLog } = {}) {
  if (typeof name !== 'string' || name === '' || typeof version !== 'string') {
    throw new TypeError(`world: name and version must be strings, got ${show(name)}, ${show(version)}`);
  }
  if (typeof cpu !== 'boolean' || typeof memory !== 'boolean') {
    throw new TypeError(`world: cpu and memory must be booleans, got ${show(cpu)}, ${show(memory)}`);
  }
  if (typeof decide !== 'function') throw new TypeError(`world: decide must be a function, got ${show(decide)}`);
  if (hostLog !== undefined) {
    if (typeof hostLog !== 'function') throw new TypeError(`world: log must be the 'log' import, got ${show(hostLog)}`);
    sink = hostLog;
  }
  const info = Object.freeze({ name, version, cpu, memory });
  return {
    describe() {
      return { ...info };
    },
    // The name marks where the policy's own stack ends (see formatError).
    decide: function vmbPolicyDecide(snapshot) {
      try {
        const actions = decide(JSON.parse(snapshot));
        if (!Array.isArray(actions)) throw new TypeError(`decide must return an array of actions, got ${show(actions)}`);
        return JSON.stringify({ actions });
      } catch (e) {
        // A thrown string is the `err(..)`: the built-in default decides this quantum.
        throw `${name}: ${formatError(e)}`;
      }
    },
  };
}

/**
 * `Name: message` and the stack, innermost frame first, one line each; an
 * Error's `cause` follows. Frames of the glue and below are left out.
 */
export function formatError(e) {
  const parts = [];
  const seen = new Set();
  while (parts.length < 4 && !seen.has(e)) {
    seen.add(e);
    parts.push(oneError(e));
    if (!(e instanceof Error) || e.cause === undefined) break;
    parts.push('caused by:');
    e = e.cause;
  }
  return parts.join('\n');
}

function oneError(e) {
  if (!(e instanceof Error)) return typeof e === 'string' ? e : `thrown: ${show(e)}`;
  let head;
  try {
    head = String(e);
  } catch {
    head = 'Error: <unprintable>';
  }
  let lines = typeof e.stack === 'string' ? e.stack.split('\n') : [];
  // V8 (node) starts the stack with the message; SpiderMonkey (the component) does not.
  const v8 = lines.length > 0 && lines[0] === head;
  if (v8) lines = lines.slice(1);
  else if (lines.length > 0 && !/@|^\s*at /.test(lines[0])) lines = lines.slice(head.split('\n').length);
  const glue = lines.findIndex((l) => l.includes('vmbPolicyDecide'));
  if (glue >= 0) lines = lines.slice(0, glue);
  lines = lines.map((l) => l.trim()).filter((l) => l !== '');
  if (lines.length > MAX_FRAMES) lines = [...lines.slice(0, MAX_FRAMES), `... ${lines.length - MAX_FRAMES} outer frames`];
  return [head, ...lines.map((l) => `  ${l.startsWith('at ') ? l : `at ${l}`}`)].join('\n');
}

function show(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'function') return 'a function';
  if (v === null || typeof v !== 'object') return String(v);
  try {
    return JSON.stringify(v).slice(0, 200);
  } catch {
    return Object.prototype.toString.call(v);
  }
}

// ------------------------------------------------------------------ actions

function int(action, field, v) {
  if (typeof v !== 'number') throw new TypeError(`${action}: ${field} must be an integer, got ${typeof v} ${show(v)}`);
  if (!Number.isSafeInteger(v)) throw new RangeError(`${action}: ${field} must be an integer, got ${v}`);
  if (v < 0) throw new RangeError(`${action}: ${field} must not be negative, got ${v}`);
  return v;
}

function str(action, field, v) {
  if (typeof v !== 'string') throw new TypeError(`${action}: ${field} must be a string, got ${typeof v} ${show(v)}`);
  return v;
}

/** A `pin` action: vCPU `vcpu` of `domain` may run only on pCPUs `cpus` (a non-empty array of ids). */
export function pin(domain, vcpu, cpus, reason = '') {
  if (!Array.isArray(cpus)) throw new TypeError(`pin: cpus must be an array of integers, got ${show(cpus)}`);
  if (cpus.length === 0) throw new RangeError(`pin: cpus must not be empty (domain ${show(domain)}, vcpu ${show(vcpu)})`);
  const ids = cpus.map((c, i) => int('pin', `cpus[${i}]`, c));
  return { kind: 'pin', domain: str('pin', 'domain', domain), vcpu: int('pin', 'vcpu', vcpu), cpus: ids, reason: str('pin', 'reason', reason) };
}

/** A `set-memory` action: the balloon target of `domain`, KiB. */
export function setMemory(domain, targetKib, reason = '') {
  return {
    kind: 'set-memory',
    domain: str('setMemory', 'domain', domain),
    target_kib: int('setMemory', 'target_kib', targetKib),
    reason: str('setMemory', 'reason', reason),
  };
}

// ------------------------------------------------------------------ params

const isTable = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const has = (o, k) => Object.prototype.hasOwnProperty.call(o, k);

/** A [params] table with getters that return the default for a missing or mistyped value. */
export class Params {
  constructor(values = {}) {
    /** The table as-is. */
    this.values = isTable(values) ? values : {};
  }

  /** The raw value, or undefined. */
  get(key) {
    return has(this.values, key) ? this.values[key] : undefined;
  }

  keys() {
    return Object.keys(this.values);
  }

  /** A finite number, clamped to [lo, hi]. */
  number(key, dflt, lo = -Infinity, hi = Infinity) {
    const v = this.get(key);
    return typeof v === 'number' && Number.isFinite(v) ? Math.min(Math.max(v, lo), hi) : dflt;
  }

  /** An integer, clamped to [lo, hi]. */
  integer(key, dflt, lo = -Infinity, hi = Infinity) {
    const v = this.get(key);
    return Number.isSafeInteger(v) ? Math.min(Math.max(v, lo), hi) : dflt;
  }

  string(key, dflt) {
    const v = this.get(key);
    return typeof v === 'string' ? v : dflt;
  }

  boolean(key, dflt) {
    const v = this.get(key);
    return typeof v === 'boolean' ? v : dflt;
  }

  /** An array of strings (non-strings in it are dropped); a copy of `dflt` when absent or not an array. */
  strings(key, dflt = []) {
    const v = this.get(key);
    return Array.isArray(v) ? v.filter((s) => typeof s === 'string') : [...dflt];
  }

  /** A sub-table, e.g. `overrides = { "db-0" = 40 }`; empty when absent or not a table. */
  table(key) {
    return new Params(this.get(key));
  }
}

/** Your [params.NAME] table of the daemon config; an empty one when absent. */
export function params(snapshot, name) {
  const top = snapshot && isTable(snapshot.params) ? snapshot.params : {};
  return new Params(has(top, name) ? top[name] : undefined);
}

// ------------------------------------------------------------------ log

/** [level, message] lines logged outside the component, for tests. */
export const nativeLog = [];
const NATIVE_LOG_MAX = 10000;
let sink = null; // the component's `log` import, once world() has it

/** Logs a line through the host (`level`: 'trace' ... 'error'); under plain node it goes to `nativeLog`. */
export function log(level, message) {
  if (!LEVELS.includes(level)) throw new RangeError(`log: level must be one of ${LEVELS.join(', ')}, got ${show(level)}`);
  message = String(message);
  if (sink !== null) sink(level, message);
  else if (nativeLog.length < NATIVE_LOG_MAX) nativeLog.push([level, message]);
}

// ------------------------------------------------------------------ snapshots for tests

const clone = (v) => JSON.parse(JSON.stringify(v));

/** A domain for SnapshotBuilder.domain(): no vCPUs and 1 GiB of memory without guest stats until told. */
export class DomainBuilder {
  constructor(name, uuid = undefined) {
    this.d = {
      name,
      uuid: uuid ?? `00000000-0000-0000-0000-${fnv(name)}`,
      vcpus: [],
      memory: { max_kib: 1024 * KIB_PER_MIB, target_kib: 1024 * KIB_PER_MIB, autodeflate: false },
    };
  }

  /** Adds a vCPU that last ran on `cpu` and used `usage` of it; pinned to `cpu` unless `affinity` is given ([] = any). */
  vcpu(cpu, usage, { steal, affinity } = {}) {
    const v = { id: this.d.vcpus.length, cpu, affinity: affinity === undefined ? [cpu] : [...affinity], usage };
    if (steal !== undefined) v.steal = steal;
    this.d.vcpus.push(v);
    return this;
  }

  /** Max, balloon target and (optionally) guest-usable memory, MiB (as the Rust SDK's builder). */
  memoryMib(maxMib, targetMib, usableMib = undefined) {
    const m = this.d.memory;
    m.max_kib = maxMib * KIB_PER_MIB;
    m.target_kib = targetMib * KIB_PER_MIB;
    delete m.usable_kib;
    delete m.unused_kib;
    delete m.available_kib;
    if (usableMib !== undefined && usableMib !== null) {
      m.usable_kib = m.unused_kib = usableMib * KIB_PER_MIB;
      m.available_kib = targetMib * KIB_PER_MIB;
    }
    return this;
  }

  /** Sets memory fields as they are, KiB ({ target_kib, rss_kib, ... }); undefined or null removes one. */
  memory(fields) {
    for (const [k, v] of Object.entries(fields)) {
      if (v === undefined || v === null) delete this.d.memory[k];
      else this.d.memory[k] = v;
    }
    return this;
  }

  pressure(swapInKib, majorFaults) {
    this.d.memory.swap_in_kib = swapInKib;
    this.d.memory.major_faults = majorFaults;
    return this;
  }

  tag(...tags) {
    if (tags.length > 0) (this.d.tags ??= []).push(...tags);
    return this;
  }

  build() {
    return clone(this.d);
  }
}

/**
 * A snapshot in the daemon's shape: `cpus` online CPUs, `totalKib` of memory,
 * all available. Host CPU usage is the sum of the usage of the vCPUs that
 * ran on each (capped at 1.0) unless set with cpuUsage().
 */
export class SnapshotBuilder {
  constructor(cpus, totalKib) {
    this.s = {
      schema_version: 1,
      quantum: 0,
      quantum_ms: 1000,
      host: {
        cpus: Array.from({ length: cpus }, (_, id) => ({ id, online: true, reserved: false, usage: 0, node: 0 })),
        memory: { total_kib: totalKib, available_kib: totalKib, reserve_kib: 0 },
      },
      domains: [],
      verdicts: [],
      params: {},
    };
    this.explicitUsage = false;
  }

  hostMemory(availableKib, reserveKib) {
    Object.assign(this.s.host.memory, { available_kib: availableKib, reserve_kib: reserveKib });
    return this;
  }

  cpuUsage(usage) {
    usage.forEach((u, i) => {
      if (i < this.s.host.cpus.length) this.s.host.cpus[i].usage = u;
    });
    this.explicitUsage = true;
    return this;
  }

  reserveCpu(id) {
    for (const c of this.s.host.cpus) if (c.id === id) c.reserved = true;
    return this;
  }

  offlineCpu(id) {
    for (const c of this.s.host.cpus) if (c.id === id) c.online = false;
    return this;
  }

  quantum(q) {
    this.s.quantum = q;
    return this;
  }

  /** Sets a top-level [params] entry, e.g. .param('latency', { names: ['db'] }). */
  param(key, value) {
    this.s.params[key] = value;
    return this;
  }

  /** Adds a verdict of last quantum; rule names the guard rule that clamped or rejected it (e.g. 'pin_rate_limit'; see wit/SCHEMA.md). */
  verdict(slot, action, outcome, reason, rule = 'other') {
    this.s.verdicts.push({ slot, action, outcome, reason, rule });
    return this;
  }

  /** Adds a DomainBuilder (or a domain object). */
  domain(domain) {
    this.s.domains.push(domain instanceof DomainBuilder ? domain.build() : clone(domain));
    return this;
  }

  /** The snapshot: a fresh object that has been through JSON, as `decide` gets it. */
  build() {
    const s = clone(this.s);
    if (!this.explicitUsage) {
      for (const c of s.host.cpus) {
        let used = 0;
        for (const d of s.domains) for (const v of d.vcpus) if (v.cpu === c.id) used += v.usage;
        c.usage = Math.min(used, 1);
      }
    }
    return s;
  }

  /** The snapshot as the JSON text `decide` receives. */
  json() {
    return JSON.stringify(this.build());
  }
}

function fnv(s) {
  let h = 0xcbf29ce484222325n;
  for (const b of new TextEncoder().encode(s)) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return (h & 0xffffffffffffn).toString(16).padStart(12, '0');
}
