"""Named MoE shapes (the models the package is measured on), each in a full GPU size and a tiny CPU size.

The tiny sizes keep each model's E / k structure (and LoRA rank) and scale T, H and F down so the
whole benchmarks/ directory runs in seconds on 2 CPU cores. Two changes of structure, said here
once: qwen3-next's E=512 becomes 32 on CPU (a 512-iteration Python loop per call in the naive
baseline is the only cost that does not shrink with T and H); olmoe has no published T, so
the full size uses T=16384 (an assumption of this file, half of the Qwen3 shapes' T), and so does
gpt-oss-20b.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class ShapeConfig:
    name: str
    T: int  # tokens per call (batch x sequence, flattened)
    H: int  # hidden size
    F: int  # expert FFN size (per expert; gate_up is 2F for SwiGLU)
    E: int  # experts
    k: int  # experts per token
    r: int = 0  # LoRA rank on every expert projection (0: no LoRA, base trainable)
    lora_alpha: Optional[float] = None  # None: alpha = r (scale 1)
    activation: str = "swiglu"
    note: str = ""

    @property
    def lora(self) -> bool:
        return self.r > 0

    def as_dict(self) -> dict:
        return asdict(self)


FULL = {
    c.name: c
    for c in (
        # Uni-MoE 8e: LoRA r=8 alpha=16 on every expert, base frozen.
        ShapeConfig("uni-moe-8e", T=8192, H=4096, F=11008, E=8, k=2, r=8, lora_alpha=16.0),
        ShapeConfig("mixtral", T=16384, H=4096, F=14336, E=8, k=2),
        ShapeConfig("qwen3-30b-a3b", T=32768, H=2048, F=768, E=128, k=8),
        ShapeConfig("olmoe", T=16384, H=2048, F=1024, E=64, k=8, note="T not published; 16384 chosen"),
        ShapeConfig("qwen3-next", T=32768, H=2048, F=512, E=512, k=10),
        # PEFT's published MoE-LoRA case (fwd+bwd 4.97 ms / 2.02 GB there, best 2.56 ms / 1.30 GB).
        ShapeConfig("peft-moe-lora", T=4096, H=2048, F=768, E=128, k=8, r=16),
        # gpt-oss-20b's experts (H = F = 2880, 32 experts, top-4) with its clamped SwiGLU on interleaved
        # gate/up columns; its biases are not modelled here (SparseMoE's experts have none; the
        # compile check, ops/sm90_check.py, covers the bias epilogues at this shape).
        ShapeConfig("gpt-oss-20b", T=16384, H=2880, F=2880, E=32, k=4,
                    activation="swiglu_clamp(alpha=1.702,beta=1.0,limit=7.0):interleaved",
                    note="T not published; 16384 chosen"),
    )
}

# Tiny versions: T 128..256, H 64, F keeping roughly the model's F/H ratio (at least 16), same E
# and k except qwen3-next (E 512 -> 32, see the module docstring). All of H, F, r stay multiples of
# 4 so fp32 rows are 16-byte aligned and torch._grouped_mm can run on CPU too.
TINY = {
    "uni-moe-8e": replace(FULL["uni-moe-8e"], T=128, H=64, F=160),
    "mixtral": replace(FULL["mixtral"], T=256, H=64, F=224),
    "qwen3-30b-a3b": replace(FULL["qwen3-30b-a3b"], T=128, H=64, F=24),
    "olmoe": replace(FULL["olmoe"], T=128, H=64, F=32, note=""),
    "qwen3-next": replace(FULL["qwen3-next"], T=128, H=64, F=16, E=32, note="E shrunk 512 -> 32 on CPU"),
    "peft-moe-lora": replace(FULL["peft-moe-lora"], T=128, H=64, F=24),
    "gpt-oss-20b": replace(FULL["gpt-oss-20b"], T=128, H=64, F=64, note=""),
}

SIZES = {"tiny": TINY, "full": FULL}
NAMES = tuple(FULL)


# Decode sizes: a few tokens per step, as in generation, at the two model shapes whose experts are
# the smallest (qwen3-30b-a3b: 128 experts of 9 MiB in bf16) and the largest (mixtral: 8 of 336 MiB)
# of the list. T=1 is one sequence's step; 8, 64 and 256 are batched decoding of that many
# sequences. Under uniform routing 128 * (120/128)^T qwen3-30b-a3b experts stay idle (76 at T=8, 2
# at T=64, none at 256), so the sizes span 8 touched experts to all of them; of mixtral's 8, T=1
# touches 2, T=8 about 7 (8 * (6/8)^8 = 0.8 idle) and T >= 64 all.
DECODE_T = (1, 8, 64, 256)
DECODE_BASES = ("qwen3-30b-a3b", "mixtral")


def decode(name: str, T: int, size: str) -> ShapeConfig:
    """Config `name` at T tokens per call, named "<name>-T<T>" (the tiny size keeps the CPU H, F)."""
    return replace(get(name, size), name=f"{name}-T{T}", T=T, note="")


DECODE_NAMES = tuple(f"{name}-T{t}" for name in DECODE_BASES for t in DECODE_T)

# The host-overhead benchmark: SparseMoE forward eager vs replayed from a CUDA graph at the shape
# where the layer's fixed cost shows most (the peft-moe-lora base: T=4096 qwen3-30b-a3b experts,
# 0.31 TFLOP, 0.39 ms at the FLOP floor). GPU only: CUDA graphs need CUDA.
HOST_OVERHEAD = replace(FULL["qwen3-30b-a3b"], name="qwen3-30b-a3b-T4096", T=4096)


def get(name: str, size: str) -> ShapeConfig:
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    if name not in FULL:
        raise ValueError(f"config name must be one of {NAMES}, got {name!r}")
    return SIZES[size][name]


# Numbers other systems' authors claim for the full-size shapes (H100 SXM, bf16; not
# measured here), printed beside the full-size layer results so a run shows where it stands.
ANCHOR_CLAIMS = {
    ("qwen3-30b-a3b", "fwd"): "claimed: torch._grouped_mm 242 TFLOP/s (10.2 ms); a Triton fused MoE 501 TFLOP/s",
    ("qwen3-30b-a3b", "fwd+bwd"): "claimed: a Triton fused MoE 413 TFLOP/s",
    ("qwen3-next", "fwd"): "claimed: torch._grouped_mm 181 TFLOP/s",
    ("peft-moe-lora", "fwd+bwd"): "claimed: PEFT 4.97 ms / 2.02 GB; best known 2.56 ms / 1.30 GB",
}
