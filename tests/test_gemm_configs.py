"""Kernel config selection (ops/gemm_configs.py): shipped tables, nearest bucket, heuristic fallback,
tuning on request with its on-disk cache. No kernel runs here: launches are stand-ins."""

from __future__ import annotations

import json

import pytest
import torch

from unimoe_kernels.ops import gemm_configs as gc
from unimoe_kernels.ops.sm90_check import H100, NAMED_SHAPES, layer_launches

GPU = torch.device("cuda", 0)


@pytest.fixture
def on_gpu(monkeypatch):
    """config() as it runs on a GPU with this name (no interpreter, no CUDA call)."""
    def set_(name=H100):
        monkeypatch.setattr("unimoe_kernels.backend.interpreting", lambda: False)
        monkeypatch.setattr(gc, "_device_name", lambda device: name)
        monkeypatch.delenv("UNIMOE_AUTOTUNE", raising=False)
    return set_


def test_nearest_bucket_in_log_scale():
    table = {"k": {"4": {"BLOCK_M": 64}, "2048": {"BLOCK_M": 128}}}
    assert gc.lookup(table, "k", 8)["BLOCK_M"] == 64
    assert gc.lookup(table, "k", 512)["BLOCK_M"] == 128  # 2 octaves from 2048, 7 from 4
    assert gc.lookup(table, "k", 256) is None  # 3 octaves from the nearest: the heuristic decides
    assert gc.lookup(table, "other", 8) is None


def test_key_and_bucket():
    assert gc.table_key(torch.bfloat16, "down", 768, 2048, 128) == "bf16|down|K=768|N=2048|E=128"
    assert gc.table_key(torch.bfloat16, "down", 768, 2048, 128, rank=16).endswith("|lora")
    assert gc.rows_bucket(262144, 128) == 2048 and gc.rows_bucket(100, 128) == 1 and gc.rows_bucket(0, 8) == 1
    assert gc.device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


@pytest.mark.parametrize("device_name", [H100, "NVIDIA H200"])
def test_shipped_tables_cover_every_named_launch(device_name, on_gpu, monkeypatch):
    """Each launch of each named shape finds its own entry in the GPU's table, so a change of the
    heuristic cannot silently change what ships (the entries are what sm90_check compiled)."""
    on_gpu(device_name)
    path = gc._TABLE_DIR / gc.device_file_name(device_name)
    table = json.loads(path.read_text())["configs"]
    for shape in NAMED_SHAPES.values():
        for la in layer_launches(shape, device_name=device_name):
            role, dtype, k, nout, e, rows, rank = la.call
            entry = table[gc.table_key(dtype, role, k, nout, e, rank)][str(gc.rows_bucket(rows, e))]
            assert gc.kernel_meta(entry).items() <= la.meta.items(), (role, shape)


def test_unknown_gpu_falls_back_to_the_heuristic(on_gpu):
    on_gpu("Some Future GPU")
    got = gc.config("down", torch.bfloat16, 768, 2048, 128, 262144, GPU)
    assert got == gc.heuristic("down", torch.bfloat16, 768, 2048, 128, 262144)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [8, 4096, 262144])
@pytest.mark.parametrize("rank", [0, 16])
def test_heuristic_fits_shared_memory(dtype, rows, rank):
    for role in gc.ROLES_MM + gc.ROLES_XTY:
        cfg = gc.heuristic(role, dtype, 2048, 768, 128, rows, rank)
        assert gc.smem_estimate(role, dtype, cfg, rank) <= gc.SMEM_LIMIT_SM90, (role, cfg)
    for role in gc.ROLES_MM:
        for cfg in gc.candidates(role, dtype):
            assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= cfg.keys()


def test_tuning_on_request_times_candidates_once_and_caches_on_disk(on_gpu, monkeypatch, tmp_path):
    import triton.testing

    on_gpu()
    monkeypatch.setenv("UNIMOE_AUTOTUNE", "1")
    monkeypatch.setenv("UNIMOE_CACHE_DIR", str(tmp_path))
    ran = []

    def fake_bench(fn, **kw):
        fn()
        cfg = ran[-1]
        # Stand-in timing: 64-row tiles with BLOCK_N 128 and 4 stages "win".
        return 1.0 + (cfg["BLOCK_M"] != 64) + (cfg["BLOCK_N"] != 128) + (cfg["num_stages"] != 4)

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    args = ("down", torch.bfloat16, 768, 2048, 128, 262144, GPU)
    got = gc.config(*args, run=ran.append)
    assert (got["BLOCK_M"], got["BLOCK_N"], got["num_stages"]) == (64, 128, 4)
    n_timed = len(ran)
    # The heuristic first, then candidates in their order, at most 4 in all.
    assert ran[0] == gc.heuristic(*args[:-1]) and 1 < n_timed <= 4
    data = json.loads(gc.cache_path(H100).read_text())
    entry = data["configs"]["bf16|down|K=768|N=2048|E=128"]["2048"]
    assert entry["ms"] == 1.0 and entry["heuristic_ms"] > 1.0  # the heuristic's own time beside it
    again = gc.config(*args, run=ran.append)  # cached: nothing is timed again
    assert len(ran) == n_timed and gc.kernel_meta(again) == gc.kernel_meta(got)
    monkeypatch.delenv("UNIMOE_AUTOTUNE")  # without the switch the shipped table is used, not the cache
    assert gc.config(*args) == gc.lookup(gc._load_table(str(gc._TABLE_DIR / gc.device_file_name(H100))),
                                         "bf16|down|K=768|N=2048|E=128", 2048)
