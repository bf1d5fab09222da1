"""The Triton routing plan (ops.build_routing(backend="triton"), kernels/routing.py) equals the torch
oracle field by field, on random and edge inputs; traces under torch.compile; compiles for sm_90."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from unimoe_kernels import reference
from unimoe_kernels.ops.routing import build_routing

CASES = {
    "tiny, an expert empty": (7, 2, 5, None),
    "several blocks, a partial last one": (2000, 3, 7, None),
    "empty batch": (0, 2, 4, None),
    "E=128 k=8": (1500, 8, 128, None),
    "one expert": (300, 1, 1, None),
    "everything to one expert of many": (1100, 2, 64, 37),
    "E=512 (the widest router)": (200, 10, 512, None),
}


@pytest.mark.parametrize("t,k,e,only", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype,block_m", [(torch.int32, 64), (torch.int64, 16)])
def test_equals_the_torch_plan(t, k, e, only, dtype, block_m, device):
    g = torch.Generator().manual_seed(t + e)
    ids = torch.randint(0, e, (t, k), generator=g) if only is None else torch.full((t, k), only)
    ids = ids.to(device=device, dtype=dtype)
    got = build_routing(ids, e, block_m, backend="triton")
    want = reference.build_routing(ids, e, block_m)
    assert got.block_m == want.block_m
    for field in ("tokens_per_expert", "expert_offsets", "sorted_slots", "slot_rows", "tile_expert",
                  "tile_row_start"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.int32 and torch.equal(a, b.to(a.device)), field


def test_traces_under_torch_compile(device):
    ids = torch.randint(0, 6, (50, 2), device=device)

    def fn(ids):
        return build_routing(ids, 6, backend="triton").sorted_slots

    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(ids), fn(ids))


def test_opcheck(device):
    ids = torch.randint(0, 6, (50, 2), device=device)
    torch.library.opcheck(torch.ops.unimoe.routing_plan_triton.default, (ids, 6, 64),
                          test_utils=("test_schema", "test_faketensor"))


_SM90 = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unimoe_kernels.kernels import routing as K

def comp(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))

comp(K.routing_histogram_kernel, {"ids_ptr": "*i32", "counts_ptr": "*i32", "N": "i32", "E": "i32"},
     {"BLOCK": 1024, "BINS": 256})
comp(K.routing_scatter_kernel, {"ids_ptr": "*i64", "base_ptr": "*i32", "first_ptr": "*i32",
     "sorted_slots_ptr": "*i32", "slot_rows_ptr": "*i32", "N": "i32", "E": "i32"}, {"BLOCK": 1024})
comp(K.routing_tile_map_kernel, {"offsets_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_row_start_ptr": "*i32",
     "num_experts": "i32", "max_tiles": "i32", "N": "i32"}, {"BLOCK_M": 64, "E_PAD": 128, "BLOCK_T": 64})
print("compiled 3")
'''


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SM90], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled 3" in res.stdout, res.stderr[-3000:]
