// The component: the `policy-json` world's exports, made by vmb-policy from plan().
import log from 'log'; // the component's only import (a default import)
import { log as logLine, world } from 'vmb-policy';
import { plan } from './policy.js';

let quanta = 0; // state lives across quanta (and is lost on a trap or reload)

// describe() and decide(json) -> json; any exception -> err(..).
export const { describe, decide } = world({
  name: 'latency-isolate-js',
  version: '0.1.0',
  cpu: true,
  memory: false,
  log,
  decide(snapshot) {
    const actions = plan(snapshot);
    if (quanta++ === 0) logLine('info', `first quantum: ${actions.length} action(s)`);
    return actions;
  },
});
