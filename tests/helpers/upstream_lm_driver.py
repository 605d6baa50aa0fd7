"""Drives upstream 0.5.6's own lm:// client (LMCServerConnector) and protocol
classes. Run with ONLY the tree of tests/helpers/upstream_wheel.py on PYTHONPATH:

    python tests/helpers/upstream_lm_driver.py '{"port": P, "ops": [...]}'

ops: {"op": "put", "key", "file", "shape", "dtype", "fmt"} (payload read from file),
     {"op": "get", "key", "out"} (payload written to out),
     {"op": "exists", "key"},
     {"op": "request_header", "command", "key", "length", "fmt", "dtype", "shape"},
     {"op": "reply_header", "code", "length", "fmt", "dtype", "shape"},
     {"op": "parse_key", "key"} (upstream's parse, printed back).
Prints one JSON list of results.
"""

import asyncio
import json
import sys
import threading

import torch

import lmcache.v1.protocol as proto  # upstream's
from lmcache.utils import parse_cache_key
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

assert "lmcache/v1/protocol.py" in proto.__file__ and "upstream" in proto.__file__, proto.__file__


def main(spec):
    conn = loop = None
    if spec.get("port"):
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        conn = LMCServerConnector("127.0.0.1", spec["port"], loop, LocalCPUBackend())

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    out = []
    for op in spec["ops"]:
        kind = op["op"]
        if kind == "put":
            data = bytearray(open(op["file"], "rb").read())
            tensor = torch.frombuffer(data, dtype=getattr(torch, op["dtype"])).reshape(op["shape"])
            run(conn.put(parse_cache_key(op["key"]), MemoryObj(tensor, MemoryFormat(op["fmt"]))))
            out.append(True)
        elif kind == "get":
            obj = run(conn.get(parse_cache_key(op["key"])))
            if obj is None:
                out.append(None)
            else:
                with open(op["out"], "wb") as f:
                    f.write(bytes(obj.byte_array))
                out.append({"shape": list(obj.get_shape()), "dtype": str(obj.get_dtype()), "fmt": obj.fmt.value})
        elif kind == "exists":
            out.append(conn.exists_sync(parse_cache_key(op["key"])))
        elif kind == "request_header":
            msg = proto.ClientMetaMessage(proto.ClientCommand(op["command"]), parse_cache_key(op["key"]),
                                          op["length"], MemoryFormat(op["fmt"]), proto.INT_TO_DTYPE[op["dtype"]],
                                          torch.Size(op["shape"]))
            out.append(msg.serialize().hex())
        elif kind == "reply_header":
            msg = proto.ServerMetaMessage(proto.ServerReturnCode(op["code"]), op["length"], MemoryFormat(op["fmt"]),
                                          proto.INT_TO_DTYPE[op["dtype"]], torch.Size(op["shape"]))
            out.append(msg.serialize().hex())
        elif kind == "parse_key":
            out.append(parse_cache_key(op["key"]).to_string())
        else:
            raise ValueError(kind)
    if conn is not None:
        run(conn.close())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
