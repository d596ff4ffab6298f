"""Native tests of vmb_policy.py: `python3 -m unittest` in this directory."""
import json
import unittest

import vmb_policy
from vmb_policy import DomainBuilder, Err, SnapshotBuilder, params, pin, set_memory

MIB = 1024


class Glue(unittest.TestCase):
    def world(self, decide):
        return vmb_policy.world("t", "1.2.3", cpu=True, memory=False, decide=decide)()

    def test_describe(self):
        info = self.world(lambda s: []).describe()
        self.assertEqual((info.name, info.version, info.cpu, info.memory), ("t", "1.2.3", True, False))

    def test_decide_round_trips_json(self):
        seen = []

        def decide(s):
            seen.append(s)
            return [pin(s["domains"][0]["name"], 0, [1], "r"), set_memory("a", 1048576.0)]

        out = self.world(decide).decide(SnapshotBuilder(2, 4 << 20).domain(DomainBuilder("a").vcpu(0, 0.5)).json())
        self.assertEqual(seen[0]["domains"][0]["vcpus"][0]["usage"], 0.5)
        self.assertEqual(out, '{"actions":[{"kind":"pin","domain":"a","vcpu":0,"cpus":[1],"reason":"r"},'
                              '{"kind":"set-memory","domain":"a","target_kib":1048576,"reason":""}]}')
        self.assertEqual(json.loads(out)["actions"][1]["target_kib"], 1048576)

    def test_state_lives_across_calls(self):
        count = [0]

        def decide(s):
            count[0] += 1
            return []

        w = self.world(decide)
        w.decide("{}")
        w.decide("{}")
        self.assertEqual(count[0], 2)

    def test_every_exception_is_an_err_with_type_message_and_traceback(self):
        def inner(s):
            return s["host"]

        def decide(s):
            return inner(s)

        with self.assertRaises(Err) as cm:
            self.world(decide).decide("{}")
        msg = cm.exception.value
        self.assertTrue(msg.startswith("t: KeyError: 'host'\nTraceback (most recent call last):\n"), msg)
        self.assertIn('File "test_vmb_policy.py", line', msg)
        self.assertIn("in decide", msg)
        self.assertTrue(msg.rstrip().endswith("in inner"), msg)
        self.assertNotIn('File "vmb_policy.py"', msg)  # the glue's own frame is left out

    def test_bad_json_and_bad_answers_are_errs(self):
        for snapshot, decide, want in [
            ("not json", lambda s: [], "t: JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"
                                       "Traceback (most recent call last):\n  File \"json/__init__.py\", line"),
            ("{}", lambda s: None, "TypeError: decide must return a list of actions, got NoneType"),
            ("{}", lambda s: [{"x": object()}], "TypeError: Object of type object is not JSON serializable"),
            ("{}", lambda s: [{"x": float("nan")}], "ValueError: Out of range float values"),
            ("{}", lambda s: [pin("a", 0, [1.5])], "ValueError: pin: cpus[0] must be an integer, got 1.5"),
        ]:
            with self.assertRaises(Err) as cm:
                self.world(decide).decide(snapshot)
            self.assertIn(want, cm.exception.value)

    def test_chained_exceptions_are_shown(self):
        def decide(s):
            try:
                {}["k"]
            except KeyError as e:
                raise RuntimeError("bad params") from e

        with self.assertRaises(Err) as cm:
            self.world(decide).decide("{}")
        msg = cm.exception.value
        self.assertIn("RuntimeError: bad params", msg)
        self.assertIn("caused by:\nKeyError: 'k'", msg)

    def test_world_checks_its_arguments(self):
        with self.assertRaises(TypeError):
            vmb_policy.world("t", "1", cpu="yes", memory=False, decide=lambda s: [])
        with self.assertRaises(TypeError):
            vmb_policy.world("t", "1", cpu=True, memory=False, decide=None)


class Actions(unittest.TestCase):
    def test_pin_and_set_memory(self):
        self.assertEqual(pin("web", 1, [2, 3], "why"),
                         {"kind": "pin", "domain": "web", "vcpu": 1, "cpus": [2, 3], "reason": "why"})
        self.assertEqual(set_memory("db", 2048 * MIB),
                         {"kind": "set-memory", "domain": "db", "target_kib": 2048 * MIB, "reason": ""})

    def test_integral_floats_are_converted(self):
        a = set_memory("db", 1048576.0)
        self.assertIs(type(a["target_kib"]), int)
        self.assertEqual(pin("w", 0.0, (3.0,))["cpus"], [3])

    def test_non_integers_are_refused_naming_field_and_value(self):
        for call, exc, words in [
            (lambda: set_memory("db", 1.5), ValueError, "target_kib must be an integer, got 1.5"),
            (lambda: set_memory("db", "3"), TypeError, "target_kib must be an integer, got str '3'"),
            (lambda: set_memory("db", True), TypeError, "target_kib must be an integer, got the bool True"),
            (lambda: set_memory("db", float("inf")), ValueError, "target_kib"),
            (lambda: set_memory("db", -1), ValueError, "target_kib must not be negative, got -1"),
            (lambda: pin("w", 0, [-2.0]), ValueError, "cpus[0] must not be negative, got -2"),
            (lambda: pin("w", None, [1]), TypeError, "vcpu must be an integer, got NoneType None"),
            (lambda: pin("w", 0, [1, False]), TypeError, "cpus[1] must be an integer, got the bool False"),
            (lambda: pin("w", 0, 3), TypeError, "cpus must be a list of integers"),
            (lambda: pin("w", 0, "3"), TypeError, "cpus must be a list of integers"),
            (lambda: pin("w", 0, []), ValueError, "cpus must not be empty"),
            (lambda: pin(7, 0, [1]), TypeError, "domain must be a string"),
            (lambda: set_memory("db", 1, reason=None), TypeError, "reason must be a string"),
        ]:
            with self.assertRaises(exc) as cm:
                call()
            self.assertIn(words, str(cm.exception))


class ParamsTests(unittest.TestCase):
    def snap(self, table):
        return SnapshotBuilder(1, 1 << 20).param("me", table).build()

    def test_missing_tables_are_empty(self):
        self.assertEqual(params({}, "me"), {})
        self.assertEqual(params({"params": {"me": 3}}, "me"), {})
        self.assertEqual(params(self.snap({"a": 1}), "other"), {})
        self.assertEqual(params(self.snap({"a": 1}), "me"), {"a": 1})

    def test_typed_getters_fall_back_to_defaults(self):
        p = params(self.snap({"n": 3, "f": 0.5, "b": True, "s": "x", "l": ["a", 1, "b"], "t": {"k": 2}}), "me")
        self.assertEqual(p.number("n", 1.0), 3.0)
        self.assertEqual(p.number("f", 1.0, lo=0.6), 0.6)
        self.assertEqual(p.number("n", 1.0, hi=2), 2.0)
        self.assertEqual(p.number("b", 1.0), 1.0)  # a bool is not a number
        self.assertEqual(p.number("s", 1.0), 1.0)
        self.assertEqual(p.number("missing", 1.0), 1.0)
        self.assertEqual(p.integer("n", 0), 3)
        self.assertEqual(p.integer("f", 7), 7)
        self.assertEqual(p.integer("b", 7), 7)
        self.assertEqual(p.integer("n", 0, hi=2), 2)
        self.assertEqual(p.boolean("b", False), True)
        self.assertEqual(p.boolean("n", False), False)
        self.assertEqual(p.string("s", "d"), "x")
        self.assertEqual(p.string("n", "d"), "d")
        self.assertEqual(p.strings("l"), ["a", "b"])
        self.assertEqual(p.strings("s", ["z"]), ["z"])
        self.assertEqual(p.table("t").integer("k", 0), 2)
        self.assertEqual(p.table("s"), {})


class Log(unittest.TestCase):
    def test_native_log_is_collected(self):
        vmb_policy.native_log.clear()
        vmb_policy.log("info", "hello")
        vmb_policy.log("warn", 3)
        self.assertEqual(vmb_policy.native_log, [("info", "hello"), ("warn", "3")])
        with self.assertRaises(ValueError):
            vmb_policy.log("loud", "x")
        vmb_policy.native_log.clear()


class Builder(unittest.TestCase):
    def test_the_daemons_shape(self):
        s = (SnapshotBuilder(4, 16384 * MIB)
             .host_memory(8192 * MIB, 512 * MIB)
             .reserve_cpu(3)
             .quantum(7)
             .param("keepfree", {"pct": 25})
             .domain(DomainBuilder("web").vcpu(0, 0.5).vcpu(0, 0.75, steal=0.25).vcpu(1, 0.1, affinity=[])
                     .memory_mib(4096, 2048, 1000).tag("latency"))
             .domain(DomainBuilder("db").tag())
             .build())
        self.assertEqual(set(s), {"schema_version", "quantum", "quantum_ms", "host", "domains", "verdicts", "params"})
        self.assertEqual((s["schema_version"], s["quantum"], s["quantum_ms"]), (1, 7, 1000))
        self.assertEqual(s["host"]["cpus"][0], {"id": 0, "online": True, "reserved": False, "usage": 1.0, "node": 0})
        self.assertEqual([c["usage"] for c in s["host"]["cpus"]], [1.0, 0.1, 0.0, 0.0])
        self.assertTrue(s["host"]["cpus"][3]["reserved"])
        self.assertEqual(s["host"]["memory"], {"total_kib": 16384 * MIB, "available_kib": 8192 * MIB, "reserve_kib": 512 * MIB})
        web, db = s["domains"]
        self.assertEqual(web["tags"], ["latency"])
        self.assertNotIn("tags", db)  # optional fields are absent, not null
        self.assertEqual(web["vcpus"][0], {"id": 0, "cpu": 0, "affinity": [0], "usage": 0.5})
        self.assertEqual(web["vcpus"][1]["steal"], 0.25)
        pin = {"kind": "pin", "domain": "web", "vcpu": 0, "cpus": [9], "reason": "r"}
        v = SnapshotBuilder(2, MIB).verdict("cpu", pin, "rejected", "no CPU 9", "bad_cpu").verdict("cpu", pin, "clamped", "x").build()["verdicts"]
        self.assertEqual([x["rule"] for x in v], ["bad_cpu", "other"])  # the daemon's field, "other" unless named
        self.assertEqual(web["vcpus"][2]["affinity"], [])
        self.assertEqual(web["memory"], {"max_kib": 4096 * MIB, "target_kib": 2048 * MIB, "usable_kib": 1000 * MIB,
                                         "unused_kib": 1000 * MIB, "available_kib": 2048 * MIB, "autodeflate": False})
        self.assertEqual(db["memory"], {"max_kib": 1024 * MIB, "target_kib": 1024 * MIB, "autodeflate": False})
        self.assertRegex(web["uuid"], r"^00000000-0000-0000-0000-[0-9a-f]{12}$")
        self.assertEqual(s["params"], {"keepfree": {"pct": 25}})
        self.assertEqual(json.loads(SnapshotBuilder(1, 1).json())["host"]["cpus"][0]["id"], 0)

    def test_explicit_usage_and_raw_memory_fields(self):
        s = (SnapshotBuilder(2, 1 << 20).cpu_usage([0.3, 0.9]).offline_cpu(1)
             .domain(DomainBuilder("a").vcpu(0, 1.0).memory(target_kib=5000, rss_kib=4000).pressure(10, 2))
             .build())
        self.assertEqual([c["usage"] for c in s["host"]["cpus"]], [0.3, 0.9])
        self.assertFalse(s["host"]["cpus"][1]["online"])
        m = s["domains"][0]["memory"]
        self.assertEqual((m["target_kib"], m["rss_kib"], m["swap_in_kib"], m["major_faults"]), (5000, 4000, 10, 2))

    def test_builds_are_independent(self):
        b = SnapshotBuilder(1, 1).domain(DomainBuilder("a"))
        s1 = b.build()
        s1["domains"].clear()
        self.assertEqual(len(b.build()["domains"]), 1)


if __name__ == "__main__":
    unittest.main()
