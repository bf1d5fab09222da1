"""Compile the grouped GEMM launches of a layer for sm_90 without a GPU and read their resources.

    python -m unimoe_kernels.ops.sm90_check [--shape NAME ...] [--device "NVIDIA H100 80GB HBM3"]

Data flow: `layer_launches` runs the Triton forward and backward bodies of the expert MLP
(grouped_mlp_ops) on meta tensors of a shape, with the kernels replaced by a recorder, so it sees
exactly the launches (arguments, configs from the table of the named GPU or the heuristic) a GPU
would get. `compile_launch` then compiles each one through triton's own pipeline for sm_90, with
the specialisation Triton's JIT would apply to those arguments (integers equal to 1 become
constants, integers divisible by 16 are marked so, tensors are 16-byte aligned), runs the bundled
ptxas on the PTX and reports registers, spill bytes, shared memory and whether the dots are
Hopper warp-group MMAs. Must run with TRITON_INTERPRET unset (the interpreter compiles nothing).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

from . import gemm_configs, grouped_mlp_ops

# Shapes the package is measured on: (T, H, F, E, k, LoRA rank) of the benchmark suite's full
# sizes, and decode steps at the qwen3-30b-a3b and mixtral shapes.
NAMED_SHAPES = {
    "uni-moe-8e": (8192, 4096, 11008, 8, 2, 8),
    "mixtral": (16384, 4096, 14336, 8, 2, 0),
    "qwen3-30b-a3b": (32768, 2048, 768, 128, 8, 0),
    "olmoe": (16384, 2048, 1024, 64, 8, 0),
    "qwen3-next": (32768, 2048, 512, 512, 10, 0),
    "peft-moe-lora": (4096, 2048, 768, 128, 8, 16),
    "qwen3-30b-a3b-decode": (64, 2048, 768, 128, 8, 0),
    "mixtral-decode": (8, 4096, 14336, 8, 2, 0),
}

H100 = "NVIDIA H100 80GB HBM3"

# Shared memory a block may use on sm_90 and the register file's per-thread ceiling.
SMEM_LIMIT = gemm_configs.SMEM_LIMIT_SM90
MAX_REGISTERS = 255


class Launch(NamedTuple):
    role: str
    kernel: object  # the @triton.jit function
    args: tuple
    meta: dict  # constexprs and num_warps / num_stages
    call: tuple  # gemm_configs.config's arguments (role, dtype, k, nout, num_experts, rows, rank)


class Resources(NamedTuple):
    registers: int
    spill_bytes: int  # spill stores + loads reported by ptxas
    shared_bytes: int
    warp_group_dot: bool  # Hopper tensor-core MMA (wgmma) in the TTGIR

    def problems(self, small_mma: bool = False) -> list[str]:
        """What is wrong with these resources; small_mma: a tile under 64 rows (decode), which
        cannot use warp-group MMAs (their M is 64) and is not asked to."""
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of register spills")
        if self.shared_bytes > SMEM_LIMIT:
            out.append(f"{self.shared_bytes} bytes of shared memory > {SMEM_LIMIT}")
        if not self.warp_group_dot and not small_mma:
            out.append("no warp-group MMA")
        return out


def layer_launches(shape: tuple, dtype: torch.dtype = torch.bfloat16, device_name: str = H100,
                   activation: str = "swiglu") -> list[Launch]:
    """Every grouped GEMM launch of one layer's forward and backward (gathered x and the weighted
    combine fused in, as SparseMoE runs it; base trainable without LoRA, frozen with it) at shape
    (T, H, F, E, k, r)."""
    from ..kernels import grouped_mm, grouped_xty

    t, h, f, e, k, r = shape
    n = t * k
    f_in = 2 * f if activation in ("swiglu", "geglu") else f

    def meta(*size):
        return torch.empty(size, dtype=dtype, device="meta")

    x, w_gu, w_d = meta(t, h), meta(e, f_in, h), meta(e, h, f)
    lora = (meta(e, r, h), meta(e, f_in, r), meta(e, r, f), meta(e, h, r)) if r else (None,) * 4
    offsets = torch.empty(e + 1, dtype=torch.int32, device="meta")
    gather = torch.empty(n, dtype=torch.int32, device="meta")
    launches, role = [], []

    def recorder(kernel):
        class Rec:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    launches.append(Launch(role[-1][0], kernel, args, kw, role[-1]))
                return run
        return Rec()

    real_config = gemm_configs.config

    def config(role_, dtype_, k_, nout_, e_, rows_, device_, run=None, rank=0):
        role.append((role_, dtype_, k_, nout_, e_, rows_, rank))
        return real_config(role_, dtype_, k_, nout_, e_, rows_, device_, rank=rank)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(grouped_mm, "grouped_mm_kernel", recorder(grouped_mm.grouped_mm_kernel)))
        stack.enter_context(mock.patch.object(grouped_xty, "grouped_xty_kernel",
                                              recorder(grouped_xty.grouped_xty_kernel)))
        stack.enter_context(mock.patch.object(gemm_configs, "config", config))
        stack.enter_context(mock.patch.object(gemm_configs, "_device_name", lambda device: device_name))
        stack.enter_context(mock.patch("unimoe_kernels.backend.interpreting", lambda: False))
        # The per-token dx sum is the permute's combine kernel, not a grouped GEMM: left out.
        def combine_meta(y, slot_rows, w, top_k):
            return meta(slot_rows.numel() // top_k, y.shape[1])

        stack.enter_context(mock.patch.object(grouped_mlp_ops, "_combine_impl", combine_meta))
        weights = torch.empty(t, k, dtype=torch.float32, device="meta")
        y, z, xa, ha = grouped_mlp_ops._fwd_impl(x, offsets, w_gu, w_d, *lora, activation, 2.0, None, 0.0, True,
                                                 gather, None, None, gather, k, weights)
        grouped_mlp_ops._bwd_impl(meta(t, h), x, z, xa, ha, offsets, w_gu, w_d, *lora, activation, 2.0, None, 0.0,
                                  True, not r, not r, bool(r), gather, gather, k, None, None, False, weights, True)
    return launches


def _arg_type(value) -> tuple[str, bool]:
    """(signature type, divisible by 16) as Triton's JIT specialises an argument."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(value, TensorDescriptor):
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[value.base.dtype]
        return f"tensordesc<{dt}[{','.join(str(b) for b in value.block_shape)}]>", False
    if isinstance(value, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                      torch.int64: "i64"}[value.dtype], True
    if isinstance(value, float):
        return "fp32", False
    if isinstance(value, bool):
        return "i1", False
    return ("i64" if abs(value) >= 2**31 else "i32"), value % 16 == 0


def compile_launch(launch: Launch) -> Resources:
    """Compile one recorded launch for sm_90 and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    consts = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, launch.args)):
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            consts[name] = value
            continue
        typ, div16 = _arg_type(value)
        sig[name] = typ
        if div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    options = dict(num_warps=launch.meta["num_warps"], num_stages=launch.meta["num_stages"])
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    regs, spills = _ptxas_resources(kernel.asm["ptx"])
    return Resources(regs, spills, kernel.metadata.shared, "warp_group_dot" in kernel.asm["ttgir"])


def _ptxas_resources(ptx: str) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = max(int(m) for m in re.findall(r"Used (\d+) registers", log))
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    return regs, spills


def describe(launch: Launch) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps", "num_stages", "HAS_LORA")
    return f"{launch.role:10s} " + " ".join(f"{k}={launch.meta[k]}" for k in keys if k in launch.meta)


def small_tile(launch: Launch) -> bool:
    """A tile whose MMA M is under 64: decode-sized grouped GEMMs, rank-wide LoRA gradients."""
    m = launch.meta
    if "BLOCK_M" in m:
        return m["BLOCK_M"] < 64
    return min(m["BLOCK_P"], m["BLOCK_Q"]) < 64 and max(m["BLOCK_P"], m["BLOCK_Q"]) < 64


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct compiled kernel (same constexprs and config)."""
    seen, out = set(), []
    for la in launches:
        key = (la.kernel.__name__, tuple(sorted(la.meta.items())))
        if key not in seen:
            seen.add(key)
            out.append(la)
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Compile a layer's grouped GEMMs for sm_90; print resources.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", nargs="*", default=list(NAMED_SHAPES), choices=list(NAMED_SHAPES),
                        help="named shapes to check")
    parser.add_argument("--device", default=H100, help="GPU whose shipped config table is used")
    args = parser.parse_args()
    bad = 0
    for name in args.shape:
        for la in distinct(layer_launches(NAMED_SHAPES[name], device_name=args.device)):
            res = compile_launch(la)
            problems = res.problems(small_mma=small_tile(la))
            bad += bool(problems)
            print(f"{name:22s} {describe(la)}  regs={res.registers} spill={res.spill_bytes} "
                  f"smem={res.shared_bytes} wgmma={res.warp_group_dot} {'; '.join(problems)}", flush=True)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
