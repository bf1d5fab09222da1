"""Compile the grouped GEMM launches of a layer for sm_90 without a GPU and read what they compile to.

    python -m unimoe_kernels.ops.sm90_check [--shape NAME ...] [--device "NVIDIA H100 80GB HBM3"] [--strict]

Data flow: `layer_launches` runs the Triton forward and backward bodies of the expert MLP
(grouped_mlp_ops) on meta tensors of a shape, with the kernels replaced by a recorder, so it sees
exactly the launches (arguments, configs from the table of the named GPU or the heuristic) a GPU
would get. `distinct` keeps one launch per compiled kernel, keyed as Triton's JIT keys its cache:
constexprs, argument types, integers equal to 1 (which become constants) and divisibility by 16.
`compile_launch` compiles each through triton's own pipeline for sm_90 with that specialisation,
runs the bundled ptxas and reads the PTX of the K loop (the innermost loop that issues MMAs):

- the MMA instruction shapes (`wgmma ... m64n128k16` is one warp group's 64 x 128 x 16 step);
- the `wgmma.wait_group` depths: a loop that only ever waits to 0 runs its MMAs one after another
  with the loads of the next step exposed (not software-pipelined);
- how each operand tile arrives, per source line: TMA (`cp.async.bulk.tensor`), `cp.async` of
  16 / 8 / 4 bytes, or `ld.global` of a width (2 bytes: one bf16 element per instruction);
- stores to shared memory inside the loop (data that went through registers on its way to the MMA);
- registers, spills and shared memory from ptxas.

`--strict` turns the facts into contracts (Facts.problems): at shapes with >= STRICT_ROWS rows per
expert, no output MMA narrower than n128, a K loop that waits deeper than 0, no element-wise 2-byte
global loads in the K loop; at every shape, no spills and shared memory within the limit. Must run
with TRITON_INTERPRET unset (the interpreter compiles nothing).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

from ..types import is_glu
from . import gemm_configs, grouped_mlp_ops

# Shapes the package is measured on: (T, H, F, E, k, LoRA rank) of the benchmark suite's full
# sizes, the two headline shapes and gpt-oss-20b again with LoRA r=16 on a frozen base, and decode
# steps at the qwen3-30b-a3b and mixtral shapes.
NAMED_SHAPES = {
    "uni-moe-8e": (8192, 4096, 11008, 8, 2, 8),
    "mixtral": (16384, 4096, 14336, 8, 2, 0),
    "qwen3-30b-a3b": (32768, 2048, 768, 128, 8, 0),
    "mixtral-lora16": (16384, 4096, 14336, 8, 2, 16),
    "qwen3-30b-a3b-lora16": (32768, 2048, 768, 128, 8, 16),
    "olmoe": (16384, 2048, 1024, 64, 8, 0),
    "qwen3-next": (32768, 2048, 512, 512, 10, 0),
    "peft-moe-lora": (4096, 2048, 768, 128, 8, 16),
    "gpt-oss-20b": (16384, 2880, 2880, 32, 4, 0),
    "gpt-oss-20b-lora16": (16384, 2880, 2880, 32, 4, 16),
    "qwen3-30b-a3b-decode": (64, 2048, 768, 128, 8, 0),
    "mixtral-decode": (8, 4096, 14336, 8, 2, 0),
}
# The expert layout of a shape whose model is not a plain SwiGLU without biases: (activation, biases).
# gpt-oss: clamped SwiGLU with its gate and up columns interleaved, a bias on both projections.
GPT_OSS = ("swiglu_clamp(alpha=1.702,beta=1.0,limit=7.0):interleaved", True)
SHAPE_LAYOUTS = {"gpt-oss-20b": GPT_OSS, "gpt-oss-20b-lora16": GPT_OSS}
# The shapes whose every launch must pass --strict in CI.
HEADLINE = ("qwen3-30b-a3b", "mixtral", "qwen3-30b-a3b-lora16", "mixtral-lora16")

H100 = "NVIDIA H100 80GB HBM3"
# A device name with no shipped table: its launches take the heuristic's configs.
NO_TABLE = "no shipped table"

# Shared memory a block may use on sm_90.
SMEM_LIMIT = gemm_configs.SMEM_LIMIT_SM90
# Experts averaging this many rows get 128-row tiles (gemm_configs.heuristic), so their GEMMs are
# compute-bound and held to the full contracts; fewer rows are decode-like, bound by weight reads.
STRICT_ROWS = 96
# The narrowest output MMA a compute-bound tile may issue per warp group: at n64 each k16 step
# reads the 64 x 16 A tile from shared memory for half the columns n128 covers, and shared-memory
# bandwidth, not the tensor cores, sets the pace.
MIN_MMA_N = 128
# Element-wise loads of an operand tile take at least this many instructions per thread (a 64 x 64
# tile over 256 threads is 16 of them); fewer at one site is a per-tile vector, such as an
# expert's bias row, that a persistent kernel's flattened loop holds in its epilogue: once per tile,
# not per K step.
TILE_LOAD_INSTRUCTIONS = 8


class Launch(NamedTuple):
    role: str
    kernel: object  # the @triton.jit function
    args: tuple
    meta: dict  # constexprs and num_warps / num_stages
    call: tuple  # gemm_configs.config's arguments (role, dtype, k, nout, num_experts, rows, rank)


class Facts(NamedTuple):
    """What one launch compiles to for sm_90."""

    registers: int
    spill_bytes: int  # spill stores + loads reported by ptxas
    shared_bytes: int
    warp_group_dot: bool  # Hopper tensor-core MMA (wgmma) in the TTGIR
    mma: tuple = ()  # MMA shapes issued in the K loop, e.g. ("m64n128k16",); mma.sync shapes for small tiles
    waits: tuple = ()  # wgmma.wait_group depths inside the K loop
    loads: tuple = ()  # (source site, how, instructions) per operand load in the K loop
    shared_stores: int = 0  # st.shared instructions in the K loop (operands staged through registers)
    stages: int = 0
    # Global stores inside the MMA loop: a persistent kernel's flattened (tile, K) loop, whose
    # next tile's loads are in flight while the epilogue stores.
    epilogue_in_loop: bool = False

    def problems(self, small_mma: bool = False, strict: bool = False, rank_n: int = 0) -> list[str]:
        """What is wrong: resources always; with strict, the contracts of a compute-bound tile.
        small_mma: a tile under 64 rows (decode), which cannot use warp-group MMAs (their M is 64)
        and is exempt from the contracts; rank_n: the N of rank-wide MMAs (the LoRA side product, a
        LoRA factor's gradient), which may be narrower (the rank sets it) but obey the other rules."""
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of register spills")
        if self.shared_bytes > SMEM_LIMIT:
            out.append(f"{self.shared_bytes} bytes of shared memory > {SMEM_LIMIT}")
        if small_mma:
            return out
        if not self.warp_group_dot:
            out.append("no warp-group MMA")
        if not strict:
            return out
        widths = {int(re.search(r"n(\d+)", m).group(1)) for m in self.mma if m.startswith("m64")}
        narrow = sorted(n for n in widths if n < MIN_MMA_N and n > rank_n)
        if narrow:
            out.append(f"output MMAs n{narrow} < n{MIN_MMA_N}")
        if not self.waits:
            out.append("no K loop found")
        elif max(self.waits) == 0:
            out.append("K loop only waits to 0 (not pipelined)")
        scalar = [site for site, how, n in self.loads if how == "ld.global 2B" and n >= TILE_LOAD_INSTRUCTIONS]
        if scalar:
            out.append(f"element-wise 2-byte loads in the K loop at {', '.join(scalar)}")
        return out


def layer_launches(shape: tuple, dtype: torch.dtype = torch.bfloat16, device_name: str = H100,
                   activation: str = "swiglu", bias: bool = False) -> list[Launch]:
    """Every grouped GEMM launch of one layer's forward and backward (gathered x and the weighted
    combine fused in, as SparseMoE runs it; base trainable without LoRA, frozen with it) at shape
    (T, H, F, E, k, r); with bias, trainable per-expert biases on both projections (and the
    launches of their gradients' per-expert sums, role "colsum")."""
    from ..kernels import expert_colsum, grouped_mm, grouped_xty

    t, h, f, e, k, r = shape
    n = t * k
    f_in = 2 * f if is_glu(activation) else f

    def meta(*size):
        return torch.empty(size, dtype=dtype, device="meta")

    x, w_gu, w_d = meta(t, h), meta(e, f_in, h), meta(e, h, f)
    lora = (meta(e, r, h), meta(e, f_in, r), meta(e, r, f), meta(e, h, r)) if r else (None,) * 4
    offsets = torch.empty(e + 1, dtype=torch.int32, device="meta")
    gather = torch.empty(n, dtype=torch.int32, device="meta")
    biases = (meta(e, f_in), meta(e, h)) if bias else (None, None)
    launches, role = [], []

    def recorder(kernel, own_role=None):
        class Rec:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    call = own_role or role[-1]
                    launches.append(Launch(call[0], kernel, args, kw, call))
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
        # No config and no MMA: never compute-bound (rows 0), held to the resource checks only.
        stack.enter_context(mock.patch.object(expert_colsum, "expert_colsum_kernel", recorder(
            expert_colsum.expert_colsum_kernel, ("colsum", dtype, 0, 0, e, 0, 0))))
        stack.enter_context(mock.patch.object(gemm_configs, "config", config))
        stack.enter_context(mock.patch.object(gemm_configs, "_device_name", lambda device: device_name))
        stack.enter_context(mock.patch("unimoe_kernels.backend.interpreting", lambda: False))
        # The per-token dx sum is the permute's combine kernel, not a grouped GEMM: left out.
        def combine_meta(y, slot_rows, w, top_k):
            return meta(slot_rows.numel() // top_k, y.shape[1])

        stack.enter_context(mock.patch.object(grouped_mlp_ops, "_combine_impl", combine_meta))
        weights = torch.empty(t, k, dtype=torch.float32, device="meta")
        y, z, xa, ha = grouped_mlp_ops._fwd_impl(x, offsets, w_gu, w_d, *lora, activation, 2.0, None, 0.0, True,
                                                 gather, None, None, gather, k, weights, *biases)
        grouped_mlp_ops._bwd_impl(meta(t, h), x, z, xa, ha, offsets, w_gu, w_d, *lora, activation, 2.0, None, 0.0,
                                  True, not r, not r, bool(r), gather, gather, k, None, None, False, weights, True,
                                  *biases, bias, bias)
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


class Specialisation(NamedTuple):
    signature: dict  # argument name -> type or "constexpr"
    constants: dict  # constexprs, None arguments and integers equal to 1
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]]}
    options: dict  # num_warps, num_stages

    def key(self, name: str) -> tuple:
        return (name, tuple(self.signature.items()), tuple(sorted((k, repr(v)) for k, v in self.constants.items())),
                tuple(sorted(self.attrs)), tuple(sorted(self.options.items())))


def specialisation(launch: Launch) -> Specialisation:
    """The kernel Triton's JIT would compile for these arguments: integers equal to 1 and None
    become constants, integers divisible by 16 are marked so, tensors are 16-byte aligned."""
    fn = launch.kernel
    # Parameters annotated tl.constexpr (read from the Python function: the interpreter's wrapper
    # has no list of them) are constants even when passed by position.
    constexpr = {n for n, a in getattr(fn, "fn", fn).__annotations__.items() if "constexpr" in str(a)}
    consts = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, launch.args)):
        if name in constexpr or value is None or (isinstance(value, int) and not isinstance(value, bool)
                                                  and value == 1):
            consts[name] = value
            continue
        typ, div16 = _arg_type(value)
        sig[name] = typ
        if div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    return Specialisation(sig, consts, attrs, dict(num_warps=launch.meta["num_warps"],
                                                   num_stages=launch.meta["num_stages"]))


def compile_launch(launch: Launch) -> Facts:
    """Compile one recorded launch for sm_90 and read its resources and its K loop."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = specialisation(launch)
    kernel = triton.compile(ASTSource(launch.kernel, spec.signature, spec.constants, spec.attrs),
                            target=GPUTarget("cuda", 90, 32), options=spec.options)
    ptx = kernel.asm["ptx"]
    regs, spills = _ptxas_resources(ptx)
    mma, waits, loads, stores, epilogue = k_loop_facts(ptx)
    return Facts(regs, spills, kernel.metadata.shared, "warp_group_dot" in kernel.asm["ttgir"], mma, waits, loads,
                 stores, spec.options["num_stages"], epilogue)


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


# ----------------------------------------------------------------------------------------------
# Reading the PTX
# ----------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma)\.sync\.aligned\.(m\d+n\d+k\d+)")
_WAIT = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)")
_LOC_SITE = re.compile(r"(\w+\.py):(\d+)")
_FILE = re.compile(r'^\s*\.file\s+\d+\s+"([^"]+)"')
_ELEM_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
               "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first line, last line) of every loop: a branch back to a label above it."""
    labels = {}
    out = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels and labels[b.group(1)] < i:
            out.append((labels[b.group(1)], i))
    return out


def _load_kind(line: str):
    """How a memory instruction moves an operand: 'TMA', 'cp.async 16B', 'ld.global 2B', or None."""
    if "cp.async.bulk.tensor" in line:
        return "TMA"
    m = re.search(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)", line)
    if m:
        return f"cp.async {int(m.group(1), 0)}B"
    m = re.search(r"\bld\.global(?:\.\w+)*?(?:\.v(\d))?\.([bsuf]\d+)\b", line)
    if m:
        return f"ld.global {int(m.group(1) or 1) * _ELEM_BYTES[m.group(2)]}B"
    return None


def _site(loc_comment: str, sources: dict) -> str:
    """'grouped_xty.py:83 (yt)': where a PTX .loc comment's instruction comes from in the package,
    named by the variable its source line assigns (the operand): the innermost call site whose
    line is an assignment, else the innermost site in the package."""
    sites = [(name, int(line)) for name, line in _LOC_SITE.findall(loc_comment) if name in sources]
    if not sites:
        return "?"
    for name, line in sites:
        text = sources[name]
        m = re.match(r"(\w+)\s*=(?!=)", text[line - 1].strip()) if line <= len(text) else None
        if m:
            return f"{name}:{line} ({m.group(1)})"
    return f"{sites[0][0]}:{sites[0][1]}"


def k_loop_facts(ptx: str) -> tuple[tuple, tuple, tuple, int, bool]:
    """(MMA shapes, wait_group depths, (site, how, count) loads, shared stores, global stores?) of
    the K loops: the innermost loops that issue MMAs (a persistent kernel's tile loop contains its K
    loop, unless the two are flattened into one)."""
    lines = ptx.splitlines()
    sources = {}
    package = Path(__file__).resolve().parents[1]
    for line in lines:
        m = _FILE.match(line)
        if m and Path(m.group(1)).is_file() and package in Path(m.group(1)).resolve().parents:
            sources[Path(m.group(1)).name] = Path(m.group(1)).read_text().splitlines()
    with_mma = [(a, b) for a, b in _loops(lines) if any(_MMA.search(ln) for ln in lines[a:b + 1])]
    inner = [(a, b) for a, b in with_mma if not any(a < c and d <= b and (c, d) != (a, b) for c, d in with_mma)]
    mma, waits, loads, stores, global_stores = set(), set(), Counter(), 0, False
    for a, b in inner:
        loc = ""
        for line in lines[a:b + 1]:
            if line.lstrip().startswith(".loc"):
                loc = line
                continue
            mma.update(_MMA.findall(line))
            waits.update(int(w) for w in _WAIT.findall(line))
            kind = _load_kind(line)
            if kind:
                loads[(_site(loc, sources), kind)] += 1
            stores += bool(re.search(r"\bst\.shared\b", line))
            global_stores |= bool(re.search(r"\bst\.global\b|cp\.async\.bulk\.tensor\.\w+\.global\.shared", line))
    return (tuple(sorted(mma)), tuple(sorted(waits)), tuple((s, k, n) for (s, k), n in sorted(loads.items())),
            stores, global_stores)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def describe(launch: Launch) -> str:
    """Role, config, and the argument specialisations that tell launches of one role apart."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps", "num_stages", "HAS_LORA",
            "PERSISTENT")
    unit = [n for n, v in zip(launch.kernel.arg_names, launch.args)
            if n.startswith("stride") and isinstance(v, int) and not isinstance(v, bool) and v == 1]
    return (f"{launch.role:10s} " + " ".join(f"{k}={launch.meta[k]}" for k in keys if k in launch.meta)
            + f" unit-stride={','.join(unit) or '-'}")


def format_facts(facts: Facts) -> str:
    loads = "; ".join(f"{site} {how} x{n}" for site, how, n in facts.loads) or "-"
    return (f"mma={','.join(facts.mma) or '-'} wait={','.join(map(str, facts.waits)) or '-'} "
            f"stages={facts.stages} regs={facts.registers} spill={facts.spill_bytes} smem={facts.shared_bytes} "
            f"wgmma={facts.warp_group_dot} st.shared/loop={facts.shared_stores} "
            f"epilogue-in-loop={facts.epilogue_in_loop} loads: {loads}")


def small_tile(launch: Launch) -> bool:
    """A tile whose MMA M is under 64: decode-sized grouped GEMMs, rank-wide LoRA gradients; and the
    kernels without MMAs (the bias gradients' sums)."""
    m = launch.meta
    if launch.role == "colsum":
        return True
    if "BLOCK_M" in m:
        return m["BLOCK_M"] < 64
    return min(m["BLOCK_P"], m["BLOCK_Q"]) < 64 and max(m["BLOCK_P"], m["BLOCK_Q"]) < 64


def compute_bound(launch: Launch) -> bool:
    """A launch the strict contracts apply to: >= STRICT_ROWS rows per expert on average."""
    _role, _dtype, _k, _nout, e, rows, _rank = launch.call
    return rows >= STRICT_ROWS * e


def rank_width(launch: Launch) -> int:
    """The widest MMA N that is rank-wide by nature: the LoRA side product's (BLOCK_R), a LoRA
    factor gradient's rank side, or a rank-wide output (_narrow's); 0 when there is none."""
    m = launch.meta
    if launch.role == "colsum":
        return 0
    if "BLOCK_P" in m:
        return min(m["BLOCK_P"], m["BLOCK_Q"]) if launch.role == "lora_wgrad" else 0
    return max(m["BLOCK_R"] if m.get("HAS_LORA") else 0, m["BLOCK_N"] if m["BLOCK_N"] < 64 else 0)


def check(launch: Launch, strict: bool = False) -> tuple[Facts, list[str]]:
    """Compile a launch; (facts, problems) with the strict contracts where they apply."""
    facts = compile_launch(launch)
    problems = facts.problems(small_mma=small_tile(launch), strict=strict and compute_bound(launch),
                              rank_n=rank_width(launch))
    return facts, problems


def prior_reason(launch: Launch) -> str:
    """Why a compile-checked prior is in a table: what its launch compiles to (it is not timed)."""
    f = compile_launch(launch)
    return (f"compiled for sm_90, not timed: {','.join(f.mma) or 'no MMA'}, K-loop wait {max(f.waits, default='-')}, "
            f"{f.registers} regs, {f.spill_bytes} B spilled, {f.shared_bytes} B shared"
            + (", epilogue overlapped" if f.epilogue_in_loop else ""))


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct compiled kernel: the full specialisation (constexprs, argument types,
    unit integers, divisibility) and the compile options, as Triton keys its cache."""
    seen, out = set(), []
    for la in launches:
        key = specialisation(la).key(la.kernel.__name__)
        if key not in seen:
            seen.add(key)
            out.append(la)
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Compile a layer's grouped GEMMs for sm_90; print what they "
                                                 "compile to.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", nargs="*", default=list(NAMED_SHAPES), choices=list(NAMED_SHAPES),
                        help="named shapes to check")
    parser.add_argument("--device", default=H100, help="GPU whose shipped config table is used")
    parser.add_argument("--activation", nargs="*", default=None,
                        help="activations (types.ACTIVATION_KINDS strings) whose epilogues to compile; by default "
                             "each shape's own (SHAPE_LAYOUTS, else swiglu)")
    parser.add_argument("--strict", action="store_true",
                        help=f"fail on narrow MMAs, serial K loops and element-wise 2-byte loads at shapes with "
                             f">= {STRICT_ROWS} rows per expert (spills and shared memory are always checked)")
    args = parser.parse_args(argv)
    bad = 0
    for name in args.shape:
        own, bias = SHAPE_LAYOUTS.get(name, ("swiglu", False))
        for act in args.activation or [own]:
            launches = layer_launches(NAMED_SHAPES[name], device_name=args.device, activation=act, bias=bias)
            for la in distinct(launches):
                facts, problems = check(la, strict=args.strict)
                bad += bool(problems)
                label = name if act == own else f"{name} {act}"
                print(f"{label:22s} {describe(la)}\n    {format_facts(facts)}"
                      + (f"\n    PROBLEMS: {'; '.join(problems)}" if problems else ""), flush=True)
    print(f"{bad} launch(es) with problems" if bad else "every launch passes")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
