"""The kernel stage's parts on the CPU: its plan follows gemm_configs, its routing has the edge cases
it claims, its check catches an unwritten row and a wrong one, and the tuner it sits beside skips
only compile errors; plus the per-kernel profile of one layer call.

The kernels run in Triton's interpreter at a few dozen rows (the root conftest sets it up).
"""

import json
import math
import time

import pytest
import torch

from unimoe_kernels.ops import gemm_configs

from . import kernel_stage, layer_profile


def test_alternatives_come_from_the_candidates(monkeypatch):
    shipped = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, PERSISTENT=False)
    pool = [
        dict(shipped),  # the shipped config itself: never an alternative
        dict(shipped, num_stages=4),
        dict(shipped, BLOCK_N=256),
        dict(shipped, PERSISTENT=True),
        dict(shipped, BLOCK_M=64, num_warps=4),
        dict(shipped, BLOCK_N=256, num_stages=8),  # 8 stages of 128x64 + 64x256 bf16 tiles: past shared memory
    ]
    monkeypatch.setattr(gemm_configs, "candidates", lambda role, dtype: [dict(c) for c in pool])
    picked = kernel_stage.alternatives("down", shipped, count=3)
    assert [label for label, _ in picked] == ["persistent", "wider-N", "stages"]
    assert [cfg for _, cfg in picked] == [pool[3], pool[2], pool[1]]
    # Beyond the named kinds, the rest of the list in its order; never the shipped config, never
    # one past sm_90's shared memory.
    more = kernel_stage.alternatives("down", shipped, count=10)
    assert [cfg for _, cfg in more] == [pool[3], pool[2], pool[1], pool[4]]
    assert more[-1][0] == "cand4"
    # A table entry's annotations (its time, why it was chosen) do not make a config another one.
    annotated = {**shipped, "ms": 1.5, "heuristic_ms": 2.0, "reason": "compiled for sm_90, not timed"}
    assert kernel_stage._clean(annotated) == kernel_stage._clean(shipped) == shipped
    # A persistent shipped config: the alternative schedule is one program per tile.
    flipped = kernel_stage.alternatives("down", dict(shipped, PERSISTENT=True), count=1)
    assert flipped == [("per-tile", shipped)]


def test_plan_uses_the_shipped_configs_and_unique_ids():
    cases = kernel_stage.plan(("qwen3-30b-a3b",), kernel_stage.ROLES, 2, device_name="no such GPU")
    assert len({c["id"] for c in cases}) == len(cases)
    for role in kernel_stage.ROLES:
        mine = [c for c in cases if c["role"] == role]
        assert mine[0]["label"] == "shipped" and 1 <= len(mine) <= 3
        t, h, f, e, k, r = kernel_stage._shape("qwen3-30b-a3b")
        _, knd, nout = kernel_stage._role_key(role, (t, h, f, e, k, r))
        # No table for that GPU: the shipped config is the heuristic's for the role's own launch.
        want = gemm_configs.heuristic(role, torch.bfloat16, knd, nout, e, t * k)
        assert mine[0]["cfg"] == kernel_stage._clean(want)
        assert all(c["cfg"] != mine[0]["cfg"] for c in mine[1:])


@pytest.mark.parametrize("n, experts, tokens, k", [(512, 16, 64, 8), (262144, 128, 32768, 8), (256, 8, 128, 2)])
def test_routing_has_an_empty_and_a_ragged_expert(n, experts, tokens, k):
    offsets, gather, counts = kernel_stage.routing(n, experts, tokens, k, "cpu")
    assert counts[0] == 0 and offsets[-1] == n and offsets.tolist() == [0] + list(torch.tensor(counts).cumsum(0))
    assert counts[1] > 0 and all(counts[1] % b for b in (16, 32, 64, 128))  # no tile size divides it
    assert min(counts[2:]) > 0
    assert torch.bincount(gather.long(), minlength=tokens).tolist() == [k] * tokens  # every token k times


def _down(rows_per_expert=32):
    dims = (rows_per_expert * 8 // 2, 64, 48, 8, 2)  # T, H, F, E, k: N = T*k over 8 experts
    cfg = kernel_stage._clean(gemm_configs.heuristic("down", torch.float32, 48, 64, 8, dims[0] * 2))
    return kernel_stage.build("down", dims, cfg, torch.float32, torch.device("cpu")), dims


def test_check_catches_unwritten_and_wrong_rows():
    b, dims = _down()
    with pytest.raises(AssertionError, match="non-finite"):  # the NaN prefill, before any launch
        kernel_stage.check("down", b.outs, b.ref, b.offsets, dims[3], kernel_stage.FP32_TOL)
    b.launch()
    errors = kernel_stage.check("down", b.outs, b.ref, b.offsets, dims[3], kernel_stage.FP32_TOL)
    assert errors["y"] < kernel_stage.FP32_TOL
    ragged = b.offsets.tolist()[1]  # the first row of expert 1
    b.outs["y"][ragged, 0] += 1.0
    with pytest.raises(AssertionError, match="expert 1"):
        kernel_stage.check("down", b.outs, b.ref, b.offsets, dims[3], kernel_stage.FP32_TOL)


def test_wgrad_of_the_empty_expert_must_be_zero():
    dims = (64, 32, 16, 8, 2)
    cfg = kernel_stage._clean(gemm_configs.heuristic("wgrad", torch.float32, 32, 32, 8, 128))
    b = kernel_stage.build("wgrad", dims, cfg, torch.float32, torch.device("cpu"))
    b.launch()
    kernel_stage.check("wgrad", b.outs, b.ref, b.offsets, dims[3], kernel_stage.FP32_TOL)
    b.outs["dw"][0, 0, 0] = 1e-3  # the empty expert's gradient, no longer zero
    with pytest.raises(AssertionError, match="empty expert 0"):
        kernel_stage.check("wgrad", b.outs, b.ref, b.offsets, dims[3], kernel_stage.FP32_TOL)


def test_compiled_facts_report_whatever_sm90_check_returns(monkeypatch):
    from unimoe_kernels.ops import sm90_check

    class Report(tuple):  # a report with a field sm90_check may grow, and its own problems()
        _fields = ("registers", "tma_bytes")

        def _asdict(self):
            return dict(zip(self._fields, self))

        def problems(self, small_mma=False):
            return ["made up"]

    monkeypatch.setattr(sm90_check, "compile_launch", lambda launch: Report((128, 4096)))
    case = kernel_stage.plan(("mixtral",), ("dgrad",), 0)[0]
    facts = kernel_stage.compiled_facts(case)
    assert facts["registers"] == 128 and facts["tma_bytes"] == 4096 and facts["problems"] == ["made up"]
    assert facts["describe"].startswith("dgrad")
    monkeypatch.setattr(sm90_check, "compile_launch", lambda launch: 1 / 0)
    assert "ZeroDivisionError" in kernel_stage.compiled_facts(case)["error"]


# ----------------------------------------------------------------------------------------------
# The tuner (gemm_configs.tune): at most 4 configs; only compile and resource errors are skipped
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """tune() with a made-up device and triton's do_bench calling the config once."""
    import triton.testing

    monkeypatch.setenv("UNIMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm_configs, "_device_name", lambda device: "made-up GPU")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    return lambda run: gemm_configs.tune("down", torch.bfloat16, 2048, 2048, 8, 4096, torch.device("cpu"), run)


def test_tune_skips_compile_errors_and_tries_at_most_four(tuner, tmp_path):
    from triton.runtime.errors import OutOfResources, PTXASError

    tried = []
    errors = [OutOfResources(300000, 232448, "shared memory"), PTXASError("ptxas fatal"),
              RuntimeError("PassManager::run failed")]

    def run(cfg):
        tried.append(cfg)
        if errors:
            raise errors.pop(0)
        return 1.0

    best = tuner(run)
    assert len(tried) == 4  # the heuristic and three candidates, though more fit in shared memory
    assert best == tried[3]  # the only one that ran
    assert len({str(c) for c in tried}) == 4
    table = json.loads((tmp_path / "tuned-made_up_GPU.json").read_text())["configs"]
    (entry,) = table["bf16|down|K=2048|N=2048|E=8"].values()
    assert entry["ms"] == 1.0 and math.isnan(entry["heuristic_ms"])  # the heuristic failed to compile


def test_tune_skips_a_front_end_compilation_error(tuner):
    from triton.compiler.errors import CompilationError

    tried = []

    def run(cfg):
        tried.append(cfg)
        if len(tried) == 1:
            raise CompilationError("def kernel(): ...", None, "made-up error")
        return 2.0

    assert tuner(run) == tried[1]


def test_tune_lets_a_cuda_fault_through(tuner, tmp_path):
    tried = []

    def run(cfg):
        tried.append(cfg)
        if len(tried) == 2:  # a sticky fault: every later candidate would fail the same way
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return 1.0

    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuner(run)
    assert len(tried) == 2 and not list(tmp_path.iterdir())  # nothing recorded for that key


# ----------------------------------------------------------------------------------------------
# Per-kernel profile
# ----------------------------------------------------------------------------------------------


def test_layer_profile_rows_add_up():
    start = time.monotonic()
    result = layer_profile.profile("mixtral", "tiny", calls=1)
    rows = result["rows"]
    assert rows and result["total_ms"] > 0 and time.monotonic() - start < 60
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-6
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    text = layer_profile.render(result, top=3)
    assert text[-1].split()[-1] == "total" and f"({len(rows) - 3} more)" in text[-2]
