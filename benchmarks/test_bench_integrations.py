"""A transformers MoE block (Mixtral's, Qwen3-MoE's) patched by patch_moe vs the same block unpatched.

Flow of one benchmark (config, size, LoRA or not, mode, provider):

    block = MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock of the config's H, F, E, k (random weights)
    oracle = the unpatched block in fp32 with merged weights W + s B A (LoRA), its y (and dx)
    provider's block on x [1, T, H]: check y (and dx) against the oracle, then time (harness.measure)

Providers, base (no LoRA):   hf_eager        transformers' own per-expert loop (the default)
                             hf_grouped_mm   transformers' experts_implementation="grouped_mm"
                             hf_unimoe       experts_implementation="unimoe": this package's kernels
                             patched         patch_moe(block): GroupedExperts on the same weights
          LoRA r=8 alpha=16: peft            PEFT target_parameters on the unpatched block (delta-W)
                             peft_unimoe     the same PEFT model with experts_implementation="unimoe":
                                             PEFT's factors through the fused LoRA path
                             patched         patch_moe(block, lora_rank=8) with PEFT's adapter loaded
Shapes come from benchmarks/configs.py ("mixtral", "qwen3-30b-a3b", and "peft-moe-lora" at its own
rank 16, alpha 32, LoRA providers only): tiny on CPU, full (marked gpu) on a GPU. TFLOP/s counts the
expert GEMMs (baselines.flops), as in test_layer.py.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch

from unimoe_kernels import baselines

from . import configs, harness
from .harness import DEVICE, DTYPE, Record

transformers = pytest.importorskip("transformers")

CONFIGS = ("mixtral", "qwen3-30b-a3b", "peft-moe-lora")
LORA = (0, 8)  # rank; 8 with alpha 16 is the Uni-MoE recipe
LORA_PROVIDERS = ("peft", "peft_unimoe", "patched")
PROVIDERS = {0: ("hf_eager", "hf_grouped_mm", "hf_unimoe", "patched")}
MODES = ("fwd", "fwd+bwd")


def _ranks(name):
    # The PEFT MoE-LoRA case is measured at the rank it is defined with, with LoRA only.
    return (configs.get(name, "full").r,) if name == "peft-moe-lora" else LORA


def _params():
    out = []
    cases = [(name, r) for name in CONFIGS for r in _ranks(name)]
    for size, (name, r), mode in itertools.product(("tiny", "full"), cases, MODES):
        for provider in PROVIDERS.get(r, LORA_PROVIDERS):
            marks = [pytest.mark.gpu] if size == "full" else []  # full sizes: GBs of weights, minutes on CPU
            out.append(pytest.param(size, name, r, mode, provider, marks=marks,
                                    id=f"{size}-{name}-r{r}-{mode}-{provider}"))
    return out


def _block(cfg, dtype):
    """The host model's MoE block for a benchmark config, weights drawn here (the classes leave them empty)."""
    if cfg.name == "mixtral":
        hf_cfg = transformers.MixtralConfig(hidden_size=cfg.H, intermediate_size=cfg.F, num_local_experts=cfg.E,
                                            num_experts_per_tok=cfg.k)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg)
    else:
        hf_cfg = transformers.Qwen3MoeConfig(hidden_size=cfg.H, moe_intermediate_size=cfg.F, num_experts=cfg.E,
                                             num_experts_per_tok=cfg.k, norm_topk_prob=True)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # Expert weights at 1/sqrt(fan_in) keep activations O(1); router weights at 1/sqrt(H)
            # give logits of spread ~1, so top-k margins are wide and bf16 rarely flips a choice.
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    block.config = hf_cfg
    return block.to(device=DEVICE, dtype=dtype).eval()


def _peft_block(block, r):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    pm = peft.get_peft_model(block, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh B is zero: a provider that dropped LoRA would pass the check
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) / r)
    return pm.eval()


class _Case:
    """The unpatched block, its LoRA adapter (PEFT-wrapped copy), inputs and the fp32 oracle."""

    def __init__(self, cfg, r, mode):
        self.cfg, self.r, self.bwd = cfg, r, mode == "fwd+bwd"
        self.block = _block(cfg, DTYPE)
        self.peft = _peft_block(copy.deepcopy(self.block), r) if r else None
        g = torch.Generator(device=DEVICE).manual_seed(2)
        self.xs = [torch.randn(1, cfg.T, cfg.H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(self.bwd)
                   for _ in range(harness.N_INPUTS)]
        self.grad_out = torch.randn(1, cfg.T, cfg.H, device=DEVICE, dtype=DTYPE, generator=g) if self.bwd else None
        oracle = _block(cfg, torch.float32)
        oracle.load_state_dict({k: v.float() for k, v in self.block.state_dict().items()})
        if r:  # merged weights: W + s B A, computed by PEFT's own merge on an fp32 copy
            merged = _peft_block(copy.deepcopy(oracle), r)
            merged.load_state_dict({k: v.float() for k, v in self.peft.state_dict().items()})
            oracle = merged.merge_and_unload()
        x = self.xs[0].detach().float().requires_grad_(self.bwd)
        self.y_ref = oracle(x).detach()
        self.dx_ref = None
        if self.bwd:
            oracle(x).backward(self.grad_out.float())
            self.dx_ref = x.grad


_CASE: dict = {}


def _case(cfg, size, r, mode) -> _Case:
    key = (cfg.name, size, r, mode)
    if key not in _CASE:
        _CASE.clear()  # one case alive at a time: full-size weights are GBs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _CASE[key] = _Case(cfg, r, mode)
    return _CASE[key]


def _provider(provider, case):
    """-> the module to call on x [1, T, H], or a string saying why it cannot run here."""
    from unimoe_kernels.integrations.peft import load_peft_adapter
    from unimoe_kernels.integrations.transformers import EXPERTS_IMPLEMENTATION, patch_moe

    if provider == "hf_eager":
        return case.block
    if provider == "hf_grouped_mm":
        why = baselines.grouped_mm_supported(DEVICE, DTYPE)
        if why:
            return why
        block = copy.deepcopy(case.block)
        block.config._experts_implementation = "grouped_mm"
        return block
    if provider == "peft":
        return case.peft
    if provider in ("hf_unimoe", "peft_unimoe"):
        # The block's config is shared by its experts module (copied along with it).
        block = copy.deepcopy(case.peft if provider == "peft_unimoe" else case.block)
        target = block.base_model.model if provider == "peft_unimoe" else block
        target.config._experts_implementation = EXPERTS_IMPLEMENTATION
        return block
    block = copy.deepcopy(case.block)
    if case.r:
        peft = pytest.importorskip("peft")
        load_peft_adapter(block, peft.get_peft_model_state_dict(case.peft), config=case.peft.peft_config["default"])
        for n, p in block.named_parameters():  # PEFT trains only LoRA: the same work here (router frozen too)
            p.requires_grad_("lora_" in n)
    else:
        assert patch_moe(block) == 1
    return block


@pytest.mark.parametrize("size, name, r, mode, provider", _params())
def test_hf_block(benchmark, size, name, r, mode, provider):
    base = configs.get(name, size)
    cfg = base if not r else replace(base, r=r, lora_alpha=2.0 * r)
    benchmark.group = f"hf_block {name} r{r} {size} {mode}"
    case = _case(cfg, size, r, mode)
    fn = _provider(provider, case)
    if isinstance(fn, str):
        harness.record_skip("hf_block", cfg, size, mode, provider, fn)
    params = [p for p in fn.parameters() if p.requires_grad]
    setup, call = harness.layer_callables(fn, params, case.xs, case.grad_out, case.bwd)

    setup()
    try:
        y = harness.first_call(call, (case.xs[0],))
    except NotImplementedError as err:
        harness.record_skip("hf_block", cfg, size, mode, provider, str(err))
    if y is None:
        harness.record_skip("hf_block", cfg, size, mode, provider, "CUDA out of memory at this size")
    harness.check_close(f"{provider} y", y[0], case.y_ref[0], DTYPE)
    if case.bwd:
        harness.check_close(f"{provider} dx", case.xs[0].grad[0], case.dx_ref[0], DTYPE)

    args_for = lambda i: (case.xs[i % len(case.xs)],)  # noqa: E731 - rotation of the input sets
    ms = harness.measure(benchmark, call, args_for, setup)
    base_trainable = not r  # LoRA: base frozen in both providers
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, "swiglu", r, case.bwd, base_trainable=base_trainable)
    rec = Record("hf_block", cfg.name + (f"-lora{r}" if r else ""), size, mode, provider, ms=ms, shape=cfg.as_dict(),
                 peak_mem_mb=harness.peak_memory_mb(call, args_for(0), setup) if ms else None)
    harness.record(benchmark, rec, flop_count=flop_count.total)


def test_peft_experts_lora_script():
    """benchmarks/peft_experts_lora.py at the tiny PEFT MoE-LoRA shape: the three providers agree
    (checked inside measure) and the fused path keeps less memory than PEFT's W + s B A paths."""
    from . import peft_experts_lora

    pytest.importorskip("peft")
    results = {r.provider: r for r in peft_experts_lora.measure("tiny", rounds=1, device="cpu")}
    assert list(results) == list(peft_experts_lora.PROVIDERS)
    ours = results["peft+unimoe"]
    for name in ("peft+eager", "peft+grouped_mm"):
        theirs = results[name]
        assert ours.saved_mib < theirs.saved_mib and ours.peak_mib < theirs.peak_mib, (ours, theirs)
    assert "peft+unimoe" in peft_experts_lora.format_table(list(results.values()), "t")
