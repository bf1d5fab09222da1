"""PEFT target_parameters LoRA on MoE experts: PEFT's own path vs experts_implementation="unimoe".

    python -m benchmarks.peft_experts_lora [--size tiny|full] [--tokens T --hidden H --ffn F] [--rounds N]

One Qwen3-MoE block at the PEFT MoE-LoRA shape (benchmarks/configs.py "peft-moe-lora": E=128, k=8,
r=16; tiny on CPU in fp32, full on a GPU in bf16), wrapped by PEFT's ParamWrapper on gate_up_proj
and down_proj, run three ways on copies of one model:

    peft+eager       transformers' per-expert loop on W + s B A (PEFT folds the delta into the weight)
    peft+grouped_mm  transformers' torch._grouped_mm on W + s B A (the default experts implementation)
    peft+unimoe      this package's kernels on W with PEFT's A, B, s: LoRA through the rank r

Flow: check that all three give the same y, dx and LoRA gradients, then time forward+backward
(median of --rounds, providers interleaved) and measure per provider: the peak of the tensor bytes
created during one forward+backward (parameters excluded; CUDA: the allocator's peak, CPU: every
storage an op creates counted until it is freed, _TensorBytes) and the bytes saved for backward
other than parameters. "N.NNx faster" = PEFT's time / this time, the package's convention.
"""

from __future__ import annotations

import argparse
import copy
import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from unimoe_kernels import timing

PROVIDERS = {"peft+eager": "eager", "peft+grouped_mm": "grouped_mm", "peft+unimoe": "unimoe"}


@dataclass
class Result:
    provider: str
    ms: float
    peak_mib: float
    saved_mib: float


class _TensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while active, each counted until it is freed, and the
    peak of that sum: the CPU's stand-in for CUDA's max_memory_allocated (torch keeps no CPU
    allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict = {}

    def _free(self, key, nbytes):
        self.live -= nbytes
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._alive:
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    self._alive[key] = weakref.finalize(storage, self._free, key, nbytes)
        return out


def _block(cfg, dtype, device):
    import transformers

    hf_cfg = transformers.Qwen3MoeConfig(hidden_size=cfg.H, moe_intermediate_size=cfg.F, num_experts=cfg.E,
                                         num_experts_per_tok=cfg.k, norm_topk_prob=True)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            # 1/sqrt(fan_in): activations O(1), router logits of spread ~1 (clear top-k margins).
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    block.config = hf_cfg  # the block's own config object, shared with its experts module
    return block.to(device=device, dtype=dtype)


def _peft_models(cfg, dtype, device):
    import peft

    import unimoe_kernels.integrations.transformers  # noqa: F401  (registers "unimoe")

    lora = peft.LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=[],
                           target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    pm = peft.get_peft_model(_block(cfg, dtype, device), lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh B is zero: a provider dropping the adapter would go unnoticed
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) / cfg.r)
    models = {}
    for name, impl in PROVIDERS.items():
        m = copy.deepcopy(pm).train()
        m.base_model.model.config._experts_implementation = impl
        models[name] = m
    return models


def _step(m, x, dy):
    def run():
        for p in m.parameters():
            p.grad = None
        x.grad = None
        y = m(x)
        y.backward(dy)
        return y
    return run


def _peak_bytes(run, device) -> int:
    if device.type == "cuda":
        timing.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        timing.sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _TensorBytes() as counter:
        run()
    return counter.peak


def _saved_bytes(run, params) -> int:
    """Bytes of the distinct storages saved for backward, parameters excluded."""
    resident = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


def measure(size: str = "tiny", rounds: int = 9, device=None, shape=None) -> list[Result]:
    """Check the three providers against each other, then time and measure them; PEFT's own paths first."""
    from . import configs

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = shape or configs.get("peft-moe-lora", size)
    models = _peft_models(cfg, dtype, device)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(1, cfg.T, cfg.H, device=device, dtype=dtype, generator=g, requires_grad=True)
    dy = torch.randn(1, cfg.T, cfg.H, device=device, dtype=dtype, generator=g)
    runs = {name: _step(m, x, dy) for name, m in models.items()}

    outs = {}
    for name, run in runs.items():
        y = run()
        lora = [p.grad.float() for n, p in models[name].named_parameters() if "lora_" in n]
        outs[name] = [y.float(), x.grad.float(), *lora]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, got in outs.items():
        for a, b in zip(got, outs["peft+eager"]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                       msg=lambda m, name=name: f"{name} vs peft+eager: {m}")

    # No warm-up round: the check above ran every provider once. Interleaved rounds, so machine
    # noise hits every provider alike; wall time synchronized around each call.
    times = timing.time_interleaved(runs, rounds, warmup=0, device=device, clock="wall")
    return [Result(name, times[name].median, _peak_bytes(run, device) / 2**20,
                   _saved_bytes(run, list(models[name].parameters())) / 2**20) for name, run in runs.items()]


def format_table(results: list[Result], title: str) -> str:
    base = results[0]
    lines = [title, "N.NNx faster = peft+eager's median time / this provider's (above 1: faster)",
             f"{'provider':<16} {'fwd+bwd ms':>10} {'faster':>8} {'peak MiB':>9} {'saved MiB':>10}"]
    for r in results:
        lines.append(f"{r.provider:<16} {r.ms:>10.2f} {base.ms / r.ms:>7.2f}x {r.peak_mib:>9.2f} {r.saved_mib:>10.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from . import configs

    p = argparse.ArgumentParser(prog="python -m benchmarks.peft_experts_lora", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "full"), default="full" if torch.cuda.is_available() else "tiny",
                   help="the peft-moe-lora shape's size (full: the GPU size)")
    p.add_argument("--tokens", type=int, default=None, help="override T of the shape (None: the shape's)")
    p.add_argument("--hidden", type=int, default=None, help="override H of the shape (None: the shape's)")
    p.add_argument("--ffn", type=int, default=None, help="override F of the shape (None: the shape's)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds, each runs every provider once")
    args = p.parse_args(argv)
    cfg = configs.get("peft-moe-lora", args.size)
    overrides = {"T": args.tokens, "H": args.hidden, "F": args.ffn}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = measure(args.size, args.rounds, shape=cfg)
    print(format_table(results, f"PEFT target_parameters LoRA, Qwen3-MoE block T={cfg.T} H={cfg.H} F={cfg.F} "
                                f"E={cfg.E} k={cfg.k} r={cfg.r} on {device}, {torch.get_num_threads()} threads"))


if __name__ == "__main__":
    main()
