"""unimoe_kernels: fused Mixture-of-Experts kernels (gating, permutation, grouped LoRA-expert GEMMs)
with drop-in torch.nn modules. CUDA tensors run Triton kernels, CPU tensors the torch path of
reference.py; both have the same semantics. Nothing here touches the GPU at import time.
The layers, data flow, op contracts and kernel designs: docs/architecture.md.
"""

from . import amp, ops, reference
from .modules import GroupedExperts, SparseMoE, TopKRouter
from .parallel import gather_state_dict, shard_state_dict
from .types import GatingOutput, MoEAux, RoutingPlan

__version__ = "0.1.0"

__all__ = [
    "SparseMoE", "TopKRouter", "GroupedExperts", "MoEAux", "GatingOutput", "RoutingPlan",
    "amp", "ops", "reference", "__version__", "shard_state_dict", "gather_state_dict",
]
