"""`python -m lmcache <command>`: server, demo, doctor, bench <name>."""

from __future__ import annotations

import argparse
import importlib
import sys

from lmcache.bench import BENCHES


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run the shared host cache of this node", add_help=False)
    server.set_defaults(module="lmcache.v1.mp.cli")

    demo = commands.add_parser("demo", help="run vLLM with LMCache on a long prompt twice", add_help=False)
    demo.set_defaults(module="lmcache.demo")

    doctor = commands.add_parser("doctor", help="check this setup: OK / WARN / FAIL with the fix", add_help=False)
    doctor.set_defaults(module="lmcache.doctor.cli")

    bench = commands.add_parser("bench", help="measure throughput; the last line printed is JSON")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        sub = benches.add_parser(name, add_help=False)
        sub.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    # Parse the command first, then let its module add its own options.
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known.module)
    sub = argparse.ArgumentParser(prog=f"python -m lmcache {' '.join(argv[:2] if known.command == 'bench' else argv[:1])}")
    module.add_arguments(sub)
    skip = 2 if known.command == "bench" else 1
    args = sub.parse_args(argv[skip:])
    if known.command == "bench":
        from lmcache.console import emit_result

        emit_result(module.run(args))
        return 0
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
