"""The reference Uni-MoE's layer stack: training step time with this package's SparseMoE layers vs
the naive loop over experts of the Uni-MoE v1 code, same weights: the end-to-end training throughput the package claims.

    residual stack of SparseMoE layers (LoRA r=8 alpha 16 on every expert, frozen base, top-2 of 8)
    jobs.demo.measure_layer_stack: checks ours against the naive loop, then times fwd+bwd of both,
    interleaved -> tokens/s per provider -> Records in the benchmark summary

Shapes are jobs.demo.STACK_SHAPES: "micro" on CPU (a smoke test), "uni-moe-8e" (T=8192 H=4096
F=11008 E=8 k=2, bf16) on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from unimoe_kernels import baselines
from unimoe_kernels.jobs.demo import STACK_SHAPES, measure_layer_stack

from . import harness
from .harness import Record

ROUNDS = {"micro": 2, "uni-moe-8e": 5}  # interleaved timing rounds; the CPU shape only smoke-tests


@pytest.mark.parametrize("shape", ["micro", pytest.param("uni-moe-8e", marks=pytest.mark.gpu)])
def test_layer_stack_training(benchmark, shape):
    device = torch.device("cuda" if harness.HAS_CUDA else "cpu")
    result = benchmark.pedantic(measure_layer_stack, args=(shape, device, ROUNDS[shape]), rounds=1, iterations=1)
    c = STACK_SHAPES[shape]
    assert result["max_rel_err"] <= (5e-2 if device.type == "cuda" else 1e-4)
    flop = c["layers"] * baselines.flops(c["tokens"], c["top_k"], c["hidden"], c["ffn"], "swiglu", c["lora_rank"],
                                         backward=True, base_trainable=False).total
    size = "full" if device.type == "cuda" else "tiny"
    for provider in ("naive_loop", "ours"):  # ours last: it carries the ratio to the naive loop
        rate = result["train_tokens_per_s"]["naive" if provider == "naive_loop" else "fused"]
        rec = Record("model_stack", shape, size, "fwd+bwd", provider, ms=1e3 * c["tokens"] / rate, shape=dict(c))
        harness.record(benchmark, rec, flop_count=flop)
