"""The compiled-code contracts of the grouped GEMMs (ops/sm90_check.py).

The PTX reader is checked on small hand-written PTX (loops, MMA shapes, wait depths, how operands
are loaded, which source line loads them) and the contract rules on stand-in facts; then every
launch of every named shape is compiled for sm_90 with ptxas (no GPU needed) and must pass
`--strict`: at the headline shapes (>= 96 rows per expert) n128-or-wider output MMAs, a pipelined
K loop, no element-wise 2-byte loads in it, no spills.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unimoe_kernels.ops import sm90_check as sc

PTX = """
.file 1 "{src}"
$L__BB0_1:
\t.loc\t1 3 0                          // kern.py:3:0
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {{%r2, %r3}}], [%r4];
$L__BB0_2:
\t.loc\t1 4 0                          // kern.py:4:0 @[ kern.py:3:0 ]
\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd2 + 0 ], 0x10, %r6;
\t.loc\t1 5 0                          // kern.py:5:0
\t@%p1 ld.global.b16 {{ %rs1 }}, [ %rd3 + 0 ];
\tld.global.v4.b32 {{ %r7, %r8, %r9, %r10 }}, [ %rd4 + 0 ];
\tst.shared.b16 [%r11], %rs1;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {{%r1}}, %rd5, %rd6, %p2, 1, 1, 0, 0;
\twgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {{%r1}}, %rd5, %rd6, %p2, 1, 1, 0, 0;
\twgmma.wait_group.sync.aligned 1;
\t@%p3 bra \t$L__BB0_2;
\twgmma.wait_group.sync.aligned 0;
\t@%p4 bra \t$L__BB0_1;
"""

SOURCE = "def kern():\n    acc = 0\n    xt = desc.load()\n    wt = tl.load(w)\n    yt = tl.load(y)\n"


@pytest.fixture
def ptx(tmp_path, monkeypatch):
    # The reader names source lines of the package's own files only: put the stand-in source there.
    src = tmp_path / "kern.py"
    src.write_text(SOURCE)
    monkeypatch.setattr(sc, "__file__", str(tmp_path / "ops" / "sm90_check.py"))
    return PTX.format(src=src)


def test_reader_finds_the_inner_mma_loop_and_its_facts(ptx):
    mma, waits, loads, stores, epilogue = sc.k_loop_facts(ptx)
    assert mma == ("m64n128k16", "m64n16k16")
    assert waits == (1,)  # the wait to 0 after the K loop belongs to the outer (tile) loop only
    assert set(loads) == {("kern.py:4 (wt)", "cp.async 16B", 1), ("kern.py:5 (yt)", "ld.global 2B", 1),
                          ("kern.py:5 (yt)", "ld.global 16B", 1)}  # the TMA load sits in the outer loop
    assert stores == 1 and not epilogue  # no global store in the K loop: the epilogue runs after it
    flattened = ptx.replace("\tst.shared.b16 [%r11], %rs1;", "\tst.global.b16 [ %rd9 + 0 ], { %rs1 };")
    assert sc.k_loop_facts(flattened)[4]


def test_load_kinds():
    assert sc._load_kind("cp.async.bulk.tensor.3d.shared::cluster.global [a], [b, {c}], [d];") == "TMA"
    assert sc._load_kind("cp.async.ca.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x4, %r2;") == "cp.async 4B"
    assert sc._load_kind("@%p1 ld.global.nc.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];") == "ld.global 8B"
    assert sc._load_kind("ld.global.b16 { %rs1 }, [ %rd1 + 0 ];") == "ld.global 2B"
    assert sc._load_kind("st.global.b16 [ %rd1 + 0 ], { %rs1 };") is None


def facts(**kw):
    base = dict(registers=200, spill_bytes=0, shared_bytes=100_000, warp_group_dot=True, mma=("m64n128k16",),
                waits=(1,), loads=(("k.py:1 (xt)", "TMA", 1),), shared_stores=0, stages=3)
    return sc.Facts(**{**base, **kw})


@pytest.mark.parametrize("change,problem", [
    ({}, None),
    ({"spill_bytes": 8}, "spills"),
    ({"shared_bytes": sc.SMEM_LIMIT + 1}, "shared memory"),
    ({"mma": ("m64n64k16",)}, "n[64]"),
    ({"mma": ("m64n128k16", "m64n16k16")}, None),  # the rank-wide side product (rank_n=16) is allowed
    ({"mma": ("m64n128k16", "m64n32k16")}, "n[32]"),  # wider than the rank: a narrow output MMA
    ({"waits": (0,)}, "only waits to 0"),
    ({"waits": ()}, "no K loop"),
    ({"loads": (("k.py:2 (yt)", "ld.global 2B", 32),)}, "element-wise 2-byte loads in the K loop at k.py:2 (yt)"),
    ({"loads": (("k.py:2 (ids)", "ld.global 4B", 1),)}, None),  # a gather index is not an operand tile
    ({"loads": (("k.py:3", "ld.global 2B", 1),)}, None),  # a per-tile bias row in a flattened epilogue
    ({"loads": (("k.py:2 (yt)", "ld.global 2B", sc.TILE_LOAD_INSTRUCTIONS),)}, "element-wise 2-byte"),
])
def test_strict_rules(change, problem):
    got = facts(**change).problems(strict=True, rank_n=16)
    assert (not got) if problem is None else any(problem in p for p in got), got


def test_rules_outside_strict_and_for_decode_tiles():
    narrow_serial = facts(mma=("m64n64k16",), waits=(0,), loads=(("k:1", "ld.global 2B", 4),))
    assert narrow_serial.problems(strict=False) == []  # below STRICT_ROWS only resources are checked
    decode = facts(warp_group_dot=False, mma=("m16n8k16",), waits=())
    assert decode.problems(small_mma=True, strict=True) == []
    assert decode.problems(small_mma=True, strict=True) == facts(warp_group_dot=False).problems(small_mma=True)
    assert facts(spill_bytes=4, warp_group_dot=False).problems(small_mma=True) == ["4 bytes of register spills"]


def test_distinct_keeps_launches_whose_specialisation_differs():
    """dW_gu and dW_d share every constexpr, but dW_d writes its gradient transposed (an output
    stride of 1 on the other axis): two kernels, both compiled and reported."""
    launches = sc.layer_launches(sc.NAMED_SHAPES["qwen3-30b-a3b"])
    wgrads = [la for la in sc.distinct(launches) if la.role == "wgrad"]
    assert len(wgrads) == 2
    assert {sc.describe(la).split("unit-stride=")[1] for la in wgrads} == {"stride_xp,stride_yq,stride_op",
                                                                          "stride_xp,stride_yq,stride_oq"}
    assert len(sc.distinct(launches + launches)) == len(sc.distinct(launches))


def _strict(*args: str) -> str:
    """stdout of `sm90_check --strict ARGS` in a subprocess without TRITON_INTERPRET; fails unless
    every launch passes."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as _nv  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is not available: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "unimoe_kernels.ops.sm90_check", "--strict", *args], env=env,
                         capture_output=True, text=True, timeout=1800)
    out = res.stdout
    assert res.returncode == 0 and out.rstrip().endswith("every launch passes"), out[-8000:] + res.stderr[-3000:]
    return out


def test_every_named_launch_passes_strict():
    """Every grouped GEMM launch of every named shape (forward and backward; LoRA on a frozen base
    and off with a trainable one; the shipped H100 table) compiled through the full CUDA pipeline
    with ptxas. Runs in a subprocess without TRITON_INTERPRET; needs no GPU, only triton's ptxas."""
    out = _strict()
    for shape in sc.HEADLINE:
        roles = {line.split()[1] for line in out.splitlines() if line.startswith(shape + " ")}
        assert {"up_glu", "down", "dact", "dgrad"} <= roles, (shape, roles)
        assert ("wgrad" in roles) != shape.endswith("lora16"), roles  # frozen base with LoRA: no dW
        assert ("lora_wgrad" in roles) == shape.endswith("lora16"), roles
    assert out.count("wgmma=True") >= 50
    # gpt-oss's layout (interleaved gate/up, biases): the bias gradients' sums compile too.
    assert any(line.startswith("gpt-oss-20b ") and " colsum " in line for line in out.splitlines())


def test_every_activation_epilogue_passes_strict():
    """The epilogues of every activation kind beyond SwiGLU (forward and backward; the constants of
    gpt-oss's clamp and a softcap of 30) at a headline shape, a LoRA one and a decode step."""
    acts = ["swiglu_clamp(alpha=1.702,beta=1.0,limit=7.0)", "swiglu_softcap(gate_cap=30.0,up_cap=30.0)",
            "geglu", "geglu_tanh", "relu2", "gelu_tanh", "silu", "relu", "gelu", "swiglu:interleaved",
            "geglu_clamp(beta=0.0,limit=7.0)"]
    out = _strict("--shape", "qwen3-30b-a3b", "mixtral-lora16", "qwen3-30b-a3b-decode", "--activation", *acts)
    for act in acts:
        assert f"qwen3-30b-a3b {act} " in out and f"mixtral-lora16 {act} " in out, act
