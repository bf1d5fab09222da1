"""The main job: `python -m unimoe_kernels <subcommand>`; `--help` lists the subcommands.

Each subcommand is a module of unimoe_kernels.jobs with add_arguments(parser) and run(args). All are
imported to build the parser; none of them imports triton or touches the GPU at import. A bad value
prints one line `python -m unimoe_kernels <job>: error: ...` and exits 2; `<job> --help` shows every
option with its default.
"""

from __future__ import annotations

import importlib
import sys

from .jobs import Parser, run_or_exit

# subcommand -> help; the module unimoe_kernels.jobs.<subcommand> implements it.
JOBS = {
    "bench": "time SparseMoE fwd+bwd against the naive loop and a dense chain",
    "train": "one training stage of the reference Uni-MoE (checkpoints, resume)",
    "generate": "greedy answers of a trained reference Uni-MoE",
    "demo": "stages 0-3 of the reference Uni-MoE on the tiny default, then a report (JSON + PNG)",
    "altmoe": "Alt-MoE connector: alternating training and cross-modal retrieval",
}


def build_parser():
    """(the top-level Parser, {subcommand: (its parser, its module)})."""
    parser = Parser(prog="python -m unimoe_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    jobs = {}
    for name, help_text in JOBS.items():
        module = importlib.import_module(f".jobs.{name}", __package__)
        jobs[name] = (sub.add_parser(name, help=help_text, description=module.__doc__), module)
        module.add_arguments(jobs[name][0])
    return parser, jobs


def main(argv=None) -> int:
    """Parse argv, run the subcommand; a command-line error exits 2 with one `error:` line."""
    parser, jobs = build_parser()
    args = parser.parse_args(argv)
    sub_parser, module = jobs[args.command]
    run_or_exit(sub_parser, module.run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
