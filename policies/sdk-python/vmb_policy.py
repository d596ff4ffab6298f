"""vmb_policy: a one-file SDK for vm-balancer policies in Python.

Copy this file next to your app module (or add its directory with `-p`).
It targets the `policy-json` world of `wit/policy.wit`: the snapshot
arrives as JSON text and the answer goes back as JSON text, parsed and
written by CPython's native `_json`.

    import vmb_policy

    def decide(snapshot):                      # a dict, the fields of wit/SCHEMA.md
        return [vmb_policy.set_memory("web-0", 1048576, "why")]

    WitWorld = vmb_policy.world("my-policy", "0.1.0", cpu=False, memory=True, decide=decide)

    componentize-py -d wit -w policy-json componentize app -p . --stub-wasi -o my.wasm

What it gives you:
- `world(...)`: the `WitWorld` class componentize-py looks for. Its
  `decide` parses the snapshot, calls your function, and writes
  `{"actions": [...]}`; **every exception** becomes the `err(..)` answer,
  with the exception's type, message and traceback (the built-in default
  then decides that quantum). One instance lives across quanta.
- `pin(...)`, `set_memory(...)`: action dicts with checked integer fields.
- `params(snapshot, "name")`: your `[params.name]` table, with typed
  getters that fall back to defaults.
- `log(level, message)`: the host's log inside the component; collected in
  `native_log` (and otherwise silent) under plain `python3`.
- `SnapshotBuilder` / `DomainBuilder`: snapshots for native unit tests, in
  the shape the daemon sends.

It imports nothing at call time: under `--stub-wasi` importing a module that
was not imported while the component was built traps (there is no file
system), and so does the standard `traceback` module's formatting (it reads
source lines). Do the same in your own modules: import at the top.
"""

import json

try:  # inside the component: the bindings componentize-py generates
    import wit_world as _wit
    from componentize_py_types import Err
except ImportError:  # plain python3: stand-ins with the same behaviour
    _wit = None

    class Err(Exception):
        """The `err(..)` case of `decide` (componentize_py_types.Err in the component)."""

        def __init__(self, value):
            super().__init__(value)
            self.value = value


__all__ = [
    "world", "pin", "set_memory", "params", "Params", "log", "native_log",
    "format_exception", "SnapshotBuilder", "DomainBuilder", "Err", "LEVELS", "KIB_PER_MIB",
]

LEVELS = ("trace", "debug", "info", "warn", "error")
KIB_PER_MIB = 1024
_MAX_FRAMES = 24  # innermost frames kept in an err message

# ---------------------------------------------------------------- the glue


class _Info:
    """What `describe` returns outside the component (wit_world.PolicyInfo inside)."""

    def __init__(self, name, version, cpu, memory):
        self.name, self.version, self.cpu, self.memory = name, version, cpu, memory

    def __repr__(self):
        return "PolicyInfo(name=%r, version=%r, cpu=%r, memory=%r)" % (self.name, self.version, self.cpu, self.memory)


def world(name, version, *, cpu, memory, decide):
    """The `WitWorld` class for the `policy-json` world.

    `decide(snapshot_dict) -> list of actions` is your policy; module
    globals (or a closure) keep state across quanta. Assign the result to
    `WitWorld` in the module you pass to `componentize-py ... componentize`.
    """
    if not isinstance(name, str) or not name or not isinstance(version, str):
        raise TypeError("world: name and version must be strings, got %r, %r" % (name, version))
    if not isinstance(cpu, bool) or not isinstance(memory, bool):
        raise TypeError("world: cpu and memory must be bools, got %r, %r" % (cpu, memory))
    if not callable(decide):
        raise TypeError("world: decide must be a function, got %r" % (decide,))
    info_type = _wit.PolicyInfo if _wit is not None else _Info
    policy_decide = decide

    class WitWorld:
        def describe(self):
            return info_type(name=name, version=version, cpu=cpu, memory=memory)

        def decide(self, snapshot):
            try:
                actions = policy_decide(json.loads(snapshot))
                if not isinstance(actions, (list, tuple)):
                    raise TypeError("decide must return a list of actions, got %s" % type(actions).__name__)
                return json.dumps({"actions": list(actions)}, separators=(",", ":"), allow_nan=False)
            except Exception as e:  # the err(..): the built-in default decides this quantum
                raise Err("%s: %s" % (name, format_exception(e, skip=1)))

    WitWorld.__qualname__ = WitWorld.__name__ = "WitWorld"
    return WitWorld


def format_exception(e, skip=0):
    """`Type: message` and the traceback's frames, innermost last, one line each.

    Written by hand: `traceback.format_exception` reads source lines from
    files, which traps under `--stub-wasi`. `skip` drops outer frames (the
    glue's own). Chained exceptions (`raise ... from`, or raised while
    handling another) follow with their own frames.
    """
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        parts.append(_one_exception(e, skip))
        skip = 0
        nxt = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
        if nxt is not None:
            parts.append("caused by:" if e.__cause__ is not None else "while handling:")
        e = nxt
    return "\n".join(parts)


def _one_exception(e, skip):
    try:
        text = str(e)
    except Exception:  # a broken __str__ must not hide the error
        text = "<unprintable>"
    head = type(e).__name__ + (": " + text if text else "")
    frames = []
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append('  File "%s", line %d, in %s' % (_short(code.co_filename), tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    frames = frames[skip:]
    if len(frames) > _MAX_FRAMES:
        frames = ["  ... %d outer frames" % (len(frames) - _MAX_FRAMES)] + frames[-_MAX_FRAMES:]
    return "\n".join([head, "Traceback (most recent call last):"] + frames) if frames else head


def _short(filename):
    """The file's name; a package's `__init__.py` with its directory (`json/__init__.py`)."""
    parts = filename.replace("\\", "/").split("/")
    return "/".join(parts[-2:]) if parts[-1] == "__init__.py" and len(parts) > 1 else parts[-1]


# ---------------------------------------------------------------- actions


def _int(action, field, value):
    """A non-negative integer field: ints as they are, integral floats converted; bool, other floats and strings refused."""
    if isinstance(value, bool):
        raise TypeError("%s: %s must be an integer, got the bool %r" % (action, field, value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            raise ValueError("%s: %s must be an integer, got %r" % (action, field, value))
        value = int(value)
    if not isinstance(value, int):
        raise TypeError("%s: %s must be an integer, got %s %r" % (action, field, type(value).__name__, value))
    if value < 0:
        raise ValueError("%s: %s must not be negative, got %r" % (action, field, value))
    return int(value)


def _str(action, field, value):
    if not isinstance(value, str):
        raise TypeError("%s: %s must be a string, got %s %r" % (action, field, type(value).__name__, value))
    return value


def pin(domain, vcpu, cpus, reason=""):
    """A `pin` action: vCPU `vcpu` of `domain` may run only on pCPUs `cpus` (a non-empty list of ids)."""
    if isinstance(cpus, (str, bytes, dict)) or not hasattr(cpus, "__iter__"):
        raise TypeError("pin: cpus must be a list of integers, got %s %r" % (type(cpus).__name__, cpus))
    ids = [_int("pin", "cpus[%d]" % i, c) for i, c in enumerate(cpus)]
    if not ids:
        raise ValueError("pin: cpus must not be empty (domain %r, vcpu %r)" % (domain, vcpu))
    return {"kind": "pin", "domain": _str("pin", "domain", domain), "vcpu": _int("pin", "vcpu", vcpu),
            "cpus": ids, "reason": _str("pin", "reason", reason)}


def set_memory(domain, target_kib, reason=""):
    """A `set-memory` action: the balloon target of `domain`, KiB."""
    return {"kind": "set-memory", "domain": _str("set_memory", "domain", domain),
            "target_kib": _int("set_memory", "target_kib", target_kib), "reason": _str("set_memory", "reason", reason)}


# ---------------------------------------------------------------- params


class Params(dict):
    """A `[params]` table (a dict) with getters that return the default for a missing or mistyped value."""

    def number(self, key, default, lo=None, hi=None):
        """A number (int or float, not bool) as a float, clamped to [lo, hi]."""
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            return default
        v = float(v)
        if lo is not None:
            v = max(v, lo)
        if hi is not None:
            v = min(v, hi)
        return v

    def integer(self, key, default, lo=None, hi=None):
        """An integer (an integral float counts), clamped to [lo, hi]."""
        v = self.get(key)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            return default
        if lo is not None:
            v = max(v, lo)
        if hi is not None:
            v = min(v, hi)
        return v

    def string(self, key, default):
        v = self.get(key)
        return v if isinstance(v, str) else default

    def boolean(self, key, default):
        v = self.get(key)
        return v if isinstance(v, bool) else default

    def strings(self, key, default=()):
        """A list of strings (non-strings in it are dropped); `list(default)` when absent or not a list."""
        v = self.get(key)
        return [s for s in v if isinstance(s, str)] if isinstance(v, list) else list(default)

    def table(self, key):
        """A sub-table, e.g. `overrides = { "db-0" = 40 }`; empty when absent or not a table."""
        v = self.get(key)
        return Params(v) if isinstance(v, dict) else Params()


def params(snapshot, name):
    """Your `[params.NAME]` table of the daemon config; an empty one when absent."""
    top = snapshot.get("params") if isinstance(snapshot, dict) else None
    table = top.get(name) if isinstance(top, dict) else None
    return Params(table) if isinstance(table, dict) else Params()


# ---------------------------------------------------------------- log

native_log = []  # (level, message) lines logged outside the component, for tests
_NATIVE_LOG_MAX = 10000


def log(level, message):
    """Logs a line through the host (`level`: "trace" ... "error"). Outside the component it is appended to `native_log`."""
    if not isinstance(level, str):
        level = getattr(level, "name", str(level)).lower()  # a wit_world.Level
    if level not in LEVELS:
        raise ValueError("log: level must be one of %s, got %r" % (", ".join(LEVELS), level))
    message = str(message)
    if _wit is not None:
        _wit.log(getattr(_wit.Level, level.upper()), message)
    elif len(native_log) < _NATIVE_LOG_MAX:
        native_log.append((level, message))


# ---------------------------------------------------------------- snapshots for tests


class DomainBuilder:
    """A domain for `SnapshotBuilder.domain`: no vCPUs and 1 GiB of memory without guest stats until told."""

    def __init__(self, name, uuid=None):
        self._d = {
            "name": name,
            "uuid": uuid or "00000000-0000-0000-0000-%012x" % _fnv(name),
            "vcpus": [],
            "memory": {"max_kib": 1024 * KIB_PER_MIB, "target_kib": 1024 * KIB_PER_MIB, "autodeflate": False},
        }

    def vcpu(self, cpu, usage, steal=None, affinity=None):
        """Adds a vCPU that last ran on `cpu` and used `usage` of it; pinned to `cpu` unless `affinity` is given ([] = any)."""
        v = {"id": len(self._d["vcpus"]), "cpu": cpu, "affinity": [cpu] if affinity is None else list(affinity), "usage": usage}
        if steal is not None:
            v["steal"] = steal
        self._d["vcpus"].append(v)
        return self

    def memory_mib(self, max_mib, target_mib, usable_mib=None):
        """Max, balloon target and (optionally) guest-usable memory, MiB (as the Rust SDK's builder)."""
        m = self._d["memory"]
        m["max_kib"], m["target_kib"] = max_mib * KIB_PER_MIB, target_mib * KIB_PER_MIB
        for k in ("usable_kib", "unused_kib", "available_kib"):
            m.pop(k, None)
        if usable_mib is not None:
            m["usable_kib"] = m["unused_kib"] = usable_mib * KIB_PER_MIB
            m["available_kib"] = target_mib * KIB_PER_MIB
        return self

    def memory(self, **fields):
        """Sets memory fields as they are, KiB (`target_kib=..., rss_kib=...`); None removes one."""
        for k, v in fields.items():
            if v is None:
                self._d["memory"].pop(k, None)
            else:
                self._d["memory"][k] = v
        return self

    def pressure(self, swap_in_kib, major_faults):
        self._d["memory"]["swap_in_kib"], self._d["memory"]["major_faults"] = swap_in_kib, major_faults
        return self

    def tag(self, *tags):
        if tags:
            self._d.setdefault("tags", []).extend(tags)
        return self

    def build(self):
        return json.loads(json.dumps(self._d))


class SnapshotBuilder:
    """A snapshot dict in the daemon's shape: `cpus` online CPUs, `total_kib` of memory, all available.

    Host CPU usage is the sum of the usage of the vCPUs that ran on each
    (capped at 1.0) unless set with `cpu_usage`.
    """

    def __init__(self, cpus, total_kib):
        self._s = {
            "schema_version": 1, "quantum": 0, "quantum_ms": 1000,
            "host": {
                "cpus": [{"id": i, "online": True, "reserved": False, "usage": 0.0, "node": 0} for i in range(cpus)],
                "memory": {"total_kib": total_kib, "available_kib": total_kib, "reserve_kib": 0},
            },
            "domains": [], "verdicts": [], "params": {},
        }
        self._explicit_usage = False

    def host_memory(self, available_kib, reserve_kib):
        self._s["host"]["memory"].update(available_kib=available_kib, reserve_kib=reserve_kib)
        return self

    def cpu_usage(self, usage):
        for cpu, u in zip(self._s["host"]["cpus"], usage):
            cpu["usage"] = u
        self._explicit_usage = True
        return self

    def reserve_cpu(self, cpu_id):
        for cpu in self._s["host"]["cpus"]:
            if cpu["id"] == cpu_id:
                cpu["reserved"] = True
        return self

    def offline_cpu(self, cpu_id):
        for cpu in self._s["host"]["cpus"]:
            if cpu["id"] == cpu_id:
                cpu["online"] = False
        return self

    def quantum(self, quantum):
        self._s["quantum"] = quantum
        return self

    def param(self, key, value):
        """Sets a top-level `[params]` entry, e.g. `.param("keepfree", {"pct": 25})`."""
        self._s["params"][key] = value
        return self

    def verdict(self, slot, action, outcome, reason, rule="other"):
        """Adds a verdict of last quantum; `rule` names the guard rule that
        clamped or rejected it (e.g. "pin_rate_limit"; see wit/SCHEMA.md)."""
        self._s["verdicts"].append({"slot": slot, "action": action, "outcome": outcome, "reason": reason, "rule": rule})
        return self

    def domain(self, domain):
        """Adds a `DomainBuilder` (or a domain dict)."""
        self._s["domains"].append(domain.build() if isinstance(domain, DomainBuilder) else domain)
        return self

    def build(self):
        """The snapshot: a fresh dict that has been through JSON, as `decide` gets it."""
        s = json.loads(json.dumps(self._s))
        if not self._explicit_usage:
            for cpu in s["host"]["cpus"]:
                used = sum(v["usage"] for d in s["domains"] for v in d["vcpus"] if v["cpu"] == cpu["id"])
                cpu["usage"] = min(used, 1.0)
        return s

    def json(self):
        """The snapshot as the JSON text `decide` receives."""
        return json.dumps(self.build(), separators=(",", ":"))


def _fnv(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0xFFFFFFFFFFFF
