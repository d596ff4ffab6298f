"""The component: the `policy-json` world's exports, made by vmb_policy from keepfree.plan.

Build: componentize-py -d ../../../wit -w policy-json componentize app \
           -p . -p ../../../policies/sdk-python --stub-wasi -o keepfree.wasm
"""
import vmb_policy

import keepfree

quanta = 0  # state lives across quanta (and is lost on a trap or reload)


def decide(snapshot):
    global quanta
    actions = keepfree.plan(snapshot)
    if quanta == 0:
        vmb_policy.log("info", "first quantum: %d action(s)" % len(actions))
    quanta += 1
    return actions


# The class componentize-py exports: describe() and decide(json) -> json, any exception -> err(..).
WitWorld = vmb_policy.world("keepfree-python", "0.1.0", cpu=False, memory=True, decide=decide)
