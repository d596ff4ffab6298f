#!/usr/bin/env python3
"""Random scenarios, two policy sets side by side: where is one worse?

    python3 examples/scenarios/sweep.py [--bin target/release/vm-balancer]
        [--seeds 1-100] [--policy SPEC ...] [--against SPEC ...] [--keep DIR]

Each seed generates a scenario (2 to 32 pCPUs, 1 to 4 VM groups of 1, 2 or
4 vCPUs, every demand profile and placement the simulator has, NUMA nodes,
background load, late starts and stops, hosts sized from 0.6 to 1.3 times
the guests' max) and simulates it with `--policy` (default: the built-in
defaults) and `--against` (default: `builtin:classic`). A line is printed
for each scenario where the first set is worse on a figure (busiest pCPU /
best placement mean, unserved demand, guest OOM, quanta below the reserve,
host OOM), then the totals of both.

The shipped scenarios test what they were written for; this finds what
nobody wrote a scenario for. It found the memory policy leaving the host
below its reserve after guests started on it, and the CPU policy reading a
step of demand as noise (issue 12). Standard library only.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile


def profile(r, kinds, value, between, walk_step):
    """A random profile of one of `kinds`, its values drawn by `value()`
    (and `between(lo, hi)`), a random walk's steps up to `walk_step`."""
    kind = r.choice(kinds)
    if kind == "constant":
        return f'{{ kind = "constant", value = {value()} }}'
    if kind == "step":
        return f'{{ kind = "step", before = {value()}, after = {value()}, at = {r.randint(1, 30)} }}'
    if kind == "ramp":
        s = r.randint(0, 20)
        return f'{{ kind = "ramp", from = {value()}, to = {value()}, start = {s}, end = {s + r.randint(0, 25)} }}'
    if kind == "phases":
        return f'{{ kind = "phases", values = [{value()}, {value()}, {value()}], every = {r.randint(1, 15)} }}'
    lo, hi = sorted([value(), value()])
    if kind == "periodic":
        return f'{{ kind = "periodic", low = {lo}, high = {hi}, period = {r.randint(2, 20)}, offset = {r.randint(0, 5)} }}'
    return f'{{ kind = "random-walk", start = {between(lo, hi)}, step = {walk_step}, min = {lo}, max = {hi} }}'


def cpu_profile(r):
    kinds = ["constant", "step", "periodic", "random-walk", "phases", "ramp"]
    return profile(r, kinds, lambda: round(r.uniform(0, 1), 2), lambda lo, hi: round(r.uniform(lo, hi), 2), round(r.uniform(0, 0.3), 2))


def mem_profile(r, max_mib):
    kinds = ["constant", "step", "ramp", "random-walk", "periodic"]
    return profile(r, kinds, lambda: r.randint(0, max_mib), r.randint, r.randint(0, max(1, max_mib // 8)))


def scenario(seed):
    """The scenario text of `seed` (the same text for the same seed)."""
    r = random.Random(seed)
    cpus = r.choice([2, 4, 8, 16, 32])
    nodes = r.choice([1, 1, 2]) if cpus >= 4 else 1
    groups = [(r.choice([512, 1024, 2048, 4096]), r.randint(1, cpus)) for _ in range(r.randint(1, 4))]
    base = r.choice([0, 512, 1024])
    memory = int((sum(m * c for m, c in groups) * r.uniform(0.6, 1.3) + base + 512) // 256 * 256)
    text = (
        f'name = "sweep-{seed}"\nseed = {seed}\nquanta = 40\n\n[host]\ncpus = {cpus}\nmemory_mib = {memory}\n'
        f"base_used_mib = {base}\nreserve_mib = {r.choice([256, 512])}\nnuma_nodes = {nodes}\n"
    )
    if r.random() < 0.3:
        text += f'background = [{", ".join(str(round(r.uniform(0, 0.5), 2)) for _ in range(cpus))}]\n'
    for g, (max_mib, count) in enumerate(groups):
        text += (
            f'\n[[vm]]\nname = "g{g}"\ncount = {count}\nvcpus = {r.choice([1, 1, 2, 4])}\nmax_mib = {max_mib}\n'
            f"initial_mib = {r.choice([max_mib, max_mib // 2, max_mib // 4])}\n"
            f'placement = "{r.choice(["first", "round-robin", "random", "unpinned"])}"\n'
        )
        if r.random() < 0.3:
            text += f"start = {r.randint(0, 10)}\n"
        if r.random() < 0.3:
            text += f"stop = {r.randint(15, 40)}\n"
        if r.random() < 0.3:
            text += f"stagger = {r.randint(1, 3)}\n"
        if r.random() < 0.3:
            text += f"spread = {round(r.uniform(0, 0.5), 2)}\n"
        if r.random() < 0.2:
            text += "balloon_stats = false\n"
        if r.random() < 0.2:
            text += "swap_mib = 256\n"
        text += f"cpu = {cpu_profile(r)}\nmem_mib = {mem_profile(r, max_mib)}\n"
    return text


def simulate(binary, path, specs):
    args = [binary, "simulate", path, "--json"]
    for spec in specs:
        args += ["--policy", spec]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    report = json.loads(out.stdout)
    # A decide call past its deadline (a loaded machine) falls back to the
    # built-in default: that run is not the policy's own.
    fell = {name: s["fallbacks"] for name, s in report["slots"].items() if s["fallbacks"] or s["failures"]}
    if fell:
        print(f"warning: {path} {' '.join(specs) or 'defaults'}: fallbacks {fell}; figures are not the policy's own", file=sys.stderr)
    cpu, mem = report["cpu"], report["memory"]
    return {
        "busiest / best": cpu["mean_best_ratio"],
        "unserved %": cpu["unserved_pct"],
        "pins": cpu["pin_changes"],
        "guest OOM": mem["oom_events"],
        "below reserve": mem["below_reserve_quanta"],
        "host OOM": mem["host_oom_events"],
    }


def seeds(text):
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/vm-balancer", help="the vm-balancer binary")
    ap.add_argument("--seeds", default="1-100", type=seeds, help="seeds, e.g. 1-100 or 7")
    ap.add_argument("--policy", action="append", default=[], help="the set under test (repeat; default: the defaults)")
    ap.add_argument("--against", action="append", default=None, help="the set compared with (default: builtin:classic)")
    ap.add_argument("--keep", help="write each scenario to this directory (to rerun one with simulate --timeline)")
    a = ap.parse_args()
    against = a.against or ["builtin:classic"]
    # Worse by more than this is reported (figures wander a little).
    slack = {"busiest / best": 0.02, "unserved %": 0.5, "guest OOM": 0, "below reserve": 0, "host OOM": 0}
    totals = [dict.fromkeys(slack | {"pins": 0}, 0.0) for _ in range(2)]
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            path = os.path.join(a.keep or tmp, f"sweep-{seed}.toml")
            with open(path, "w") as f:
                f.write(scenario(seed))
            ours, theirs = simulate(a.bin, path, a.policy), simulate(a.bin, path, against)
            for total, figures in zip(totals, (ours, theirs)):
                for key in total:
                    total[key] += figures[key]
            worse = [f"{k} {ours[k]:.3g} > {theirs[k]:.3g}" for k, s in slack.items() if ours[k] > theirs[k] + s]
            if worse:
                print(f"seed {seed}: " + "; ".join(worse) + f" (pins {ours['pins']} / {theirs['pins']})", flush=True)
    n = len(a.seeds)
    for name, total in zip(("tested", "against"), totals):
        print(
            f"{name:8}: busiest / best {total['busiest / best'] / n:.4f} mean, unserved {total['unserved %'] / n:.2f} %, "
            f"pins {total['pins']:.0f}, guest OOM {total['guest OOM']:.0f}, quanta below the reserve "
            f"{total['below reserve']:.0f}, host OOM {total['host OOM']:.0f}"
        )


if __name__ == "__main__":
    main()
