"""Tune the grouped GEMM configs of named shapes on this GPU and write them in the shipped-table format.

    python -m benchmarks.sweep_configs --out DIR [--shapes qwen3-30b-a3b mixtral ...] [--lora-rank 16]

Data flow: for each shape, one SparseMoE-style forward + backward of grouped_mlp_gather in bf16
runs with UNIMOE_AUTOTUNE=1 and UNIMOE_CACHE_DIR=DIR, so every kernel launch (roles up_glu, down,
dact, dgrad, wgrad, lora_wgrad) times the heuristic and the next candidates that fit in shared
memory (ops/gemm_configs.tune: at most 4 configs per launch, a few seconds of compile each) on its
own arguments and records the fastest in DIR/tuned-<device>.json, with its time in ms. A config
that does not compile or fit is skipped; a CUDA fault stops the sweep (it would poison every later
candidate). That file is a
config table: copy it to unimoe_kernels/ops/configs/<device>.json to ship it. The heuristic's time
for the same launch is printed beside the winner so the gain is visible.

`--priors` instead writes the compile-checked heuristic configs of the named shapes for a device
name without any GPU (what the package ships until a sweep replaces it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _shapes():
    from unimoe_kernels.ops.sm90_check import NAMED_SHAPES

    return NAMED_SHAPES


def write_priors(device_name: str, out: Path) -> Path:
    """The heuristic's config of every launch of every named shape, as a table for device_name, each
    with what it compiles to for sm_90 as its reason."""
    from unimoe_kernels.ops import gemm_configs
    from unimoe_kernels.ops.sm90_check import NO_TABLE, layer_launches, prior_reason

    configs: dict = {}
    for shape in _shapes().values():
        # Recorded without a table, so each launch carries the heuristic's config that is written.
        for la in layer_launches(shape, device_name=NO_TABLE):
            role, dtype, k, nout, e, rows, rank = la.call
            key = gemm_configs.table_key(dtype, role, k, nout, e, rank)
            entry = dict(gemm_configs.heuristic(*la.call), reason=prior_reason(la))
            configs.setdefault(key, {})[str(gemm_configs.rows_bucket(rows, e))] = entry
    data = {"device": device_name,
            "source": "compile-checked priors (heuristic; sm90_check: no spills, shared memory within the limit); "
                      "not timed: benchmarks/sweep_configs.py on the device replaces them with measured winners",
            "configs": configs}
    path = out / gemm_configs.device_file_name(device_name)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def sweep(shapes: list[str], out: Path, lora_rank: int) -> Path:
    import torch

    os.environ["UNIMOE_AUTOTUNE"] = "1"
    os.environ["UNIMOE_CACHE_DIR"] = str(out)
    from unimoe_kernels import reference, timing
    from unimoe_kernels.ops import gemm_configs
    from unimoe_kernels.ops.grouped_gemm import grouped_mlp_gather
    from unimoe_kernels.ops.routing import build_routing

    dev = torch.device("cuda")
    for name in shapes:
        t, h, f, e, k, r = _shapes()[name]
        r = r or lora_rank
        # Launch to completion: the backward's kernels (and their tuning) finish before the clock stops.
        with timing.stopwatch(dev) as sw:
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
            ids = torch.randint(0, e, (t, k), device=dev, generator=g)
            plan = build_routing(ids, e)
            w_gu = (torch.randn(e, 2 * f, h, device=dev, generator=g) / h**0.5).bfloat16().requires_grad_(r == 0)
            w_d = (torch.randn(e, h, f, device=dev, generator=g) / f**0.5).bfloat16().requires_grad_(r == 0)
            lora = None
            if r:
                lora_shapes = ((e, r, h), (e, 2 * f, r), (e, r, f), (e, h, r))
                lora = reference.LoRAWeights(*(
                    torch.randn(*s, device=dev, generator=g).mul(0.02).bfloat16().requires_grad_()
                    for s in lora_shapes))
            y = grouped_mlp_gather(x, plan, k, w_gu, w_d, lora=lora)
            y.backward(torch.randn_like(y))
        print(f"{name}: tuned in {sw.seconds:.1f} s", flush=True)
    path = gemm_configs.cache_path(torch.cuda.get_device_name())
    print(f"table: {path}")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory of the tuned table")
    parser.add_argument("--shapes", nargs="*", default=["qwen3-30b-a3b", "mixtral", "peft-moe-lora"],
                        choices=list(_shapes()), help="named shapes to tune")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank for shapes that have none (0: none)")
    parser.add_argument("--priors", metavar="DEVICE_NAME", help="write the compile-checked priors for this GPU")
    args = parser.parse_args(argv)
    if args.priors:
        print(write_priors(args.priors, args.out))
        return
    import torch

    if not torch.cuda.is_available():
        print("error: the sweep times kernels and needs a CUDA device", file=sys.stderr)
        raise SystemExit(2)
    sweep(args.shapes, args.out, args.lora_rank)


if __name__ == "__main__":
    main()
