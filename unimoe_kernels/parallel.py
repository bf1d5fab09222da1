"""Checkpoints across expert-parallel layouts: full state dict <-> per-rank shards.

With an ep_group of P ranks, rank r's SparseMoE holds experts r*E/P .. (r+1)*E/P - 1, so every
`experts.<name>` tensor of its state dict is the dim-0 slice [r*E/P, (r+1)*E/P) of the full one;
everything else (router.weight, router.expert_bias, ...) is replicated. The helpers:

    full --shard_state_dict(full, r, P)--> rank r's state dict      (pure, no communication)
    P per-rank dicts --merge_state_dicts--> full                    (pure: offline resharding)
    live model on P ranks --gather_state_dict(model)--> full        (collective over each layer's ep_group)

so a checkpoint saved with P ranks loads with P' ranks (merge or gather, then shard for P') or in one
process (the full dict). Keys are matched by their ending `experts.<name>` (name one of
EXPERT_PARAMS), so a SparseMoE nested in a model ("model.layers.3.mlp.experts.gate_up_proj") is
handled; `prefix` restricts the match to keys under one module.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

# Parameters of GroupedExperts that are split over the expert-parallel group (dim 0 = expert).
EXPERT_PARAMS = (
    "gate_up_proj", "down_proj", "lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down",
    "lora_gate_gate_up", "lora_gate_down",  # the optional LoRA rank gates: [E, r, H], per expert
)


def is_expert_key(key: str, prefix: Optional[str] = None) -> bool:
    """Whether `key` names an expert-sharded tensor: ends with `experts.<name>` under `prefix`."""
    if prefix:
        if not key.startswith(prefix):
            return False
        key = key[len(prefix):]
    return any(key == f"experts.{n}" or key.endswith(f".experts.{n}") for n in EXPERT_PARAMS)


def _new_like(state_dict: Mapping) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict = OrderedDict()
    # nn.Module.state_dict() carries per-module versions in _metadata; load_state_dict reads them.
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _check_world(world_size, rank=None) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def shard_state_dict(
    full_state_dict: Mapping[str, torch.Tensor], rank: int, world_size: int, *, prefix: Optional[str] = None
) -> "OrderedDict[str, torch.Tensor]":
    """Rank `rank`'s state dict for an expert-parallel group of `world_size` from a full one.

    Expert tensors (is_expert_key) are cut to their contiguous block of E/world_size experts and
    cloned, so saving the shard writes only that block; other entries are shared, not copied.
    ValueError names the key whose expert count is not divisible by world_size.
    """
    _check_world(world_size, rank)
    out = _new_like(full_state_dict)
    for key, value in full_state_dict.items():
        if is_expert_key(key, prefix) and isinstance(value, torch.Tensor):
            if value.dim() < 1 or value.shape[0] % world_size:
                raise ValueError(f"{key}: {tuple(value.shape)} has {value.shape[0] if value.dim() else 0} experts, "
                                 f"not divisible by world_size={world_size}")
            per = value.shape[0] // world_size
            value = value[rank * per:(rank + 1) * per].clone()
        out[key] = value
    return out


def merge_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]], *, prefix: Optional[str] = None
) -> "OrderedDict[str, torch.Tensor]":
    """The full state dict from the per-rank dicts of ranks 0..P-1 (in that order), offline.

    Expert tensors are concatenated along the expert dim; replicated entries come from rank 0.
    """
    if not shards:
        raise ValueError("shards must hold the state dicts of ranks 0..P-1, got none")
    first = shards[0]
    for r, shard in enumerate(shards[1:], 1):
        if shard.keys() != first.keys():
            raise ValueError(f"shards[{r}] has different keys from shards[0]")
    out = _new_like(first)
    for key, value in first.items():
        if is_expert_key(key, prefix) and isinstance(value, torch.Tensor):
            value = torch.cat([s[key] for s in shards], dim=0)
        out[key] = value
    return out


def _layout(t: Optional[torch.Tensor]) -> Optional[str]:
    """'4x8x16:float32' for a tensor, None for a missing entry: what the shards must agree on."""
    if t is None:
        return None
    return "x".join(str(d) for d in t.shape) + ":" + str(t.dtype).replace("torch.", "")


def gather_state_dict(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The full (single-process) state dict of `module`, on every rank.

    `module` is a SparseMoE or any model containing SparseMoE layers; for each layer with an
    ep_group, its experts.* tensors are all-gathered over that group (rank order = expert order).
    A collective: every rank of every ep_group must call it; shards whose shapes or dtypes differ
    between ranks are the same ValueError on every rank, naming the tensor. Every rank receives
    the whole dict (it costs the full expert memory per rank, transiently); save it from one rank,
    or shard it again with shard_state_dict for another group size.
    """
    from .modules import SparseMoE

    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module must be an nn.Module (a SparseMoE or a model holding some), got {type(module).__name__}")
    state = module.state_dict()
    for name, sub in module.named_modules():
        if not isinstance(sub, SparseMoE) or sub.ep_group is None:
            continue
        import torch.distributed as dist

        from .ops.dispatch import check_group_config

        base = f"{name}.experts." if name else "experts."
        # Shards of different shapes or dtypes would make the all_gathers below exchange different
        # byte counts (gloo aborts the process): compare them first, the same error on every rank.
        layout = {pname: _layout(state.get(base + pname)) for pname in EXPERT_PARAMS}
        check_group_config(sub.ep_group, layout, device=sub.router.weight.device,
                           what=f"gather_state_dict({name or 'module'!r})")
        for pname in EXPERT_PARAMS:
            key = base + pname
            if key not in state:
                continue
            local = state[key].contiguous()
            parts = [torch.empty_like(local) for _ in range(sub.ep_size)]
            dist.all_gather(parts, local, group=sub.ep_group)
            state[key] = torch.cat(parts, dim=0)
    return state


__all__ = ["shard_state_dict", "gather_state_dict", "merge_state_dicts", "is_expert_key", "EXPERT_PARAMS"]
