"""The main job: `python -m unimoe_kernels <subcommand>`; `--help` lists the subcommands."""

from __future__ import annotations

import argparse
import sys

from .jobs import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimoe_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(sub.add_parser("bench", help="time SparseMoE fwd+bwd against the naive loop and a dense chain"))
    # The model jobs are imported lazily: `bench` should not pay for loading the reference model.
    from .jobs import demo, generate, train

    train.add_arguments(sub.add_parser("train", help="one training stage of the reference Uni-MoE (checkpoints, resume)"))
    generate.add_arguments(sub.add_parser("generate", help="greedy answers of a trained reference Uni-MoE"))
    demo.add_arguments(sub.add_parser("demo", help="stages 0-3 on the tiny default, then a report (JSON + PNG)"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench.run(args)
    elif args.command == "train":
        train.run(args)
    elif args.command == "generate":
        generate.run(args)
    elif args.command == "demo":
        demo.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
