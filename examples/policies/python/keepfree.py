"""keep-free: the decision logic of the Python example policy, in plain Python.

Keeps a target percentage of each guest's memory free: a guest whose free
share is below the target is grown to exactly the target, one with much
more free than the target (above target + `slack`) is shrunk to it.

    free %  = usable_kib / target_kib * 100     (what the guest has now)
    want    = used_kib / (1 - pct / 100)        (the target giving pct % free)

Parameters, from the daemon config (all optional):

    [params.keepfree]
    pct = 25                      # % of each guest to keep free
    slack = 10                    # reclaim only above pct + slack %
    min_step_mib = 16             # ignore smaller changes
    overrides = { "db-0" = 40 }   # per-VM pct, by domain name

This module uses only vmb_policy (plain Python, policies/sdk-python), so it
runs and is unit-tested (test_keepfree.py) with the ordinary `python3`.
"""

from vmb_policy import KIB_PER_MIB, params, set_memory


def read_params(snapshot):
    """Reads [params.keepfree] with defaults; tolerates missing or odd values."""
    table = params(snapshot, "keepfree")
    pct = table.number("pct", 25.0, 0.0, 90.0)
    overrides = table.table("overrides")
    return {
        "pct": pct,
        "slack": table.number("slack", 10.0, 0.0, 100.0),
        "min_step_kib": int(table.number("min_step_mib", 16.0, 0.0, 1 << 20) * KIB_PER_MIB),
        "overrides": {str(name): overrides.number(name, pct, 0.0, 90.0) for name in overrides},
    }


def plan(snapshot):
    """Returns the list of set-memory actions (dicts) for one snapshot."""
    p = read_params(snapshot)
    memory = snapshot["host"]["memory"]
    # What growing guests may take this quantum without touching the reserve.
    pool = max(0, memory["available_kib"] - memory["reserve_kib"])
    grow, shrink = [], []
    for d in snapshot.get("domains", []):
        m = d["memory"]
        free = m.get("usable_kib", m.get("unused_kib"))
        if free is None:
            continue  # no balloon stats: nothing safe to say
        target, max_kib = m["target_kib"], m["max_kib"]
        used = max(0, target - free)
        pct = p["overrides"].get(d["name"], p["pct"])
        want = min(max_kib, int(used / (1.0 - pct / 100.0)) + 1)
        free_pct = 100.0 * free / target if target else 0.0
        if free_pct < pct and want - target >= p["min_step_kib"]:
            grow.append((free_pct, d["name"], target, want, pct))
        elif free_pct > pct + p["slack"] and target - want >= p["min_step_kib"]:
            shrink.append((d["name"], want, free_pct, pct))
    actions = []
    for name, want, free_pct, pct in shrink:
        actions.append(set_memory(name, want, "%.0f%% free > %.0f%% + slack" % (free_pct, pct)))
    # Most starved first, each up to what the pool still holds.
    for free_pct, name, target, want, pct in sorted(grow):
        step = min(want - target, pool)
        if step <= 0:
            break
        pool -= step
        actions.append(set_memory(name, target + step, "%.0f%% free < %.0f%%" % (free_pct, pct)))
    return actions
