"""The main job: `python -m unimoe_kernels <subcommand>`; `--help` lists the subcommands.

Each subcommand is a module of unimoe_kernels.jobs with add_arguments(parser) and run(args). All are
imported to build the parser; none of them imports triton or touches the GPU at import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> help; the module unimoe_kernels.jobs.<subcommand> implements it.
JOBS = {
    "bench": "time SparseMoE fwd+bwd against the naive loop and a dense chain",
    "train": "one training stage of the reference Uni-MoE (checkpoints, resume)",
    "generate": "greedy answers of a trained reference Uni-MoE",
    "demo": "stages 0-3 of the reference Uni-MoE on the tiny default, then a report (JSON + PNG)",
    "altmoe": "Alt-MoE connector: alternating training and cross-modal retrieval",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimoe_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, help_text in JOBS.items():
        modules[name] = importlib.import_module(f".jobs.{name}", __package__)
        modules[name].add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    modules[args.command].run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
