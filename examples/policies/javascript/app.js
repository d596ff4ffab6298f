// The component glue: the `policy` world's exports, on top of policy.js.
import log from 'log';
import { decode, encode } from '@msgpack/msgpack';
import { plan } from './policy.js';

export function describe() {
  return { name: 'latency-isolate-js', version: '0.1.0', cpu: true, memory: false };
}

let quanta = 0; // state lives across quanta (and is lost on a trap or reload)

export function decide(snapshot) {
  let actions;
  try {
    actions = plan(decode(snapshot));
  } catch (e) {
    // A thrown string is the `err(..)`: the built-in default decides this quantum.
    throw `latency-isolate: ${e && e.stack ? e.stack : e}`;
  }
  if (quanta++ === 0) log('info', `first quantum: ${actions.length} action(s)`);
  return encode({ actions });
}
