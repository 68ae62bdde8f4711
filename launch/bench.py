"""swarm-bench: benchmarks, one subcommand per module in launch/benchmarks/.

A benchmark module defines HELP (one line), add_arguments(parser) and run(args) -> exit code.
Adding one is one line in BENCHMARKS (plus its module). Ctrl+C and SIGTERM stop a benchmark alike
(exit status 130 or 143), the local swarms and testbeds it started torn down on the way out.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from launch.cluster import SigtermUnwinds, stopped

BENCHMARKS: dict[str, str] = {
    "solo": "launch.benchmarks.solo",
    "codec": "launch.benchmarks.codec",
    "swarm": "launch.benchmarks.swarm",
    "nat": "launch.benchmarks.nat",
    "spes": "launch.benchmarks.spes",
    "spsa": "launch.benchmarks.spsa",
    "pipeline": "launch.benchmarks.pipeline",
    "quality": "launch.benchmarks.quality",
    "scale": "launch.benchmarks.scale",
    "trust": "launch.benchmarks.trust",
    "memory": "launch.benchmarks.memory",
    "gpu": "launch.benchmarks.gpu",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with SigtermUnwinds():  # SIGTERM unwinds as Ctrl+C does: clusters and testbeds are torn down
            return int(args.run(args))
    except KeyboardInterrupt as e:
        return stopped("swarm-bench", e)


if __name__ == "__main__":
    sys.exit(main())
