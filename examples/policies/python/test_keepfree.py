"""Native unit tests of keepfree.py: `python3 -m unittest test_keepfree`.

vmb_policy (policies/sdk-python) must be importable: build.sh sets
PYTHONPATH; run by hand, this file finds it in the repository.
"""
import os
import sys
import unittest

try:
    import vmb_policy  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "policies", "sdk-python"))

from vmb_policy import DomainBuilder, SnapshotBuilder

from keepfree import plan

MIB = 1024


def snap(domains, params=None, available_mib=8192):
    """A host with 16 GiB and a 512 MiB reserve; domains as (name, max, target, usable) MiB (usable None: no stats)."""
    b = SnapshotBuilder(4, 16384 * MIB).host_memory(available_mib * MIB, 512 * MIB)
    for name, max_mib, target_mib, usable_mib in domains:
        b.domain(DomainBuilder(name).memory_mib(max_mib, target_mib, usable_mib))
    for key, table in (params or {}).items():
        b.param(key, table)
    return b.build()


class KeepFree(unittest.TestCase):
    def test_grows_a_starved_guest_to_the_target(self):
        a = plan(snap([("web", 4096, 1100, 100)]))  # used 1000 MiB, 9 % free
        self.assertEqual(len(a), 1)
        self.assertAlmostEqual(a[0]["target_kib"] / MIB, 1000 / 0.75, delta=1)

    def test_shrinks_only_above_the_slack(self):
        self.assertEqual(plan(snap([("web", 4096, 1400, 400)])), [])  # 28.6 % free: inside the band
        a = plan(snap([("web", 4096, 2000, 1000)]))  # 50 % free
        self.assertAlmostEqual(a[0]["target_kib"] / MIB, 1000 / 0.75, delta=1)

    def test_override_keeps_more_free(self):
        params = {"keepfree": {"pct": 25, "overrides": {"db-0": 40}}}
        a = plan(snap([("db-0", 4096, 2400, 1400), ("web", 4096, 2000, 1000)], params))
        by = {x["domain"]: x["target_kib"] / MIB for x in a}
        self.assertAlmostEqual(by["db-0"], 1000 / 0.60, delta=1)
        self.assertAlmostEqual(by["web"], 1000 / 0.75, delta=1)

    def test_growth_never_exceeds_the_pool(self):
        a = plan(snap([("a", 8192, 1100, 100), ("b", 8192, 1100, 100)], available_mib=512 + 300))
        self.assertLessEqual(sum(x["target_kib"] - 1100 * MIB for x in a), 300 * MIB)

    def test_guests_without_stats_are_left_alone(self):
        self.assertEqual(plan(snap([("web", 4096, 2000, None)])), [])

    def test_odd_params_fall_back_to_defaults(self):
        odd = {"keepfree": {"pct": "lots", "slack": True, "overrides": ["db-0"]}}
        self.assertEqual(plan(snap([("web", 4096, 2000, 1000)], odd)), plan(snap([("web", 4096, 2000, 1000)])))

    def test_the_component_answers_json_and_errs_with_a_traceback(self):
        import json

        import app
        from vmb_policy import Err

        w = app.WitWorld()
        self.assertEqual(w.describe().name, "keepfree-python")
        out = json.loads(w.decide(json.dumps(snap([("web", 4096, 1100, 100)]))))
        self.assertEqual([a["kind"] for a in out["actions"]], ["set-memory"])
        with self.assertRaises(Err) as cm:
            w.decide('{"domains": []}')  # no "host"
        self.assertIn("keepfree-python: KeyError: 'host'", cm.exception.value)
        self.assertIn('File "keepfree.py"', cm.exception.value)


if __name__ == "__main__":
    unittest.main()
