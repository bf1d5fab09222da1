"""The main job: `python -m unimoe_kernels <subcommand>`; `--help` lists the subcommands.

Each subcommand is a module of unimoe_kernels.jobs with add_arguments(parser) and run(args). All are
imported to build the parser; none of them imports triton or touches the GPU at import. A bad value
prints one line `python -m unimoe_kernels <job>: error: ...` and exits 2; `<job> --help` shows every
option with its default. The top-level --help shows DESCRIPTION (for users), not this docstring.
"""

from __future__ import annotations

import importlib
import sys

from .jobs import Parser, run_or_exit

PROG = "python -m unimoe_kernels"

# subcommand -> help; the module unimoe_kernels.jobs.<subcommand> implements it.
JOBS = {
    "bench": "time SparseMoE fwd+bwd against the naive loop and a dense chain",
    "train": "one training stage of the reference Uni-MoE (checkpoints, resume)",
    "generate": "greedy answers of a trained reference Uni-MoE",
    "demo": "stages 0-3 of the reference Uni-MoE on the tiny default, then a report (JSON + PNG)",
    "altmoe": "Alt-MoE connector: alternating training and cross-modal retrieval",
}

DESCRIPTION = f"""\
Fused Mixture-of-Experts layers for PyTorch, and jobs that train, run and time them on a small
reference Uni-MoE model and an Alt-MoE connector (synthetic data, nothing to download; CPU or GPU).

Start with `{PROG} demo`: it trains the tiny model through its four stages
and writes a report with plots to runs/demo/. `{PROG} <job> --help` lists a
job's options and their defaults."""

EPILOG = f"""\
examples:
  {PROG} demo                      # stages 0-3 and a report in runs/demo/
  {PROG} generate -n 2             # answers of the model the demo trained
  {PROG} train --stage 0 --out runs/mine
  {PROG} bench --tokens 1024       # one MoE layer against the naive loop and a dense chain
  {PROG} altmoe train              # Alt-MoE connector, report in runs/altmoe/"""


def build_parser():
    """(the top-level Parser, {subcommand: (its parser, its module)})."""
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    # Not required by argparse: its message for a missing subcommand does not list the choices; main does.
    sub = parser.add_subparsers(dest="command", title="jobs", metavar="job")
    jobs = {}
    for name, help_text in JOBS.items():
        module = importlib.import_module(f".jobs.{name}", __package__)
        jobs[name] = (sub.add_parser(name, help=help_text, description=module.__doc__), module)
        module.add_arguments(jobs[name][0])
    return parser, jobs


def main(argv=None) -> int:
    """Parse argv, run the subcommand; a command-line error exits 2 with one `error:` line, Ctrl-C
    exits 130 with one line (and what is kept) instead of a traceback."""
    parser, jobs = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"choose a job: {', '.join(JOBS)} (`{PROG} --help` says what each does)")
    sub_parser, module = jobs[args.command]
    try:
        run_or_exit(sub_parser, module.run, args)
    except KeyboardInterrupt:
        print(f"{sub_parser.prog}: interrupted{getattr(module, 'ON_INTERRUPT', '')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
