"""Functional ops with autograd, for framework authors who compose their own MoE layer: the one door
to the kernels (the modules and integrations of this package use nothing else).

topk_gating -> build_routing -> permute -> grouped_mlp -> unpermute (grouped_mlp_gather fuses the
permute into the GEMM's loads, grouped_mlp_combine the unpermute too); see each module's docstring.
Beside them: router_logits (the router GEMM, fp32 out), load_balancing_loss / z_loss / router_losses
(gating.py), expert_capacity / apply_capacity (routing.py), lora_rank_gates (lora_gates.py).
Expert parallel: topk_gating -> build_routing -> dispatch -> grouped_mlp -> combine (ops/dispatch.py).
Every op's contract and the kernel designs: docs/architecture.md.
"""

from .dispatch import combine, dispatch
from .gating import RouterStats, load_balancing_loss, router_logits, router_losses, topk_gating, z_loss
from .grouped_gemm import grouped_mlp, grouped_mlp_combine, grouped_mlp_gather
from .lora_gates import lora_rank_gates
from .permute import permute, unpermute
from .routing import apply_capacity, build_routing, expert_capacity

__all__ = [
    "router_logits", "topk_gating", "router_losses", "RouterStats", "load_balancing_loss", "z_loss", "build_routing",
    "expert_capacity", "apply_capacity", "permute", "unpermute", "grouped_mlp", "grouped_mlp_gather",
    "grouped_mlp_combine", "lora_rank_gates", "dispatch", "combine",
]
