"""Functional ops with autograd, for framework authors who compose their own MoE layer.

topk_gating -> build_routing -> permute -> grouped_mlp -> unpermute (grouped_mlp_gather fuses the
permute into the GEMM's loads, grouped_mlp_combine the unpermute too); see each module's docstring.
Expert parallel: topk_gating -> build_routing -> dispatch -> grouped_mlp -> combine (ops/dispatch.py).
"""

from .dispatch import combine, dispatch
from .gating import RouterStats, router_losses, topk_gating
from .grouped_gemm import grouped_mlp, grouped_mlp_combine, grouped_mlp_gather
from .permute import permute, unpermute
from .routing import build_routing

__all__ = [
    "topk_gating", "router_losses", "RouterStats", "build_routing", "permute", "unpermute", "grouped_mlp",
    "grouped_mlp_gather", "grouped_mlp_combine", "dispatch", "combine",
]
