"""Native unit tests of keepfree.py: `python3 -m unittest test_keepfree`."""
import unittest

from keepfree import plan

MIB = 1024


def snap(domains, params=None, available_mib=8192):
    return {
        "host": {"memory": {"total_kib": 16384 * MIB, "available_kib": available_mib * MIB, "reserve_kib": 512 * MIB}},
        "domains": [
            {"name": n, "memory": {"max_kib": mx * MIB, "target_kib": t * MIB, "usable_kib": f * MIB}}
            for n, mx, t, f in domains
        ],
        "params": params or {},
    }


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
        s = snap([("web", 4096, 2000, 1000)])
        del s["domains"][0]["memory"]["usable_kib"]
        self.assertEqual(plan(s), [])


if __name__ == "__main__":
    unittest.main()
