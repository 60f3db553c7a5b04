"""`python -m bench SUITE --workload NAME ...`: one entry point for the benchmark suites.

Each suite is a module of this package with `add_cli_args(parser)` and `main(args) -> int`. Run from
the repository root; results go to bench/results/<device>/<suite>_<workload>.json.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUITES = ("latency", "acceptance", "serve", "host", "steps", "kernels", "prefill", "tune", "train", "plot")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A workload's XLA flags must be in the environment before JAX starts, i.e. before the suites
    # (which import JAX) are imported.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workload")
    known, _ = pre.parse_known_args(argv)
    if known.workload:
        from bench import workloads

        flags = workloads.get(known.workload).xla_flags
        if flags:
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    # Import only the suite asked for (the others pull in JAX, the trainer, ...); all of them for --help.
    first = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name in (first,) if first in SUITES else SUITES:
        modules[name] = importlib.import_module(f"bench.{name}")
        doc = modules[name].__doc__
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        modules[name].add_cli_args(p)
    args = parser.parse_args(argv)
    args.argv = ["python", "-m", "bench", *argv]
    return modules[args.suite].main(args)


if __name__ == "__main__":
    raise SystemExit(main())
