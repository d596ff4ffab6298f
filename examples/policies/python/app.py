"""The component glue: the `policy` world's exports, on top of keepfree.py."""
import msgpack

import wit_world
from componentize_py_types import Err

import keepfree


class WitWorld(wit_world.WitWorld):
    def describe(self) -> wit_world.PolicyInfo:
        return wit_world.PolicyInfo(name="keepfree-python", version="0.1.0", cpu=False, memory=True)

    def decide(self, snapshot: bytes) -> bytes:
        try:
            snap = msgpack.unpackb(snapshot, raw=False, strict_map_key=False)
            actions = keepfree.plan(snap)
        except Exception as e:  # an err(..): the built-in default decides this quantum
            raise Err("keepfree: %s: %s" % (type(e).__name__, e))
        return msgpack.packb({"actions": actions}, use_bin_type=True)
