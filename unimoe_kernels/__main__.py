"""The main job: `python -m unimoe_kernels <subcommand>`; `--help` lists the subcommands."""

from __future__ import annotations

import argparse
import sys

from .jobs import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimoe_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(sub.add_parser("bench", help="time SparseMoE fwd+bwd against the naive loop and a dense chain"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
