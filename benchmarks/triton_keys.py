"""Which compiles share a Triton cache entry: the JIT's key for a kernel-stage case, for the layer's
own launch of the same role, and for sm90_check.compile_launch of it; computed without a GPU.

    python -m benchmarks.triton_keys [--shapes qwen3-30b-a3b,mixtral] [--roles up_glu,down,...]

Triton's on-disk cache is addressed by sha256 of "triton_key - source hash - backend hash - options
hash - cache-invalidating environment" (triton/runtime/cache.py, compiler/compiler.py): a compile
elsewhere is a hit only if every part matches. This tool stands a made-up CUDA driver in for the
GPU (target sm_90, device 0), lets the JIT bind and specialise each launch exactly as it would on
the GPU (TMA descriptors on, as on Hopper), and stops at the compile to read the key it would look
up. It prints, per shipped case, whether the case's key equals the layer's (the kernel stage then
fills the cache for the layer stage) and whether sm90_check's equals the JIT's (its compiles then
double as cache entries), with the first difference when they do not. benchmarks/NOTES.md has what
it found and why a cache filled here is not carried to the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from typing import Optional
from unittest import mock

from . import kernel_stage


class _Stop(Exception):
    """Raised by the stand-in compile once it has the key: nothing is compiled or launched."""


def _fake_driver():
    import torch
    from triton.backends.compiler import GPUTarget

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)  # H100 and H200 alike: compute capability 9.0, warp 32

        def get_active_torch_device(self):
            return torch.device("cpu")

    return Driver()


def keys(shapes: tuple, roles: tuple) -> list[dict]:
    """Per shipped case: {"id", "case", "layer", "sm90"} Triton cache keys and, where the case's and
    sm90_check's differ, "why": the signature, attribute or option entries that differ."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    import triton.compiler.compiler as tcc
    from triton.runtime.cache import get_cache_key
    from triton.runtime.driver import driver

    from unimoe_kernels.ops import grouped_gemm_launch, sm90_check

    seen: list = []

    def stand_in(src, target=None, options=None, _env_vars=None):
        backend = tcc.make_backend(target)
        opts = backend.parse_options(dict(options or {}))
        env = tcc.get_cache_invalidating_env_vars() if _env_vars is None else _env_vars
        seen.append((get_cache_key(src, backend, opts, env), src, opts))
        raise _Stop

    def key_of(fn) -> tuple:
        seen.clear()
        try:
            fn()
        except _Stop:
            pass
        return seen[-1]

    out = []
    with ExitStack() as stack:
        # Put back whatever was active before (reset_active would look for a real driver, and a CPU has none).
        stack.callback(setattr, driver, "_active", driver._active)
        driver.set_active(_fake_driver())
        for target in (triton, tcc):  # the JIT binds `compile` from triton.compiler; sm90_check calls triton.compile
            stack.enter_context(mock.patch.object(target, "compile", stand_in))
        stack.enter_context(mock.patch("triton.compiler.compile", stand_in))
        stack.enter_context(mock.patch.object(grouped_gemm_launch, "_use_tma", lambda device: True))
        stack.enter_context(mock.patch.object(grouped_gemm_launch, "_persistent_programs", lambda device: 132))
        for case in kernel_stage.plan(shapes, roles, 0, device_name=sm90_check.H100):
            shape = kernel_stage._shape(case["shape"])
            role_key = kernel_stage._role_key(case["role"], shape)
            launches, _ = kernel_stage._recorded(shape, case["device_name"], override=(role_key, case["cfg"]))
            la = next(x for x in launches if (x.call[0], x.call[2], x.call[3]) == role_key)
            built = kernel_stage.build(case["role"], kernel_stage.case_dims(case["shape"], False), case["cfg"],
                                       torch.bfloat16, torch.device("cpu"))
            mine = key_of(built.launch)
            layer = key_of(lambda: la.kernel[(1,)](*la.args, **la.meta))
            sm90 = key_of(lambda: sm90_check.compile_launch(la))
            row = {"id": case["id"], "case": mine[0], "layer": layer[0], "sm90": sm90[0]}
            if sm90[0] != mine[0]:
                row["why"] = _differences(sm90, mine)
            out.append(row)
    return out


def _differences(a: tuple, b: tuple) -> list[str]:
    """What differs between two (key, ASTSource, options) compile requests (a: sm90_check, b: the JIT)."""
    _, sa, oa = a
    _, sb, ob = b
    why = []
    if sa.fn.cache_key != sb.fn.cache_key:
        why.append("the kernel source")
    for name in sa.signature:
        if sa.signature.get(name) != sb.signature.get(name):
            why.append(f"signature of {name}: {sa.signature.get(name)!r} vs the JIT's {sb.signature.get(name)!r}")
    for path in sorted(set(sa.attrs) | set(sb.attrs)):
        if sa.attrs.get(path) != sb.attrs.get(path):
            why.append(f"attributes of {sa.fn.arg_names[path[0]]}: {sa.attrs.get(path)} vs the JIT's "
                       f"{sb.attrs.get(path)}")
    for path in sorted(set(sa.constants) | set(sb.constants)):
        if sa.constants.get(path) != sb.constants.get(path):
            why.append(f"constant {sa.fn.arg_names[path[0]]}: {sa.constants.get(path)} vs {sb.constants.get(path)}")
    for name in sorted(set(oa.__dict__) | set(ob.__dict__)):
        if oa.__dict__.get(name) != ob.__dict__.get(name):
            why.append(f"option {name}: {oa.__dict__.get(name)} vs {ob.__dict__.get(name)}")
    return why


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(kernel_stage.HEADLINE))
    parser.add_argument("--roles", default=",".join(kernel_stage.ROLES))
    args = parser.parse_args(argv)
    rows = keys(tuple(args.shapes.split(",")), tuple(args.roles.split(",")))
    for row in rows:
        print(f"{row['id']:36s} case = layer: {'yes' if row['case'] == row['layer'] else 'NO':3s}  "
              f"sm90_check = JIT: {'yes' if row['sm90'] == row['case'] else 'no'}", flush=True)
        for why in row.get("why", [])[:4]:
            print(f"    {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
